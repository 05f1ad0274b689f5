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
    SHORTCUT_NAME,
    ArchSpec,
    BlockSpec,
    block_units,
    feature_indices,
    global_pool,
    stage_plan,
)
from tresnet_jax.model.layers import (
    ConvNormAct,
    Dense,
    SqueezeExcite,
    avg_pool_shortcut,
    space_to_depth,
)

Array = jax.Array
Dtype = Any


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
        return ConvNormAct(
            self.features,
            1,
            None,
            train=self.train,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name=SHORTCUT_NAME[self.stride],
        )(x)


class Block(nn.Module):
    """One residual block (``BlockSpec``): branch units, squeeze-excite, shortcut, ReLU."""

    spec: BlockSpec
    train: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        unit = dict(train=self.train, dtype=self.dtype, axis_name=self.axis_name)
        block = self.spec
        shortcut = x
        if block.project:
            shortcut = Shortcut(block.out_features, block.stride, name="downsample", **unit)(x)
        y = x
        for name, _, cout, k, slope, down, zero_init in block_units(block):
            y = ConvNormAct(cout, k, slope, downsample=down, zero_init_norm=zero_init, name=name, **unit)(y)
            if name == SE_AFTER and block.se_width:
                y = SqueezeExcite(block.se_width, dtype=self.dtype, name="se")(y)
        return nn.relu(y + shortcut)


class Stage(nn.Module):
    """One stage: blocks named ``0``, ``1``, ... as in timm's Sequential."""

    blocks: tuple[BlockSpec, ...]
    train: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, spec in enumerate(self.blocks):
            x = Block(spec, train=self.train, dtype=self.dtype, axis_name=self.axis_name, name=str(i))(x)
        return x


class Body(nn.Module):
    """Space-to-depth stem and the four stages; returns the feature maps at ``out_indices``
    (``FEATURE_INDICES``), running no stage after the last one asked for."""

    arch: ArchSpec
    train: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, out_indices: Sequence[int] = FEATURE_INDICES) -> list[Array]:
        out_indices = feature_indices(out_indices)
        unit = dict(train=self.train, dtype=self.dtype, axis_name=self.axis_name)
        x = space_to_depth(x.astype(self.dtype))
        x = ConvNormAct(self.arch.planes, 3, self.arch.stem_slope, name="conv1", **unit)(x)
        maps = [x]
        for s, blocks in enumerate(stage_plan(self.arch)[: max(out_indices)], start=1):
            x = Stage(blocks, name=f"layer{s}", **unit)(x)
            maps.append(x)
        return [maps[i] for i in out_indices]


class Head(nn.Module):
    """Global average pool -> linear, in float32 (the logits feed softmax and the loss)."""

    num_classes: int

    @nn.compact
    def __call__(self, features: Array) -> Array:
        return Dense(self.num_classes, HEAD_KERNEL_INIT, jnp.float32, name="fc")(features)


class TResNet(nn.Module):
    """TResNet classifier. Input: NHWC images in [0, 1] (no mean/std), sides multiples of 32.

    ``model.apply(variables, images)`` returns float32 logits (the pooled features when
    ``num_classes`` is 0); ``method="features"`` the pooled features and
    ``method="stage_features"`` feature maps for use as a backbone: the stem's and the four
    stages', or those of ``out_indices=(1, 2, 3, 4)`` (0: stem, 1-4: stages, as in timm).
    Training mode: ``model.apply(variables, images, train=True, mutable=["batch_stats"])``.
    """

    arch: ArchSpec
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, output: str = "logits", out_indices: Sequence[int] = FEATURE_INDICES
    ) -> Array | list[Array]:
        body = Body(self.arch, train=train, dtype=self.dtype, axis_name=self.axis_name, name="body")
        if output == "stages":
            return body(x, out_indices)
        features = global_pool(body(x, (LAST_STAGE,))[0])
        if output == "features" or self.num_classes == 0:
            return features
        return Head(self.num_classes, name="head")(features)

    def features(self, x: Array, train: bool = False) -> Array:
        """Globally pooled features, (N, num_features), float32."""
        return self(x, train, output="features")

    def stage_features(
        self, x: Array, train: bool = False, out_indices: Sequence[int] = FEATURE_INDICES
    ) -> list[Array]:
        """Feature maps (NHWC) at ``out_indices``: 0 the stem, 1-4 the stages (strides
        ``FEATURE_STRIDES``: 4, 4, 8, 16, 32); stages after the last index asked for are not run."""
        return self(x, train, output="stages", out_indices=out_indices)
