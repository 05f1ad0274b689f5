"""TResNet (Ridnik et al., arXiv 2003.13630) as a Flax Linen module.

The variable tree mirrors timm's module names (``body/layer3/0/conv2/bn/scale`` is timm's
``body.layer3.0.conv2.bn.weight``), which keeps the weight conversion a mechanical rename.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from tresnet_jax.layers import ConvNormAct, SqueezeExcite, avg_pool_shortcut, space_to_depth, torch_default_bias_init

Array = jax.Array
Dtype = Any

BASIC, BOTTLENECK = "basic", "bottleneck"
EXPANSION = {BASIC: 1, BOTTLENECK: 4}


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """The numbers that make one TResNet variant."""

    layers: tuple[int, int, int, int]
    width_factor: float = 1.0
    v2: bool = False  # bottlenecks in every stage (TResNet-L-V2)
    stem_slope: float = 1e-2
    block_slope: float = 1e-3

    @property
    def planes(self) -> int:
        planes = int(64 * self.width_factor)
        return planes // 8 * 8 if self.v2 else planes

    @property
    def block_types(self) -> tuple[str, str, str, str]:
        return (BOTTLENECK,) * 4 if self.v2 else (BASIC, BASIC, BOTTLENECK, BOTTLENECK)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(
            self.planes * 2**i * EXPANSION[kind] for i, kind in enumerate(self.block_types)
        )

    @property
    def num_features(self) -> int:
        return self.stage_channels[-1]


STAGE_STRIDES = (1, 2, 2, 2)
STAGE_HAS_SE = (True, True, True, False)


class Shortcut(nn.Module):
    """[AvgPool 2x2 when stride 2] -> 1x1 conv + norm; named ``1`` (after the pool) or ``0`` as
    in timm's ``downsample`` Sequential."""

    features: int
    stride: int
    train: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.stride == 2:
            x = avg_pool_shortcut(x)
        name = "1" if self.stride == 2 else "0"
        return ConvNormAct(
            self.features, 1, None, train=self.train, dtype=self.dtype, axis_name=self.axis_name, name=name
        )(x)


class Block(nn.Module):
    """BasicBlock or Bottleneck, with optional squeeze-excite and projection shortcut."""

    kind: str
    planes: int
    stride: int
    project: bool
    use_se: bool
    slope: float
    train: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        unit = dict(train=self.train, dtype=self.dtype, axis_name=self.axis_name)
        out_features = self.planes * EXPANSION[self.kind]
        shortcut = x
        if self.project:
            shortcut = Shortcut(out_features, self.stride, name="downsample", **unit)(x)
        down = self.stride == 2
        if self.kind == BASIC:
            y = ConvNormAct(self.planes, 3, self.slope, downsample=down, name="conv1", **unit)(x)
            y = ConvNormAct(self.planes, 3, None, zero_init_norm=True, name="conv2", **unit)(y)
            if self.use_se:
                y = SqueezeExcite(max(self.planes // 4, 64), dtype=self.dtype, name="se")(y)
        else:
            y = ConvNormAct(self.planes, 1, self.slope, name="conv1", **unit)(x)
            y = ConvNormAct(self.planes, 3, self.slope, downsample=down, name="conv2", **unit)(y)
            if self.use_se:
                y = SqueezeExcite(max(self.planes * 4 // 8, 64), dtype=self.dtype, name="se")(y)
            y = ConvNormAct(out_features, 1, None, zero_init_norm=True, name="conv3", **unit)(y)
        return nn.relu(y + shortcut)


class Stage(nn.Module):
    """One stage: blocks named ``0``, ``1``, ... as in timm's Sequential."""

    kind: str
    planes: int
    depth: int
    stride: int
    project: bool
    use_se: bool
    slope: float
    train: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.depth):
            first = i == 0
            x = Block(
                self.kind,
                self.planes,
                self.stride if first else 1,
                self.project and first,
                self.use_se,
                self.slope,
                train=self.train,
                dtype=self.dtype,
                axis_name=self.axis_name,
                name=str(i),
            )(x)
        return x


class Body(nn.Module):
    """Space-to-depth stem and the four stages; returns the stem's and every stage's output."""

    arch: ArchSpec
    train: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        unit = dict(train=self.train, dtype=self.dtype, axis_name=self.axis_name)
        arch = self.arch
        x = space_to_depth(x.astype(self.dtype))
        x = ConvNormAct(arch.planes, 3, arch.stem_slope, name="conv1", **unit)(x)
        outputs = [x]
        in_features = arch.planes
        stages = zip(arch.block_types, arch.layers, STAGE_STRIDES, STAGE_HAS_SE, strict=True)
        for s, (kind, depth, stride, use_se) in enumerate(stages, start=1):
            planes = arch.planes * 2 ** (s - 1)
            project = stride != 1 or in_features != planes * EXPANSION[kind]
            x = Stage(kind, planes, depth, stride, project, use_se, arch.block_slope, name=f"layer{s}", **unit)(x)
            in_features = planes * EXPANSION[kind]
            outputs.append(x)
        return outputs


class Head(nn.Module):
    """Global average pool -> linear, in float32 (the logits feed softmax and the loss)."""

    num_classes: int
    num_features: int

    @nn.compact
    def __call__(self, features: Array) -> Array:
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=torch_default_bias_init(self.num_features),
            name="fc",
        )(features)


class TResNet(nn.Module):
    """TResNet classifier. Input: NHWC images in [0, 1] (no mean/std), sides multiples of 32.

    ``model.apply(variables, images)`` returns float32 logits (the pooled features when
    ``num_classes`` is 0); ``method="features"`` the pooled features and
    ``method="stage_features"`` the stem's and the four stages' feature maps, for use as a
    backbone. Training mode: ``model.apply(variables, images, train=True,
    mutable=["batch_stats"])``.
    """

    arch: ArchSpec
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False, output: str = "logits") -> Array | list[Array]:
        stages = Body(self.arch, train=train, dtype=self.dtype, axis_name=self.axis_name, name="body")(x)
        if output == "stages":
            return stages
        features = jnp.mean(stages[-1].astype(jnp.float32), axis=(1, 2))
        if output == "features" or self.num_classes == 0:
            return features
        return Head(self.num_classes, self.arch.num_features, name="head")(features)

    def features(self, x: Array, train: bool = False) -> Array:
        """Globally pooled features, (N, num_features), float32."""
        return self(x, train, output="features")

    def stage_features(self, x: Array, train: bool = False) -> list[Array]:
        """Feature maps of the stem and the four stages (strides 4, 4, 8, 16, 32), NHWC."""
        return self(x, train, output="stages")


def variable_shapes(arch: ArchSpec, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat (collection, module..., leaf) -> shape of a model's variables, computing nothing."""
    model = TResNet(arch, num_classes)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
