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
from tresnet_jax.data.classes import check_label_kind
from tresnet_jax.data.gpu_decode import BatchDecoder, select_decoder
from tresnet_jax.data.labels_csv import CsvSource, classes_in, read_class_file
from tresnet_jax.data.sources import FolderSource, LabelMap, Source, SyntheticSource, model_labels
from tresnet_jax.data.tfds_reader import open_split
from tresnet_jax.data.train_stream import StreamSpec, steps_per_epoch
from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import HeadSpec
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import ModelSpec, resolve
from tresnet_jax.preprocessing import Preprocessing
from tresnet_jax.runtime.parallel import BATCH_AXIS, data_mesh, first_gpu_index, local_batch_size, select_devices
from tresnet_jax.runtime.precision import PRECISIONS
from tresnet_jax.runtime.xla_options import pointwise_as_matmul_for
from tresnet_jax.train.config import TrainConfig, resolved, stored_config
from tresnet_jax.train.step import draws_dropout, make_optimizer

VAL_SPLITS = ("validation", "test")
# What to do when the loss and the data disagree on the number of classes an image, by the loss's kind.
LOSS_REMEDY = {
    True: "use --loss cross_entropy, or multi-label data (voc/2007, coco/2014, --train-labels CSV)",
    False: "use --loss asl or --loss bce",
}


@dataclasses.dataclass(frozen=True)
class RunParts:
    """A run's fixed parts (``build``); its state lives in checkpoints."""

    cfg: TrainConfig  # its "auto" settings decided, the device count set when it is a setting (no sync_bn)
    workdir: Path
    lead: bool  # process 0: it prints, writes the config, the metrics and the final weights
    train_source: Source
    val_source: Source | None
    num_classes: int
    label_map: LabelMap  # training set label -> model target
    mesh: Mesh
    stream: StreamSpec
    steps_per_epoch: int
    total_steps: int
    model_spec: ModelSpec
    head: HeadSpec  # the classifier, an ML-Decoder's K written out (``ModelSettings.head_spec``)
    model: TResNet  # the training step's (BatchNorm over the global batch with sync_bn)
    eval_model: TResNet
    tx: optax.GradientTransformation
    augment: AugmentConfig
    preprocessing: Preprocessing  # of validation, and recorded with the final weights
    decoder: BatchDecoder | None = None  # JPEGs decoded and cropped on the GPU; None: on the host

    @property
    def multi_label(self) -> bool:
        return self.label_map.multi_label

    @property
    def device_augment(self) -> AugmentConfig | None:
        """What the training step augments (None: the host did it all)."""
        return self.augment if self.cfg.augment.place == "device" else None

    @property
    def example_ids(self) -> bool:
        """Whether the training batches carry each image's (epoch, index): for the augmentation
        on the device, and for the model's dropout keys (``step.dropout_keys``)."""
        return self.device_augment is not None or draws_dropout(self.model)

    def log(self, line: str) -> None:
        """Print a line of the run's log (on the lead process)."""
        if self.lead:
            print(line, flush=True)


