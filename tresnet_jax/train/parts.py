"""What a run is made of, built once from its TrainConfig before anything is read or written:
its data (sources, label map, stream of global batches), the device mesh, the models, the
optimizer and the augmentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import optax
from jax.sharding import Mesh

from tresnet_jax.data.augment import AugmentConfig
from tresnet_jax.data.gpu_decode import DECODE_CHOICES, BatchDecoder, select_decoder
from tresnet_jax.data.labels_csv import CsvSource, classes_in, read_class_file
from tresnet_jax.data.preprocess import check_image_size
from tresnet_jax.data.sources import FolderSource, LabelMap, Source, SyntheticSource, model_labels
from tresnet_jax.data.tfds_reader import open_split
from tresnet_jax.data.train_stream import StreamSpec, steps_per_epoch
from tresnet_jax.errors import InputError
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import ModelSpec, resolve
from tresnet_jax.runtime.parallel import BATCH_AXIS, data_mesh, first_gpu_index, local_batch_size, select_devices
from tresnet_jax.train.config import AUGMENT_PLACES, TrainConfig, stored_setting
from tresnet_jax.train.step import PRECISIONS, OptimConfig, make_optimizer

VAL_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class RunParts:
    """A run's fixed parts (``build``); its state lives in checkpoints."""

    cfg: TrainConfig  # as given, but with the device count set when it is a setting (no sync_bn)
    workdir: Path
    lead: bool  # process 0: it prints, writes the config, the metrics and the exports
    train_source: Source
    val_source: Source | None
    num_classes: int
    label_map: LabelMap  # training set label -> model target
    mesh: Mesh
    stream: StreamSpec
    steps_per_epoch: int
    total_steps: int
    model_spec: ModelSpec
    model: TResNet  # the training step's (BatchNorm over the global batch with sync_bn)
    eval_model: TResNet
    optim: OptimConfig
    tx: optax.GradientTransformation
    augment: AugmentConfig
    decoder: BatchDecoder | None = None  # JPEGs decoded and cropped on the GPU; None: on the host

    @property
    def multi_label(self) -> bool:
        return self.label_map.multi_label

    @property
    def device_augment(self) -> AugmentConfig | None:
        """What the training step augments (None: the host did it all)."""
        return self.augment if self.cfg.augment == "device" else None

    def log(self, line: str) -> None:
        """Print a line of the run's log (on the lead process)."""
        if self.lead:
            print(line, flush=True)


