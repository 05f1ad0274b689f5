"""The training step, data parallel and pmap-style: a per-device program (``jax.shard_map``
under ``jax.jit``) whose gradients are averaged with ``lax.pmean``; the state is donated.

BatchNorm: a model built with ``axis_name=BATCH_AXIS`` normalises with the statistics of the
global batch (an all-reduce per layer, forward and backward: the result does not depend on
the device count); one built without normalises each device's shard with its own statistics
(no per-layer communication, as PyTorch's DistributedDataParallel without SyncBatchNorm) and
the running statistics are averaged over the devices once per step.

Single-label batches carry a class index per image and train with softmax cross-entropy;
multi-label ones carry multi-hot rows and train with the asymmetric loss or binary
cross-entropy (``train.losses``). Label smoothing pulls a one-hot target towards uniform over
the classes, a multi-hot one towards 1/2 in every class (each class is its own binary problem).

Augmentation on the device (``augment`` given): the batch holds uint8 crops and each image's
(epoch, index), and flip, RandAugment and Cutout run per device before anything else
(``data.device_augment``): each image's draws come from its ids alone, so N devices augment as
one does and a resumed or fp16-skipped step augments as it did.

Dropout (an ML-Decoder head's): each example's masks come from its own key, ``fold_in`` of
``DROPOUT_STREAM`` into the augmentation's key of its (epoch, index) ids (``dropout_keys``), so
N devices drop as one does and a resumed run drops as it did. The head's queries (the
``constants`` collection) ride in the state beside the parameters: the optimizer, weight decay,
gradients, EMA and loss scale see ``params`` alone, so the queries stay bit for bit as they were.

Mixup/CutMix: one draw per step, the same on every device, and the partner of global row r is
row B-1-r of the global batch (one ``ppermute`` brings each device its partner rows): N devices
mix exactly as one does.

Precision: bf16/fp16 compute with float32 parameters, BatchNorm statistics and loss; fp16 adds
dynamic loss scaling: a step with non-finite gradients is skipped (``optax.apply_if_finite``:
the weights, the optimizer's state and its schedule's count stay as they were, and so do the
BatchNorm statistics and the EMA) and the scale halved. The schedule follows the updates
applied, so a run with k skipped steps ends k updates behind its step count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from tresnet_jax.data.augment import AugmentConfig
from tresnet_jax.data.device_augment import augment_batch, image_keys
from tresnet_jax.model.architecture import FC_HEAD, ML_DECODER
from tresnet_jax.model.ml_decoder import QUERIES
from tresnet_jax.runtime.parallel import BATCH_AXIS
from tresnet_jax.runtime.xla_options import compiler_options
from tresnet_jax.train.config import TrainConfig
from tresnet_jax.train.losses import asymmetric_loss

# fp16: consecutive overflowing steps apply_if_finite skips before it gives up and applies a
# non-finite update. A float32 loss scale is below 2**128: halved on every overflow, it is at
# its floor of 1 after at most 128, and the trainer stops at the next (scale 1 and still
# non-finite). So every overflow up to the trainer's stop is skipped.
MAX_CONSECUTIVE_OVERFLOWS = 129
INITIAL_LOSS_SCALE = 2.0**15  # fp16's dynamic loss scale at the start
LOSS_SCALE_PERIOD = 2000  # fp16: finite steps before the scale doubles
DROPOUT_STREAM = 0x44524F50  # "DROP": folded into an image's augmentation key for its dropout key


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    loss_scale: jax.Array  # 1.0 unless fp16
    finite_steps: jax.Array  # fp16: consecutive finite steps since the scale last changed
    rng: jax.Array  # mixup/cutmix randomness, folded with the step
    # Variables that are never trained (an ML-Decoder's queries; empty for fc). Last, and with a
    # default, so that a checkpoint written before it restores (``Checkpoints.restore``).
    constants: Any = flax.struct.field(default_factory=dict)


def learning_rate(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """The learning rate by the number of updates applied, over a run of ``total_steps``."""
    optim, peak = cfg.optim, cfg.peak_lr()
    warmup = max(1, int(total_steps * optim.warmup_fraction))
    if optim.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(
            total_steps, peak, pct_start=warmup / total_steps, div_factor=25.0, final_div_factor=1e4
        )
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))
    return optax.constant_schedule(peak)


def decay_mask(params: Any) -> Any:
    """Weight decay applies to conv and dense kernels only: not to 1-D parameters (norm scales)
    nor to biases, the rule of ASL's and ML-Decoder's ``add_weight_decay`` (``len(shape) == 1``
    or a name ending ``.bias``). An ML-Decoder's queries are no parameters: nothing decays them."""

    def decayed(path: tuple[Any, ...], p: jax.Array) -> bool:
        return p.ndim > 1 and getattr(path[-1], "key", None) != "bias"

    return jax.tree_util.tree_map_with_path(decayed, params)


