"""The architecture of TResNet as numbers and plans, shared by the Linen and the NNX module:
the variants' numbers (``ArchSpec``), each stage's blocks (``BlockSpec``), each block's
conv+norm+act units (``UnitSpec``), every variable's shape and initialiser, and the feature maps
a model can return. Both modules are built from this plan and nothing else; nothing here builds
a module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tresnet_jax.errors import InputError
from tresnet_jax.model.layers import (
    Init,
    Specs,
    conv_norm_act_specs,
    dense_specs,
    nested,
    squeeze_excite_specs,
)
from tresnet_jax.model.ml_decoder import check_groups, decoder_specs, num_queries

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
        return tuple(self.planes * 2**i * EXPANSION[kind] for i, kind in enumerate(self.block_types))

    @property
    def num_features(self) -> int:
        return self.stage_channels[-1]


STAGE_STRIDES = (1, 2, 2, 2)
STAGE_HAS_SE = (True, True, True, False)
STEM_IN_FEATURES = 48  # 3 colours x the 4x4 space-to-depth block
SE_AFTER = "conv2"  # squeeze-excite follows this unit in both kinds of block
SHORTCUT_NAME = {1: "0", 2: "1"}  # timm's downsample Sequential: [AvgPool,] conv+norm


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """One conv (stride 1, 'same', no bias) -> BatchNorm -> optional LeakyReLU -> optional
    anti-aliased stride-2 downsampling, under timm's name for it."""

    name: str
    in_features: int
    out_features: int
    kernel_size: int
    slope: float | None = None  # LeakyReLU negative slope; None: no activation
    downsample: bool = False  # anti-aliased stride 2 after the activation
    zero_init_norm: bool = False  # the norm's scale starts at zero (a residual branch's last unit)

    @property
    def specs(self) -> Specs:
        return conv_norm_act_specs(self.in_features, self.out_features, self.kernel_size, self.zero_init_norm)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block: BasicBlock or Bottleneck, optional squeeze-excite and projection."""

    kind: str
    in_features: int
    planes: int
    stride: int
    project: bool  # shortcut through (avg pool +) 1x1 conv + norm
    se_width: int | None  # squeeze-excite hidden width; None: no SE
    slope: float

    @property
    def out_features(self) -> int:
        return self.planes * EXPANSION[self.kind]

    @property
    def units(self) -> tuple[UnitSpec, ...]:
        """The residual branch's units in order; the squeeze-excite follows ``SE_AFTER``."""
        down = self.stride == 2
        if self.kind == BASIC:
            return (
                UnitSpec("conv1", self.in_features, self.planes, 3, self.slope, down),
                UnitSpec("conv2", self.planes, self.planes, 3, zero_init_norm=True),
            )
        return (
            UnitSpec("conv1", self.in_features, self.planes, 1, self.slope),
            UnitSpec("conv2", self.planes, self.planes, 3, self.slope, down),
            UnitSpec("conv3", self.planes, self.out_features, 1, zero_init_norm=True),
        )

    @property
    def shortcut(self) -> UnitSpec | None:
        """The projection shortcut's conv + norm (after a 2x2 average pool when the block has
        stride 2), under ``downsample``; None: the identity."""
        if not self.project:
            return None
        return UnitSpec(SHORTCUT_NAME[self.stride], self.in_features, self.out_features, 1)


def stem_unit(arch: ArchSpec) -> UnitSpec:
    """The stem's unit, on the space-to-depth input."""
    return UnitSpec("conv1", STEM_IN_FEATURES, arch.planes, 3, arch.stem_slope)


