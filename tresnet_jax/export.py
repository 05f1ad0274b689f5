"""Deployment exports of a TResNet with its weights baked in, for serving without this package.

- ONNX (onnxruntime, TensorRT): translated equation by equation from the jaxpr of the Flax
  model's inference forward, so the file computes what the model computes; it is not a second
  implementation of the architecture. The translation stores feature maps NCHW (the layout
  of ONNX's and TensorRT's convolutions) where the jaxpr is NHWC, and folds every computation
  on weights alone (BatchNorm scales, casts) into constants. The blur's reflect
  padding stays what the jaxpr makes of it: slices and concatenations, no ``Pad``.
- Serialized StableHLO (``jax.export``), lowered for the CPU and CUDA: ``jax.export.deserialize``
  gives a function of the images alone.

Both trace the model with its 1x1 convolutions as convolutions (``pointwise_as_matmul`` off),
so a file does not depend on the backend that made it, and at the model's own precision (true
float32 for a float32 model). Both take any batch size; the image size is fixed when exporting.

An ML-Decoder head is exported as the model computes it (its queries are constants of the
file). A zero-shot ML-Decoder scores the classes it is given at run time, and so does its
export: ``class_embeddings`` float32 [classes, 300] is a second input, with any number of
classes, and the logits are [batch, classes]; nothing about the classes is fixed when exporting.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.ml_decoder import WORD_DIM
from tresnet_jax.weights.info import WeightsInfo

BATCH = "batch"  # the symbolic batch dimension of both exports
CLASSES = "classes"  # a zero-shot export's symbolic number of classes
INPUT_NAME, OUTPUT_NAME = "images", "logits"
EMBEDDINGS_NAME = "class_embeddings"  # a zero-shot export's second input
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # the IR version that came with opset 17; newer ones shut out older runtimes
STABLEHLO_PLATFORMS = ("cpu", "cuda")
NCHW = (0, 3, 1, 2)  # axis order in which an NHWC feature map is stored in the ONNX graph


def _zero_shot(model: TResNet) -> bool:
    return model.head_spec.zero_shot and model.num_classes > 0


def _inference(model: TResNet, variables: dict[str, Any]) -> Callable[..., jax.Array]:
    """images (N, H, W, 3) [, class_embeddings (C, 300) of a zero-shot model] -> logits, with
    the variables (every collection) closed over: constants of the export; 1x1 convolutions as
    convolutions."""
    plain = model.clone(pointwise_as_matmul=False)
    if _zero_shot(model):
        return lambda images, class_embeddings: plain.apply(variables, images, class_embeddings=class_embeddings)
    return lambda images: plain.apply(variables, images)


def _input_specs(model: TResNet, image_size: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The images of any batch size, and a zero-shot model's word vectors of any number of classes."""
    batch, classes = jax.export.symbolic_shape(f"{BATCH}, {CLASSES}")
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    if not _zero_shot(model):
        return (images,)
    return images, jax.ShapeDtypeStruct((classes, WORD_DIM), jnp.float32)


def stablehlo_export(model: TResNet, variables: dict[str, Any], image_size: int) -> bytes:
    """The serialized ``jax.export.Exported`` of the inference forward: float32 NHWC images of
    any batch size (and a zero-shot model's float32 (classes, 300) class embeddings) -> float32
    logits, for the CPU and CUDA."""
    forward = jax.jit(_inference(model, variables))
    exported = jax.export.export(forward, platforms=STABLEHLO_PLATFORMS)(*_input_specs(model, image_size))
    return bytes(exported.serialize())


