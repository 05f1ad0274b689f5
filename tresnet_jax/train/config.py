"""A run's settings as one typed tree: ``TrainConfig`` with its model, data, optim, augment and run
sections, each a frozen dataclass whose fields declare their type, their check and their
command-line flag (``train/flags.py`` builds train.py's parser from them). A value is checked
where the section is made, so a library caller gets the one-line ``InputError`` the command line
prints, naming the flag and the allowed values. ``config.json`` and the recipes hold the same
tree; a ``config.json`` written before the sections (one flat table) still reads and resumes.

"auto" settings (precision, where the augmentation runs) are resolved once, by ``resolved``;
``check_resumable`` refuses to continue a workdir with settings that change the result."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import FC, FC_HEAD, ML_DECODER, HeadSpec
from tresnet_jax.model.ml_decoder import DEFAULT_QUERIES
from tresnet_jax.model.registry import ARCHITECTURES
from tresnet_jax.preprocessing import SIZE_STEP, valid_image_size
from tresnet_jax.runtime.precision import canonical, default_precision
from tresnet_jax.weights.conversion import MULTI_LABEL_HELP
from tresnet_jax.weights.storage import write_file_atomically

CONFIG_FILE = "config.json"
MULTI_LABEL_LOSSES = ("asl", "bce")
SYNTHETIC_IMAGES = 1_281_167  # --synthetic-data without a count: as many as ImageNet's training set

Check = tuple[Callable[[Any], bool], str]  # (test, what a value must be)
POSITIVE: Check = (lambda v: v > 0, "positive")
AT_LEAST_0: Check = (lambda v: v >= 0, "at least 0")
FRACTION: Check = (lambda v: 0 <= v < 1, "in [0, 1)")
CLOSED_FRACTION: Check = (lambda v: 0 <= v <= 1, "in [0, 1]")
SCALE: Check = (lambda v: 0 < v <= 1, "in (0, 1]")
IMAGE_SIZE: Check = (valid_image_size, f"a positive multiple of {SIZE_STEP}")


def setting(
    default: Any,
    help: str = "",
    *,
    flags: tuple[str, ...] = (),
    check: Check | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Any:
    """A section's field: its default, the help of its flag, its flags (default ``--name``, with
    dashes), a check of its value beyond its type, and extra argparse options (``cli``)."""
    metadata = {"help": help, "flags": flags, "check": check, "cli": dict(cli or {})}
    return dataclasses.field(default=default, metadata=metadata)


def flag_names(field: dataclasses.Field) -> tuple[str, ...]:
    """The flags of a field; the first one names it in messages."""
    return field.metadata.get("flags") or ("--" + field.name.replace("_", "-"),)


class Section:
    """A frozen settings dataclass whose values are checked when it is made."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _checked(getattr(self, field.name), hints[field.name], field)
            object.__setattr__(self, field.name, value)


def _checked(value: Any, hint: Any, field: dataclasses.Field) -> Any:
    """``value`` if it has the field's type and passes its check (a path given as a Path is
    kept as its text, an integer where a float is asked for as a float); else InputError."""
    name = flag_names(field)[0]
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in (a for a in allowed if a is not type(None)):
        if typing.get_origin(kind) is Literal:
            if isinstance(value, str) and value in typing.get_args(kind):
                return value
            choices = ", ".join(typing.get_args(kind))
            raise InputError(f"{name} must be one of {choices}, got {value!r}")
        converted = _as_type(value, kind)
        if converted is not _NO:
            check = field.metadata.get("check")
            if check is not None and not check[0](converted):
                raise InputError(f"{name} must be {check[1]}, got {value!r}")
            return converted
    kinds = " or ".join("a number" if k is float else k.__name__ for k in allowed if k is not type(None))
    optional = " (or None)" if type(None) in allowed else ""
    raise InputError(f"{name} must be {kinds}{optional}, got {value!r}")


_NO = object()