def stage_plan(arch: ArchSpec) -> tuple[tuple[BlockSpec, ...], ...]:
    """Every block of the four stages, from the variant's numbers: the one place they are read."""
    stages, in_features = [], arch.planes
    for s, (kind, depth, stride, has_se) in enumerate(
        zip(arch.block_types, arch.layers, STAGE_STRIDES, STAGE_HAS_SE, strict=True)
    ):
        planes = arch.planes * 2**s
        se_width = (max(planes // 4, 64) if kind == BASIC else max(planes * 4 // 8, 64)) if has_se else None
        blocks = []
        for i in range(depth):
            out_features = planes * EXPANSION[kind]
            first = i == 0
            project = first and (stride != 1 or in_features != out_features)
            spec = BlockSpec(kind, in_features, planes, stride if first else 1, project, se_width, arch.block_slope)
            blocks.append(spec)
            in_features = out_features
        stages.append(tuple(blocks))
    return tuple(stages)


def block_specs(block: BlockSpec) -> Specs:
    """The variables of one block (``Block``'s, computed without tracing)."""
    specs: Specs = {}
    if block.shortcut:
        specs |= nested(("downsample", block.shortcut.name), block.shortcut.specs)
    for unit in block.units:
        specs |= nested((unit.name,), unit.specs)
        if unit.name == SE_AFTER and block.se_width:
            specs |= nested(("se",), squeeze_excite_specs(unit.out_features, block.se_width))
    return specs


HEAD_KERNEL_INIT = Init("normal", 0.01)
FC, ML_DECODER = "fc", "ml_decoder"
HEAD_KINDS = (FC, ML_DECODER)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """Which classifier head maps the last stage's feature map to the logits: ``fc`` (global
    average pool + linear, the original TResNet's) or ``ml_decoder`` (``model.ml_decoder``:
    cross-attention of K queries, ``num_groups``, to the spatial tokens; ``zero_shot``: a query
    per class from its word vector, given at call time)."""

    kind: str = FC
    num_groups: int | None = None
    zero_shot: bool = False

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise InputError(f"unknown head {self.kind!r}; known: {', '.join(HEAD_KINDS)}")
        if self.num_groups is not None and (
            isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1
        ):
            raise InputError(f"num_groups must be a whole number >= 1, got {self.num_groups!r}")
        if self.kind == FC and (self.num_groups is not None or self.zero_shot):
            raise InputError("num_groups and zero_shot are settings of the ml_decoder head")
        if self.zero_shot and self.num_groups is not None:
            raise InputError("a zero-shot ML-Decoder has a query per class: num_groups does not apply")

    def check_classes(self, num_classes: int) -> None:
        """An ML-Decoder's groups are at most its classes (the original caps them silently) and
        give an output to each (``ml_decoder.check_groups``)."""
        if self.num_groups is not None and self.num_groups > num_classes:
            raise InputError(f"num_groups {self.num_groups} is more than the {num_classes} classes")
        if self.kind == ML_DECODER and not self.zero_shot and num_classes:
            check_groups(num_classes, self.num_groups)

    def resolved(self, num_classes: int) -> HeadSpec:
        """The head of a ``num_classes`` model with an ML-Decoder's K written out (100 when
        None, at most the classes), so that two records of the same head compare equal."""
        if self.kind != ML_DECODER or self.zero_shot:
            return self
        return HeadSpec(ML_DECODER, num_queries(num_classes, self.num_groups))

    def describe(self) -> str:
        """The head in words: "fc", "ML-Decoder (K 80)", "zero-shot ML-Decoder"."""
        if self.kind == FC:
            return "fc"
        if self.zero_shot:
            return "zero-shot ML-Decoder"
        return "ML-Decoder" + (f" (K {self.num_groups})" if self.num_groups is not None else "")


FC_HEAD = HeadSpec()  # the original TResNet's classifier


def head_specs(num_features: int, num_classes: int, head: HeadSpec = FC_HEAD) -> Specs:
    """The classifier head's variables: the one declaration of each kind. A head, in each API,
    is one module named ``head`` that maps the last stage's feature map to the logits."""
    if head.kind == ML_DECODER:
        return decoder_specs(num_features, num_classes, head.num_groups, head.zero_shot)
    return nested(("fc",), dense_specs(num_features, num_classes, HEAD_KERNEL_INIT))


def variable_specs(arch: ArchSpec, num_classes: int, head: HeadSpec = FC_HEAD) -> Specs:
    """Flat (collection, module..., leaf) -> shape and initial distribution of every variable of
    a model, computing and tracing nothing (a test holds it equal to ``TResNet.init``'s)."""
    stem = stem_unit(arch)
    specs = nested(("body", stem.name), stem.specs)
    for s, blocks in enumerate(stage_plan(arch), start=1):
        for i, block in enumerate(blocks):
            specs |= nested(("body", f"layer{s}", str(i)), block_specs(block))
    if num_classes:
        specs |= nested(("head",), head_specs(arch.num_features, num_classes, head))
    return specs


def variable_shapes(
    arch: ArchSpec, num_classes: int, head: HeadSpec = FC_HEAD
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat (collection, module..., leaf) -> shape of a model's variables, computing nothing."""
    return {path: spec.shape for path, spec in variable_specs(arch, num_classes, head).items()}


FEATURE_INDICES = (0, 1, 2, 3, 4)  # the stem, stages 1-4: timm's feature_info numbering
FEATURE_STRIDES = (4, 4, 8, 16, 32)
LAST_STAGE = FEATURE_INDICES[-1]


def feature_indices(out_indices: Sequence[int]) -> tuple[int, ...]:
    """``out_indices`` checked: a non-empty sequence of 0 (the stem) to 4 (stage 4)."""
    indices = tuple(out_indices)
    if not indices or any(not isinstance(i, int) or i not in FEATURE_INDICES for i in indices):
        raise ValueError(f"out_indices must be 0 (stem) to {LAST_STAGE} (last stage), got {out_indices!r}")
    return indices


def global_pool(x: Array) -> Array:
    """The head's input: the spatial mean of the last feature map, in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
