"""Fresh variables drawn on the host with NumPy: the original's initial distributions
(``layers.Init``) without compiling anything, and the one way a new classifier head is made."""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from tresnet_jax.model.architecture import FC_HEAD, ArchSpec, HeadSpec, head_specs, variable_specs
from tresnet_jax.model.layers import Specs, nested
from tresnet_jax.model.ml_decoder import QUERIES

Variables = dict[str, Any]
Seed = int | jax.Array


def _entropy(seed: Seed) -> list[int]:
    """Integer words of an int seed or a JAX PRNG key."""
    if isinstance(seed, int):
        return [seed]
    key = seed if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(seed)
    return [int(word) for word in np.asarray(jax.random.key_data(key)).ravel()]


def draw(specs: Specs, seed: Seed = 0) -> Variables:
    """Nested numpy variables drawn from ``specs``; each variable has its own stream, seeded by
    ``seed`` and its path, so a variable's values do not depend on which others are drawn."""
    entropy = _entropy(seed)
    flat = {}
    for path, spec in specs.items():
        rng = np.random.default_rng([*entropy, zlib.crc32("/".join(path).encode())])
        flat[path] = spec.init.draw(rng, spec.shape)
    return traverse_util.unflatten_dict(flat)


def random_variables(arch: ArchSpec, num_classes: int, seed: Seed = 0, head: HeadSpec = FC_HEAD) -> Variables:
    """A fresh model's variables (numpy, float32: ``params``, ``batch_stats`` and an
    ML-Decoder's ``constants``), as the original initialises them."""
    return draw(variable_specs(arch, num_classes, head), seed)


def replace_head(
    variables: Variables, arch: ArchSpec, num_classes: int, seed: Seed = 0, head: HeadSpec = FC_HEAD
) -> Variables:
    """``variables`` with a new ``num_classes`` head of kind ``head`` (0 classes: none), drawn as
    a fresh model's head with the same seed would be; the backbone is kept as it is."""
    kept = {
        collection: {k: v for k, v in tree.items() if k != "head"}
        for collection, tree in variables.items()
        if collection != QUERIES
    }
    if num_classes:
        for collection, tree in draw(nested(("head",), head_specs(arch.num_features, num_classes, head)), seed).items():
            kept.setdefault(collection, {})["head"] = tree["head"]
    return kept