def onnx_model(model: TResNet, variables: dict[str, Any], image_size: int, properties: dict[str, str]) -> Any:
    """The inference forward as a checked ``onnx.ModelProto``: input ``images`` float32
    [batch, 3, H, W] (NCHW) and, for a zero-shot model, ``class_embeddings`` float32
    [classes, 300]; output ``logits`` float32 [batch, classes]; ``properties`` go into the
    model's metadata."""
    import onnx
    from onnx import helper

    closed = jax.make_jaxpr(_inference(model, variables))(*_input_specs(model, image_size))
    graph = _Graph()
    images = _Value(INPUT_NAME, NCHW, closed.in_avals[0].shape)
    args = [images]
    inputs = [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, [BATCH, 3, image_size, image_size])]
    if _zero_shot(model):
        args.append(_Value(EMBEDDINGS_NAME, (0, 1), closed.in_avals[1].shape))
        inputs.append(helper.make_tensor_value_info(EMBEDDINGS_NAME, onnx.TensorProto.FLOAT, [CLASSES, WORD_DIM]))
    for value in args:
        graph.add_input(value)
    (logits,) = _convert(graph, closed.jaxpr, closed.consts, args)
    graph.nodes.append(helper.make_node("Identity", [_tensor(graph, logits)], [OUTPUT_NAME]))
    classes = closed.out_avals[0].shape[1]
    classes = classes if isinstance(classes, int) else CLASSES
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, [BATCH, classes])]
    proto = helper.make_model(
        helper.make_graph(graph.nodes, "tresnet", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name="tresnet_jax",
    )
    helper.set_model_props(proto, properties)
    onnx.checker.check_model(proto)
    return proto


def onnx_properties(info: WeightsInfo, image_size: int, dtype: str) -> dict[str, str]:
    """What the ONNX file says about itself (``metadata_props``)."""
    properties = {
        "model": info.model,
        "head": info.head.describe(),
        "num_classes": str(info.num_classes),
        "multi_label": str(info.multi_label).lower(),
        "tag": str(info.tag),
        "compute_dtype": dtype,
        "input": f"{INPUT_NAME}: float32 [batch, 3, {image_size}, {image_size}], NCHW, RGB in [0, 1], no mean/std",
        "preprocessing": json.dumps(info.preprocessing.to_json(), sort_keys=True),
    }
    if info.head.zero_shot and info.num_classes:
        properties["num_classes"] = "the rows of class_embeddings"
        properties[EMBEDDINGS_NAME] = f"float32 [classes, {WORD_DIM}]: a word vector a class to score, in logit order"
    return properties


# --- jaxpr -> ONNX -----------------------------------------------------------------------
# A value of the jaxpr becomes a numpy array (a constant: the weights and whatever is computed
# from them alone) or a _Value (a tensor of the ONNX graph). Every rule below translates one
# primitive of the inference forward.


@dataclasses.dataclass(frozen=True)
class _Value:
    """The ONNX tensor ``name`` holds the jaxpr value of ``shape`` with its axes in the order
    ``perm`` (``NCHW`` for an NHWC feature map, identity elsewhere)."""

    name: str
    perm: tuple[int, ...]
    shape: tuple[Any, ...]  # the jaxpr's shape; the batch is symbolic


class _Graph:
    """The nodes and initializers being built, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.scope = ""
        self._counter = itertools.count()
        self._small: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._symbols: dict[str, tuple[str, int]] = {}  # symbolic dimension -> (input, stored axis)
        self._sizes: dict[str, str] = {}  # symbolic dimension -> its size, a 1-D int64 tensor

    def add_input(self, value: _Value) -> None:
        """Where the graph finds the size of each symbolic dimension of an input."""
        for axis, size in enumerate(value.shape):
            if not isinstance(size, (int, np.integer)):
                self._symbols.setdefault(str(size), (value.name, value.perm.index(axis)))

    def shape(self, shape: tuple[Any, ...]) -> str:
        """A 1-D int64 tensor holding ``shape``: its numbers as constants, each symbolic dimension
        read once from the input that has it."""
        parts = []
        for size in shape:
            if isinstance(size, (int, np.integer)):
                parts.append(self.constant(np.array([size], np.int64)))
                continue
            if str(size) not in self._sizes:
                name, axis = self._symbols[str(size)]
                self._sizes[str(size)] = self.node("Shape", [name], start=axis, end=axis + 1)
            parts.append(self._sizes[str(size)])
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, axis=0)

    def constant(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        array = np.ascontiguousarray(array)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key in self._small:
            return self._small[key]
        name = f"const_{next(self._counter)}"
        self.initializers.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._small[key] = name
        return name

    def node(self, op: str, inputs: list[str], **attributes: Any) -> str:
        from onnx import helper

        out = f"{op.lower()}_{next(self._counter)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{self.scope}/{out}", **attributes))
        return out


def _convert(graph: _Graph, jaxpr: Any, consts: list[Any], args: list[Any]) -> list[Any]:
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, (np.asarray(c) for c in consts), strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(var: Any) -> Any:
        return np.asarray(var.val, var.aval.dtype) if isinstance(var, jax_core.Literal) else env[var]

    for eqn in jaxpr.eqns:
        outs = _convert_equation(graph, eqn, [read(v) for v in eqn.invars])
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _convert_equation(graph: _Graph, eqn: Any, ins: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    if all(isinstance(x, np.ndarray) for x in ins) and all(_static(v.aval.shape) for v in eqn.outvars):
        outs = eqn.primitive.bind(*ins, **eqn.params)  # computed once, here: a constant of the graph
        return [np.asarray(o) for o in (outs if eqn.primitive.multiple_results else [outs])]
    graph.scope = str(eqn.source_info.name_stack)
    activation = _ACTIVATIONS.get(eqn.params.get("name"))
    if name in _CALLS and activation is not None:
        return [activation(graph, eqn, *ins)]
    if name in _CALLS:
        inner = eqn.params["jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"]
        return _convert(graph, inner.jaxpr, inner.consts, ins)
    if name in _ELEMENTWISE:
        return [_elementwise(graph, eqn, ins)]
    if name not in _RULES:
        raise NotImplementedError(f"no ONNX translation for the jaxpr primitive {name!r}")
    return [_RULES[name](graph, eqn, *ins)]


def _static(shape: tuple[Any, ...]) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in shape)


def _out_shape(eqn: Any) -> tuple[Any, ...]:
    return tuple(eqn.outvars[0].aval.shape)


def _ndim(x: Any) -> int:
    return x.ndim if isinstance(x, np.ndarray) else len(x.shape)


def _value(graph: _Graph, x: Any) -> _Value:
    if isinstance(x, np.ndarray):
        return _Value(graph.constant(x), tuple(range(x.ndim)), x.shape)
    return x


def _tensor(graph: _Graph, x: Any, perm: tuple[int, ...] | None = None) -> str:
    """The ONNX tensor holding ``x`` with its axes in the order ``perm`` (default: as is)."""
    perm = tuple(range(_ndim(x))) if perm is None else perm
    if isinstance(x, np.ndarray):
        return graph.constant(x.transpose(perm) if x.ndim else x)
    x = _value(graph, x)
    if x.perm == perm or not x.shape:
        return x.name
    where = np.argsort(x.perm)  # where each axis of the jaxpr value is stored
    return graph.node("Transpose", [x.name], perm=[int(where[axis]) for axis in perm])


def _reshape_to(graph: _Graph, x: Any, shape: tuple[Any, ...]) -> _Value:
    """Reshape; the symbolic batch is copied (0) where it stays in place, else inferred (-1)."""
    x = _value(graph, x)
    spec = [
        int(d) if isinstance(d, (int, np.integer)) else 0 if i < len(x.shape) and d == x.shape[i] else -1
        for i, d in enumerate(shape)
    ]
    if spec.count(-1) > 1:
        raise NotImplementedError(f"reshape to {shape}: more than one dimension to infer")
    name = graph.node("Reshape", [_tensor(graph, x), graph.constant(np.array(spec, np.int64))])
    return _Value(name, tuple(range(len(shape))), shape)


_ELEMENTWISE = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "exp": "Exp",
    "sqrt": "Sqrt",
    "logistic": "Sigmoid",
    "convert_element_type": "Cast",
}


def _elementwise(graph: _Graph, eqn: Any, ins: list[Any]) -> _Value:
    """Operands of the output's rank are brought to the layout of the first non-constant one;
    scalars and size-1 axes broadcast as in the jaxpr."""
    shape = _out_shape(eqn)
    perm = next((x.perm for x in ins if isinstance(x, _Value) and len(x.shape) == len(shape)), tuple(range(len(shape))))
    names = [_tensor(graph, x, perm if _ndim(x) == len(shape) else None) for x in ins]
    attributes = {}
    if eqn.primitive.name == "convert_element_type":
        attributes["to"] = _onnx_dtype(eqn.params["new_dtype"])
    return _Value(graph.node(_ELEMENTWISE[eqn.primitive.name], names, **attributes), perm, shape)


def _onnx_dtype(dtype: Any) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _leaky_relu(graph: _Graph, eqn: Any, x: Any, slope: Any) -> _Value:
    """``jax.nn.leaky_relu``: where(x >= 0, x, slope * x), which is ONNX's LeakyRelu."""
    if not isinstance(slope, np.ndarray):
        raise NotImplementedError("leaky_relu with a slope computed from the input")
    x = _value(graph, x)
    return _Value(graph.node("LeakyRelu", [x.name], alpha=float(slope)), x.perm, x.shape)


def _relu(graph: _Graph, eqn: Any, x: Any) -> _Value:
    x = _value(graph, x)
    return _Value(graph.node("Relu", [x.name]), x.perm, x.shape)


# Calls of jitted or custom-derivative functions are inlined, except these, which are one op.
_CALLS = frozenset({"jit", "pjit", "custom_jvp_call", "custom_vjp_call", "closed_call"})
_ACTIVATIONS = {"leaky_relu": _leaky_relu, "relu": _relu}


def _conv(graph: _Graph, eqn: Any, x: Any, kernel: Any) -> _Value:
    p = eqn.params
    dn = p["dimension_numbers"]
    if not isinstance(kernel, np.ndarray) or set(p["lhs_dilation"]) != {1} or p["batch_group_count"] != 1:
        raise NotImplementedError("convolution with a computed kernel, input dilation or batch groups")
    name = graph.node(
        "Conv",
        [_tensor(graph, x, tuple(dn.lhs_spec)), graph.constant(kernel.transpose(dn.rhs_spec))],
        strides=list(p["window_strides"]),
        pads=[lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]],
        dilations=list(p["rhs_dilation"]),
        group=p["feature_group_count"],
    )
    name = _cast(graph, name, eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype)
    return _Value(name, tuple(dn.out_spec), _out_shape(eqn))


