"""One board's build: MCU boards get the checks and the sources (checks.py, codegen.py); Linux
boards a budget check, a LiteRT run and, for Coral, the Edge TPU path (converters/edgetpu.py).
Each writes firmware.json with the numbers, also when a check fails."""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.boards import Board
from tierlite.converters.firmware.checks import DoesNotFit, MicroCheck, NotEdgeTPUReady, check_fit
from tierlite.converters.firmware.codegen import write_sources
from tierlite.converters.firmware.frames import frame_to_input, load_frames
from tierlite.converters.firmware.model import EndModel


def _write_report(report: dict[str, Any], out: Path | None) -> dict[str, Any]:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "firmware.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _base_report(model: EndModel, board: Board, src: str | Path) -> dict[str, Any]:
    return {"board": board.name, "board_title": board.title, "kind": board.kind, "runtime": board.runtime,
            "source": str(src), "model": model.path.name, "model_name": model.name,
            "model_version": model.version, "model_bytes": len(model.data)}


def firmware_for_mcu(check: MicroCheck, board: Board, out: Path | None, node_id: str | None = None,
                     prefix: str = "tierlite", src: str | Path = "") -> dict[str, Any]:
    """Fit, parity, latency, then the sources. DoesNotFit is raised after firmware.json is written."""
    model = check.model
    fit = check_fit(board, len(model.data), check.arena, model.path.name)
    report = _base_report(model, board, src or model.path)
    report.update(arena_bytes=check.arena, ops=check.graph.ops, fit=asdict(fit),
                  tflm_latency_ms_host=round(check.latency_ms, 3))
    if not fit.fits:
        raise DoesNotFit(f"{model.path.name} does not fit {board.name}: " + "; ".join(fit.problems),
                         _write_report(report, out))
    report["parity"] = asdict(check.parity)
    if out is not None:
        written = write_sources(out, model, board, check.graph, check.arena, fit, node_id or board.name, prefix)
        report["files"] = [p.name for p in written] + ["firmware.json"]
    return _write_report(report, out)


def firmware_for_linux(model: EndModel, board: Board, out: Path | None, src: str | Path = "") -> dict[str, Any]:
    """Linux nodes run the bundle with `tierlite device --board`: check the budget, that LiteRT loads
    the model here, and for Edge TPU boards readiness (+ compile when edgetpu_compiler is present)."""
    from tierlite.converters.edgetpu import (add_to_bundle, compile_edgetpu, compiler_path, edgetpu_check,
                                             static_batch)
    from tierlite.runtimes import open_runtime

    fit = check_fit(board, len(model.data), None, model.path.name)
    report = _base_report(model, board, src or model.path)
    report["fit"] = asdict(fit)
    if not fit.fits:
        raise DoesNotFit(f"{model.path.name} does not fit {board.name}: " + "; ".join(fit.problems),
                         _write_report(report, out))
    rt = open_runtime(model.path, "litert", {"threads": min(board.threads, os.cpu_count() or 1)})
    frames = load_frames(model, None, 1)
    x = frame_to_input(frames[0], model.input) if model.input.dtype in ("int8", "uint8") else \
        frames[0].reshape(model.input.shape).astype(np.float32)
    rt.run([x])
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        rt.run([x])
        times.append(time.perf_counter() - t0)
    report["litert_latency_ms_host"] = round(statistics.median(times) * 1000, 3)
    if board.runtime == "edgetpu":
        data, fixed = static_batch(model.data)
        etpu = edgetpu_check(data, model.path.name)
        if fixed:
            etpu.notes.append(f"dynamic batch dimension fixed to 1 for the Edge TPU ({fixed} tensors)")
        if etpu.ready:
            if compiler_path() is None:
                etpu.message = ("edgetpu_compiler is not on PATH, nothing compiled: install edgetpu-compiler "
                                "(x86-64 Debian/Ubuntu) and re-run to add the compiled model to the bundle "
                                "(until then the node runs the end segment on its CPU)")
            else:
                dest = model.bundle_root or out or (Path(src).parent if src else model.path.parent)
                compiled, etpu.compiler_log = compile_edgetpu(data, model.path.stem, Path(dest))
                etpu.compiled = str(compiled)
                if model.bundle_root is not None:
                    add_to_bundle(model.bundle_root, compiled)
                    etpu.message = f"compiled {compiled.name} and added it to the bundle's files"
                else:
                    etpu.message = f"compiled {compiled}"
        report["edgetpu"] = asdict(etpu)
        if not etpu.ready:
            raise NotEdgeTPUReady(f"{model.path.name} is not Edge TPU-ready: " + "; ".join(etpu.problems),
                                  _write_report(report, out))
    return _write_report(report, out)
