"""Runtime plugins behind one interface (tierlite.runtimes.base.Runtime).

`open_runtime(path, "litert")` loads a model with the named plugin; with fallback it tries the
next plugin in FALLBACK_ORDER when the preferred one is not installed, and logs the choice once.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tierlite.errors import ConfigError, RuntimeUnavailable
from tierlite.runtimes.base import Runtime, TensorDetail

log = logging.getLogger("tierlite.runtime")

PLUGINS = {
    "litert": ("tierlite.runtimes.litert", "LiteRTRuntime", "LiteRTConfig"),
    "tflite-runtime": ("tierlite.runtimes.tflite_runtime", "TFLiteRuntime", "TFLiteRuntimeConfig"),
    "edgetpu": ("tierlite.runtimes.edgetpu", "EdgeTPURuntime", "EdgeTPUConfig"),
    "tflm": ("tierlite.runtimes.tflm", "TFLMRuntime", "TFLMConfig"),
}
FALLBACK_ORDER = ("edgetpu", "litert", "tflite-runtime", "tflm")
_announced: set[tuple[str, str]] = set()


def plugin_classes(key: str):
    import importlib

    if key not in PLUGINS:
        raise ConfigError(f"unknown runtime {key!r}; choose one of {', '.join(PLUGINS)}")
    module, runtime_cls, config_cls = PLUGINS[key]
    mod = importlib.import_module(module)
    return getattr(mod, runtime_cls), getattr(mod, config_cls)


def open_runtime(model_path: str | Path, runtime: str = "litert", options: dict | None = None,
                 fallback: bool = False) -> Runtime:
    """Load `model_path` with plugin `runtime`; options are that plugin's config fields."""
    order = [runtime] + ([k for k in FALLBACK_ORDER if k != runtime] if fallback else [])
    errors = []
    for key in order:
        cls, config_cls = plugin_classes(key)
        fields = config_cls.__dataclass_fields__
        try:
            config = config_cls(**{k: v for k, v in (options or {}).items() if k in fields})
            rt = cls(model_path, config)
        except RuntimeUnavailable as e:
            errors.append(str(e))
            continue
        if (key, runtime) not in _announced:
            _announced.add((key, runtime))
            if key == runtime:
                log.info("runtime %s loaded %s", key, Path(model_path).name)
            else:
                log.warning("runtime %s unavailable (%s); fell back to %s", runtime, errors[0], key)
        return rt
    raise RuntimeUnavailable("; ".join(errors))


__all__ = ["Runtime", "TensorDetail", "open_runtime", "PLUGINS", "FALLBACK_ORDER"]
