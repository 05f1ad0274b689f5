"""A run's settings: ``TrainConfig``, written to ``workdir/config.json``, and the check that a
workdir is only ever continued with settings that compute the same result."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tresnet_jax.errors import InputError
from tresnet_jax.weights.storage import write_file_atomically

CONFIG_FILE = "config.json"
LOSSES = ("cross_entropy", "asl", "bce")
MULTI_LABEL_LOSSES = ("asl", "bce")
RESIZES = ("crop", "squish")
AUGMENT_PLACES = ("auto", "device", "host")
# What a run written before a setting existed did: its stored config is read with these values.
BEFORE_THE_SETTING = {"augment": "host", "decode": "host"}
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


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; written to ``workdir/config.json``."""

    workdir: str
    recipe: str | None = None  # the recipe (train/recipes) the other values started from
    model: str = "tresnet_m"
    num_classes: int | None = None  # default: the training set's classes
    init: str | None = None  # converted weights (name, directory or PyTorch file) to fine-tune
    dataset: str | None = None  # TFDS NAME[:SPLIT] for training
    val_dataset: str | None = None  # TFDS NAME:SPLIT for validation (default: the dataset's validation split)
    train_dir: str | None = None
    val_dir: str | None = None
    data_dir: str | None = None
    train_labels: str | None = None  # multi-label CSV (image,labels), images relative to its folder
    val_labels: str | None = None
    classes: str | None = None  # class names, one a line (default: the sorted names the CSVs use)
    synthetic_data: int | None = None  # random images as an epoch of this many, instead of a dataset
    image_size: int = 224
    resize: str = "crop"  # crop: inception crop / resize + centre crop; squish: whole image to size x size
    epochs: int = 300
    max_steps: int | None = None
    batch_size: int = 256
    lr: float | None = None  # default: 0.1 * batch / 256 (sgd), 8e-4 * batch / 256 (adam, adamw)
    schedule: str = "onecycle"
    warmup_fraction: float = 0.2
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    loss: str = "cross_entropy"  # softmax cross-entropy (single-label) | asl | bce (multi-label)
    asl_gamma_neg: float = 4.0  # asl: focusing exponent of the negatives
    asl_gamma_pos: float = 0.0  # asl: of the positives
    asl_clip: float = 0.05  # asl: probability margin shifted off the negatives
    crop_min_scale: float = 0.08  # inception crop: smallest fraction of the image area
    flip: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: float = 9.0
    cutout: float = 0.5
    augment: str = "auto"  # where flip, RandAugment and Cutout run: device | host (auto: resolved in parts)
    decode: str = "auto"  # where JPEGs are decoded and cropped: gpu | host (auto: resolved in parts)
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
        return (0.1 if self.optimizer == "sgd" else 8e-4) * self.batch_size / 256

    @property
    def multi_label(self) -> bool:
        """Sigmoid outputs and multi-hot targets (the loss says so)."""
        return self.loss in MULTI_LABEL_LOSSES


def check_resumable(workdir: Path, cfg: TrainConfig) -> None:
    """A workdir holds one run: refuse to continue it with settings that change the result
    (without synchronised BatchNorm, the device count is one of them)."""
    path = workdir / CONFIG_FILE
    resumable = RESUMABLE if cfg.sync_bn else RESUMABLE - {"num_devices"}
    current = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in resumable}
    if path.exists():
        # A setting added after the run was written has the value runs had before it.
        defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **BEFORE_THE_SETTING}
        stored = {k: v for k, v in {**defaults, **json.loads(path.read_text())}.items() if k not in resumable}
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if changed:
            details = ", ".join(f"{k} {stored.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
            raise InputError(f"{workdir} holds a run with other settings ({details}); use a new --workdir")


def stored_setting(workdir: Path, name: str) -> str | None:
    """A setting of the run already in ``workdir`` (an "auto" resolves to what it chose then)."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(name, BEFORE_THE_SETTING.get(name))


def write_config(workdir: Path, cfg: TrainConfig) -> None:
    """``workdir/config.json``, written by the lead process alone. Atomic: the other processes
    read it in check_resumable, maybe while it is written."""
    text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
    write_file_atomically(workdir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
