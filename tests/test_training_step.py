"""The training step on a tiny network: mixup/CutMix mix the global batch the same on any
number of devices, an fp16 step skipped for overflow leaves everything, the learning-rate
schedule included, where it was (with the augmentation on the device too), and BatchNorm per
device is the mean of each shard's own step."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec

from tests.settings import config
from tresnet_jax.data.augment import AugmentConfig
from tresnet_jax.model.layers import KAIMING, BatchNorm, Conv, Dense, Numerics
from tresnet_jax.runtime.parallel import BATCH_AXIS, data_mesh, replicate, select_devices, shard_batch
from tresnet_jax.train.config import TrainConfig
from tresnet_jax.train.losses import asymmetric_loss
from tresnet_jax.train.step import (
    applied_updates,
    create_state,
    decay_mask,
    draws_dropout,
    global_partners,
    learning_rate,
    make_optimizer,
    make_train_step,
    mix,
    soft_targets,
)

SIZE = 8
CLASSES = 10
DEVICE_AUGMENT = AugmentConfig(image_size=SIZE)  # flip, RandAugment 2 at 9, Cutout 0.5


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> spatial mean -> dense: what the step cares about in a
    TResNet (BatchNorm statistics over the mapped axis, a compute dtype), compiled in seconds."""

    num_classes: int = CLASSES
    dtype: Any = jnp.float32
    axis_name: str | None = BATCH_AXIS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        numerics = Numerics.of(self.dtype)
        x = Conv(8, 3, numerics, name="conv")(x)
        x = BatchNorm(not train, axis_name=self.axis_name, name="bn")(x)
        x = jnp.mean(jax.nn.relu(x).astype(jnp.float32), axis=(1, 2))
        return Dense(self.num_classes, KAIMING, numerics, name="fc")(x)


def mesh_of(devices: int) -> Mesh:
    return data_mesh(select_devices(devices))


def random_batches(count: int, size: int, seed: int = 0, multi_hot: bool = False) -> list[dict[str, np.ndarray]]:
    """Random uint8 images with class indices, or multi-hot uint8 rows (``multi_hot``)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (size, SIZE, SIZE, 3), dtype=np.uint8),
            "label": (rng.random((size, CLASSES)) < 0.3).astype(np.uint8)
            if multi_hot
            else rng.integers(0, CLASSES, size, dtype=np.int32),
            "augment_ids": np.stack([np.full(size, k), np.arange(size)], 1).astype(np.int32),
        }
        for k in range(count)
    ]


def run_steps(
    model: nn.Module,
    cfg: TrainConfig,
    total_steps: int,
    devices: int,
    batches: list[dict[str, np.ndarray]],
    scales: list[float] | None = None,
    augment: AugmentConfig | None = None,
) -> tuple[list[Any], list[dict[str, float]]]:
    """The states after each step and the metrics of each step; ``scales``: the loss scale to
    set before each step (fp16); ``augment``: augmented in the step (else the ids are dropped,
    unless the model's dropout draws from them)."""
    mesh = mesh_of(devices)
    tx = make_optimizer(cfg, total_steps)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))  # one program, not op by op
    state = replicate(create_state(variables, tx, cfg), mesh)
    step = make_train_step(model, tx, cfg, total_steps, mesh, augment)
    if augment is None and not draws_dropout(model):
        batches = [{k: v for k, v in batch.items() if k != "augment_ids"} for batch in batches]
    states, metrics = [jax.device_get(state)], []
    for k, batch in enumerate(batches):
        if scales is not None:
            state = state.replace(loss_scale=replicate(jnp.asarray(scales[k], jnp.float32), mesh))
        state, out = step(state, shard_batch(batch, mesh))
        states.append(jax.device_get(state))
        metrics.append({key: float(v) for key, v in jax.device_get(out).items()})
    return states, metrics


def update_error(got: Any, want: Any, start: Any) -> float:
    """The largest over the leaves of |got - want| / |want - start|: how far two results are
    apart relative to how far the training moved them (norms over each array)."""
    errors = jax.tree_util.tree_map(
        lambda g, w, s: np.linalg.norm(np.subtract(g, w)) / np.linalg.norm(np.subtract(w, s)), got, want, start
    )
    return max(jax.tree_util.tree_leaves(errors))


def assert_trees_equal(a: Any, b: Any) -> None:
    for (path, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b), strict=True
    ):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# --- mixup / CutMix ------------------------------------------------------------------------------

MIXES = {
    "mixup": config(mixup=0.4),
    "cutmix": config(cutmix=1.0),
    "both": config(mixup=0.4, cutmix=1.0),
}