def _dot_general(graph: _Graph, eqn: Any, lhs: Any, rhs: Any) -> _Value:
    """A product with a constant matrix, (..., K) x (K, M): MatMul; any other (batch
    dimensions, two computed operands: attention, ML-Decoder's group projection): Einsum, with
    each operand in the layout it is stored in."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    shape = _out_shape(eqn)
    if isinstance(rhs, np.ndarray) and rhs.ndim == 2 and not lhs_batch and tuple(lhs_contract) == (_ndim(lhs) - 1,):
        kernel = rhs if tuple(rhs_contract) == (0,) else rhs.T
        product = graph.node("MatMul", [_tensor(graph, lhs), graph.constant(kernel)])
    else:
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        lhs_letters = [next(letters) for _ in range(_ndim(lhs))]
        shared = dict(zip(rhs_batch, lhs_batch, strict=True)) | dict(zip(rhs_contract, lhs_contract, strict=True))
        rhs_letters = [lhs_letters[shared[d]] if d in shared else next(letters) for d in range(_ndim(rhs))]
        free = [lhs_letters[d] for d in range(_ndim(lhs)) if d not in (*lhs_batch, *lhs_contract)]
        free += [rhs_letters[d] for d in range(_ndim(rhs)) if d not in (*rhs_batch, *rhs_contract)]
        out = "".join([lhs_letters[d] for d in lhs_batch] + free)
        operands, terms = [], []
        for x, named in ((lhs, lhs_letters), (rhs, rhs_letters)):
            x = _value(graph, x)
            operands.append(x.name)
            terms.append("".join(named[axis] for axis in x.perm))
        product = graph.node("Einsum", operands, equation=f"{terms[0]},{terms[1]}->{out}")
    name = _cast(graph, product, eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype)
    return _Value(name, tuple(range(len(shape))), shape)


def _cast(graph: _Graph, name: str, dtype: Any, to: Any) -> str:
    return name if np.dtype(dtype) == np.dtype(to) else graph.node("Cast", [name], to=_onnx_dtype(to))


def _reshape(graph: _Graph, eqn: Any, x: Any) -> _Value:
    return _reshape_to(graph, x, _out_shape(eqn))


def _broadcast_in_dim(graph: _Graph, eqn: Any, x: Any) -> _Value:
    """Size-1 axes added (the squeeze-excite gate): a reshape, ONNX broadcasts the rest; values
    repeated along a new axis (ML-Decoder's queries, one set an image): Expand after it."""
    shape, dims = _out_shape(eqn), eqn.params["broadcast_dimensions"]
    kept = [1] * len(shape)
    for dim, size in zip(dims, x.shape, strict=True):
        kept[dim] = size
    if tuple(kept) == shape:
        return _reshape_to(graph, x, shape)
    if isinstance(x, np.ndarray) and _static(tuple(kept)):
        x = x.reshape(kept)
    elif tuple(kept) != x.shape:
        x = _reshape_to(graph, x, tuple(kept))
    name = graph.node("Expand", [_tensor(graph, x), graph.shape(shape)])
    return _Value(name, tuple(range(len(shape))), shape)


def _squeeze(graph: _Graph, eqn: Any, x: Any) -> _Value:
    return _reshape_to(graph, x, _out_shape(eqn))


def _stop_gradient(graph: _Graph, eqn: Any, x: Any) -> Any:
    """Nothing to stop in inference (softmax subtracts its maximum under it)."""
    return x


def _square(graph: _Graph, eqn: Any, x: Any) -> _Value:
    x = _value(graph, x)
    return _Value(graph.node("Mul", [x.name, x.name]), x.perm, x.shape)


def _rsqrt(graph: _Graph, eqn: Any, x: Any) -> _Value:
    """1 / sqrt(x) (LayerNorm's scale): ONNX has no one operator for it."""
    x = _value(graph, x)
    return _Value(graph.node("Reciprocal", [graph.node("Sqrt", [x.name])]), x.perm, x.shape)


def _transpose(graph: _Graph, eqn: Any, x: Any) -> _Value:
    shape = _out_shape(eqn)
    return _Value(_tensor(graph, x, tuple(eqn.params["permutation"])), tuple(range(len(shape))), shape)


def _slice(graph: _Graph, eqn: Any, x: Any) -> _Value:
    x = _value(graph, x)
    p = eqn.params
    strides = p["strides"] or (1,) * len(x.shape)
    axes, starts, ends, steps = [], [], [], []
    bounds = zip(p["start_indices"], p["limit_indices"], strides, x.shape, strict=True)
    for axis, (start, limit, stride, size) in enumerate(bounds):
        if (start, stride) == (0, 1) and limit == size:
            continue  # the whole axis (the symbolic batch among them)
        axes.append(x.perm.index(axis))
        starts.append(int(start))
        ends.append(int(limit))
        steps.append(int(stride))
    inputs = [graph.constant(np.array(v, np.int64)) for v in (starts, ends, axes, steps)]
    return _Value(graph.node("Slice", [x.name, *inputs]), x.perm, _out_shape(eqn))


def _gather(graph: _Graph, eqn: Any, x: Any, indices: Any) -> _Value:
    """A gather that is a slice: constant start indices, the axes kept in order, the collapsed
    ones of size 1 (``x[:, :n]`` and ``x[..., 0]`` of an array with a symbolic dimension trace
    to one: ML-Decoder's first ``classes`` outputs, the zero-shot head's one output a query)."""
    x = _value(graph, x)
    numbers, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    collapsed = tuple(numbers.collapsed_slice_dims)
    if (
        not isinstance(indices, np.ndarray)
        or indices.shape != (len(numbers.start_index_map),)
        or numbers.operand_batching_dims
        or tuple(numbers.offset_dims) != tuple(range(len(x.shape) - len(collapsed)))
        or any(sizes[axis] != 1 for axis in collapsed)
    ):
        raise NotImplementedError("gather other than a slice at constant indices")
    starts = dict(zip(numbers.start_index_map, indices.tolist(), strict=True))
    axes, begins, ends = [], [], []
    for axis, (size, whole) in enumerate(zip(sizes, x.shape, strict=True)):
        start = starts.get(axis, 0)
        if start == 0 and size == whole:
            continue  # the whole axis (the symbolic batch among them)
        if not _static((size, whole)) or start + size > whole:
            raise NotImplementedError("gather of a slice that is not within a static axis")
        axes.append(x.perm.index(axis))
        begins.append(int(start))
        ends.append(int(start + size))
    bounds = [graph.constant(np.array(v, np.int64)) for v in (begins, ends, axes)]
    sliced = _Value(graph.node("Slice", [x.name, *bounds]), x.perm, tuple(sizes))
    return _reshape_to(graph, sliced, _out_shape(eqn)) if collapsed else sliced


def _rev(graph: _Graph, eqn: Any, x: Any) -> _Value:
    """Reversing size-1 axes (the reflect padding of width 1) changes nothing."""
    x = _value(graph, x)
    if any(x.shape[axis] != 1 for axis in eqn.params["dimensions"]):
        raise NotImplementedError("rev of an axis longer than 1")
    return x


def _concatenate(graph: _Graph, eqn: Any, *xs: Any) -> _Value:
    perm = next((x.perm for x in xs if isinstance(x, _Value)), tuple(range(_ndim(xs[0]))))
    name = graph.node("Concat", [_tensor(graph, x, perm) for x in xs], axis=perm.index(eqn.params["dimension"]))
    return _Value(name, perm, _out_shape(eqn))


def _reduce_sum(graph: _Graph, eqn: Any, x: Any) -> _Value:
    x = _value(graph, x)
    stored_axes = np.array([x.perm.index(a) for a in eqn.params["axes"]], np.int64)
    name = graph.node("ReduceSum", [x.name, graph.constant(stored_axes)], keepdims=0)
    return _Value(name, _reduced_perm(x, eqn.params["axes"]), _out_shape(eqn))


def _reduce_max(graph: _Graph, eqn: Any, x: Any) -> _Value:
    """ReduceMax, whose axes are still an attribute in opset 17 (ReduceSum's an input)."""
    x = _value(graph, x)
    stored_axes = [x.perm.index(a) for a in eqn.params["axes"]]
    name = graph.node("ReduceMax", [x.name], axes=stored_axes, keepdims=0)
    return _Value(name, _reduced_perm(x, eqn.params["axes"]), _out_shape(eqn))


def _reduced_perm(x: _Value, axes: tuple[int, ...]) -> tuple[int, ...]:
    """The storage order of what is left after reducing ``axes`` of ``x``."""
    kept = [a for a in x.perm if a not in axes]  # the remaining axes, in stored order
    return tuple(int(r) for r in np.argsort(np.argsort(kept)))


def _reduce_window_sum(graph: _Graph, eqn: Any, x: Any) -> _Value:
    """A window sum over two axes: AveragePool counting the padding, times the window size
    (exact for the 2x2 window of the shortcut pool: a power of two)."""
    p = eqn.params
    if {*p["base_dilation"], *p["window_dilation"]} != {1}:
        raise NotImplementedError("reduce_window_sum with dilation")
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    pooled = [a for a in range(len(window)) if (window[a], strides[a], tuple(padding[a])) != (1, 1, (0, 0))]
    other = [a for a in range(len(window)) if a not in pooled]
    if len(other) != 2:
        raise NotImplementedError("reduce_window_sum not over all but two axes")
    perm = (*other, *pooled)
    average = graph.node(
        "AveragePool",
        [_tensor(graph, x, perm)],
        kernel_shape=[window[a] for a in pooled],
        strides=[strides[a] for a in pooled],
        pads=[padding[a][0] for a in pooled] + [padding[a][1] for a in pooled],
        count_include_pad=1,
    )
    size = np.array(math.prod(window[a] for a in pooled), eqn.outvars[0].aval.dtype)
    return _Value(graph.node("Mul", [average, graph.constant(size)]), perm, _out_shape(eqn))


_RULES: dict[str, Callable[..., _Value]] = {
    "conv_general_dilated": _conv,
    "dot_general": _dot_general,
    "reshape": _reshape,
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": _squeeze,
    "stop_gradient": _stop_gradient,
    "square": _square,
    "rsqrt": _rsqrt,
    "transpose": _transpose,
    "slice": _slice,
    "gather": _gather,
    "rev": _rev,
    "concatenate": _concatenate,
    "reduce_sum": _reduce_sum,
    "reduce_max": _reduce_max,
    "reduce_window_sum": _reduce_window_sum,
}
