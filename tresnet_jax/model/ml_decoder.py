"""ML-Decoder (Ridnik et al., WACV 2023; Alibaba-MIIL/ML_Decoder): the attention head that
replaces TResNet's global pooling and fc. Its numbers, its variables' declaration, and the
functions of its computation that the Linen and NNX modules share.

What the original does, quirks included (each kept here as it is there):
- tokens: ReLU(Linear 2048->768) of the flattened last feature map, no positional encoding;
- queries: an embedding table of K rows that is never trained (``requires_grad_(False)``): here
  the variable collection ``constants``, which no optimizer, weight decay or EMA sees. K is
  ``num_groups``, 100 when not given, and never more than the class count;
- one post-norm decoder layer without self-attention, which still adds the queries to a dropout
  of themselves and normalises first (``norm1(q + dropout(q))``: LN(2q) in evaluation); then
  cross-attention (8 heads, packed q/k/v projections with biases, dropout 0.1 on the attention
  weights), ``norm2``; a 2048-wide ReLU feed-forward, ``norm3``; LayerNorm eps 1e-5; dropout
  0.1 in training only;
- group decoding: g = ``int(classes / K + 0.999)`` (the original's formula, which is not
  always the ceiling: 3001 classes and 1500 queries give 2, leaving K x g short of the
  classes, where the original fails on its bias; ``check_groups`` refuses such a K), a
  (768 x g) projection per query, the first ``classes`` outputs of the flattened (K x g), and
  a bias per class;
- zero-shot (``zsl``): a query per class, ReLU(Linear 300->768) of the class's word vector
  given at call time, and one shared (768 x 1) projection with a scalar bias.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tresnet_jax.errors import InputError
from tresnet_jax.model.layers import (
    ONES,
    ZEROS,
    Init,
    Numerics,
    Specs,
    VariableSpec,
    nested,
    torch_default_bias_init,
)

Array = jax.Array

EMBED_DIM = 768  # the decoder's width (``decoder_embedding``)
NUM_HEADS = 8
FFN_DIM = 2048
DROPOUT = 0.1
LAYER_NORM_EPS = 1e-5
WORD_DIM = 300  # zero-shot: the width of a class's word vector (fastText in the paper)
DEFAULT_QUERIES = 100  # K when num_groups is not given
QUERIES = "constants"  # the collection of the queries: never trained


def num_queries(num_classes: int, num_groups: int | None) -> int:
    """K: ``num_groups`` (100 when None), never more than ``num_classes``."""
    return min(DEFAULT_QUERIES if num_groups is None else num_groups, num_classes)


def duplicate_factor(num_classes: int, queries: int) -> int:
    """g, the outputs of each query: the original's ``int(classes / K + 0.999)``."""
    return int(num_classes / queries + 0.999)


def check_groups(num_classes: int, num_groups: int | None) -> None:
    """InputError when the original's g leaves fewer outputs than classes (``duplicate_factor``)."""
    queries = num_queries(num_classes, num_groups)
    factor = duplicate_factor(num_classes, queries)
    if queries * factor < num_classes:
        raise InputError(
            f"{queries} groups for {num_classes} classes: ML-Decoder's int(classes / K + 0.999) gives {factor} "
            f"outputs a group, {queries * factor} in all, fewer than the classes; choose another num_groups"
        )


def _linear(in_features: int, features: int) -> Specs:
    """A PyTorch ``nn.Linear`` (kernel stored (in, out)): weight and bias U(+-1/sqrt(in))."""
    uniform = torch_default_bias_init(in_features)
    return {
        ("params", "kernel"): VariableSpec((in_features, features), uniform),
        ("params", "bias"): VariableSpec((features,), uniform),
    }


def _layer_norm() -> Specs:
    return {
        ("params", "scale"): VariableSpec((EMBED_DIM,), ONES),
        ("params", "bias"): VariableSpec((EMBED_DIM,), ZEROS),
    }