def draws_dropout(model: Any) -> bool:
    """Whether the model drops out in training (an ML-Decoder head): its batches must carry the
    images' ids, from which each example's dropout key comes."""
    return getattr(model, "head_spec", FC_HEAD).kind == ML_DECODER


def dropout_keys(seed: int, ids: jax.Array) -> jax.Array:
    """One dropout key per example from its (epoch, image index) row: the augmentation's key of
    the image (``device_augment.image_keys``) with ``DROPOUT_STREAM`` folded in, so that dropout
    and augmentation draw independently, and both from the image's ids alone."""
    return jax.vmap(lambda key: jax.random.fold_in(key, DROPOUT_STREAM))(image_keys(seed, ids))


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of ``cfg`` over a run of ``total_steps``; in fp16 wrapped in
    ``optax.apply_if_finite`` (its state is then an ``ApplyIfFiniteState`` around the inner one:
    fp16 checkpoints have that structure)."""
    optim, schedule = cfg.optim, learning_rate(cfg, total_steps)
    if optim.optimizer == "adamw":
        tx = optax.adamw(schedule, weight_decay=optim.weight_decay, mask=decay_mask)
    elif optim.optimizer == "adam":  # L2 added to the gradients before Adam, as ASL's torch.optim.Adam
        tx = optax.chain(
            optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
            optax.scale_by_adam(),
            optax.scale_by_learning_rate(schedule),
        )
    else:
        tx = optax.chain(
            optax.trace(optim.momentum, nesterov=True),
            optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    return optax.apply_if_finite(tx, MAX_CONSECUTIVE_OVERFLOWS) if cfg.model.precision == "fp16" else tx


def applied_updates(opt_state: Any) -> jax.Array:
    """The number of updates the optimizer has applied: the count of its learning-rate
    schedule (``make_optimizer``'s), which skipped fp16 steps do not advance."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    counts = [s.count for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    if len(counts) != 1:
        raise ValueError(f"expected one learning-rate schedule in the optimizer's state, found {len(counts)}")
    return counts[0]


def create_state(variables: dict[str, Any], tx: optax.GradientTransformation, cfg: TrainConfig) -> TrainState:
    """The state a run starts from: the variables (an ML-Decoder's queries among the
    ``constants``, which nothing trains), the optimizer's state, the EMA (a copy), the loss
    scale, and the key of the step's randomness (``cfg.run.seed``)."""
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    ema = cfg.optim.ema_decay > 0
    # The EMA starts equal to the weights but in buffers of its own: the state is donated.
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree) if ema else None  # noqa: E731
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=copy(params),
        ema_batch_stats=copy(batch_stats),
        loss_scale=jnp.asarray(INITIAL_LOSS_SCALE if cfg.model.precision == "fp16" else 1.0, jnp.float32),
        finite_steps=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(cfg.run.seed)),
        constants=variables.get("constants", {}),
    )


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Class indices (batch,) -> one-hot rows smoothed towards uniform; multi-hot rows (batch,
    classes) -> float rows smoothed towards 1/2."""
    if labels.ndim == 2:
        return labels.astype(jnp.float32) * (1.0 - smoothing) + 0.5 * smoothing
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def training_loss(logits: jax.Array, targets: jax.Array, cfg: TrainConfig) -> jax.Array:
    """The batch's mean loss: softmax cross-entropy, or for multi-hot targets the asymmetric loss
    (bce: without focusing or clipping), summed over the classes."""
    optim = cfg.optim
    if optim.loss == "asl":
        return asymmetric_loss(logits, targets, optim.asl_gamma_neg, optim.asl_gamma_pos, optim.asl_clip)
    if optim.loss == "bce":
        return asymmetric_loss(logits, targets, 0.0, 0.0, None)
    return optax.softmax_cross_entropy(logits, targets).mean()


def global_partners(tree: Any, axis_name: str) -> Any:
    """Inside ``shard_map``, for a batch sharded along ``axis_name``: the rows of the reversed
    global batch facing this device's rows (global row r faces row B-1-r). They are device
    n-1-d's rows in reverse order for device d: one ``ppermute`` (no all-gather), then a local
    reversal."""
    n = lax.axis_size(axis_name)
    mirrored = lax.ppermute(tree, axis_name, [(i, n - 1 - i) for i in range(n)])
    return jax.tree_util.tree_map(lambda x: x[::-1], mirrored)


def mix(
    images: jax.Array,
    targets: jax.Array,
    partner_images: jax.Array,
    partner_targets: jax.Array,
    rng: jax.Array,
    cfg: TrainConfig,
) -> tuple[jax.Array, jax.Array]:
    """Mixup or CutMix (``cfg.augment`` turns one or both on; chosen at random when both are) of
    each row with its partner row. Everything drawn comes from ``rng``: the same key on every
    device gives every device the same mixing."""
    mixup, cutmix = cfg.augment.mixup, cfg.augment.cutmix
    choose, lam_key, box_key = jax.random.split(rng, 3)
    use_cutmix = jax.random.bernoulli(choose, 0.5) if mixup and cutmix else cutmix > 0
    alpha = jnp.where(use_cutmix, cutmix or 1.0, mixup or 1.0)
    lam = jax.random.beta(lam_key, alpha, alpha)
    _, h, w, _ = images.shape
    cut = jnp.sqrt(1.0 - lam)
    cy, cx = jax.random.uniform(box_key, (2,)) * jnp.array([h, w])
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (jnp.abs(rows - cy) * 2 < cut * h) & (jnp.abs(cols - cx) * 2 < cut * w)
    box_lam = 1.0 - box.mean()
    mixed_cut = jnp.where(box[None, :, :, None], partner_images, images)
    mixed_up = lam * images + (1.0 - lam) * partner_images
    images = jnp.where(use_cutmix, mixed_cut, mixed_up)
    lam = jnp.where(use_cutmix, box_lam, lam)
    return images, lam * targets + (1.0 - lam) * partner_targets


def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    cfg: TrainConfig,
    total_steps: int,
    mesh: Mesh,
    augment: AugmentConfig | None = None,
) -> Callable:
    """``step(state, batch) -> (state, metrics)``, jitted with the state donated. BatchNorm
    statistics cover the global batch when ``model.axis_name`` is ``BATCH_AXIS``, each device's
    shard when it is None (see the module's docstring). With ``augment``, the batch's images are
    crops augmented here with the draws of (``cfg.run.seed``, its ``augment_ids``); a model that
    ``draws_dropout`` takes each example's dropout key from the same ids (``dropout_keys``)."""
    schedule = learning_rate(cfg, total_steps)
    seed = cfg.run.seed
    dropout = draws_dropout(model)

    def inputs(images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        return images.astype(jnp.float32) / 255.0, soft_targets(labels, model.num_classes, cfg.optim.label_smoothing)

    def device_step(state: TrainState, batch: dict[str, jax.Array]):
        pixels = batch["image"]
        if augment is not None:
            pixels = augment_batch(pixels, batch["augment_ids"], seed, augment)
        images, targets = inputs(pixels, batch["label"])
        if cfg.augment.mixup or cfg.augment.cutmix:  # the step's key, not the device's: N devices mix as one does
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            # The partners travel as uint8 images and labels: a quarter of the bytes of floats.
            partners = inputs(*global_partners((pixels, batch["label"]), BATCH_AXIS))
            images, targets = mix(images, targets, *partners, rng, cfg)

        keys = {"dropout_keys": dropout_keys(seed, batch["augment_ids"])} if dropout else {}

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats, **constants(state)}
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], **keys)
            loss = training_loss(logits, targets, cfg)
            return loss * state.loss_scale, (loss, logits, updates["batch_stats"])

        # Differentiate this device's copy of the parameters (marked as varying over the device
        # axis) to get this device's gradients, then average them: pmap's semantics. Without the
        # cast, shard_map's autodiff would already sum the gradients of the replicated parameters.
        local_params = lax.pcast(state.params, BATCH_AXIS, to="varying")
        grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(local_params)
        grads = jax.tree_util.tree_map(lambda g: g / state.loss_scale, lax.pmean(grads, BATCH_AXIS))
        if model.axis_name is None:  # per-device statistics: one all-reduce for all running averages
            batch_stats = lax.pmean(batch_stats, BATCH_AXIS)
        finite = all_finite(grads)
        # fp16: apply_if_finite skips a non-finite update (weights, optimizer state, schedule).
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        applied = applied_updates(state.opt_state)  # before this step: its learning rate's index
        statistics = {"batch_stats": batch_stats, **_ema(state, params, batch_stats, applied, cfg)}
        if cfg.model.precision == "fp16":  # a skipped step leaves the running statistics and the EMA too
            statistics = jax.tree_util.tree_map(
                lambda new, old: jnp.where(finite, new, old), statistics, {k: getattr(state, k) for k in statistics}
            )
        new = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            **statistics,
            **_loss_scale(state, finite, cfg),
        )
        metrics = {
            "loss": loss,
            "lr": schedule(applied),  # the learning rate this step applies (if it is not skipped)
            "loss_scale": state.loss_scale,
            "finite": finite.astype(jnp.float32),  # the gradients
            "params_finite": all_finite(params).astype(jnp.float32),
        }
        if not cfg.multi_label:
            metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
        return new, lax.pmean(metrics, BATCH_AXIS)

    replicated = PartitionSpec()
    sharded = jax.shard_map(
        device_step, mesh=mesh, in_specs=(replicated, PartitionSpec(BATCH_AXIS)), out_specs=(replicated, replicated)
    )
    return jax.jit(sharded, donate_argnums=0, compiler_options=compiler_options())


