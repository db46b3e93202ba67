"""`tierlite firmware SRC --board NAME --out DIR`: the arguments, one build per board
(targets.py), a line of numbers per board and a table when there are several. docs/FIRMWARE.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tierlite.boards import Board, format_bytes, load_board
from tierlite.converters.firmware.checks import BoardCheckFailed, MicroCheck
from tierlite.converters.firmware.model import load_end_model
from tierlite.converters.firmware.targets import firmware_for_linux, firmware_for_mcu
from tierlite.errors import ConfigError


def resolve_boards(spec: str) -> list[Board]:
    """`--board pi4`, `--board a,b`, `--board mcu` / `linux` / `all`, or a path to a board YAML."""
    from tierlite.boards import list_boards

    boards: list[Board] = []
    for name in (s.strip() for s in spec.split(",")):
        if name in ("mcu", "linux", "all"):
            boards += [b for b in list_boards() if name == "all" or b.kind == name]
        elif name:
            boards.append(load_board(name))
    return list({b.name: b for b in boards}.values())  # each board once, in the order given


def markdown_table(reports: list[dict[str, Any]]) -> str:
    rows = ["| board | model bytes | flash budget | arena bytes (measured) | RAM budget | fits | "
            "latency here, ms | notes |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for r in reports:
        fit = r.get("fit", {})
        arena = r.get("arena_bytes")
        if "tflm_latency_ms_host" in r:
            latency = f"{r['tflm_latency_ms_host']:.2f} (TFLM)"
        elif "litert_latency_ms_host" in r:
            latency = f"{r['litert_latency_ms_host']:.2f} (LiteRT)"
        else:
            latency = ""
        notes = list(fit.get("problems", [])) + list(fit.get("warnings", []))
        if "edgetpu" in r:
            e = r["edgetpu"]
            notes.append("Edge TPU-ready" if e["ready"] else "not Edge TPU-ready: " + "; ".join(e["problems"]))
        rows.append(f"| {r['board']} | {r['model_bytes']:,} | {fit.get('model_budget', 0):,} | "
                    f"{'-' if arena is None else f'{arena:,}'} | {fit.get('arena_budget', 0):,} "
                    f"({r.get('arena_in', '')}) | {'yes' if fit.get('fits') else 'NO'} | {latency} | "
                    f"{'; '.join(notes)} |")
    return "\n".join(rows)


def configure_firmware(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="bundle directory or .tar.gz (its end segment), or any .tflite")
    parser.add_argument("--board", help="board profile name (see --list-boards), comma-separated names, "
                                        "'mcu', 'linux' or 'all', or a path to a board YAML")
    parser.add_argument("--out", help="output directory (one subdirectory per board when several)")
    parser.add_argument("--node-id", help="node id for the MQTT topics (default: the board name)")
    parser.add_argument("--mqtt-prefix", default="tierlite", help="MQTT topic prefix (default: tierlite)")
    parser.add_argument("--threshold", type=float,
                        help="exit threshold (normalized entropy); default: the bundle's, 1.0 for a bare .tflite")
    parser.add_argument("--frames", help="image folder for the parity check (default: seeded synthetic frames)")
    parser.add_argument("--parity-frames", type=int, default=8, help="frames in the parity check (default 8)")
    parser.add_argument("--list-boards", action="store_true", help="list the packaged board profiles and exit")


def _print_report(r: dict[str, Any]) -> None:
    fit = r["fit"]
    line = (f"{r['board']}: {'fits' if fit['fits'] else 'DOES NOT FIT'}: model {r['model_bytes']:,} B "
            f"(flash budget {fit['model_budget']:,} B)")
    if r.get("arena_bytes") is not None:
        line += f", arena {r['arena_bytes']:,} B measured on TFLite Micro (RAM budget {fit['arena_budget']:,} B)"
    print(line)
    for w in fit["warnings"]:
        print(f"  warning: {w}")
    if "parity" in r:
        p = r["parity"]
        where = f" (first diverging op: {', '.join(p['diverging_ops'])}, {p['kernel_steps']} step)" \
            if p["diverging_ops"] else ""
        print(f"  parity on {p['frames']} frames: TFLite Micro equals LiteRT reference kernels on "
              f"{p['frames_exact']}/{p['frames']} frames{where}, outputs max "
              f"{max(p['max_steps_vs_reference'])} step(s) off, top-1 agreement "
              f"{p['top1_agreement_vs_reference']:.0%}; vs LiteRT default kernels max "
              f"{max(p['max_steps_vs_default'])} step(s), top-1 agreement {p['top1_agreement_vs_default']:.0%}, "
              f"exit agreement {p['exit_agreement_vs_default']:.0%}")
    if "tflm_latency_ms_host" in r:
        print(f"  TFLite Micro latency on this host: {r['tflm_latency_ms_host']} ms (reference kernels; "
              "not the board's speed)")
    if "litert_latency_ms_host" in r:
        print(f"  LiteRT latency on this host: {r['litert_latency_ms_host']} ms")
    if "edgetpu" in r:
        e = r["edgetpu"]
        print(f"  Edge TPU: {'ready' if e['ready'] else 'NOT ready: ' + '; '.join(e['problems'])}"
              + "".join(f"; {n}" for n in e["notes"]))
        if e["message"]:
            print(f"  {e['message']}")
    if r.get("files"):
        print(f"  wrote {', '.join(r['files'])}")


def run_firmware(args: argparse.Namespace) -> int:
    from tierlite.boards import list_boards

    if args.list_boards:
        for b in list_boards():
            print(f"{b.name:18} {b.kind:5} {b.runtime:8} threads={b.threads} model<={format_bytes(b.budget.model)} "
                  f"arena<={format_bytes(b.budget.arena)} ({b.budget.arena_in})  {b.title}")
        return 0
    if not args.source or not args.board:
        raise ConfigError("give a bundle or .tflite and --board NAME (or --list-boards)")
    boards = resolve_boards(args.board)
    if not boards:
        raise ConfigError(f"--board {args.board!r} names no board")
    model = load_end_model(args.source, args.threshold)
    out = Path(args.out) if args.out else None
    several = len(boards) > 1
    check = None
    reports, failures = [], []
    for board in boards:
        board_out = (out / board.name if several else out) if out else None
        try:
            if board.is_mcu:
                check = check or MicroCheck(model, args.frames, args.parity_frames)
                r = firmware_for_mcu(check, board, board_out, args.node_id, args.mqtt_prefix, args.source)
            else:
                r = firmware_for_linux(model, board, board_out, args.source)
        except BoardCheckFailed as e:
            if not several:
                raise
            failures.append(str(e))
            r = e.report
        r["arena_in"] = board.budget.arena_in
        reports.append(r)
        _print_report(r)
    if several:
        print()
        print(markdown_table(reports))
    if failures:
        print(f"error: {len(failures)} of {len(boards)} boards failed the checks (see above)", file=sys.stderr)
        return 2
    return 0