def sharded_mix(cfg: TrainConfig, devices: int) -> Callable:
    """``mix`` as the step runs it: each device its shard of the global batch, partners from
    ``global_partners``, the same key everywhere."""
    batch = PartitionSpec(BATCH_AXIS)

    def per_device(images, targets, key):
        return mix(images, targets, *global_partners((images, targets), BATCH_AXIS), key, cfg)

    return jax.jit(
        jax.shard_map(
            per_device, mesh=mesh_of(devices), in_specs=(batch, batch, PartitionSpec()), out_specs=(batch, batch)
        )
    )


def test_partners_are_the_reversed_global_batch():
    rows = np.arange(8 * 2, dtype=np.int32).reshape(8, 2)
    for devices in (1, 2, 4):
        batch = PartitionSpec(BATCH_AXIS)
        partners = jax.jit(
            jax.shard_map(
                lambda x: global_partners(x, BATCH_AXIS), mesh=mesh_of(devices), in_specs=batch, out_specs=batch
            )
        )(rows)
        np.testing.assert_array_equal(partners, rows[::-1], err_msg=f"{devices} devices")


@pytest.mark.slow
@pytest.mark.parametrize("name", MIXES)
def test_mixing_on_n_devices_is_bitwise_what_one_device_computes(name):
    cfg = MIXES[name]
    rng = np.random.default_rng(1)
    images = rng.random((8, SIZE, SIZE, 3), dtype=np.float32)
    targets = np.asarray(soft_targets(jnp.asarray(rng.integers(0, CLASSES, 8)), CLASSES, 0.1))
    keys = [jax.random.key(k) for k in range(8)]
    mixes = {devices: sharded_mix(cfg, devices) for devices in (1, 2, 4)}
    # The definition, each row mixed with the reversed batch's, in a program of its own: XLA
    # may contract lam * a + (1 - lam) * b into fused multiply-adds differently there (1 ulp).
    direct_mix = jax.jit(lambda i, t, k: mix(i, t, i[::-1], t[::-1], k, cfg))
    kinds = set()
    for key in keys:
        one = jax.device_get(mixes[1](images, targets, key))
        direct = direct_mix(images, targets, key)
        np.testing.assert_array_max_ulp(one[0], direct[0], maxulp=1)
        np.testing.assert_array_max_ulp(one[1], direct[1], maxulp=1)
        for devices in (2, 4):
            many = jax.device_get(mixes[devices](images, targets, key))
            np.testing.assert_array_equal(many[0], one[0], err_msg=f"images, {devices} devices")
            np.testing.assert_array_equal(many[1], one[1], err_msg=f"targets, {devices} devices")
        assert not np.array_equal(one[0], images)
        pasted = np.all((one[0] == images) | (one[0] == images[::-1]))  # CutMix copies pixels
        kinds.add("cutmix" if pasted else "mixup")
    assert kinds == ({"mixup", "cutmix"} if name == "both" else {name})


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cross_entropy", "asl"])
def test_train_step_with_mixup_and_cutmix_on_two_devices_follows_one(loss):
    """Three steps of batch 8, mixup and CutMix on. The mixed batches are bitwise the same on 1
    and 2 devices (above), so what remains is the order of float32 additions in the gradient
    pmean and the BatchNorm statistics (a mean of 8 rows against the mean of two means of 4):
    each step's gradients differ by a few units of float32 rounding (6e-8) relative to the
    terms summed. The losses then agree to ~1e-7 (bound 1e-5). The parameters are compared by
    their updates, leaf by leaf in norm: the conv kernel's gradient, behind BatchNorm, is a
    small difference of large terms, so its relative error is the largest (7.5e-6 measured;
    bound 1e-3). Both bounds are far below what a mixing that differs per device does: drawing
    per device, or mixing with the device's own shard reversed, moved the losses by 0.3-0.8 %.
    Multi-label (asl): the multi-hot rows travel and mix as the class indices do. (Augmented on
    the device: tests/test_train_resume.py's tiny run, on 1 and 2 devices.)"""
    cfg = config(lr=0.2, mixup=0.4, cutmix=1.0, ema_decay=0.0, loss=loss)
    batches = random_batches(3, 8, multi_hot=loss == "asl")
    one_states, one = run_steps(TinyNet(), cfg, 3, 1, batches)
    two_states, two = run_steps(TinyNet(), cfg, 3, 2, batches)
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5)
    for name in ("params", "batch_stats"):
        start, one_end, two_end = (getattr(s, name) for s in (one_states[0], one_states[-1], two_states[-1]))
        assert update_error(two_end, one_end, start) < 1e-3, name


