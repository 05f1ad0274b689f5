"""ML-Decoder's head in PyTorch state_dicts <-> the Flax variables ``model.ml_decoder`` declares.

Two layouts hold the same tensors. The official code (Alibaba-MIIL/ML_Decoder) hangs the
token projection, the queries and the group projection on its ``nn.TransformerDecoder``:
``head.decoder.embed_standart.weight``, ``head.decoder.query_embed.weight``,
``head.decoder.duplicate_pooling``; timm's copy of it (``timm.layers.ml_decoder``) keeps them on
the head: ``head.embed_standart.weight``, ... Both name the decoder layer
``head.decoder.layers.0.*`` and, zero-shot, the word-vector projection ``head.wordvec_proj.*``.
The attention's query, key and value projections are one packed ``in_proj_weight`` there
(rows in that order), three kernels here; linear weights are (out, in) there, (in, out) here.

Everything the head is (K queries, g outputs each, the classes, zero-shot) is read off the
tensors and checked against ``decoder_specs``, the one declaration of the head's variables.
Plain ``{key: numpy array}`` dicts: no PyTorch needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from tresnet_jax.model.architecture import ML_DECODER, HeadSpec
from tresnet_jax.model.ml_decoder import EMBED_DIM, decoder_specs, duplicate_factor
from tresnet_jax.weights.torch_layout import OFFICIAL, TIMM, LayoutError, listing

HEAD = "head."
_LAYER = "decoder.layers.0."
# What the official code attaches to the decoder (``head.decoder.<name>``) and timm to the head.
_ON_DECODER = ("embed_standart.", "query_embed.", "duplicate_pooling")
_QUERIES, _GROUP_KERNEL, _GROUP_BIAS = "query_embed.weight", "duplicate_pooling", "duplicate_pooling_bias"
_WORD_PROJ = "wordvec_proj."  # zero-shot's: the queries come from word vectors

# How a tensor maps: a Linear's weight (transposed), as it is, or one of q/k/v of the packed
# projection (its rows in that order; a weight transposed, a bias as it is).
LINEAR, SAME = "linear", "same"
PACKED = ("query", "key", "value")

# Flax path under the head (collection, module..., leaf) -> (timm-layout key under ``head.``, mapping).
_TABLE: dict[tuple[str, ...], tuple[str, str]] = {
    ("params", "embed", "kernel"): ("embed_standart.weight", LINEAR),
    ("params", "embed", "bias"): ("embed_standart.bias", SAME),
    ("constants", "queries"): (_QUERIES, SAME),
    ("params", "word_proj", "kernel"): (_WORD_PROJ + "weight", LINEAR),
    ("params", "word_proj", "bias"): (_WORD_PROJ + "bias", SAME),
    **{
        ("params", "attention", name, leaf): (f"{_LAYER}multihead_attn.in_proj_{torch_leaf}", name)
        for name in PACKED
        for leaf, torch_leaf in (("kernel", "weight"), ("bias", "bias"))
    },
    ("params", "attention", "out", "kernel"): (f"{_LAYER}multihead_attn.out_proj.weight", LINEAR),
    ("params", "attention", "out", "bias"): (f"{_LAYER}multihead_attn.out_proj.bias", SAME),
    **{
        ("params", norm, leaf): (f"{_LAYER}{norm}.{torch_leaf}", SAME)
        for norm in ("norm1", "norm2", "norm3")
        for leaf, torch_leaf in (("scale", "weight"), ("bias", "bias"))
    },
    **{
        ("params", linear, leaf): (f"{_LAYER}{linear}.{torch_leaf}", LINEAR if leaf == "kernel" else SAME)
        for linear in ("linear1", "linear2")
        for leaf, torch_leaf in (("kernel", "weight"), ("bias", "bias"))
    },
    ("params", "group_fc", "kernel"): (_GROUP_KERNEL, SAME),
    ("params", "group_fc", "bias"): (_GROUP_BIAS, SAME),
}


def torch_name(name: str, layout: str) -> str:
    """The full key of a head tensor (its timm-layout name under ``head.``) in ``layout``."""
    moved = layout == OFFICIAL and name.startswith(_ON_DECODER)
    return HEAD + ("decoder." if moved else "") + name


_NAMES = {torch_name(name, layout) for name, _ in _TABLE.values() for layout in (OFFICIAL, TIMM)}


def has_ml_decoder(state_dict: Mapping[str, object]) -> bool:
    """Whether a state_dict carries an ML-Decoder head: any of its tensors, in either layout."""
    return any(key in _NAMES for key in state_dict)


def head_layout(state_dict: Mapping[str, object]) -> str:
    """``official`` (``head.decoder.embed_standart``, ...) or ``timm`` (``head.embed_standart``,
    ...); LayoutError for a head that mixes them. Only the decoder layer's keys, which both
    share: official, the published one."""
    prefixes = {layout: tuple(torch_name(name, layout) for name in _ON_DECODER) for layout in (OFFICIAL, TIMM)}
    found = {layout for layout, starts in prefixes.items() for key in state_dict if key.startswith(starts)}
    if len(found) == 2:
        raise LayoutError(
            "the ML-Decoder head mixes the official layout (head.decoder.embed_standart, ...) and timm's "
            "(head.embed_standart, ...)"
        )
    return found.pop() if found else OFFICIAL


@dataclasses.dataclass(frozen=True)
class DecoderHead:
    """An ML-Decoder head read off a state_dict: what it is, and its Flax variables (flat paths
    from the model's root, numpy)."""

    spec: HeadSpec
    num_classes: int  # duplicate_pooling_bias's length: 1 for zero-shot, which scores any classes
    layout: str
    variables: dict[tuple[str, ...], np.ndarray]


def read_head(head: Mapping[str, np.ndarray], num_features: int) -> DecoderHead:
    """The ML-Decoder head of the ``head.*`` tensors of a state_dict, on a body of
    ``num_features`` channels: K = query_embed's rows, the classes = duplicate_pooling_bias's
    length, zero-shot when wordvec_proj is there (no queries then: they come from word vectors).
    LayoutError naming the keys when a tensor is missing, unexpected, mis-shaped or inconsistent
    with the others."""
    layout = head_layout(head)
    zero_shot = any(key.startswith(HEAD + _WORD_PROJ) for key in head)
    kind = "zero-shot ML-Decoder head (wordvec_proj)" if zero_shot else "ML-Decoder head"
    where = f"{kind}, {layout} layout"

    def tensor(name: str) -> np.ndarray:
        key = torch_name(name, layout)
        if key not in head:
            raise LayoutError(f"{where}: missing {key}")
        return head[key]

    if zero_shot:
        classes, queries = 1, None
    else:
        classes, queries = _groups(tensor(_QUERIES), tensor(_GROUP_KERNEL), tensor(_GROUP_BIAS), layout)
    specs = decoder_specs(num_features, classes, queries, zero_shot)
    variables, missing, mismatched, used = {}, [], [], set()
    for path, spec in specs.items():
        name, mapping = _TABLE[path]
        key = torch_name(name, layout)
        used.add(key)
        if key not in head:
            missing.append(key)
            continue
        value = np.asarray(head[key])
        want = _torch_shape(spec.shape, mapping)
        if value.shape != want:
            mismatched.append(f"{key} is {value.shape}, expected {want}")
            continue
        variables[(path[0], "head", *path[1:])] = _to_flax(value, mapping)
    unexpected = [key for key in head if key not in used]
    problems = [
        f"{label} {listing(list(dict.fromkeys(items)))}"  # a packed tensor once, not once a part
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch:", mismatched))
        if items
    ]
    if problems:
        raise LayoutError(f"{where}: " + "; ".join(problems))
    spec = HeadSpec(ML_DECODER, zero_shot=True) if zero_shot else HeadSpec(ML_DECODER, num_groups=queries)
    return DecoderHead(spec, classes, layout, variables)


def _groups(queries: np.ndarray, kernel: np.ndarray, bias: np.ndarray, layout: str) -> tuple[int, int]:
    """(classes, K) of a head with learned queries, its three defining tensors checked against
    each other as the original computes them: g = int(classes / K + 0.999), K <= classes."""
    names = {name: torch_name(name, layout) for name in (_QUERIES, _GROUP_KERNEL, _GROUP_BIAS)}
    if np.ndim(queries) != 2 or np.shape(queries)[1] != EMBED_DIM:
        raise LayoutError(f"{names[_QUERIES]} is {np.shape(queries)}, expected (queries, {EMBED_DIM})")
    if np.ndim(kernel) != 3 or np.shape(kernel)[1] != EMBED_DIM:
        raise LayoutError(f"{names[_GROUP_KERNEL]} is {np.shape(kernel)}, expected (queries, {EMBED_DIM}, g)")
    if np.ndim(bias) != 1:
        raise LayoutError(f"{names[_GROUP_BIAS]} is {np.shape(bias)}, expected (classes,)")
    k, (rows, _, g), classes = len(queries), np.shape(kernel), len(bias)
    if rows != k:
        raise LayoutError(f"{names[_GROUP_KERNEL]} has {rows} groups, {names[_QUERIES]} {k} queries")
    if k == 0 or k > classes:
        raise LayoutError(f"{names[_QUERIES]} has {k} queries for {classes} classes ({names[_GROUP_BIAS]})")
    if g != duplicate_factor(classes, k):
        raise LayoutError(
            f"{names[_GROUP_BIAS]} has {classes} classes for {k} queries, which ML-Decoder gives "
            f"int({classes} / {k} + 0.999) = {duplicate_factor(classes, k)} outputs each; "
            f"{names[_GROUP_KERNEL]} {tuple(np.shape(kernel))} gives them {g}"
        )
    return classes, k


def _transposed(mapping: str, ndim: int) -> bool:
    """Whether the tensor is a weight stored (out, in) there: a Linear's, or a packed one's."""
    return mapping == LINEAR or (mapping in PACKED and ndim == 2)


def _torch_shape(shape: tuple[int, ...], mapping: str) -> tuple[int, ...]:
    if _transposed(mapping, len(shape)):
        shape = shape[::-1]
    return (len(PACKED) * shape[0], *shape[1:]) if mapping in PACKED else shape


def _to_flax(value: np.ndarray, mapping: str) -> np.ndarray:
    if mapping in PACKED:
        value = np.split(value, len(PACKED))[PACKED.index(mapping)]
    if _transposed(mapping, value.ndim):
        value = value.T
    return np.array(value, np.float32)  # a copy: never the caller's tensor


def head_state_dict(head: Mapping[tuple[str, ...], np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """The torch tensors of an ML-Decoder head in ``layout``, from its flat Flax variables
    (paths from the model's root, as ``traverse_util.flatten_dict`` gives them); the inverse of
    ``read_head``."""
    out: dict[str, np.ndarray] = {}
    packed: dict[str, dict[str, np.ndarray]] = {}
    for path, value in head.items():
        name, mapping = _TABLE[(path[0], *path[2:])]
        value = np.asarray(value, np.float32)
        if _transposed(mapping, value.ndim):
            value = value.T
        if mapping in PACKED:
            packed.setdefault(name, {})[mapping] = value
        else:
            out[torch_name(name, layout)] = np.ascontiguousarray(value)
    for name, parts in packed.items():
        out[torch_name(name, layout)] = np.ascontiguousarray(np.concatenate([parts[p] for p in PACKED]))
    return out
