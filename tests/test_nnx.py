"""The NNX TResNet against the Linen one on the same variables, its training mode, fine-tuning
with ``nnx.Optimizer``, the variable mapping both ways, and stage selection (``out_indices``).
On tests/tiny_model.py's TResNet: every kind of layer of the published ones, what is compared
does not depend on their size, and its programs compile in a third of tresnet_m's time."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import tresnet_jax
import tresnet_jax.nnx
from bench.nnx_vs_linen import train_step
from tests import tiny_model
from tresnet_jax.model.architecture import FEATURE_STRIDES, stage_plan
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.model.linen import TResNet
from tresnet_jax.weights.storage import save_weights

ARCH = tiny_model.SPEC
CLASSES = 10
IMAGES = np.random.default_rng(1).uniform(size=(4, 64, 64, 3)).astype(np.float32)
LABELS = np.arange(4, dtype=np.int32)


def with_trained_statistics(variables, seed=0):
    """Fresh variables whose BatchNorm looks trained: scales, biases and running statistics away
    from 1/0 (the last norm of each branch no longer zero), so the running-statistics path and
    every residual branch count; a head whose logits spread over a few units."""
    rng = np.random.default_rng(seed)
    draw = {
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: rng.normal(0, 0.1, s),
        "mean": lambda s: rng.normal(0, 0.1, s),
        "var": lambda s: rng.uniform(0.5, 2.0, s),
    }
    flat = traverse_util.flatten_dict(variables)
    for path, value in flat.items():
        if path[-2] == "bn":
            flat[path] = draw[path[-1]](value.shape).astype(np.float32)
    # A head that spreads the logits over a few units, far from a trivial (zero-centred) output.
    kernel = flat["params", "head", "fc", "kernel"]
    flat["params", "head", "fc", "kernel"] = rng.normal(0, 4 / np.sqrt(kernel.shape[0]), kernel.shape).astype(
        np.float32
    )
    return jax.device_put(traverse_util.unflatten_dict(flat))


class Linen(NamedTuple):
    """The Linen model, its variables, and what it computes for IMAGES."""

    model: TResNet
    variables: dict
    logits: jax.Array
    train_logits: jax.Array
    train_statistics: dict  # batch_stats after one training-mode call


@pytest.fixture(scope="module")
def linen():
    model = TResNet(ARCH, CLASSES)
    variables = with_trained_statistics(random_variables(ARCH, CLASSES, seed=5))

    @jax.jit
    def reference(variables, images):
        train_logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return model.apply(variables, images), train_logits, updates["batch_stats"]

    return Linen(model, variables, *reference(variables, IMAGES))


def make_nnx(linen):
    return tresnet_jax.nnx.from_linen_variables(linen.model, linen.variables)


def assert_trees_equal(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for path, value in flat_a.items():
        assert np.asarray(value).dtype == np.asarray(flat_b[path]).dtype == np.float32, path
        np.testing.assert_array_equal(value, flat_b[path], err_msg="/".join(path))


def test_state_paths_are_the_linen_variable_paths_and_round_trip_exactly(linen):
    model = make_nnx(linen)
    paths = {tuple(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    assert ("body", "layer3", "0", "conv2", "bn", "var") in paths
    assert ("body", "layer3", "0", "downsample", "1", "bn", "mean") in paths
    assert_trees_equal(tresnet_jax.nnx.to_linen_variables(model), linen.variables)


def test_variables_that_do_not_fit_are_refused(linen):
    model, variables = linen.model, linen.variables
    with pytest.raises(ValueError, match=r"at params/head/fc/bias: shape \(10,\), expected \(3,\)"):
        tresnet_jax.nnx.from_linen_variables(model.clone(num_classes=3), variables)
    with pytest.raises(ValueError, match="params/head/fc/bias is not one of its variables"):
        tresnet_jax.nnx.from_linen_variables(model.clone(num_classes=0), variables)


def test_eval_logits_equal_linen(linen):
    logits = nnx.jit(lambda model, x: model(x))(make_nnx(linen), IMAGES)
    reference = linen.logits
    assert logits.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(reference))) > 1.0  # far from a trivial (zero-centred) output
    # The same operations on the same float32 inputs; 1e-6 leaves room for a different fusion.
    bound = 1e-6 * max(1.0, float(jnp.max(jnp.abs(reference))))
    assert float(jnp.max(jnp.abs(logits - reference))) <= bound


@pytest.fixture(scope="module")
def fine_tuned(linen):
    """Three AdamW steps (``bench.nnx_vs_linen.train_step``, the benchmarked step) on IMAGES
    from the linen variables: the losses, and the running statistics after the first step."""
    model = make_nnx(linen)
    model.train()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    step = nnx.jit(train_step)
    losses = [float(step(model, optimizer, IMAGES, LABELS))]
    first_statistics = tresnet_jax.nnx.to_linen_variables(model)["batch_stats"]
    losses += [float(step(model, optimizer, IMAGES, LABELS)) for _ in range(2)]
    return losses, first_statistics


@pytest.mark.slow
def test_train_mode_updates_running_statistics_as_linen(linen, fine_tuned):
    _, first_statistics = fine_tuned
    reference = traverse_util.flatten_dict(linen.train_statistics)
    flat = traverse_util.flatten_dict(first_statistics)
    assert flat.keys() == reference.keys()
    worst = max(float(jnp.max(jnp.abs(flat[p] - reference[p]) / (1.0 + jnp.abs(reference[p])))) for p in flat)
    # The same operations on the same inputs, as for the logits (measured: equal).
    assert worst <= 1e-6
    before = traverse_util.flatten_dict(linen.variables["batch_stats"])
    assert any(not np.allclose(flat[p], before[p]) for p in flat)


@pytest.mark.slow
def test_nnx_optimizer_fine_tuning_lowers_the_loss(linen, fine_tuned):
    losses, _ = fine_tuned
    first_loss = optax.softmax_cross_entropy_with_integer_labels(linen.train_logits, LABELS).mean()
    assert losses[0] == pytest.approx(float(first_loss), rel=1e-5)  # its first forward is Linen's
    assert losses[-1] < 0.5 * losses[0]


def test_train_and_eval_switch_every_batch_norm(linen):
    model = make_nnx(linen)
    norms = [node for _, node in nnx.iter_graph(model) if isinstance(node, tresnet_jax.nnx.BatchNorm)]
    assert len(norms) == len(traverse_util.flatten_dict(linen.variables["batch_stats"])) // 2
    assert all(bn.use_running_average for bn in norms)
    model.train()
    assert not any(bn.use_running_average for bn in norms)
    model.eval()
    assert all(bn.use_running_average for bn in norms)


def conv_count(jaxpr) -> int:
    """Convolutions in a jaxpr, sub-jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "conv_general_dilated"
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                count += conv_count(inner)
    return count


