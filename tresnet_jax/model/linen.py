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
    FC_HEAD,
    FEATURE_INDICES,
    HEAD_KERNEL_INIT,
    LAST_STAGE,
    ML_DECODER,
    SE_AFTER,
    ArchSpec,
    BlockSpec,
    HeadSpec,
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
    Specs,
    SqueezeExcite,
    avg_pool_shortcut,
    declare,
    space_to_depth,
)
from tresnet_jax.model.ml_decoder import decode, decoder_specs

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


def declare_tree(module: nn.Module, specs: Specs) -> dict[str, Any]:
    """Variables declared from specs at any depth (``(collection, module..., leaf)``): the
    module's own, and the deeper ones in submodules named as their paths say. Returns their
    values as a nested dict by name."""
    own = {path: spec for path, spec in specs.items() if len(path) == 2}
    tree = {name: getattr(value, "value", value) for name, value in declare(module, own).items()}
    for child in dict.fromkeys(path[1] for path in specs if len(path) > 2):
        deeper = {(path[0], *path[2:]): spec for path, spec in specs.items() if len(path) > 2 and path[1] == child}
        tree[child] = VariableTree(deeper, name=child)()
    return tree


class VariableTree(nn.Module):
    """A submodule that only holds variables (``declare_tree``)."""

    specs: Specs

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        return declare_tree(self, self.specs)


class MLDecoderHead(nn.Module):
    """ML-Decoder (``model.ml_decoder``) in place of pooling and ``fc``: its variables under
    ``params/head``, the queries under ``constants/head/queries``."""

    num_classes: int
    spec: HeadSpec
    numerics: Numerics = FLOAT32

    @nn.compact
    def __call__(
        self, feature_map: Array, class_embeddings: Array | None = None, dropout_keys: Array | None = None
    ) -> Array:
        spec = self.spec
        specs = decoder_specs(feature_map.shape[-1], self.num_classes, spec.num_groups, spec.zero_shot)
        tree = declare_tree(self, specs)
        queries = tree.pop("queries", None)
        return decode(feature_map, tree, queries, self.numerics, self.num_classes, class_embeddings, dropout_keys)


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

    ``head_spec``: the classifier, ``fc`` or ML-Decoder (``HeadSpec``). An ML-Decoder takes
    ``class_embeddings`` when zero-shot ((classes, 300) word vectors of the classes to score)
    and draws its dropout in training from ``dropout_keys``, one PRNG key per example, or else
    from the ``dropout`` PRNG stream (``rngs={"dropout": key}``); its queries are the
    ``constants`` collection, which training never updates.
    """

    arch: ArchSpec
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    allow_tf32: bool = False
    pointwise_as_matmul: bool = False
    head_spec: HeadSpec = FC_HEAD

    @property
    def numerics(self) -> Numerics:
        return Numerics.of(self.dtype, self.allow_tf32, self.pointwise_as_matmul)

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool = False,
        output: str = "logits",
        out_indices: Sequence[int] = FEATURE_INDICES,
        class_embeddings: Array | None = None,
        dropout_keys: Array | None = None,
    ) -> Array | list[Array]:
        body = Body(self.arch, train, self.numerics, self.axis_name, name="body")
        if output == "stages":
            return body(x, out_indices)
        last = body(x, (LAST_STAGE,))[0]
        if output == "features" or self.num_classes == 0:
            return global_pool(last)
        if self.head_spec.kind != ML_DECODER:
            return Head(self.num_classes, self.numerics, name="head")(last)
        if train and dropout_keys is None:
            dropout_keys = jax.random.split(self.make_rng("dropout"), x.shape[0])
        head = MLDecoderHead(self.num_classes, self.head_spec, self.numerics, name="head")
        return head(last, class_embeddings, dropout_keys if train else None)

    def features(self, x: Array, train: bool = False) -> Array:
        """Globally pooled features, (N, num_features), float32."""
        return self(x, train, output="features")

    def stage_features(
        self, x: Array, train: bool = False, out_indices: Sequence[int] = FEATURE_INDICES
    ) -> list[Array]:
        """Feature maps (NHWC) at ``out_indices``: 0 the stem, 1-4 the stages (strides
        ``FEATURE_STRIDES``: 4, 4, 8, 16, 32); stages after the last index asked for are not run."""
        return self(x, train, output="stages", out_indices=out_indices)