# --- fp16: a skipped step ------------------------------------------------------------------------

FINE, OVERFLOW = 2.0**10, 2.0**100  # 2**100 times the loss overflows float16 in the backward pass


@pytest.mark.parametrize(
    ("optimizer", "augment"),
    [("sgd", None), ("adamw", None), pytest.param("sgd", DEVICE_AUGMENT, marks=pytest.mark.slow)],
)
def test_fp16_skipped_step_leaves_everything_and_the_schedule_where_it_was(optimizer, augment):
    """Steps 1-4, step 2 overflowing: after it the weights, optimizer state, BatchNorm
    statistics and EMA are what they were; the schedule's count did not move, so each step's
    learning rate is the schedule at the number of updates applied before it, and the run ends
    one update behind its step count, with the weights of a run that never saw batch 2 (with
    the augmentation on the device too: the images' draws travel with them, not with the step)."""
    cfg = config(lr=0.1, optimizer=optimizer, precision="fp16")
    model = TinyNet(dtype=jnp.float16)
    batches = random_batches(4, 4)
    states, metrics = run_steps(model, cfg, 6, 1, batches, scales=[FINE, OVERFLOW, FINE, FINE], augment=augment)
    assert [m["finite"] for m in metrics] == [1.0, 0.0, 1.0, 1.0]
    assert all(m["params_finite"] == 1.0 for m in metrics)
    before, after = states[1], states[2]
    for name in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
        assert_trees_equal(getattr(after, name), getattr(before, name))
    # apply_if_finite's own counters record the skip; the optimizer's state is untouched.
    assert_trees_equal(after.opt_state.inner_state, before.opt_state.inner_state)
    assert int(after.opt_state.total_notfinite) == 1
    assert (int(after.step), float(after.loss_scale)) == (2, OVERFLOW / 2)
    schedule = learning_rate(cfg, 6)
    assert [int(applied_updates(s.opt_state)) for s in states] == [0, 1, 1, 2, 3]
    assert [m["lr"] for m in metrics] == [pytest.approx(float(schedule(k))) for k in (0, 1, 1, 2)]
    assert len({m["lr"] for m in metrics}) == 3  # the schedule moves between updates
    # The skipped step is as if batch 2 had never come (same loss scale for the others).
    unskipped, _ = run_steps(model, cfg, 6, 1, [batches[0], *batches[2:]], scales=[FINE] * 3, augment=augment)
    for name in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
        assert_trees_equal(getattr(states[-1], name), getattr(unskipped[-1], name))
    assert_trees_equal(states[-1].opt_state.inner_state, unskipped[-1].opt_state.inner_state)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_without_fp16_each_step_applies_the_schedule_at_its_index(precision):
    """No skipping outside fp16: the optimizer is the plain one (checkpoints keep their
    structure) and step k's learning rate is the schedule at k."""
    cfg = config(lr=0.1, precision=precision)
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
    states, metrics = run_steps(TinyNet(dtype=dtype), cfg, 4, 1, random_batches(3, 4))
    plain = optax.chain(
        optax.trace(0.9, nesterov=True),
        optax.add_decayed_weights(1e-4, mask=decay_mask),
        optax.scale_by_learning_rate(learning_rate(cfg, 4)),
    )
    assert jax.tree_util.tree_structure(states[0].opt_state) == jax.tree_util.tree_structure(
        plain.init(states[0].params)
    )
    schedule = learning_rate(cfg, 4)
    assert [m["lr"] for m in metrics] == [pytest.approx(float(schedule(k))) for k in range(3)]
    assert len({m["lr"] for m in metrics}) == 3
    assert [int(applied_updates(s.opt_state)) for s in states] == [0, 1, 2, 3]