def _as_type(value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        return value if kind is bool else _NO
    if kind is int:
        return value if isinstance(value, int) else _NO
    if kind is float:
        return float(value) if isinstance(value, int | float) else _NO
    if kind is str:
        return os.fspath(value) if isinstance(value, str | os.PathLike) else _NO
    return _NO


def head_name(name: str) -> str:
    """``--head`` in the command line's spelling: HeadSpec's ``ml_decoder`` is taken too."""
    return "ml-decoder" if name == ML_DECODER else name


@dataclasses.dataclass(frozen=True)
class ModelSettings(Section):
    """The network: which, with which head, how many classes, from which weights, in which precision."""

    name: str = setting("tresnet_m", "the architecture", flags=("--model",))
    num_classes: int | None = setting(None, "default: the training set's number of classes", check=POSITIVE)
    init: str | None = setting(None, "fine-tune from converted weights: a name, weights directory or PyTorch file")
    init_multi_label: bool = setting(
        False,
        "--init " + MULTI_LABEL_HELP.replace("a PyTorch file's", "is a PyTorch file whose"),
        flags=("--init-multi-label",),
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto",
        "auto: bf16 on GPU/TPU, fp32 on CPU; fp16 uses dynamic loss scaling (float32, bfloat16, float16 are taken too)",
        cli={"type": canonical},
    )
    tf32: bool = setting(
        False,
        "float32 convolutions and matrix products in TF32 on NVIDIA GPUs since Ampere (faster; 10 mantissa bits "
        "instead of 23); default: true float32, where timm parity is promised",
        flags=("--tf32",),
    )
    head: Literal["fc", "ml-decoder"] = setting(
        "fc",
        "the classifier: fc (global pooling + linear, TResNet's) or ml-decoder (ML-Decoder's attention head, "
        "dropout 0.1 drawn per image, its queries never trained); weights of --init with another head get a new one",
        cli={"type": head_name},
    )
    num_groups: int | None = setting(
        None,
        f"ML-Decoder's queries K (default {DEFAULT_QUERIES}, and never more than the classes, as the original)",
        check=POSITIVE,
    )

    def __post_init__(self) -> None:
        if isinstance(self.precision, str):  # the other spelling (float32, bfloat16, float16) is taken too
            object.__setattr__(self, "precision", canonical(self.precision))
        if isinstance(self.head, str):
            object.__setattr__(self, "head", head_name(self.head))
        super().__post_init__()
        if self.name not in ARCHITECTURES:
            raise InputError(f"--model must be one of {', '.join(ARCHITECTURES)}, got {self.name!r}")
        if self.num_groups is not None and self.head != "ml-decoder":
            raise InputError(f"--num-groups is a setting of --head ml-decoder, not of --head {self.head}")

    def head_spec(self, num_classes: int) -> HeadSpec:
        """The head of a run of ``num_classes`` classes, an ML-Decoder's K written out (as the
        weights record it); InputError when ``--num-groups`` asks for more queries than classes
        (the original caps them silently)."""
        if self.head == FC:
            return FC_HEAD
        if self.num_groups is not None and self.num_groups > num_classes:
            raise InputError(
                f"--num-groups {self.num_groups} is more than the {num_classes} classes: ML-Decoder has at most "
                "a query per class"
            )
        head = HeadSpec(ML_DECODER, self.num_groups)
        head.check_classes(num_classes)  # and a K whose groups leave classes without an output
        return head.resolved(num_classes)


@dataclasses.dataclass(frozen=True)
class DataSettings(Section):
    """What the run trains and validates on, at what size, decoded where."""

    dataset: str | None = setting(None, "TFDS dataset NAME[:SPLIT] prepared on disk (split default: train)")
    val_dataset: str | None = setting(None, "TFDS NAME:SPLIT for validation (default: the dataset's validation)")
    train_dir: str | None = setting(None, "training images, a folder per class", flags=("--train_dir", "--train-dir"))
    val_dir: str | None = setting(None, "validation images, a folder per class", flags=("--val_dir", "--val-dir"))
    data_dir: str | None = setting(None, "TFDS data directory", flags=("--data_dir", "--data-dir"))
    train_labels: str | None = setting(None, "multi-label training set: image,labels rows", cli={"metavar": "CSV"})
    val_labels: str | None = setting(None, "multi-label validation set: image,labels rows", cli={"metavar": "CSV"})
    classes: str | None = setting(None, "class names of the label CSVs, one a line", cli={"metavar": "FILE"})
    synthetic_data: int | None = setting(
        None,
        f"random images as an epoch of IMAGES (default {SYNTHETIC_IMAGES}), made from their index and cropped "
        "like files: nothing read from disk or decoded",
        check=POSITIVE,
        cli={"nargs": "?", "const": SYNTHETIC_IMAGES, "metavar": "IMAGES"},
    )
    image_size: int = setting(224, check=IMAGE_SIZE)
    resize: Literal["crop", "squish"] = setting(
        "crop",
        "crop: inception crop in training, resize + centre crop in evaluation; squish: the whole image to "
        "size x size (ASL)",
    )
    decode: Literal["auto", "gpu", "host"] = setting(
        "auto",
        "where JPEGs are decoded, cropped and resized: on the GPU in batches (nvJPEG through torchvision, the "
        "[torch] extra; needs --augment device) or on the host's cores; auto: the GPU when there is one and the "
        "decoder loads, as before when a run continues",
    )


@dataclasses.dataclass(frozen=True)
class OptimSettings(Section):
    """How long, in which batches, with which optimizer, schedule and loss."""

    epochs: int = setting(300, check=POSITIVE)
    max_steps: int | None = setting(None, "stop after this many steps (overrides --epochs)", check=POSITIVE)
    batch_size: int = setting(256, "global batch", check=POSITIVE)
    lr: float | None = setting(
        None, "peak learning rate (default: 0.1 x batch/256 for sgd, 8e-4 x batch/256 for adam, adamw)", check=POSITIVE
    )
    schedule: Literal["onecycle", "cosine", "constant"] = setting("onecycle")
    warmup_fraction: float = setting(0.2, "of the steps, rising to the peak", check=CLOSED_FRACTION)
    optimizer: Literal["sgd", "adam", "adamw"] = setting(
        "sgd", "sgd: Nesterov momentum; adam: L2 decay added to the gradients (ASL's torch Adam); adamw: decoupled"
    )
    momentum: float = setting(0.9, check=FRACTION)
    weight_decay: float = setting(1e-4, "conv and dense kernels only", check=AT_LEAST_0)
    label_smoothing: float = setting(0.1, check=FRACTION)
    loss: Literal["cross_entropy", "asl", "bce"] = setting(
        "cross_entropy", "cross_entropy: single-label softmax; asl (asymmetric loss), bce: multi-label sigmoids"
    )
    asl_gamma_neg: float = setting(4.0, "ASL's exponent of negatives", check=AT_LEAST_0)
    asl_gamma_pos: float = setting(0.0, "ASL's exponent of positives", check=AT_LEAST_0)
    asl_clip: float = setting(0.05, "ASL's probability margin on negatives", check=FRACTION)
    ema_decay: float = setting(0.9997, "0 disables the EMA", check=FRACTION)


@dataclasses.dataclass(frozen=True)
class AugmentSettings(Section):
    """The training images' augmentation: where it runs and what it does."""

    place: Literal["auto", "device", "host"] = setting(
        "auto",
        "where flip, RandAugment and Cutout run (the crop is the host's): on the accelerator, batched in the "
        "training step, or on the host's cores; auto: device on a GPU or TPU, host on a CPU-only machine "
        "(measured faster there), as before when a run continues",
        flags=("--augment",),
    )
    crop_min_scale: float = setting(0.08, "inception crop: smallest fraction of the image area kept", check=SCALE)
    flip: bool = setting(True, "no random horizontal flips", flags=("--no-flip",))
    randaugment_ops: int = setting(2, "0 disables RandAugment", check=AT_LEAST_0)
    randaugment_magnitude: float = setting(9.0, check=AT_LEAST_0)
    cutout: float = setting(0.5, "erased square side fraction; 0: off", check=CLOSED_FRACTION)
    mixup: float = setting(0.0, "Beta alpha; 0: off", check=AT_LEAST_0)
    cutmix: float = setting(0.0, "Beta alpha; 0: off", check=AT_LEAST_0)


@dataclasses.dataclass(frozen=True)
class RunSettings(Section):
    """Where the run lives and how it goes; most of it may change when it continues."""

    workdir: str | None = setting(
        None, "the run's directory: config, checkpoints, metrics, final weights (required to train)"
    )
    recipe: str | None = setting(
        None,
        "start from a fine-tuning recipe (--recipe list names them); flags given beside it override its values",
        cli={"metavar": "NAME"},
    )
    seed: int = setting(0)
    eval_every: int = setting(1, "epochs; 0: only at the end", check=AT_LEAST_0)
    checkpoint_every: int | None = setting(None, "steps (default: every epoch)", check=POSITIVE)
    keep_checkpoints: int = setting(3, check=POSITIVE)
    log_every: int = setting(20, "steps", check=POSITIVE)
    num_devices: int | None = setting(None, "use the first N devices of each process (default: all)", check=POSITIVE)
    sync_bn: bool = setting(
        True,
        "BatchNorm statistics over the global batch (default; the result does not depend on the device count) "
        "or, --no-sync-bn, each device's shard (no per-layer all-reduce)",
        flags=("--sync-bn",),
    )
    eval_batch_size: int | None = setting(None, check=POSITIVE)
    progress: bool = setting(True, "no progress bar", flags=("--no-progress",))
    compilation_cache: bool = setting(True, "do not use JAX's persistent cache", flags=("--no-compilation-cache",))


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSettings,
    "data": DataSettings,
    "optim": OptimSettings,
    "augment": AugmentSettings,
    "run": RunSettings,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; written to ``workdir/config.json``."""

    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    optim: OptimSettings = dataclasses.field(default_factory=OptimSettings)
    augment: AugmentSettings = dataclasses.field(default_factory=AugmentSettings)
    run: RunSettings = dataclasses.field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise InputError(f"TrainConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")

    @property
    def multi_label(self) -> bool:
        """Sigmoid outputs and multi-hot targets (the loss says so)."""
        return self.optim.loss in MULTI_LABEL_LOSSES

    def peak_lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return (0.1 if self.optim.optimizer == "sgd" else 8e-4) * self.optim.batch_size / 256

    def replace(self, **dotted: Any) -> TrainConfig:
        """A copy with settings changed by dotted name: ``cfg.replace(**{"optim.lr": 0.1})``."""
        return from_flat({**flat(self), **dotted})

    def to_json(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, document: Mapping[str, Any], where: str = CONFIG_FILE) -> TrainConfig:
        """The tree of a ``config.json``; one written before the sections (a flat table: older
        runs) has its settings placed in theirs, and a setting added after it the value runs had
        before the setting existed (``BEFORE_THE_SETTING``)."""
        if not isinstance(document.get("model"), Mapping):
            return from_old_flat(document, where)
        unknown = sorted(set(document) - set(SECTIONS))
        if unknown:
            raise InputError(f"{where}: unknown section {unknown[0]!r}; sections: {', '.join(SECTIONS)}")
        values = {}
        for section, kind in SECTIONS.items():
            table = document.get(section, {})
            names = {f.name for f in dataclasses.fields(kind)}
            extra = sorted(set(table) - names)
            if extra:
                raise InputError(f"{where}: unknown setting {section}.{extra[0]}")
            values |= {f"{section}.{key}": value for key, value in table.items()}
        return from_flat(values)


def fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """Every setting: (dotted name ``section.field``, its dataclass field)."""
    for section, kind in SECTIONS.items():
        for field in dataclasses.fields(kind):
            yield f"{section}.{field.name}", field


def flat(cfg: TrainConfig) -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}``: every setting by dotted name."""
    return {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(cfg, s)).items()}


