"""Multi-exit models (BranchyNet / DDNN style): one backbone, cut at two named points into the
end (camera), edge (gateway) and cloud segments, each with its own exit head.

    pixels uint8 ─ end ──► end_feature ─ edge ──► edge_feature ─ cloud ──► logits
                    └► end logits           └► edge logits

Each segment is its own keras.Model, so exporting one segment is converting one model; the
joint training model just chains them. Two families:
  * "resnet":    basic residual blocks (3x3-3x3), for 32x32 frames;
  * "mobilenet": depthwise-separable blocks, strided stem for 96x96+ frames.
The end segment takes raw pixel values (0..255; uint8 once exported) and rescales itself.
`binarized=True` swaps the end segment for a binary one (weights +-1 x per-channel scale,
step activations), whose boundary feature has exactly two values.

TensorFlow/Keras are imported inside functions, so `import tierlite.converters.models` is cheap.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tierlite.errors import ConfigError

FAMILIES = ("resnet", "mobilenet")
# A binary activation outputs {0, BINARY_HIGH}. 6 matches ReLU6, which the int8 export uses as
# an exact step (see export.fold_binary_end): {0, 6} quantizes to exactly {-128, 127}.
BINARY_HIGH = 6.0


@dataclass
class ArchConfig:
    """Everything needed to rebuild the network (stored as JSON next to the checkpoint)."""
    family: str = "resnet"
    input_size: int = 32
    num_classes: int = 10
    stem: int = 16                       # stem conv channels
    end: list = field(default_factory=lambda: [[16, 1], [32, 2]])    # [channels, stride] per block
    boundary: int = 8                    # channels of the end -> edge feature (bottleneck)
    boundary_pool: int = 1               # average-pool the end trunk by this factor before the bottleneck
    boundary_after: int = -1             # end block whose output feeds the bottleneck (-1: the last);
                                         # earlier = higher resolution for edge/cloud, more bytes
    edge: list = field(default_factory=lambda: [[64, 2]])
    edge_boundary: int = 0               # 0: edge feature = last edge block output (no bottleneck)
    cloud: list = field(default_factory=lambda: [[128, 2]])
    binarized: bool = False              # binary end segment
    binary_end: list = field(default_factory=lambda: [[32, 2], [64, 2]])  # binary conv stack
    head_dropout: float = 0.0
    cloud_head_width: int = 0            # >0: an extra hidden dense layer in the cloud head
    end_head_grid: int = 1               # end exit pools to a GxG grid before its dense layer (1 = GAP)

    def validate(self) -> "ArchConfig":
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; choose one of {FAMILIES}")
        if self.input_size < 16 or self.input_size % 8:
            raise ConfigError(f"input_size must be a multiple of 8 and >= 16, got {self.input_size}")
        if self.num_classes < 2:
            raise ConfigError("num_classes must be >= 2")
        for name in ("end", "edge", "cloud", "binary_end"):
            blocks = getattr(self, name)
            if not all(isinstance(b, (list, tuple)) and len(b) == 2 and int(b[1]) in (1, 2) for b in blocks):
                raise ConfigError(f"{name}: blocks must be [channels, stride(1|2)] pairs, got {blocks!r}")
        if not -1 <= self.boundary_after < len(self.end):
            raise ConfigError(f"boundary_after must be -1 or an end block index < {len(self.end)}")
        if self.boundary < 1:
            raise ConfigError("boundary (end feature channels) must be >= 1")
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ArchConfig":
        known = cls.__dataclass_fields__
        unknown = set(d) - set(known)
        if unknown:
            raise ConfigError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_json())


# ---------------------------------------------------------------------------------------------
# Custom layers (registered so a saved .keras checkpoint reloads without extra arguments)
# ---------------------------------------------------------------------------------------------
def _custom_layers():
    """Defined lazily so importing this module does not import Keras."""
    global BinaryConv2D, BinaryStep
    if "BinaryConv2D" in globals():
        return BinaryConv2D, BinaryStep
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="tierlite")
    class BinaryConv2D(keras.layers.Conv2D):
        """Conv2D whose effective kernel is sign(w) * mean|w| per output channel.

        Gradients pass straight through (STE); latent weights are clipped to [-1, 1]
        (clipped in the training step), as in BinaryConnect / XNOR-Net.
        """

        def convolution_op(self, inputs, kernel):
            alpha = ops.mean(ops.abs(kernel), axis=(0, 1, 2), keepdims=True)
            sign = ops.cast(ops.where(kernel >= 0, 1.0, -1.0), kernel.dtype)  # kernel may be bfloat16
            kernel = kernel + ops.stop_gradient(sign * alpha - kernel)
            return super().convolution_op(inputs, kernel)

    @keras.saving.register_keras_serializable(package="tierlite")
    class BinaryStep(keras.layers.Layer):
        """Binary activation: BINARY_HIGH * [x > 0] forward, hard-tanh gradient (STE).

        A step {0, h} is sign(x) shifted and scaled; the offset is absorbed by the next layer's
        bias, and {0, h} maps onto an exact int8 step in TFLite (ReLU6 saturation).
        """

        def __init__(self, high: float = BINARY_HIGH, **kw):
            super().__init__(**kw)
            self.high = float(high)

        def call(self, x):
            soft = ops.clip((x + 1.0) * 0.5, 0.0, 1.0) * self.high
            hard = ops.cast(x > 0, x.dtype) * self.high
            return soft + ops.stop_gradient(hard - soft)

        def get_config(self):
            return {**super().get_config(), "high": self.high}

    return BinaryConv2D, BinaryStep


def _all_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
        else:
            yield layer


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def _conv_bn(x, ch, k, stride, name, act=True, depthwise=False):
    import keras
    L = keras.layers
    if depthwise:
        x = L.DepthwiseConv2D(k, stride, padding="same", use_bias=False, name=f"{name}_dw",
                              depthwise_initializer="he_normal")(x)
    else:
        x = L.Conv2D(ch, k, stride, padding="same", use_bias=False, name=f"{name}_conv",
                     kernel_initializer="he_normal")(x)
    x = L.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x) if act else x


def _residual_block(x, ch, stride, name):
    import keras
    L = keras.layers
    shortcut = x
    y = _conv_bn(x, ch, 3, stride, f"{name}_a")
    y = _conv_bn(y, ch, 3, 1, f"{name}_b", act=False)
    if stride != 1 or x.shape[-1] != ch:
        shortcut = _conv_bn(x, ch, 1, stride, f"{name}_proj", act=False)
    y = L.Add(name=f"{name}_add")([y, shortcut])
    return L.ReLU(name=f"{name}_out")(y)


def _separable_block(x, ch, stride, name):
    """MobileNet depthwise-separable block, with a residual when shapes allow (cheap accuracy)."""
    import keras
    L = keras.layers
    y = _conv_bn(x, None, 3, stride, f"{name}_d", depthwise=True)
    y = _conv_bn(y, ch, 1, 1, f"{name}_p", act=False)
    if stride == 1 and x.shape[-1] == ch:
        y = L.Add(name=f"{name}_add")([y, x])
    return L.ReLU(name=f"{name}_out")(y)


def _blocks(x, cfg: ArchConfig, blocks, prefix, first=0):
    block = _residual_block if cfg.family == "resnet" else _separable_block
    for i, (ch, stride) in enumerate(blocks, start=first):
        x = block(x, int(ch), int(stride), f"{prefix}{i}")
    return x


def _exit_head(x, cfg: ArchConfig, tier, hidden=0, grid=1):
    import keras
    L = keras.layers
    if grid > 1 and x.shape[1] > grid:
        # Keep coarse spatial layout (binary features pooled globally lose too much of it).
        x = L.AveragePooling2D(x.shape[1] // grid, name=f"{tier}_pool")(x)
        x = L.Flatten(name=f"{tier}_flatten")(x)
    else:
        x = L.GlobalAveragePooling2D(name=f"{tier}_gap")(x)
    if hidden:
        x = L.Dense(hidden, name=f"{tier}_hidden")(x)
        x = L.ReLU(name=f"{tier}_hidden_relu")(x)
    if cfg.head_dropout:
        x = L.Dropout(cfg.head_dropout, name=f"{tier}_dropout")(x)
    return L.Dense(cfg.num_classes, name=f"{tier}_logits", dtype="float32")(x)


def stem_stride(cfg: ArchConfig) -> int:
    return 2 if cfg.input_size >= 64 else 1


# ---------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------
def build_end(cfg: ArchConfig):
    """Raw pixels (float 0..255) -> [feature, logits]."""
    import keras
    L = keras.layers
    inp = keras.Input((cfg.input_size, cfg.input_size, 3), name="pixels")
    x = L.Rescaling(1.0 / 255.0, name="end_rescale")(inp)  # no offset: zero padding == black pixel
    if cfg.binarized:
        BinaryConv2D, BinaryStep = _custom_layers()
        x = L.Conv2D(cfg.stem, 3, stem_stride(cfg), padding="same", use_bias=False,
                     name="end_stem_conv", kernel_initializer="he_normal")(x)
        x = L.BatchNormalization(momentum=0.9, name="end_stem_bn")(x)
        x = BinaryStep(name="end_stem_step")(x)
        for i, (ch, stride) in enumerate(cfg.binary_end):
            x = BinaryConv2D(int(ch), 3, int(stride), padding="same", use_bias=False,
                             name=f"end_bin{i}_conv", kernel_initializer="glorot_uniform")(x)
            x = L.BatchNormalization(momentum=0.9, name=f"end_bin{i}_bn")(x)
            x = BinaryStep(name=f"end_bin{i}_step")(x)
        trunk = x
        f = BinaryConv2D(cfg.boundary, 1, 1, padding="same", use_bias=False,
                         name="end_binfeat_conv", kernel_initializer="glorot_uniform")(trunk)
        f = L.BatchNormalization(momentum=0.9, name="end_binfeat_bn")(f)
        feature = BinaryStep(name="end_feature")(f)
    else:
        x = _conv_bn(x, cfg.stem, 3, stem_stride(cfg), "end_stem")
        cut = len(cfg.end) if cfg.boundary_after < 0 else cfg.boundary_after + 1
        tap = _blocks(x, cfg, cfg.end[:cut], "end_b")
        # The exit may look deeper than the boundary: later end blocks feed only the camera's exit.
        trunk = _blocks(tap, cfg, cfg.end[cut:], "end_b", first=cut)
        f = tap
        if cfg.boundary_pool > 1:  # fewer positions, more channels: same bytes, richer feature
            f = L.AveragePooling2D(cfg.boundary_pool, name="end_bottleneck_pool")(f)
        f = L.Conv2D(cfg.boundary, 1, padding="same", use_bias=False, name="end_bottleneck_conv")(f)
        # Linear bottleneck: a symmetric range uses all 256 int8 levels on the wire.
        feature = L.BatchNormalization(momentum=0.9, name="end_feature")(f)
    logits = _exit_head(trunk, cfg, "end", grid=cfg.end_head_grid)
    return keras.Model(inp, [feature, logits], name="end")


def build_edge(cfg: ArchConfig, feature_shape):
    import keras
    inp = keras.Input(tuple(feature_shape), name="end_feature_in")
    first = cfg.edge[0][0] if cfg.edge else cfg.boundary * 4
    x = _conv_bn(inp, int(first), 3, 1, "edge_expand")  # widen the narrow boundary again
    x = _blocks(x, cfg, cfg.edge, "edge_b")
    logits = _exit_head(x, cfg, "edge")
    if cfg.edge_boundary:
        feature = _conv_bn(x, cfg.edge_boundary, 1, 1, "edge_feature", act=False)
    else:
        feature = x
    return keras.Model(inp, [feature, logits], name="edge")


def build_cloud(cfg: ArchConfig, feature_shape):
    import keras
    inp = keras.Input(tuple(feature_shape), name="edge_feature_in")
    x = inp
    if cfg.edge_boundary:  # back to the edge trunk's width: the cloud's blocks keep their shapes
        x = _conv_bn(x, int(cfg.edge[-1][0] if cfg.edge else cfg.boundary * 4), 3, 1, "cloud_expand")
    x = _blocks(x, cfg, cfg.cloud, "cloud_b")
    logits = _exit_head(x, cfg, "cloud", hidden=cfg.cloud_head_width)
    return keras.Model(inp, logits, name="cloud")


def build_segments(cfg: ArchConfig):
    """(end, edge, cloud) keras.Models; chain them with `build_joint`."""
    cfg.validate()
    end = build_end(cfg)
    edge = build_edge(cfg, end.outputs[0].shape[1:])
    cloud = build_cloud(cfg, edge.outputs[0].shape[1:])
    return end, edge, cloud


def build_joint(cfg: ArchConfig):
    """The training model: pixels -> [end_logits, edge_logits, cloud_logits]."""
    import keras
    end, edge, cloud = build_segments(cfg)
    inp = keras.Input((cfg.input_size, cfg.input_size, 3), name="pixels")
    f1, l1 = end(inp)
    f2, l2 = edge(f1)
    l3 = cloud(f2)
    return keras.Model(inp, [l1, l2, l3], name=f"multiexit_{cfg.family}")


def segments_of(joint):
    """The (end, edge, cloud) sub-models of a joint model (built or reloaded)."""
    return tuple(joint.get_layer(t) for t in ("end", "edge", "cloud"))


def count_params(model) -> int:
    return int(sum(_prod(w.shape) for w in model.weights))


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
