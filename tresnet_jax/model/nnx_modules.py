"""TResNet as a Flax NNX module: the same architecture plan, variables and weights as the Linen
model, in NNX's object style (the public entry, with loading, is ``tresnet_jax.nnx``).

The modules are built from the plan (``architecture.stage_plan``, ``BlockSpec.units``,
``stem_unit``) and each declares its variables from the specs that define the Linen model's
(``UnitSpec.specs``, ``architecture.variable_specs``), so the architecture is written once.
``nnx.state(model)`` paths are the Linen variable paths (``body/layer3/0/conv2/conv/kernel``;
running statistics are ``nnx.BatchStat``), which is what ``from_linen_variables`` /
``to_linen_variables`` rely on: a model is built abstractly and filled with Linen variables, so
making one compiles and initialises nothing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from tresnet_jax.model.architecture import (
    FC_HEAD,
    FEATURE_INDICES,
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
    variable_specs,
)
from tresnet_jax.model.layers import (
    Numerics,
    Specs,
    avg_pool_shortcut,
    batch_norm,
    conv_norm_act_tail,
    space_to_depth,
    squeeze_excite,
)
from tresnet_jax.model.linen import TResNet as LinenTResNet
from tresnet_jax.model.ml_decoder import QUERIES, decode

Array = jax.Array
Dtype = Any
Variables = dict[str, Any]
Keys = Iterator[jax.Array]  # one PRNG key per variable, in construction order


class Constant(nnx.Variable):
    """A variable that is never trained: ML-Decoder's queries (Linen's ``constants``)."""


VARIABLE_TYPES = {"params": nnx.Param, "batch_stats": nnx.BatchStat, QUERIES: Constant}  # Linen collection -> type


def _under(specs: Specs, name: str) -> Specs:
    """The specs of submodule ``name``, their paths made relative to it (``layers.nested``'s inverse)."""
    return {(path[0], *path[2:]): spec for path, spec in specs.items() if len(path) > 2 and path[1] == name}


def _declare(module: nnx.Module, specs: Specs, keys: Keys) -> None:
    """A module's own variables from their specs, as attributes named by leaf, each drawn with
    the next key. Under ``nnx.eval_shape`` (``from_linen_variables``) they are shapes only."""
    for (collection, name), spec in specs.items():
        setattr(module, name, VARIABLE_TYPES[collection](spec.init(next(keys), spec.shape)))


class Conv(nnx.Module):
    """``Numerics.conv`` with its ``kernel``."""

    def __init__(self, specs: Specs, numerics: Numerics, *, keys: Keys) -> None:
        _declare(self, specs, keys)
        self.numerics = numerics

    def __call__(self, x: Array) -> Array:
        return self.numerics.conv(x, self.kernel[...])


class BatchNorm(nnx.Module):
    """``layers.batch_norm``: running statistics unless ``use_running_average`` is False
    (``model.train()``), which normalises with the batch's and updates ``mean``/``var``."""

    def __init__(self, specs: Specs, *, keys: Keys) -> None:
        _declare(self, specs, keys)
        self.use_running_average = True

    def __call__(self, x: Array) -> Array:
        train = not self.use_running_average
        y, mean, var = batch_norm(x, self.scale[...], self.bias[...], self.mean[...], self.var[...], train)
        if train:  # set_value, not [...] =: that one probes the tracer's sharding, seconds per trace
            self.mean.set_value(mean)
            self.var.set_value(var)
        return y


class ConvNormAct(nnx.Module):
    """One unit of the plan (``UnitSpec``): ``conv`` -> ``bn`` -> optional LeakyReLU -> optional
    anti-aliased stride 2."""

    def __init__(self, unit: UnitSpec, numerics: Numerics, *, keys: Keys) -> None:
        self.conv = Conv(_under(unit.specs, "conv"), numerics, keys=keys)
        self.bn = BatchNorm(_under(unit.specs, "bn"), keys=keys)
        self.slope, self.downsample = unit.slope, unit.downsample

    def __call__(self, x: Array) -> Array:
        return conv_norm_act_tail(self.bn(self.conv(x)), self.slope, self.downsample)


class Dense(nnx.Module):
    """``Numerics.dense`` with its ``kernel`` and ``bias``."""

    def __init__(self, specs: Specs, numerics: Numerics, *, keys: Keys) -> None:
        _declare(self, specs, keys)
        self.numerics = numerics

    def __call__(self, x: Array) -> Array:
        return self.numerics.dense(x, self.kernel[...], self.bias[...])


class SqueezeExcite(nnx.Module):
    def __init__(self, specs: Specs, numerics: Numerics, *, keys: Keys) -> None:
        self.fc1 = Dense(_under(specs, "fc1"), numerics, keys=keys)
        self.fc2 = Dense(_under(specs, "fc2"), numerics, keys=keys)

    def __call__(self, x: Array) -> Array:
        return squeeze_excite(x, self.fc1, self.fc2)


class Block(nnx.Module):
    """One residual block of the plan: its units (``conv1``...), ``se`` after ``SE_AFTER``, the
    shortcut's unit in ``downsample`` (``downsample/1`` after the average pool, as timm's
    Sequential numbers it), ReLU."""

    def __init__(self, block: BlockSpec, specs: Specs, numerics: Numerics, *, keys: Keys) -> None:
        self.block = block
        if shortcut := block.shortcut:
            self.downsample = nnx.Dict({shortcut.name: ConvNormAct(shortcut, numerics, keys=keys)})
        for unit in block.units:
            setattr(self, unit.name, ConvNormAct(unit, numerics, keys=keys))
        if block.se_width:
            self.se = SqueezeExcite(_under(specs, "se"), numerics, keys=keys)

    def __call__(self, x: Array) -> Array:
        block = self.block
        shortcut = x
        if block.shortcut:
            pooled = avg_pool_shortcut(x) if block.stride == 2 else x
            shortcut = self.downsample[block.shortcut.name](pooled)
        y = x
        for unit in block.units:
            y = getattr(self, unit.name)(y)
            if unit.name == SE_AFTER and block.se_width:
                y = self.se(y)
        return jax.nn.relu(y + shortcut)


class Body(nnx.Module):
    """Space-to-depth, the stem ``conv1`` and the stages ``layer1``-``layer4`` (lists of blocks)."""

    def __init__(self, arch: ArchSpec, specs: Specs, numerics: Numerics, *, keys: Keys) -> None:
        self.numerics = numerics
        stem = stem_unit(arch)
        setattr(self, stem.name, ConvNormAct(stem, numerics, keys=keys))
        for s, blocks in enumerate(stage_plan(arch), start=1):
            stage = _under(specs, f"layer{s}")
            layer = nnx.List(Block(b, _under(stage, str(i)), numerics, keys=keys) for i, b in enumerate(blocks))
            setattr(self, f"layer{s}", layer)

    def __call__(self, x: Array, out_indices: Sequence[int] = FEATURE_INDICES) -> list[Array]:
        """The feature maps at ``out_indices``; stages after the last one asked for are not run."""
        out_indices = feature_indices(out_indices)
        x = self.conv1(space_to_depth(x.astype(self.numerics.dtype)))
        maps = [x]
        for s in range(1, max(out_indices) + 1):
            for block in getattr(self, f"layer{s}"):
                x = block(x)
            maps.append(x)
        return [maps[i] for i in out_indices]


class Head(nnx.Module):
    """The classifier (``architecture.head_specs``): global average pool of the last feature
    map -> ``fc``, in float32 (the logits feed softmax and the loss)."""

    def __init__(self, specs: Specs, numerics: Numerics, *, keys: Keys) -> None:
        self.fc = Dense(_under(specs, "fc"), numerics.in_float32(), keys=keys)

    def __call__(self, feature_map: Array) -> Array:
        return self.fc(global_pool(feature_map))


class VariableTree(nnx.Module):
    """Variables declared from specs at any depth: its own as attributes named by leaf, deeper
    ones in child trees named as their paths say (``linen.declare_tree``'s twin)."""

    def __init__(self, specs: Specs, *, keys: Keys) -> None:
        _declare(self, {path: spec for path, spec in specs.items() if len(path) == 2}, keys)
        self.names = tuple(dict.fromkeys(path[1] for path in specs))
        for child in dict.fromkeys(path[1] for path in specs if len(path) > 2):
            setattr(self, child, VariableTree(_under(specs, child), keys=keys))

    def values(self) -> dict[str, Any]:
        """The arrays, as a nested dict by name."""
        tree = {}
        for name in self.names:
            value = getattr(self, name)
            tree[name] = value.values() if isinstance(value, VariableTree) else value[...]
        return tree


class MLDecoderHead(VariableTree):
    """ML-Decoder (``model.ml_decoder``): the Linen ``MLDecoderHead``'s variables and numbers.
    Dropout runs in training mode (``model.train()``) and draws from ``dropout_keys``, one PRNG
    key per example, which training must then pass."""

    def __init__(self, specs: Specs, num_classes: int, numerics: Numerics, *, keys: Keys) -> None:
        super().__init__(specs, keys=keys)
        self.num_classes, self.numerics = num_classes, numerics
        self.deterministic = True

    def __call__(
        self, feature_map: Array, class_embeddings: Array | None = None, dropout_keys: Array | None = None
    ) -> Array:
        tree = self.values()
        queries = tree.pop("queries", None)
        if not self.deterministic and dropout_keys is None:
            raise ValueError("an ML-Decoder in training mode draws its dropout from dropout_keys: one key per example")
        keys = None if self.deterministic else dropout_keys
        return decode(feature_map, tree, queries, self.numerics, self.num_classes, class_embeddings, keys)


class TResNet(nnx.Module):
    """TResNet classifier. Input: NHWC images in [0, 1] (no mean/std), sides multiples of 32.

    ``model(x)``: float32 logits (the pooled features when ``num_classes`` is 0);
    ``features(x)``: pooled float32 features; ``stage_features(x, out_indices)``: feature maps,
    0 the stem, 1-4 the stages (strides 4, 4, 8, 16, 32). ``dtype``, ``allow_tf32`` and
    ``pointwise_as_matmul`` are the Linen model's (``linen.TResNet``): how it computes is its
    own, wherever it is called from; parameters and running statistics stay float32. Built in
    eval mode; ``train()`` switches BatchNorm to batch statistics (and an ML-Decoder's dropout
    on: pass ``dropout_keys``, one PRNG key per example). ``head_spec``: the classifier
    (``HeadSpec``); a zero-shot ML-Decoder takes ``class_embeddings`` at call time. Constructing one directly
    draws the original's initial values with ``rngs``; ``create_model`` and ``load`` draw
    nothing on the device.
    """

    def __init__(
        self,
        arch: ArchSpec,
        num_classes: int = 1000,
        dtype: Dtype = jnp.float32,
        *,
        allow_tf32: bool = False,
        pointwise_as_matmul: bool = False,
        head_spec: HeadSpec = FC_HEAD,
        rngs: nnx.Rngs,
    ) -> None:
        self.arch, self.num_classes, self.dtype = arch, num_classes, dtype
        self.allow_tf32, self.pointwise_as_matmul, self.head_spec = allow_tf32, pointwise_as_matmul, head_spec
        specs = variable_specs(arch, num_classes, head_spec)
        keys = iter(jax.random.split(rngs.params(), len(specs)))
        self.body = Body(arch, _under(specs, "body"), self.numerics, keys=keys)
        head: Head | MLDecoderHead | None = None
        if num_classes and head_spec.kind == ML_DECODER:
            head = MLDecoderHead(_under(specs, "head"), num_classes, self.numerics, keys=keys)
        elif num_classes:
            head = Head(_under(specs, "head"), self.numerics, keys=keys)
        self.head = nnx.data(head)

    @property
    def numerics(self) -> Numerics:
        return Numerics.of(self.dtype, self.allow_tf32, self.pointwise_as_matmul)

    def __call__(self, x: Array, class_embeddings: Array | None = None, dropout_keys: Array | None = None) -> Array:
        last = self.body(x, (LAST_STAGE,))[0]
        if isinstance(self.head, MLDecoderHead):
            return self.head(last, class_embeddings, dropout_keys)
        return global_pool(last) if self.head is None else self.head(last)

    def features(self, x: Array) -> Array:
        """Globally pooled features, (N, num_features), float32."""
        return global_pool(self.body(x, (LAST_STAGE,))[0])

    def stage_features(self, x: Array, out_indices: Sequence[int] = FEATURE_INDICES) -> list[Array]:
        """Feature maps (NHWC) at ``out_indices`` (0: stem, 1-4: stages, as in timm)."""
        return self.body(x, out_indices)


def from_linen_variables(model: LinenTResNet, variables: Variables) -> TResNet:
    """The NNX twin of a Linen ``model`` holding ``variables`` (``{params, batch_stats}``): built
    abstractly, then filled with these arrays (shared, not copied; numpy ones are put on the
    default device). Raises ValueError when the variables do not fit the architecture. Linen's
    ``axis_name`` has no counterpart: under ``jax.jit`` with the batch sharded over devices, the
    BatchNorm statistics are the whole batch's already."""
    numerics = dict(
        allow_tf32=model.allow_tf32, pointwise_as_matmul=model.pointwise_as_matmul, head_spec=model.head_spec
    )
    abstract = nnx.eval_shape(lambda: TResNet(model.arch, model.num_classes, model.dtype, **numerics, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    given = traverse_util.flatten_dict(dict(variables))
    filled, wanted = [], set()
    for path, slot in nnx.to_flat_state(state):
        key = (_collection(slot), *map(str, path))
        wanted.add(key)
        value = given.get(key)
        if getattr(value, "shape", None) != slot.shape:
            found = "missing" if value is None else f"shape {getattr(value, 'shape', None)}"
            raise ValueError(f"variables do not fit the model at {'/'.join(key)}: {found}, expected {slot.shape}")
        filled.append((path, slot.replace(jnp.asarray(value, jnp.float32))))
    if extra := sorted(set(given) - wanted):
        raise ValueError(f"variables do not fit the model: {'/'.join(extra[0])} is not one of its variables")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def to_linen_variables(model: TResNet) -> Variables:
    """The model's ``{params, batch_stats}`` as the Linen model holds them (its arrays, not copies):
    for ``TResNet.apply``, ``storage.save_weights`` and the exporters."""
    flat = {
        (_collection(variable), *map(str, path)): variable[...]
        for path, variable in nnx.to_flat_state(nnx.state(model))
    }
    return traverse_util.unflatten_dict(flat)


def _collection(variable: nnx.Variable) -> str:
    """The Linen collection an NNX variable belongs to: ``params``, ``batch_stats`` or ``constants``."""
    return next(name for name, kind in VARIABLE_TYPES.items() if isinstance(variable, kind))
