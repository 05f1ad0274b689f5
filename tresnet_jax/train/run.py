"""A whole training run: data, model (fresh or fine-tuned from converted weights), the
data-parallel step, periodic evaluation, Orbax checkpoints with automatic resume, metrics
(JSON lines and TensorBoard) and the export of the final weights.

A run lives in its ``workdir``; started again with the same settings it continues from its last
complete checkpoint and ends with exactly the parameters an uninterrupted run would have.
SIGTERM or SIGINT stops it after the current step with a checkpoint of that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tresnet_jax.data.augment import AugmentConfig
from tresnet_jax.data.classes import imagenet_index
from tresnet_jax.data.preprocess import Preprocessing, check_image_size
from tresnet_jax.data.sources import FolderSource, Source, SyntheticSource, model_labels
from tresnet_jax.data.tfds_reader import open_split
from tresnet_jax.data.train_stream import StreamSpec, steps_per_epoch, train_batches
from tresnet_jax.errors import InputError
from tresnet_jax.evaluation import evaluate_many
from tresnet_jax.model.initialization import random_variables, replace_head
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import ModelSpec, resolve
from tresnet_jax.progress import ProgressBar
from tresnet_jax.runtime.parallel import (
    BATCH_AXIS,
    data_mesh,
    host_copy,
    local_batch_size,
    prefetch_to_devices,
    replicate,
    select_devices,
)
from tresnet_jax.train.events import ScalarWriter
from tresnet_jax.train.preemption import StopRequests
from tresnet_jax.train.step import PRECISIONS, OptimConfig, TrainState, create_state, make_optimizer, make_train_step
from tresnet_jax.weights.factory import load_any
from tresnet_jax.weights.storage import save_weights, write_file_atomically

CONFIG_FILE = "config.json"
VAL_SPLITS = ("validation", "test")
METRICS_FILE = "metrics.jsonl"
# Settings that may change when a run is resumed: they do not change what is computed (the
# device count only changes the order of float additions).
RESUMABLE = {
    "workdir",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "eval_batch_size",
    "compilation_cache",
    "num_devices",
}


class TrainingDiverged(InputError):
    """The loss or the gradients became NaN/inf (not an fp16 overflow the loss scale absorbs)."""


class Stopped(Exception):
    """The run stopped on a signal after writing a checkpoint of its current step."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: Path):
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step} of {total_steps}: checkpoint {checkpoint}; "
            f"the same command continues from there"
        )


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; written to ``workdir/config.json``."""

    workdir: str
    model: str = "tresnet_m"
    num_classes: int | None = None  # default: the training set's classes
    init: str | None = None  # converted weights (name, directory or PyTorch file) to fine-tune
    dataset: str | None = None  # TFDS NAME[:SPLIT] for training
    val_dataset: str | None = None  # TFDS NAME:SPLIT for validation (default: the dataset's validation split)
    train_dir: str | None = None
    val_dir: str | None = None
    data_dir: str | None = None
    synthetic_data: int | None = None  # random images as an epoch of this many, instead of a dataset
    image_size: int = 224
    epochs: int = 300
    max_steps: int | None = None
    batch_size: int = 256
    lr: float | None = None  # default: 0.1 * batch / 256 (sgd), 2e-4 * batch / 256 * 4 (adamw)
    schedule: str = "onecycle"
    warmup_fraction: float = 0.2
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    crop_min_scale: float = 0.08  # inception crop: smallest fraction of the image area
    flip: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: float = 9.0
    cutout: float = 0.5
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float = 0.9997
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 1  # epochs; 0: only at the end
    checkpoint_every: int | None = None  # steps; default: every epoch
    keep_checkpoints: int = 3
    log_every: int = 20
    num_devices: int | None = None
    sync_bn: bool = True  # BatchNorm statistics of the global batch; False: of each device's shard
    eval_batch_size: int | None = None
    progress: bool = True
    compilation_cache: bool = True

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return (8e-4 if self.optimizer == "adamw" else 0.1) * self.batch_size / 256


def open_train_sources(cfg: TrainConfig) -> tuple[Source, Source | None]:
    """(training set, validation set or None)."""
    if cfg.synthetic_data:
        return SyntheticSource(cfg.synthetic_data, cfg.num_classes or 1000), None
    if cfg.train_dir:
        train = FolderSource.scan(cfg.train_dir)
    elif cfg.dataset:
        train = open_split(cfg.dataset, cfg.data_dir, default_split="train")
    else:
        raise InputError("no training data: pass --train_dir DIR or --dataset NAME")
    if cfg.val_dir:
        return train, FolderSource.scan(cfg.val_dir)
    if cfg.val_dataset:
        return train, open_split(cfg.val_dataset, cfg.data_dir)
    if cfg.dataset:  # the dataset's validation (or test) split, if it has one
        name = cfg.dataset.partition(":")[0]
        return train, next((open_split(f"{name}:{s}", cfg.data_dir) for s in VAL_SPLITS if s in train.splits), None)
    return train, None


def initial_variables(cfg: TrainConfig, model: ModelSpec, num_classes: int) -> tuple[dict[str, Any], str]:
    """Fresh variables, or the backbone of ``cfg.init`` with its head kept when the class count
    matches and newly initialised otherwise; and a line saying which."""
    if cfg.init is None:
        fresh = random_variables(model.arch, num_classes, cfg.seed)
        return fresh, f"{cfg.model} initialised from scratch (seed {cfg.seed})"
    loaded = load_any(cfg.init, model)
    if loaded.spec.arch != model.arch:
        raise InputError(f"--init {cfg.init} holds {loaded.spec.name} weights, not {cfg.model}")
    kept = loaded.model.num_classes == num_classes
    variables = loaded.variables if kept else replace_head(loaded.variables, loaded.model.arch, num_classes, cfg.seed)
    head = "its head kept" if kept else f"a new {num_classes}-class head (it had {loaded.model.num_classes})"
    return variables, f"{cfg.model} fine-tuned from {loaded.origin}: backbone loaded, {head}"


def check_resumable(workdir: Path, cfg: TrainConfig) -> None:
    """A workdir holds one run: refuse to continue it with settings that change the result
    (without synchronised BatchNorm, the device count is one of them)."""
    path = workdir / CONFIG_FILE
    resumable = RESUMABLE if cfg.sync_bn else RESUMABLE - {"num_devices"}
    current = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in resumable}
    if path.exists():
        stored = {k: v for k, v in json.loads(path.read_text()).items() if k not in resumable}
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if changed:
            details = ", ".join(f"{k} {stored.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
            raise InputError(f"{workdir} holds a run with other settings ({details}); use a new --workdir")


def suggest_batch_size(temp_bytes: int, fixed_bytes: int, limit_bytes: int, per_device_batch: int, devices: int) -> int:
    """The largest global batch whose step fits in device memory, assuming the temporaries grow
    in proportion to the batch (XLA's memory analysis of the compiled step)."""
    per_example = temp_bytes / max(per_device_batch, 1)
    fitting = int((0.95 * limit_bytes - fixed_bytes) // max(per_example, 1))
    return max(fitting, 0) * devices


def check_memory(compiled: Any, mesh: Any, global_batch: int) -> None:
    """Refuse, before the first step, a batch whose step needs more memory than a device has."""
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    stats = device.memory_stats() or {}
    analysis = compiled.memory_analysis()
    if "bytes_limit" not in stats or analysis is None:
        return
    fixed = analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    need = fixed + analysis.temp_size_in_bytes
    if need > stats["bytes_limit"]:
        devices = mesh.devices.size
        best = suggest_batch_size(
            analysis.temp_size_in_bytes, fixed, stats["bytes_limit"], global_batch // devices, devices
        )
        raise InputError(
            f"batch size {global_batch} needs {need / 2**30:.1f} GiB per device, more than the "
            f"{stats['bytes_limit'] / 2**30:.1f} GiB available; the largest that fits is about {best}"
        )


class Run:
    """One training run in its workdir."""

    def __init__(self, cfg: TrainConfig):
        check_image_size(cfg.image_size)  # every flag is checked before anything is read or written
        self.cfg = cfg
        self.workdir = Path(cfg.workdir).expanduser().absolute()
        self.lead = jax.process_index() == 0
        self.unreadable = 0  # training images passed over so far, by this process
        self.train_source, self.val_source = open_train_sources(cfg)
        self.num_classes = cfg.num_classes or len(self.train_source.class_names)
        self.label_map = model_labels(self.train_source.class_names, self.num_classes, self.train_source.name)
        devices = select_devices(cfg.num_devices)
        if not cfg.sync_bn:  # the devices' shards decide the statistics: the count is a setting
            cfg = self.cfg = dataclasses.replace(cfg, num_devices=len(devices) // jax.process_count())
        self.mesh = data_mesh(devices)
        local_batch_size(cfg.batch_size, self.mesh)
        if cfg.eval_batch_size is not None:
            local_batch_size(cfg.eval_batch_size, self.mesh)
        self.spec = StreamSpec(cfg.batch_size, jax.process_index(), jax.process_count(), cfg.seed)
        self.steps_per_epoch = steps_per_epoch(self.train_source, self.spec)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        if cfg.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        dtype = PRECISIONS[cfg.precision]
        self.spec = resolve(cfg.model)  # the model name, looked up once
        arch = self.spec.arch
        self.model = TResNet(arch, self.num_classes, dtype=dtype, axis_name=BATCH_AXIS if cfg.sync_bn else None)
        self.eval_model = TResNet(arch, self.num_classes, dtype=dtype)
        self.optim = OptimConfig(
            total_steps=self.total_steps,
            lr=cfg.peak_lr(),
            schedule=cfg.schedule,
            warmup_fraction=cfg.warmup_fraction,
            optimizer=cfg.optimizer,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            label_smoothing=cfg.label_smoothing,
            ema_decay=cfg.ema_decay,
            mixup=cfg.mixup,
            cutmix=cfg.cutmix,
            precision=cfg.precision,
        )
        self.augment = AugmentConfig(
            image_size=cfg.image_size,
            crop_scale=(cfg.crop_min_scale, 1.0),
            flip=cfg.flip,
            randaugment_ops=cfg.randaugment_ops,
            randaugment_magnitude=cfg.randaugment_magnitude,
            cutout=cfg.cutout,
        )
        self.tx = make_optimizer(self.optim)

    # --- state and checkpoints ------------------------------------------------------------------

    def checkpoint_manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.cfg.keep_checkpoints, create=True, enable_async_checkpointing=False
        )
        return ocp.CheckpointManager(self.workdir / "checkpoints", options=options)

    def initial_state(self, manager) -> tuple[TrainState, str]:
        """The state to start from: the last checkpoint, else fresh or fine-tuning weights."""
        import orbax.checkpoint as ocp

        latest = manager.latest_step()
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        if latest is not None:
            abstract = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(self.fresh_state)
            )
            state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            return state, f"resumed from the checkpoint at step {latest}"
        variables, how = initial_variables(self.cfg, self.spec, self.num_classes)
        state = create_state(variables, self.tx, self.optim, self.cfg.seed)
        return replicate(state, self.mesh), how

    def fresh_state(self) -> TrainState:
        """A state of the right structure (used abstractly, to restore a checkpoint into)."""
        variables = random_variables(self.spec.arch, self.num_classes, self.cfg.seed)
        return create_state(variables, self.tx, self.optim, self.cfg.seed)

    def save(self, manager, state: TrainState) -> None:
        import orbax.checkpoint as ocp

        manager.save(int(host_copy(state.step)), args=ocp.args.StandardSave(state), force=True)

    # --- the loop --------------------------------------------------------------------------------

    def run(self, stops: StopRequests | None = None) -> dict[str, Any]:
        """Train to the end, or until SIGTERM/SIGINT (``Stopped``, after a checkpoint); a
        command line passes the StopRequests it installed when it started."""
        with contextlib.nullcontext(stops) if stops is not None else StopRequests() as active:
            active.listen()
            return self._run(active)

    def _run(self, stops: StopRequests) -> dict[str, Any]:
        cfg = self.cfg
        check_resumable(self.workdir, cfg)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.lead:
            # Atomic: the other processes read it in check_resumable, maybe while it is written.
            text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
            write_file_atomically(self.workdir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
        manager = self.checkpoint_manager()
        state, how = self.initial_state(manager)
        start = int(host_copy(state.step))
        self.log(
            f"{how}; {self.train_source.name}: {len(self.train_source)} images, {self.num_classes} classes, "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, batch {cfg.batch_size} on "
            f"{self.mesh.devices.size} device(s), {cfg.precision}, peak lr {cfg.peak_lr():g}"
        )
        metrics_log = MetricsLog(self.workdir, start, self.lead)
        if start >= self.total_steps:
            self.log(f"already trained: step {start} of {self.total_steps}")
            return self.finish(state, manager, metrics_log, {})

        step_fn = make_train_step(self.model, self.tx, self.optim, self.mesh)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, self.batch_shapes()).compile()
        check_memory(compiled, self.mesh, cfg.batch_size)
        self.log(f"compiled the training step in {time.perf_counter() - t0:.1f} s")

        checkpoint_every = cfg.checkpoint_every or self.steps_per_epoch
        batches = train_batches(self.train_source, self.spec, self.augment, start, self.label_map, self.passed_over)
        bar = ProgressBar(
            self.total_steps * cfg.batch_size, "train", self.lead and cfg.progress, initial=start * cfg.batch_size
        )
        lagged = LaggedMetrics()
        window_start = time.perf_counter()
        last_eval: dict[str, float] = {}
        step = start
        for _, device_batch in prefetch_to_devices(batches, self.mesh):
            state, metrics = compiled(state, device_batch)
            step += 1
            epoch_end = step % self.steps_per_epoch == 0
            done = step >= self.total_steps
            log_step = step % cfg.log_every == 0
            stop = None if done else stops.agreed(collective=log_step)
            sync = epoch_end or done or step % checkpoint_every == 0 or stop is not None
            for window in lagged.push(step, metrics, log=log_step, sync=sync):
                latest = self.check_and_log(window, metrics_log, window_start)
                window_start = time.perf_counter()
                bar.update(window[-1][0] * cfg.batch_size, {"loss": latest["loss"], "lr": latest["lr"]})
            if stop is not None:
                self.save(manager, state)
                manager.wait_until_finished()
                bar.close()
                metrics_log.close()
                raise Stopped(stop, step, self.total_steps, self.workdir / "checkpoints" / str(step))
            if epoch_end and cfg.eval_every and (step // self.steps_per_epoch) % cfg.eval_every == 0 and not done:
                last_eval = self.validate(state, step, metrics_log)
                window_start = time.perf_counter()
            if step % checkpoint_every == 0 or done:
                self.save(manager, state)
                window_start = time.perf_counter()
            if done:
                break
        bar.close()
        return self.finish(state, manager, metrics_log, last_eval)

    def passed_over(self, image: str, reason: str) -> None:
        """An unreadable training image, replaced in its batch by the next readable one."""
        self.unreadable += 1
        where = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        print(f"{where}unreadable training image {image}: {reason} (replaced by the next readable image)", flush=True)

    def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(BATCH_AXIS))
        n, size = self.cfg.batch_size, self.cfg.image_size
        return {
            "image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8, sharding=sharding),
            "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
        }

    def check_and_log(self, pending, metrics_log, window_start: float) -> dict[str, float]:
        """Fetch the metrics of the steps in ``pending`` (waiting for them), stop on a non-finite
        loss, log the last step with the throughput since the previous log."""
        values = [(step, {k: float(v) for k, v in jax.device_get(m).items()}) for step, m in pending]
        rate = len(pending) * self.cfg.batch_size / (time.perf_counter() - window_start)
        for step, row in values:
            overflow = self.cfg.precision != "fp16" and row["finite"] < 1
            if not math.isfinite(row["loss"]) or overflow or row["params_finite"] < 1:
                raise TrainingDiverged(
                    f"the loss became {row['loss']} at step {step} (lr {row['lr']:.3g}, {self.cfg.precision}); "
                    f"training stopped and no checkpoint was written after it: lower --lr or try --precision fp32"
                )
            if self.cfg.precision == "fp16" and row["loss_scale"] <= 1.0 and row["finite"] < 1:
                raise TrainingDiverged(f"fp16 gradients overflow even with loss scale 1 at step {step}")
        step, row = values[-1]
        metrics_log.write(
            {
                "step": step,
                "epoch": step / self.steps_per_epoch,
                **row,
                "images_per_second": rate,
                "unreadable_images": self.unreadable,
            }
        )
        return row

    def validate(self, state: TrainState, step: int, metrics_log) -> dict[str, float]:
        if self.val_source is None:
            return {}
        prep = Preprocessing(self.cfg.image_size)
        labels = model_labels(self.val_source.class_names, self.num_classes, self.val_source.name)
        batch = self.cfg.eval_batch_size or self.cfg.batch_size
        weights = {"": {"params": state.params, "batch_stats": state.batch_stats}}
        if state.ema_params is not None:
            weights["ema_"] = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
        results = evaluate_many(self.eval_model, weights, self.val_source, prep, labels, batch, self.mesh)
        row = {
            f"{prefix}val_{k}": getattr(result, k)
            for prefix, result in results.items()
            for k in ("top1", "top5", "loss")
        }
        metrics_log.write({"step": step, "epoch": step / self.steps_per_epoch, **row})
        ema = f" (EMA {row['ema_val_top1']:.2f})" if "ema_val_top1" in row else ""
        self.log(f"epoch {step / self.steps_per_epoch:g}: validation top-1 {row['val_top1']:.2f}{ema}")
        return row

    def finish(self, state: TrainState, manager, metrics_log, last_eval: dict[str, float]) -> dict[str, Any]:
        """Final validation, the export of the weights (and of their EMA) as weights directories."""
        step = int(host_copy(state.step))
        final = self.validate(state, step, metrics_log) if self.val_source is not None else last_eval
        manager.wait_until_finished()
        exports = {"export": (state.params, state.batch_stats, "")}
        if state.ema_params is not None:
            exports["export_ema"] = (state.ema_params, state.ema_batch_stats, "ema_")
        if self.lead:
            for name, (params, batch_stats, prefix) in exports.items():
                variables = jax.tree_util.tree_map(host_copy, {"params": params, "batch_stats": batch_stats})
                save_weights(self.workdir / name, variables, self.export_metadata(step, final, prefix), force=True)
                self.log(f"wrote {self.workdir / name}")
        metrics_log.close()
        return {"step": step, **final}

    def export_metadata(self, step: int, final: dict[str, float], prefix: str) -> dict[str, Any]:
        prep = Preprocessing(self.cfg.image_size)
        return {
            "model": self.cfg.model,
            "num_classes": self.num_classes,
            "tag": None,
            "preprocessing": {k: v for k, v in prep.to_dict().items() if k != "resize_size"},
            "reported": None,
            "source": {
                "trained_in": str(self.workdir),
                "step": step,
                "ema": bool(prefix),
                "val_top1": final.get(f"{prefix}val_top1"),
            },
            "class_names": self.model_class_names(),
        }

    def model_class_names(self) -> list[str] | None:
        """The model's class names: the dataset's, unless its labels are ImageNet WordNet ids
        mapped into a 1000-class model (ImageNet's names apply) or it has other counts."""
        names = [str(name) for name in self.train_source.class_names]
        if len(names) != self.num_classes or (self.num_classes == 1000 and set(names) <= set(imagenet_index())):
            return None
        return names

    def log(self, line: str) -> None:
        if self.lead:
            print(line, flush=True)


class LaggedMetrics:
    """The metrics of dispatched steps, read one step late: a log due at step s is read once
    step s + 1 is queued behind it, so the device never waits while the host reads and writes
    them. Checkpoints, validation and the end read everything at once (they wait anyway)."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, Any]] = []
        self.due = False

    def push(self, step: int, metrics: Any, log: bool, sync: bool) -> list[list[tuple[int, Any]]]:
        """Add the metrics of ``step``, just dispatched; return the windows of (step, metrics) to
        read now, oldest first. Each window is logged as one row, its last step's."""
        ready = []
        if self.due:
            ready.append(self.pending)
            self.pending = []
        self.pending.append((step, metrics))
        self.due = log and not sync
        if sync:
            ready.append(self.pending)
            self.pending = []
        return ready


class MetricsLog:
    """metrics.jsonl, and TensorBoard scalars when the ``tensorboard`` package is installed
    (written without TensorFlow, tresnet_jax/events.py); rows past the resumed step are dropped,
    so a resumed run's log reads like an uninterrupted one's."""

    def __init__(self, workdir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        try:
            self.writer = ScalarWriter(workdir / "tensorboard")
        except ImportError:
            self.writer = None

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps({"time": now, **row}) + "\n")
        if self.writer is not None:
            self.writer.add(int(row["step"]), {k: v for k, v in row.items() if k not in ("step", "time")}, now)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
