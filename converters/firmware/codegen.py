"""Code generation: the model as a C++ array, an op resolver with exactly the model's ops, the
config header, the exit and wire headers and the README, rendered from templates/*.in.

A template is the text of the file it makes, with `@name@` fields (as in CMake's configure_file);
render() fills every field in one pass and refuses a missing or unused value."""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np

from tierlite.boards import Board
from tierlite.converters.firmware.checks import TFLM_RESOLVER_METHODS, FitReport, require_tflm_ops
from tierlite.converters.firmware.graph import ModelGraph
from tierlite.converters.firmware.model import EndModel
from tierlite.errors import ConfigError

TOOLCHAIN_NAMES = {"esp-idf": "ESP-IDF", "stm32cube": "STM32Cube", "zephyr": "Zephyr / nRF Connect SDK"}
_FIELD = re.compile(r"@([a-z_][a-z0-9_]*)@")


def render(template: str, **values: object) -> str:
    """templates/<template> with every @name@ replaced by str(values[name])."""
    text = (resources.files(__package__) / "templates" / template).read_text(encoding="utf-8")
    fields = set(_FIELD.findall(text))
    if fields != set(values):
        raise ValueError(f"template {template}: fields {sorted(fields)}, values given for {sorted(values)}")
    return _FIELD.sub(lambda m: str(values[m.group(1)]), text)


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _c_float(x: float) -> str:
    return f"{float(x):.9g}f" if "e" in f"{float(x):.9g}" or "." in f"{float(x):.9g}" else f"{float(x):.1f}f"


def _c_type(dtype: str) -> str:
    return {"int8": "int8_t", "uint8": "uint8_t"}[dtype]


def _member(dtype: str) -> str:
    """The TfLiteTensor data union member for a tensor type."""
    return "int8" if dtype == "int8" else "uint8"


def topics(prefix: str, node_id: str) -> dict[str, str]:
    """MQTT topics of one node (tierlite.topics: <prefix>/<node>/<suffix>)."""
    from tierlite.topics import node_topic, valid_node_id

    if not valid_node_id(node_id):
        raise ConfigError(f"--node-id {node_id!r}: use 1-64 letters, digits, '_', '.', '-' (not 'update')")
    return {k: node_topic(prefix, node_id, k) for k in ("feature", "answer", "result", "status")}


def model_data_sources(data: bytes) -> dict[str, str]:
    rows = ["    " + " ".join(f"0x{b:02x}," for b in data[i:i + 12]) for i in range(0, len(data), 12)]
    return {"tierlite_model_data.h": render("tierlite_model_data.h.in"),
            "tierlite_model_data.cc": render("tierlite_model_data.cc.in", model_array="\n".join(rows),
                                             model_length=len(data))}


def op_resolver_source(graph: ModelGraph, where: str) -> str:
    require_tflm_ops(graph, where)
    adds = "\n".join(f"  if (resolver.{TFLM_RESOLVER_METHODS[op]}() != kTfLiteOk) return kTfLiteError;"
                     f"  // {op} x{graph.op_counts[op]}" for op in graph.ops)
    return render("tierlite_op_resolver.h.in", num_ops=len(graph.ops), register_ops=adds)