def expected_convs(last: int) -> int:
    """The plan's convolutions (3x3 and 1x1) up to feature index ``last``, the stem's included."""
    blocks = [block for stage in stage_plan(ARCH)[:last] for block in stage]
    return 1 + sum(len(block.units) + bool(block.shortcut) for block in blocks)


@pytest.mark.parametrize("system", ["linen", "nnx"])
def test_out_indices_select_stages_and_run_no_later_one(linen, system):
    model, variables = linen.model, linen.variables
    if system == "linen":
        stages = lambda x, out: model.apply(variables, x, method="stage_features", out_indices=out)  # noqa: E731
    else:
        stages = make_nnx(linen).stage_features
    x = jax.ShapeDtypeStruct(IMAGES.shape, jnp.float32)
    maps = jax.eval_shape(lambda x: stages(x, (4, 0, 2)), x)
    assert [m.shape for m in maps] == [(4, 2, 2, 512), (4, 16, 16, 16), (4, 8, 8, 32)]
    assert [64 // m.shape[1] for m in maps] == [FEATURE_STRIDES[i] for i in (4, 0, 2)]
    # the stem, then one block a stage: 2, 2 + shortcut, 3 + shortcut and 3 + shortcut convolutions
    assert conv_count(jax.make_jaxpr(lambda x: stages(x, (1,)))(x).jaxpr) == expected_convs(1) == 3
    assert conv_count(jax.make_jaxpr(lambda x: stages(x, (0, 1, 2, 3, 4)))(x).jaxpr) == expected_convs(4) == 14
    with pytest.raises(ValueError, match=r"out_indices must be 0 \(stem\) to 4 \(last stage\), got \(1, 5\)"):
        stages(IMAGES, (1, 5))


def test_load_from_a_saved_weights_directory(linen, tmp_path, tiny_model):
    model = make_nnx(linen)
    directory = save_weights(
        tmp_path / "weights", tresnet_jax.nnx.to_linen_variables(model), tresnet_jax.WeightsInfo(tiny_model, 10)
    )
    loaded = tresnet_jax.nnx.load(directory, dtype=jnp.bfloat16)
    assert isinstance(loaded, tresnet_jax.nnx.TResNet)
    assert (loaded.num_classes, loaded.dtype) == (10, jnp.bfloat16)
    logits, maps = nnx.eval_shape(lambda m, x: (m(x), m.stage_features(x, (1,))), loaded, IMAGES)
    assert (logits.dtype, maps[0].dtype) == (jnp.float32, jnp.bfloat16)  # bf16 compute, float32 logits
    assert_trees_equal(tresnet_jax.nnx.to_linen_variables(loaded), linen.variables)


def test_create_model_draws_the_linen_factory_variables():
    model = tresnet_jax.nnx.create_model("tresnet_m", num_classes=0, seed=3)
    _, variables = tresnet_jax.create_model("tresnet_m", num_classes=0, seed=3)
    assert model.head is None
    assert_trees_equal(tresnet_jax.nnx.to_linen_variables(model), variables)