def _attention() -> Specs:
    """``nn.MultiheadAttention``'s variables, its packed in_proj split into query, key and value
    (each (768, 768) of the packed (2304, 768), xavier-uniform over the packed shape; biases 0);
    ``out`` a Linear with a zero bias."""
    packed = Init("uniform", math.sqrt(6.0 / (EMBED_DIM + 3 * EMBED_DIM)))
    specs: Specs = {}
    for name in ("query", "key", "value"):
        specs |= nested((name,), {
            ("params", "kernel"): VariableSpec((EMBED_DIM, EMBED_DIM), packed),
            ("params", "bias"): VariableSpec((EMBED_DIM,), ZEROS),
        })  # fmt: skip
    out = _linear(EMBED_DIM, EMBED_DIM) | {("params", "bias"): VariableSpec((EMBED_DIM,), ZEROS)}
    return specs | nested(("out",), out)


def _xavier_normal(shape: tuple[int, ...]) -> Init:
    """PyTorch's ``xavier_normal_``: fan_in = shape[1] x receptive, fan_out = shape[0] x receptive."""
    receptive = math.prod(shape[2:])
    return Init("normal", math.sqrt(2.0 / (shape[1] * receptive + shape[0] * receptive)))


def decoder_specs(num_features: int, num_classes: int, num_groups: int | None, zero_shot: bool) -> Specs:
    """The head's variables, the one declaration of them (under the model's ``head``):
    ``embed`` (the original's ``embed_standart``), ``queries`` (in ``constants``; none for
    zero-shot, whose queries come from ``word_proj`` of the word vectors), ``attention``,
    ``norm1``-``norm3``, ``linear1``/``linear2`` (the feed-forward) and ``group_fc``."""
    specs = nested(("embed",), _linear(num_features, EMBED_DIM)) | nested(("attention",), _attention())
    for norm in ("norm1", "norm2", "norm3"):
        specs |= nested((norm,), _layer_norm())
    specs |= nested(("linear1",), _linear(EMBED_DIM, FFN_DIM)) | nested(("linear2",), _linear(FFN_DIM, EMBED_DIM))
    if zero_shot:
        specs |= nested(("word_proj",), _linear(WORD_DIM, EMBED_DIM))
        group_kernel, group_bias = (EMBED_DIM, 1), (1,)
    else:
        check_groups(num_classes, num_groups)
        queries = num_queries(num_classes, num_groups)
        specs[(QUERIES, "queries")] = VariableSpec((queries, EMBED_DIM), Init("normal", 1.0))
        group_kernel, group_bias = (queries, EMBED_DIM, duplicate_factor(num_classes, queries)), (num_classes,)
    specs[("params", "group_fc", "kernel")] = VariableSpec(group_kernel, _xavier_normal(group_kernel))
    specs[("params", "group_fc", "bias")] = VariableSpec(group_bias, ZEROS)
    return specs


# The computation, on the head's arrays (``params``: the nested ``params/head`` tree), shared by
# the Linen and NNX modules.

Params = dict[str, Any]


class Dropout:
    """Training-time dropout (rate ``DROPOUT``) drawn per example: ``keys`` holds one PRNG key
    per example, and each example's masks for all the sites (their shapes, without the batch
    axis, in ``site_shapes``) come from one draw of its key alone, not from the batch it shares
    or the device that computes it, which keeps a resumed or re-sharded run bit-exact. One draw
    rather than one a site: each random-bits kernel costs its own compilation (2.8x the head's
    gradient's compile time with five)."""

    def __init__(self, keys: Array, site_shapes: Sequence[tuple[int, ...]]) -> None:
        sizes = [math.prod(shape) for shape in site_shapes]
        keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - DROPOUT, (sum(sizes),)))(keys)
        parts = jnp.split(keep, list(itertools.accumulate(sizes[:-1])), axis=1)
        self.masks = [part.reshape(-1, *shape) for part, shape in zip(parts, site_shapes, strict=True)]

    def __call__(self, x: Array, site: int) -> Array:
        return jnp.where(self.masks[site], x / (1.0 - DROPOUT), 0.0).astype(x.dtype)


def _identity(x: Array, site: int) -> Array:
    return x