def _feature_defines(model: EndModel) -> str:
    feat, enc = model.feature, model.encoding
    if feat is None:
        return ""
    binary = enc.get("kind") == "binary"
    n = int(np.prod(feat.shape))
    return render("tierlite_config_feature.h.in", feature_index=model.feature_index, feature_elements=n,
                  feature_type=_c_type(feat.dtype), feature_scale=_c_float(feat.scale),
                  feature_zero_point=feat.zero_point, feature_binary=1 if binary else 0,
                  feature_low=int(enc.get("low", 0)) if binary else 0,
                  feature_high=int(enc.get("high", 0)) if binary else 0,
                  feature_wire_bytes=(n + 7) // 8 if binary else n)


def config_header(model: EndModel, board: Board, arena: int, node_id: str, prefix: str) -> str:
    inp, lo = model.input, model.logits
    n_classes = int(np.prod(lo.shape))
    t = topics(prefix, node_id)
    return render(
        "tierlite_config.h.in",
        board=_c_string(board.name), model_name=_c_string(model.name), model_version=model.version,
        model_bytes=len(model.data), node_id=_c_string(node_id),
        arena_measured=arena, arena_bytes=-(-arena // 1024) * 1024,  # measured, rounded up to 1 KiB
        input_height=inp.shape[1], input_width=inp.shape[2], input_channels=inp.shape[3],
        input_bytes=int(np.prod(inp.shape)), input_is_int8=1 if inp.dtype == "int8" else 0,
        input_type=_c_type(inp.dtype), input_scale=_c_float(inp.scale), input_zero_point=inp.zero_point,
        logits_index=model.logits_index, num_classes=n_classes, logits_type=_c_type(lo.dtype),
        logits_scale=_c_float(lo.scale), logits_zero_point=lo.zero_point,
        exit_threshold=_c_float(model.threshold),
        has_feature=0 if model.feature is None else 1, feature_defines=_feature_defines(model),
        mqtt_route="publishes itself" if board.mqtt == "self" else "relays through a host gateway",
        link=board.link, mqtt_self=1 if board.mqtt == "self" else 0, mqtt_prefix=_c_string(prefix),
        topic_feature=_c_string(t["feature"]), topic_answer=_c_string(t["answer"]),
        topic_result=_c_string(t["result"]), topic_status=_c_string(t["status"]),
        labels=", ".join(_c_string(s) for s in model.labels[:n_classes]))


def exit_header() -> str:
    """The exit decision and feature encoding in plain C: the same for every model."""
    return render("tierlite_exit.h.in")


def wire_header(model: EndModel) -> str:
    """FEATURE messages and ANSWER/REJECT parsing in C, byte for byte as tierlite.wire (docs/protocol.md).
    The constants come from tierlite.wire itself, so the two cannot drift apart silently."""
    from tierlite import wire

    feat = model.feature
    assert feat is not None
    return render(
        "tierlite_wire.h.in",
        wire_version=wire.WIRE_VERSION, bundle_id_hex=f"{wire.bundle_id(model.name):08x}",
        model_name=_c_string(model.name), kind_feature=int(wire.Kind.FEATURE), kind_answer=int(wire.Kind.ANSWER),
        kind_reject=int(wire.Kind.REJECT), feature_header_bytes=wire.TENSOR_HEADER.size + 2 * len(feat.shape),
        answer_bytes=wire.ANSWER_STRUCT.size, feature_rank=len(feat.shape),
        put_feature_shape="\n".join(f"  p = tierlite_put_u16(p, {d});" for d in feat.shape))


def _build_steps(board: Board) -> str:
    """The README's toolchain section (templates/README-<toolchain>.md.in)."""
    title = {"board_title": board.title, "board_module": board.module}
    if board.toolchain == "esp-idf":
        arena_note = ("Allocate the arena in PSRAM instead of the static array: `heap_caps_malloc(TIERLITE_ARENA_BYTES, "
                      "MALLOC_CAP_SPIRAM)` and enable CONFIG_SPIRAM (octal) in menuconfig."
                      if board.budget.arena_in == "psram" else
                      "The static arena lands in internal SRAM (fast); keep camera frame buffers in PSRAM "
                      "(`fb_location = CAMERA_FB_IN_PSRAM`).")
        return render("README-esp-idf.md.in", **title, arena_note=arena_note)
    if board.toolchain == "stm32cube":
        return render("README-stm32cube.md.in", **title)
    return render("README-zephyr.md.in", **title)


def readme(model: EndModel, board: Board, fit: FitReport, graph: ModelGraph, arena: int) -> str:
    send_feature = ""
    if model.feature is not None:  # the loop's else branch, inserted after `if (d.confident) {...}`
        send_feature = render("README-send-feature.md.in", logits_member=_member(model.logits.dtype),
                              feature_member=_member(model.feature.dtype)).removesuffix("\n")
    mqtt_note = ("The board publishes MQTT itself." if board.mqtt == "self" else
                 f"The board has no IP link ({board.link}): a host gateway relays its results and features to "
                 "the MQTT topics in `tierlite_config.h`.")
    return render(
        "README.md.in",
        board_title=board.title, model_file=model.path.name, model_name=model.name, model_version=model.version,
        model_bytes=len(model.data), model_budget=board.budget.model, arena=arena,
        arena_budget=board.budget.arena, arena_in=board.budget.arena_in, ops=", ".join(graph.ops),
        input_member=_member(model.input.dtype), logits_member=_member(model.logits.dtype),
        send_feature=send_feature, build_steps=_build_steps(board), mqtt_note=mqtt_note,
        warnings="".join(f"\n\n> warning: {w}" for w in fit.warnings))


def write_sources(out: Path, model: EndModel, board: Board, graph: ModelGraph, arena: int, fit: FitReport,
                  node_id: str, prefix: str) -> list[Path]:
    files = model_data_sources(model.data)
    files["tierlite_op_resolver.h"] = op_resolver_source(graph, model.path.name)
    files["tierlite_config.h"] = config_header(model, board, arena, node_id, prefix)
    files["tierlite_exit.h"] = exit_header()
    if model.feature is not None:
        files["tierlite_wire.h"] = wire_header(model)
    files["README.md"] = readme(model, board, fit, graph, arena)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written
