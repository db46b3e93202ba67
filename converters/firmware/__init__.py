"""`tierlite firmware`: make a bundle's end segment (or any int8 .tflite) deployable on a board
profile from firmware_configs/. graph.py reads the model, tflm_host.py measures it on TFLite Micro,
checks.py checks fit and parity, codegen.py renders the C/C++ and README from templates/,
targets.py builds one board and cli.py is the command. docs/FIRMWARE.md has the details."""
from tierlite.converters.firmware.checks import (ARENA_HEADROOM_WARN, PARITY_TOLERANCE, TFLM_RESOLVER_METHODS,
                                                 BoardCheckFailed, DoesNotFit, FitReport, MicroCheck,
                                                 NotEdgeTPUReady, ParityMismatch, ParityReport, check_fit,
                                                 check_parity, require_integer_io, require_tflm_ops)
from tierlite.converters.firmware.cli import configure_firmware, markdown_table, resolve_boards, run_firmware
from tierlite.converters.firmware.codegen import (TOOLCHAIN_NAMES, config_header, exit_header, model_data_sources,
                                                  op_resolver_source, readme, render, topics, wire_header,
                                                  write_sources)
from tierlite.converters.firmware.frames import frame_to_input, load_frames
from tierlite.converters.firmware.graph import ModelGraph, read_graph
from tierlite.converters.firmware.model import EndModel, Tensor, litert_reference, load_end_model
from tierlite.converters.firmware.targets import firmware_for_linux, firmware_for_mcu
from tierlite.converters.firmware.tflm_host import ARENA_STEP, captured_stderr, measure_arena, tflm_latency_ms

__all__ = [
    "ARENA_HEADROOM_WARN", "ARENA_STEP", "PARITY_TOLERANCE", "TFLM_RESOLVER_METHODS", "TOOLCHAIN_NAMES",
    "BoardCheckFailed", "DoesNotFit", "EndModel", "FitReport", "MicroCheck", "ModelGraph", "NotEdgeTPUReady",
    "ParityMismatch", "ParityReport", "Tensor",
    "captured_stderr", "check_fit", "check_parity", "config_header", "configure_firmware", "exit_header",
    "firmware_for_linux", "firmware_for_mcu", "frame_to_input", "litert_reference", "load_end_model",
    "load_frames", "markdown_table", "measure_arena", "model_data_sources", "op_resolver_source", "read_graph",
    "readme", "render", "require_integer_io", "require_tflm_ops", "resolve_boards", "run_firmware",
    "tflm_latency_ms", "topics", "wire_header", "write_sources",
]
