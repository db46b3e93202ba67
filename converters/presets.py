"""Named training presets: a model architecture plus a training recipe.

"small": digits-sized data, about a minute end to end on a 2-core CPU (tests, demo).
"cifar10": the reference CIFAR-10 bundle in models/cifar10 (one resumable command; docs/CONVERTERS.md).
"full":  the earlier CIFAR-10 JPEG benchmark preset (see docs/CONVERTERS.md for measured time and figures).
"mobilenet-96": the depthwise-separable family at 96x96 (larger camera frames).
Any field of ArchConfig or TrainConfig can be overridden by name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tierlite.converters.models import ArchConfig
from tierlite.errors import ConfigError


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"            # "sgd" (nesterov) or "adamw"
    lr: float = 0.1                   # peak learning rate of the one-cycle schedule
    warmup: float = 0.15              # fraction of steps spent warming up
    weight_decay: float = 5e-4
    loss_weights: list = field(default_factory=lambda: [1.0, 1.0, 1.0])  # end, edge, cloud
    label_smoothing: float = 0.1
    distill: float = 0.0              # weight of self-distillation of early exits from the cloud exit
    temperature: float = 3.0          # softening temperature of the distillation targets
    pad: int = 4                      # pad-and-crop augmentation (pixels); 0 disables
    flip: bool = True                 # horizontal flips (off for digits: mirrored digits are not digits)
    cutout: int = 0                   # side (pixels) of one grey square hidden per frame; 0 disables
    val_fraction: float = 0.1         # stratified validation split carved from the training folder
    limit: int | None = None          # use at most this many training images (quick runs)
    mixed_precision: bool = False     # bfloat16 compute where the hardware has it (GPU, AMX/AVX512-BF16, Arm BF16), else float32; weights stay float32
    calibration_frames: int = 300     # representative frames for int8 export
    max_drop: float = 0.005           # accuracy drop (fraction) allowed vs cloud-only when calibrating
    log_every_s: float = 20.0         # progress line interval
    freeze: list = field(default_factory=list)  # segments kept fixed, e.g. ["end", "edge"] to tune the cloud

    def validate(self) -> "TrainConfig":
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if len(self.loss_weights) != 3 or min(self.loss_weights) < 0:
            raise ConfigError("loss_weights must be 3 non-negative numbers (end, edge, cloud), "
                              f"got {self.loss_weights}")
        if not set(self.freeze) <= {"end", "edge", "cloud"}:
            raise ConfigError(f"freeze takes segment names (end, edge, cloud), got {self.freeze}")
        if self.cutout < 0:
            raise ConfigError(f"cutout must be >= 0 pixels, got {self.cutout}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "arch": dict(family="resnet", input_size=32, stem=8, end=[[12, 2], [16, 2]], boundary=8,
                     edge=[[32, 1]], cloud=[[48, 2]], binary_end=[[24, 2], [32, 2]], end_head_grid=2),
        "train": dict(epochs=8, batch_size=64, lr=0.1, flip=False, pad=2, distill=0.5,
                      calibration_frames=150, val_fraction=0.2, log_every_s=30.0),
    },
    "cifar10": {
        # A camera end under 64 KB int8 whose boundary is 8x8x8 int8 (512 B per escalated frame),
        # tapped after its second block and pooled; the camera's exit looks one block deeper.
        # Edge and cloud are not the thin tail of the camera's net: a 128-wide edge at 8x8 and a
        # 5.9 M-parameter cloud (256/256/512) that only a gateway or datacentre runs.
        "arch": dict(family="resnet", input_size=32, stem=16, end=[[16, 1], [32, 2], [40, 2]], boundary=8,
                     boundary_after=1, boundary_pool=2, end_head_grid=2, edge=[[128, 1], [128, 1]],
                     edge_boundary=0, cloud=[[256, 1], [256, 2], [512, 1]]),
        "train": dict(epochs=22, batch_size=256, lr=0.2, warmup=0.15, label_smoothing=0.2, distill=0.3,
                      loss_weights=[0.6, 0.6, 1.0], mixed_precision=True, calibration_frames=500),
    },
    "full": {
        # End = MLPerf Tiny ResNet-8 layout, 96 KB int8. The boundary is tapped after its second
        # block (16x16) and squeezed to 4 channels: 1,024 B per escalated frame, while the camera's
        # exit still sees the third block. Edge and cloud run a wider ResNet from 16x16 on; the
        # edge squeezes its 8x8x128 output to 8x8x16 (1,024 B) for the gateway -> cloud hop.
        # Binarized: 4x4x64 bits = 128 B, with the edge/cloud of the 4x4 boundary.
        # docs/CONVERTERS.md lists the staged runs that produced the published bundle.
        "arch": dict(family="resnet", input_size=32, stem=16, end=[[16, 1], [32, 2], [64, 2]], boundary=4,
                     boundary_after=1, edge=[[64, 1], [128, 2]], edge_boundary=16, cloud=[[256, 2], [256, 1]]),
        "binary_arch": dict(stem=32, binary_end=[[32, 2], [64, 2], [80, 2]], boundary=64, end_head_grid=2,
                            boundary_after=-1, edge=[[128, 1]], edge_boundary=0, cloud=[[256, 1], [256, 1]]),
        "train": dict(epochs=18, batch_size=128, lr=0.15, warmup=0.1, distill=0.3, loss_weights=[0.6, 0.6, 1.0],
                      mixed_precision=True, calibration_frames=500),
    },
    "mobilenet-96": {
        "arch": dict(family="mobilenet", input_size=96, stem=16, end=[[32, 2], [48, 2], [48, 1]], boundary=8,
                     edge=[[96, 2], [96, 1]], cloud=[[192, 2], [192, 1]], binary_end=[[32, 2], [64, 2], [64, 2]]),
        "train": dict(epochs=15, batch_size=64, lr=0.1, distill=0.5, pad=8),
    },
}


def resolve(preset: str, binarized: bool = False, **overrides) -> tuple[ArchConfig, TrainConfig]:
    """Preset + overrides (any ArchConfig/TrainConfig field by name) -> validated configs."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    arch = dict(PRESETS[preset]["arch"], binarized=binarized)
    if binarized:
        arch.update(PRESETS[preset].get("binary_arch", {}))
    train = dict(PRESETS[preset]["train"])
    arch_keys = {f.name for f in fields(ArchConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in arch_keys:
            arch[key] = value
        elif key in train_keys:
            train[key] = value
        else:
            raise ConfigError(f"unknown option {key!r} (not a model or training setting)")
    return ArchConfig(**arch).validate(), TrainConfig(**train).validate()


def train_config_json(t: TrainConfig) -> dict[str, Any]:
    return asdict(t)