def build(cfg: TrainConfig) -> RunParts:
    """The parts of the run ``cfg`` describes; every setting is checked here (or where it was
    made), before anything is read or written."""
    if cfg.run.workdir is None:
        raise InputError("a run needs a workdir (--workdir): its config, checkpoints, metrics and weights go there")
    workdir = Path(cfg.run.workdir).expanduser().absolute()
    stored = stored_config(workdir)
    cfg = resolved(cfg, stored, jax.default_backend())
    decoder, note = training_decoder(cfg)  # before anything is read: --decode gpu may be refused
    cfg = cfg.replace(**{"data.decode": "host" if decoder is None else "gpu"})
    if note and jax.process_index() == 0:
        print(note, flush=True)
    train_source, val_source = open_train_sources(cfg)
    loss = f"--loss {cfg.optim.loss}" + (f" (recipe {cfg.run.recipe})" if cfg.run.recipe else "") + " is"
    for source in (s for s in (train_source, val_source) if s is not None):
        check_label_kind(source.name, source.multi_label, cfg.multi_label, loss, LOSS_REMEDY)
    num_classes = cfg.model.num_classes or len(train_source.class_names)
    head = cfg.model.head_spec(num_classes)
    label_map = model_labels(train_source, num_classes)
    devices = select_devices(cfg.run.num_devices)
    if not cfg.run.sync_bn:  # the devices' shards decide the statistics: the count is a setting
        cfg = cfg.replace(**{"run.num_devices": len(devices) // jax.process_count()})
    mesh = data_mesh(devices)
    local_batch_size(cfg.optim.batch_size, mesh)
    if cfg.run.eval_batch_size is not None:
        local_batch_size(cfg.run.eval_batch_size, mesh)
    stream = StreamSpec(cfg.optim.batch_size, jax.process_index(), jax.process_count(), cfg.run.seed)
    epoch_steps = steps_per_epoch(train_source, stream)
    total_steps = cfg.optim.max_steps or cfg.optim.epochs * epoch_steps
    dtype = PRECISIONS[cfg.model.precision]
    model_spec = resolve(cfg.model.name)  # the model name, looked up once
    augment = AugmentConfig(
        image_size=cfg.data.image_size,
        squish=cfg.data.resize == "squish",
        crop_scale=(cfg.augment.crop_min_scale, 1.0),
        flip=cfg.augment.flip,
        randaugment_ops=cfg.augment.randaugment_ops,
        randaugment_magnitude=cfg.augment.randaugment_magnitude,
        cutout=cfg.augment.cutout,
    )
    axis_name = BATCH_AXIS if cfg.run.sync_bn else None
    numerics = {"allow_tf32": cfg.model.tf32, "pointwise_as_matmul": pointwise_as_matmul_for()}
    return RunParts(
        cfg=cfg,
        workdir=workdir,
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
        head=head,
        model=TResNet(model_spec.arch, num_classes, dtype=dtype, axis_name=axis_name, head_spec=head, **numerics),
        eval_model=TResNet(model_spec.arch, num_classes, dtype=dtype, head_spec=head, **numerics),
        tx=make_optimizer(cfg, total_steps),
        augment=augment,
        preprocessing=Preprocessing(cfg.data.image_size, squish=cfg.data.resize == "squish"),
        decoder=decoder,
    )


def training_decoder(cfg: TrainConfig) -> tuple[BatchDecoder | None, str | None]:
    """The GPU decoder of a resolved config's ``--decode`` (and a note when ``auto`` stays on
    the host). The GPU's crops go straight to the augmentation on the device, so it needs
    ``--augment device``."""
    choice = cfg.data.decode
    if cfg.data.synthetic_data:  # not JPEGs: the host's pool crops them
        return None, None
    if cfg.augment.place == "host":
        if choice == "gpu":
            raise InputError("--decode gpu hands its crops to the augmentation on the device: add --augment device")
        return None, None
    return select_decoder(choice, first_gpu_index())


def open_train_sources(cfg: TrainConfig) -> tuple[Source, Source | None]:
    """(training set, validation set or None)."""
    data = cfg.data
    if data.classes and not data.train_labels:
        raise InputError("--classes names the classes of --train-labels/--val-labels CSVs: pass --train-labels")
    if data.val_labels and not data.train_labels:
        raise InputError("--val-labels goes with --train-labels (both CSVs share one class list)")
    if data.synthetic_data:
        return SyntheticSource(data.synthetic_data, cfg.model.num_classes or 1000, cfg.multi_label), None
    if data.train_labels:
        return open_label_csvs(cfg)
    if data.train_dir:
        train = FolderSource.scan(data.train_dir)
    elif data.dataset:
        train = open_split(data.dataset, data.data_dir, default_split="train")
    else:
        raise InputError("no training data: pass --train_dir DIR or --dataset NAME")
    if data.val_dir:
        return train, FolderSource.scan(data.val_dir)
    if data.val_dataset:
        return train, open_split(data.val_dataset, data.data_dir)
    if data.dataset:  # the dataset's validation (or test) split, if it has one
        name = data.dataset.partition(":")[0]
        return train, next((open_split(f"{name}:{s}", data.data_dir) for s in VAL_SPLITS if s in train.splits), None)
    return train, None


def open_label_csvs(cfg: TrainConfig) -> tuple[Source, Source | None]:
    """The multi-label CSVs, with the class list of ``--classes`` or the names both use."""
    data = cfg.data
    if data.val_dir or data.val_dataset:
        raise InputError("--train-labels: give the validation images as --val-labels CSV")
    csvs = [path for path in (data.train_labels, data.val_labels) if path]
    names = read_class_file(data.classes) if data.classes else classes_in(csvs)
    train = CsvSource.read(data.train_labels, names, data.classes)
    return train, CsvSource.read(data.val_labels, names, data.classes) if data.val_labels else None
