"""TResNet (Ridnik et al., arXiv 2003.13630) as a Flax Linen module.

The variable tree mirrors timm's module names (``body/layer3/0/conv2/bn/scale`` is timm's
``body.layer3.0.conv2.bn.weight``), which keeps the weight conversion a mechanical rename.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tresnet_jax.model.architecture import (
    FEATURE_INDICES,
    HEAD_KERNEL_INIT,
    LAST_STAGE,
    SE_AFTER,
    ArchSpec,
    BlockSpec,
    UnitSpec,
    feature_indices,
    global_pool,
    stage_plan,
    stem_unit,
)
from tresnet_jax.model.layers import (
    FLOAT32,
    ConvNormAct,
    Dense,
    Numerics,
    SqueezeExcite,
    avg_pool_shortcut,
    space_to_depth,
)

Array = jax.Array
Dtype = Any


def unit_module(unit: UnitSpec, train: bool, numerics: Numerics, axis_name: str | None) -> ConvNormAct:
    """The ``ConvNormAct`` of one unit of the plan, named as the unit is."""
    return ConvNormAct(
        unit.out_features,
        unit.kernel_size,
        unit.slope,
        unit.downsample,
        unit.zero_init_norm,
        train=train,
        numerics=numerics,
        axis_name=axis_name,
        name=unit.name,
    )


class Shortcut(nn.Module):
    """[AvgPool 2x2 when stride 2] -> the block's shortcut unit (``BlockSpec.shortcut``)."""

    block: BlockSpec
    train: bool = False
    numerics: Numerics = FLOAT32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.block.stride == 2:
            x = avg_pool_shortcut(x)
        return unit_module(self.block.shortcut, self.train, self.numerics, self.axis_name)(x)


class Block(nn.Module):
    """One residual block (``BlockSpec``): branch units, squeeze-excite, shortcut, ReLU."""

    spec: BlockSpec
    train: bool = False
    numerics: Numerics = FLOAT32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        block = self.spec
        common = dict(train=self.train, numerics=self.numerics, axis_name=self.axis_name)
        shortcut = Shortcut(block, name="downsample", **common)(x) if block.shortcut else x
        y = x
        for unit in block.units:
            y = unit_module(unit, **common)(y)
            if unit.name == SE_AFTER and block.se_width:
                y = SqueezeExcite(block.se_width, self.numerics, name="se")(y)
        return nn.relu(y + shortcut)


class Stage(nn.Module):
    """One stage: blocks named ``0``, ``1``, ... as in timm's Sequential."""

    blocks: tuple[BlockSpec, ...]
    train: bool = False
    numerics: Numerics = FLOAT32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, spec in enumerate(self.blocks):
            x = Block(spec, self.train, self.numerics, self.axis_name, name=str(i))(x)
        return x


class Body(nn.Module):
    """Space-to-depth stem and the four stages; returns the feature maps at ``out_indices``
    (``FEATURE_INDICES``), running no stage after the last one asked for."""

    arch: ArchSpec
    train: bool = False
    numerics: Numerics = FLOAT32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, out_indices: Sequence[int] = FEATURE_INDICES) -> list[Array]:
        out_indices = feature_indices(out_indices)
        x = space_to_depth(x.astype(self.numerics.dtype))
        x = unit_module(stem_unit(self.arch), self.train, self.numerics, self.axis_name)(x)
        maps = [x]
        for s, blocks in enumerate(stage_plan(self.arch)[: max(out_indices)], start=1):
            x = Stage(blocks, self.train, self.numerics, self.axis_name, name=f"layer{s}")(x)
            maps.append(x)
        return [maps[i] for i in out_indices]


class Head(nn.Module):
    """The classifier (``architecture.head_specs``): global average pool of the last feature
    map -> ``fc``, in float32 (the logits feed softmax and the loss)."""

    num_classes: int
    numerics: Numerics = FLOAT32

    @nn.compact
    def __call__(self, feature_map: Array) -> Array:
        fc = Dense(self.num_classes, HEAD_KERNEL_INIT, self.numerics.in_float32(), name="fc")
        return fc(global_pool(feature_map))


class TResNet(nn.Module):
    """TResNet classifier. Input: NHWC images in [0, 1] (no mean/std), sides multiples of 32.

    ``model.apply(variables, images)`` returns float32 logits (the pooled features when
    ``num_classes`` is 0); ``method="features"`` the pooled features and
    ``method="stage_features"`` feature maps for use as a backbone: the stem's and the four
    stages', or those of ``out_indices=(1, 2, 3, 4)`` (0: stem, 1-4: stages, as in timm).
    Training mode: ``model.apply(variables, images, train=True, mutable=["batch_stats"])``.

    How it computes is its own (``numerics``), wherever it is called from: ``dtype`` is the
    compute precision (parameters and BatchNorm statistics stay float32); a float32 model runs
    its convolutions and matrix products in true float32 unless ``allow_tf32`` (JAX's default
    precision: TF32 on NVIDIA GPUs since Ampere); ``pointwise_as_matmul`` writes 1x1
    convolutions as matrix products (``layers.conv2d``: a faster training step on XLA:CPU,
    ``runtime.xla_options.pointwise_as_matmul_for``), off by default so that a traced or
    exported program does not depend on the backend that traced it.
    """

    arch: ArchSpec
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    allow_tf32: bool = False
    pointwise_as_matmul: bool = False

    @property
    def numerics(self) -> Numerics:
        return Numerics.of(self.dtype, self.allow_tf32, self.pointwise_as_matmul)

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, output: str = "logits", out_indices: Sequence[int] = FEATURE_INDICES
    ) -> Array | list[Array]:
        body = Body(self.arch, train, self.numerics, self.axis_name, name="body")
        if output == "stages":
            return body(x, out_indices)
        last = body(x, (LAST_STAGE,))[0]
        if output == "features" or self.num_classes == 0:
            return global_pool(last)
        return Head(self.num_classes, self.numerics, name="head")(last)

    def features(self, x: Array, train: bool = False) -> Array:
        """Globally pooled features, (N, num_features), float32."""
        return self(x, train, output="features")

    def stage_features(
        self, x: Array, train: bool = False, out_indices: Sequence[int] = FEATURE_INDICES
    ) -> list[Array]:
        """Feature maps (NHWC) at ``out_indices``: 0 the stem, 1-4 the stages (strides
        ``FEATURE_STRIDES``: 4, 4, 8, 16, 32); stages after the last index asked for are not run."""
        return self(x, train, output="stages", out_indices=out_indices)