def layer_norm(x: Array, params: Params) -> Array:
    """LayerNorm over the last axis (eps ``LAYER_NORM_EPS``, biased variance), in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + LAYER_NORM_EPS) * params["scale"] + params["bias"]
    return y.astype(x.dtype)


def _dense(x: Array, params: Params, numerics: Numerics) -> Array:
    return numerics.dense(x, params["kernel"], params["bias"])


def _cross_attention(
    queries: Array, tokens: Array, params: Params, numerics: Numerics, dropout: Callable[[Array, int], Array]
) -> Array:
    """``nn.MultiheadAttention(768, 8, dropout=0.1)(queries, tokens, tokens)``: (N, K, 768)."""
    n, k, _ = queries.shape
    head_dim = EMBED_DIM // NUM_HEADS

    def heads(x: Array, name: str) -> Array:
        return _dense(x, params[name], numerics).reshape(*x.shape[:2], NUM_HEADS, head_dim)

    q = heads(queries, "query") * jnp.asarray(head_dim**-0.5, numerics.dtype)
    scores = jnp.einsum("nqhd,nthd->nhqt", q, heads(tokens, "key"), precision=numerics.precision)
    weights = dropout(jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(numerics.dtype), 1)
    mixed = jnp.einsum("nhqt,nthd->nqhd", weights, heads(tokens, "value"), precision=numerics.precision)
    return _dense(mixed.reshape(n, k, EMBED_DIM), params["out"], numerics)


def check_class_embeddings(class_embeddings: Any) -> None:
    """A zero-shot head's input: a (classes, ``WORD_DIM``) array of word vectors."""
    if class_embeddings is None:
        raise InputError("a zero-shot ML-Decoder scores the classes it is given: pass their class_embeddings")
    shape = getattr(class_embeddings, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != WORD_DIM or shape[0] < 1:
        raise InputError(f"class embeddings must be (classes, {WORD_DIM}) word vectors, got shape {shape}")


def decode(
    feature_map: Array,
    params: Params,
    queries: Array | None,
    numerics: Numerics,
    num_classes: int,
    class_embeddings: Array | None = None,
    dropout_keys: Array | None = None,
) -> Array:
    """The head on the last stage's (N, H, W, C) feature map: float32 logits, (N, classes).

    ``queries``: the (K, 768) table (None for zero-shot, whose queries are ReLU(``word_proj``)
    of ``class_embeddings``, (classes, 300), one per class to score). ``dropout_keys``: one PRNG
    key per example in training (``Dropout``), None in evaluation (no dropout).
    """
    if queries is not None and class_embeddings is not None:
        raise InputError("class_embeddings are a zero-shot ML-Decoder's input; this one has learned queries")
    n, h, w, c = feature_map.shape
    tokens = jax.nn.relu(_dense(feature_map.reshape(n, h * w, c).astype(numerics.dtype), params["embed"], numerics))
    if queries is None:
        check_class_embeddings(class_embeddings)
        queries = jax.nn.relu(_dense(jnp.asarray(class_embeddings), params["word_proj"], numerics))
    target = jnp.broadcast_to(queries.astype(numerics.dtype), (n, *queries.shape))
    k = queries.shape[0]
    sites = [(k, EMBED_DIM), (NUM_HEADS, k, h * w), (k, EMBED_DIM), (k, FFN_DIM), (k, EMBED_DIM)]
    dropout = _identity if dropout_keys is None else Dropout(dropout_keys, sites)
    # The original's decoder layer without self-attention: norm1(q + dropout(q)), kept as it is.
    target = layer_norm(target + dropout(target, 0), params["norm1"])
    attended = _cross_attention(target, tokens, params["attention"], numerics, dropout)
    target = layer_norm(target + dropout(attended, 2), params["norm2"])
    hidden = dropout(jax.nn.relu(_dense(target, params["linear1"], numerics)), 3)
    target = layer_norm(target + dropout(_dense(hidden, params["linear2"], numerics), 4), params["norm3"])
    zero_shot_classes = None if class_embeddings is None else class_embeddings.shape[0]
    return group_logits(target, params["group_fc"], zero_shot_classes or num_classes, numerics.in_float32())


def group_logits(decoded: Array, params: Params, num_classes: int, numerics: Numerics) -> Array:
    """Group decoding in float32: each query's (768 x g) projection as one contraction (the
    original loops over the queries), the first ``num_classes`` of the flattened (K x g), plus
    a bias per class. Zero-shot (a (768, 1) kernel): one shared projection and a scalar bias,
    an output per query, that is per class."""
    decoded = decoded.astype(jnp.float32)
    kernel = params["kernel"]
    if kernel.ndim == 2:
        return numerics.dense(decoded, kernel, params["bias"])[..., 0]
    grouped = jnp.einsum("nkd,kdg->nkg", decoded, kernel, precision=numerics.precision)
    return grouped.reshape(decoded.shape[0], -1)[:, :num_classes] + params["bias"]