def test_fp32_step_is_the_plain_update():
    """Two fp32 steps give the weights, BatchNorm statistics and EMA of the update written out
    here, as the step computed them before the fp16 rework (one device: gradients, optax
    update, the EMA's warm-up indexed by the step). Compared by updates, leaf by leaf in norm:
    the two programs round differently and the conv kernel's gradient, behind BatchNorm, is a
    small difference of large terms (9e-6 measured; bound 1e-4)."""
    cfg = config(lr=0.1)
    model = TinyNet()
    batches = random_batches(2, 4)
    states, _ = run_steps(model, cfg, 4, 1, batches)
    tx = make_optimizer(cfg, 4)
    plain = model.clone(axis_name=None)  # one device: the batch is the global batch
    params, batch_stats = states[0].params, states[0].batch_stats
    opt_state, ema = tx.init(params), (params, batch_stats)
    for t, batch in enumerate(batches):
        images = jnp.asarray(batch["image"], jnp.float32) / 255.0
        targets = soft_targets(jnp.asarray(batch["label"]), CLASSES, cfg.optim.label_smoothing)

        def loss_fn(p, stats=batch_stats, images=images, targets=targets):
            logits, updates = plain.apply(
                {"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), -1)), updates["batch_stats"]

        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree_util.tree_map(jnp.add, params, updates)
        decay = min(cfg.optim.ema_decay, (1 + t) / (10 + t))
        ema = jax.tree_util.tree_map(lambda e, n, d=decay: d * e + (1 - d) * n, ema, (params, batch_stats))
    final, initial = states[-1], states[0]
    assert update_error(final.params, params, initial.params) < 1e-4
    assert update_error(final.batch_stats, batch_stats, initial.batch_stats) < 1e-4
    final_ema, initial_ema = (final.ema_params, final.ema_batch_stats), (initial.params, initial.batch_stats)
    assert update_error(final_ema, ema, initial_ema) < 1e-4


@pytest.mark.parametrize(("loss", "gammas", "clip"), [("asl", (4.0, 0.0), 0.05), ("bce", (0.0, 0.0), None)])
def test_multi_label_step_loss_is_the_asymmetric_loss_of_smoothed_multi_hot_targets(loss, gammas, clip):
    """The step's first loss is asymmetric_loss (bce: no focusing, no clip) of the model's logits
    and the multi-hot rows smoothed towards 1/2; no accuracy is reported for multi-label."""
    cfg = config(lr=0.1, ema_decay=0.0, loss=loss, label_smoothing=0.2)
    batches = random_batches(1, 8, multi_hot=True)
    model = TinyNet()
    states, metrics = run_steps(model, cfg, 1, 2, batches)
    variables = {"params": states[0].params, "batch_stats": states[0].batch_stats}
    images = batches[0]["image"].astype(np.float32) / 255.0  # BatchNorm over all 8 rows, as synchronised on 2 devices
    logits = TinyNet(axis_name=None).apply(variables, images, train=True, mutable=["batch_stats"])[0]
    targets = batches[0]["label"] * 0.8 + 0.1
    expected = asymmetric_loss(logits, targets, *gammas, clip)
    assert metrics[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert "accuracy" not in metrics[0]


# --- BatchNorm per device ------------------------------------------------------------------------


def test_batchnorm_per_device_is_the_mean_of_the_shards_own_steps():
    """--no-sync-bn: each device normalises its shard with the shard's statistics, and the
    gradients and running statistics are averaged, so one step on 2 devices is the mean of one
    step on each half alone (SGD's first step is linear in the gradients). Synchronised
    statistics would not give that: the halves' statistics differ from the whole batch's."""
    cfg = config(lr=0.05, ema_decay=0.0)
    tx = make_optimizer(cfg, 10)
    model = TinyNet(axis_name=None)  # per-device statistics
    variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    state = jax.tree_util.tree_map(np.asarray, create_state(variables, tx, cfg))
    batch = random_batches(1, 8)[0]
    batch["image"][4:] //= 3  # the halves differ in their statistics

    def stepper(devices):
        mesh = mesh_of(devices)
        step = make_train_step(model, tx, cfg, 10, mesh)

        def run(rows):
            new, metrics = step(
                replicate(state, mesh), shard_batch({k: batch[k][rows] for k in ("image", "label")}, mesh)
            )
            return jax.device_get({"params": new.params, "batch_stats": new.batch_stats}), float(metrics["loss"])

        return run

    two, two_loss = stepper(2)(slice(0, 8))
    one = stepper(1)
    (first, first_loss), (second, second_loss) = one(slice(0, 4)), one(slice(4, 8))
    np.testing.assert_allclose(two_loss, (first_loss + second_loss) / 2, rtol=1e-5)
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, first, second)
    for got, want in zip(jax.tree_util.tree_leaves(two), jax.tree_util.tree_leaves(mean), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Synchronised statistics would not: the global batch's variance is not the mean of the halves'.
    mesh = mesh_of(2)
    synced = make_train_step(model.clone(axis_name=BATCH_AXIS), tx, cfg, 10, mesh)
    new, _ = synced(replicate(state, mesh), shard_batch({k: batch[k] for k in ("image", "label")}, mesh))
    assert not np.allclose(jax.device_get(new.batch_stats["bn"]["var"]), two["batch_stats"]["bn"]["var"], rtol=1e-4)