def build(cfg: TrainConfig) -> RunParts:
    """The parts of the run ``cfg`` describes; every flag is checked here, before anything is
    read or written."""
    check_image_size(cfg.image_size)
    cfg = dataclasses.replace(cfg, augment=augment_place(cfg))
    decoder, note = training_decoder(cfg)  # before anything is read: --decode gpu may be refused
    cfg = dataclasses.replace(cfg, decode="host" if decoder is None else "gpu")
    if note and jax.process_index() == 0:
        print(note, flush=True)
    train_source, val_source = open_train_sources(cfg)
    check_label_kind(cfg, train_source, val_source)
    num_classes = cfg.num_classes or len(train_source.class_names)
    label_map = model_labels(train_source, num_classes)
    devices = select_devices(cfg.num_devices)
    if not cfg.sync_bn:  # the devices' shards decide the statistics: the count is a setting
        cfg = dataclasses.replace(cfg, num_devices=len(devices) // jax.process_count())
    mesh = data_mesh(devices)
    local_batch_size(cfg.batch_size, mesh)
    if cfg.eval_batch_size is not None:
        local_batch_size(cfg.eval_batch_size, mesh)
    stream = StreamSpec(cfg.batch_size, jax.process_index(), jax.process_count(), cfg.seed)
    epoch_steps = steps_per_epoch(train_source, stream)
    total_steps = cfg.max_steps or cfg.epochs * epoch_steps
    if cfg.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    dtype = PRECISIONS[cfg.precision]
    model_spec = resolve(cfg.model)  # the model name, looked up once
    optim = OptimConfig(
        total_steps=total_steps,
        lr=cfg.peak_lr(),
        schedule=cfg.schedule,
        warmup_fraction=cfg.warmup_fraction,
        optimizer=cfg.optimizer,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing,
        loss=cfg.loss,
        asl_gamma_neg=cfg.asl_gamma_neg,
        asl_gamma_pos=cfg.asl_gamma_pos,
        asl_clip=cfg.asl_clip,
        ema_decay=cfg.ema_decay,
        mixup=cfg.mixup,
        cutmix=cfg.cutmix,
        precision=cfg.precision,
    )
    augment = AugmentConfig(
        image_size=cfg.image_size,
        squish=cfg.resize == "squish",
        crop_scale=(cfg.crop_min_scale, 1.0),
        flip=cfg.flip,
        randaugment_ops=cfg.randaugment_ops,
        randaugment_magnitude=cfg.randaugment_magnitude,
        cutout=cfg.cutout,
    )
    return RunParts(
        cfg=cfg,
        workdir=Path(cfg.workdir).expanduser().absolute(),
        lead=jax.process_index() == 0,
        train_source=train_source,
        val_source=val_source,
        num_classes=num_classes,
        label_map=label_map,
        mesh=mesh,
        stream=stream,
        steps_per_epoch=epoch_steps,
        total_steps=total_steps,
        model_spec=model_spec,
        model=TResNet(model_spec.arch, num_classes, dtype=dtype, axis_name=BATCH_AXIS if cfg.sync_bn else None),
        eval_model=TResNet(model_spec.arch, num_classes, dtype=dtype),
        optim=optim,
        tx=make_optimizer(optim),
        augment=augment,
        decoder=decoder,
    )


def augment_place(cfg: TrainConfig) -> str:
    """Where flip, RandAugment and Cutout run. ``auto``: as the run in the workdir did; else on
    the device of a GPU or TPU, and on the host of a CPU-only machine, where XLA's version costs
    20x PIL's (44.6 against 2.2 ms an image on the 2-core AMD EPYC, BENCHMARKS.md)."""
    if cfg.augment not in AUGMENT_PLACES:
        raise InputError(f"--augment must be one of {', '.join(AUGMENT_PLACES)}, got {cfg.augment!r}")
    if cfg.augment != "auto":
        return cfg.augment
    stored = stored_setting(Path(cfg.workdir).expanduser(), "augment")
    if stored in ("device", "host"):
        return stored
    return "device" if jax.default_backend() in ("gpu", "tpu") else "host"


def training_decoder(cfg: TrainConfig) -> tuple[BatchDecoder | None, str | None]:
    """The GPU decoder of ``--decode`` (and a note when ``auto`` stays on the host). The GPU's
    crops go straight to the augmentation on the device, so it needs ``--augment device``;
    ``auto`` continues a run as it started."""
    if cfg.decode not in DECODE_CHOICES:
        raise InputError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {cfg.decode!r}")
    choice = cfg.decode
    if choice == "auto":
        stored = stored_setting(Path(cfg.workdir).expanduser(), "decode")
        choice = stored if stored in ("gpu", "host") else "auto"
    if cfg.synthetic_data:  # nothing to decode
        return None, None
    if cfg.augment == "host":
        if choice == "gpu":
            raise InputError("--decode gpu hands its crops to the augmentation on the device: add --augment device")
        return None, None
    return select_decoder(choice, first_gpu_index())


def check_label_kind(cfg: TrainConfig, train: Source, val: Source | None) -> None:
    """One line, before anything is compiled or written, when the loss and the data disagree on
    whether an image has one class or several."""
    recipe = f" (recipe {cfg.recipe})" if cfg.recipe else ""
    for source in (train, val):
        if source is None or source.multi_label == cfg.multi_label:
            continue
        if cfg.multi_label:
            raise InputError(
                f"--loss {cfg.loss}{recipe} trains multi-label, but {source.name} is single-label (one class an "
                "image): use --loss cross_entropy, or multi-label data (voc/2007, coco/2014, --train-labels CSV)"
            )
        raise InputError(
            f"{source.name} is multi-label (several classes an image) but --loss {cfg.loss}{recipe} is "
            "single-label: use --loss asl or --loss bce"
        )


def open_train_sources(cfg: TrainConfig) -> tuple[Source, Source | None]:
    """(training set, validation set or None)."""
    if cfg.classes and not cfg.train_labels:
        raise InputError("--classes names the classes of --train-labels/--val-labels CSVs: pass --train-labels")
    if cfg.val_labels and not cfg.train_labels:
        raise InputError("--val-labels goes with --train-labels (both CSVs share one class list)")
    if cfg.synthetic_data:
        return SyntheticSource(cfg.synthetic_data, cfg.num_classes or 1000, cfg.multi_label), None
    if cfg.train_labels:
        return open_label_csvs(cfg)
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


def open_label_csvs(cfg: TrainConfig) -> tuple[Source, Source | None]:
    """The multi-label CSVs, with the class list of ``--classes`` or the names both use."""
    if cfg.val_dir or cfg.val_dataset:
        raise InputError("--train-labels: give the validation images as --val-labels CSV")
    csvs = [path for path in (cfg.train_labels, cfg.val_labels) if path]
    names = read_class_file(cfg.classes) if cfg.classes else classes_in(csvs)
    train = CsvSource.read(cfg.train_labels, names, cfg.classes)
    return train, CsvSource.read(cfg.val_labels, names, cfg.classes) if cfg.val_labels else None