def from_flat(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from settings by dotted name (the rest at their defaults); InputError for a
    name that is not a setting."""
    known = dict(fields())
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"unknown setting {unknown[0]!r}")
    sections = {s: {} for s in SECTIONS}
    for dotted, value in values.items():
        section, name = dotted.split(".")
        sections[section][name] = value
    return TrainConfig(**{s: SECTIONS[s](**v) for s, v in sections.items()})


# Before the sections, config.json was one table; these two settings had other names there.
OLD_NAMES = {"model": "model.name", "augment": "augment.place"}
# What a run written before a setting existed did: its stored config is read with these values.
BEFORE_THE_SETTING = {"augment.place": "host", "data.decode": "host"}


def short_name(dotted: str) -> str:
    """A setting's name in messages: as the flat config.json had it (``lr``, ``model``)."""
    return next((old for old, new in OLD_NAMES.items() if new == dotted), dotted.split(".")[1])


def from_old_flat(document: Mapping[str, Any], where: str = CONFIG_FILE) -> TrainConfig:
    """The tree of a flat ``config.json`` (runs written before the sections)."""
    by_short = {short_name(dotted): dotted for dotted, _ in fields()}
    unknown = sorted(set(document) - set(by_short))
    if unknown:
        raise InputError(f"{where}: unknown setting {unknown[0]!r}")
    values = {**BEFORE_THE_SETTING, **{by_short[k]: v for k, v in document.items()}}
    return from_flat(values)


# Settings that may change when a run is resumed: they do not change what is computed (the
# device count only changes the order of float additions).
RESUMABLE = {
    "run.workdir",
    "run.eval_every",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.progress",
    "run.eval_batch_size",
    "run.compilation_cache",
    "run.num_devices",
}


def resolved(cfg: TrainConfig, stored: TrainConfig | None, backend: str) -> TrainConfig:
    """``cfg`` with its "auto" settings decided, the one place they are: precision (bf16 on a GPU
    or TPU, fp32 on the CPU), where the augmentation runs (as the run in the workdir did; else on
    the device of a GPU or TPU and on the host of a CPU-only machine, where XLA's version costs
    20x PIL's: 44.6 against 2.2 ms an image on the 2-core AMD EPYC, BENCHMARKS.md) and the
    decoder of a run that chose one (an "auto" still there is decided by the machine's decoders,
    ``train.parts.training_decoder``)."""
    accelerator = backend in ("gpu", "tpu")
    precision = cfg.model.precision
    if precision == "auto":
        precision = default_precision(backend)
    place = cfg.augment.place
    if place == "auto":
        before = stored.augment.place if stored is not None else "auto"
        place = before if before != "auto" else ("device" if accelerator else "host")
    decode = cfg.data.decode
    if decode == "auto" and stored is not None:
        decode = stored.data.decode
    return cfg.replace(**{"model.precision": precision, "augment.place": place, "data.decode": decode})


def stored_config(workdir: Path) -> TrainConfig | None:
    """The settings of the run already in ``workdir`` (None: none there)."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({err})") from None
    return TrainConfig.from_json(document, str(path))


def check_resumable(workdir: Path, cfg: TrainConfig) -> None:
    """A workdir holds one run: refuse to continue it with settings that change the result
    (without synchronised BatchNorm, the device count is one of them)."""
    stored = stored_config(workdir)
    if stored is None:
        return
    resumable = RESUMABLE if cfg.run.sync_bn else RESUMABLE - {"run.num_devices"}
    before, now = flat(stored), flat(cfg)
    changed = [k for k in before if k not in resumable and before[k] != now[k]]
    if changed:
        details = ", ".join(f"{short_name(k)} {before[k]!r} -> {now[k]!r}" for k in changed[:4])
        raise InputError(f"{workdir} holds a run with other settings ({details}); use a new --workdir")


def write_config(workdir: Path, cfg: TrainConfig) -> None:
    """``workdir/config.json``, written by the lead process alone. Atomic: the other processes
    read it in check_resumable, maybe while it is written."""
    text = json.dumps(cfg.to_json(), indent=2) + "\n"
    write_file_atomically(workdir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