def constants(state: TrainState) -> dict[str, Any]:
    """The state's never-trained variables as a collection of the model's variables (none for fc)."""
    return {QUERIES: state.constants} if state.constants else {}


def _ema(state: TrainState, params: Any, batch_stats: Any, applied: jax.Array, cfg: TrainConfig) -> dict[str, Any]:
    """Exponential moving average of the weights, with a decay that warms up with the number t
    of updates ``applied`` before ((1 + t) / (10 + t)) so short fine-tuning runs get a useful
    average too."""
    if state.ema_params is None:
        return {}
    t = applied.astype(jnp.float32)
    decay = jnp.minimum(cfg.optim.ema_decay, (1.0 + t) / (10.0 + t))
    ema_params, ema_batch_stats = jax.tree_util.tree_map(
        lambda e, n: decay * e + (1 - decay) * n, (state.ema_params, state.ema_batch_stats), (params, batch_stats)
    )
    return {"ema_params": ema_params, "ema_batch_stats": ema_batch_stats}


def _loss_scale(state: TrainState, finite: jax.Array, cfg: TrainConfig) -> dict[str, jax.Array]:
    """fp16 dynamic loss scaling: halve on overflow, double after a period of finite steps."""
    if cfg.model.precision != "fp16":
        return {}
    grown = state.finite_steps + 1 >= LOSS_SCALE_PERIOD
    scale = jnp.where(finite, jnp.where(grown, state.loss_scale * 2.0, state.loss_scale), state.loss_scale / 2.0)
    count = jnp.where(finite & ~grown, state.finite_steps + 1, 0)
    return {"loss_scale": jnp.maximum(scale, 1.0), "finite_steps": count.astype(jnp.int32)}
