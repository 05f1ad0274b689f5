"""ImageNet (or any labelled image set) top-1/top-5 of TResNet weights, on every local device;
the mAP of multi-label weights on multi-label data.

    python eval.py --model tresnet_m                          # TFDS imagenet2012 validation
    python eval.py --model tresnet_m --val_dir /data/imagenet/val
    python eval.py --weights tresnet_m_448.pth --squish --dataset imagenet_v2
    python eval.py --model tresnet_m --output results.json --save-logits logits.npz
    python eval.py --model tresnet_l.asl_coco_448 --dataset coco/2014     # mAP, per-class AP in --output
    python eval.py --model runs/ml/weights --val-labels val.csv --classes classes.txt
    python eval.py --model tresnet_v2_l.ml_decoder_coco_448 --dataset coco/2014       # ML-Decoder: mAP too
    python eval.py --model runs/zsl/weights --val-labels unseen.csv --classes unseen.txt --class-embeddings unseen.npy

Weights (--model): a name given at conversion or training, a pretrained tag
(tresnet_m.miil_in1k), hf-hub:OWNER/NAME, or an architecture (its default pretrained tag);
pretrained tags are fetched from the Hugging Face hub the first time. --weights: a weights
directory or a PyTorch checkpoint file. Preprocessing comes from the weights' pretrained
configuration; --image-size/--crop-pct/--interpolation/--squish override it.

--classes FILE is always the model's classes, one name a line, in the order of its outputs:
with --val-labels, the order the CSV's names are scored in; with a zero-shot ML-Decoder, the
classes to score, whose word vectors --class-embeddings holds row by row (a .npy array of
(classes, 300) floats). Those classes need not be the ones it was trained on: the data's labels
(folder names, the CSV's names, a TFDS dataset's names) are matched to them by name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tresnet_jax.cli import add_multi_label_argument, add_multihost_arguments, command, start_run
from tresnet_jax.data.classes import (
    ZeroShotClasses,
    check_label_kind,
    check_zero_shot_input,
    class_names,
    read_zero_shot_classes,
)
from tresnet_jax.data.gpu_decode import DECODE_CHOICES, decoder_report, reserve_for, select_decoder
from tresnet_jax.data.labels_csv import CsvSource, read_class_file
from tresnet_jax.data.sources import FolderSource, Source, SyntheticSource, model_labels
from tresnet_jax.data.tfds_reader import open_split
from tresnet_jax.evaluation import EvalResult, evaluate
from tresnet_jax.factory import fingerprint, load
from tresnet_jax.model.ml_decoder import WORD_DIM
from tresnet_jax.preprocessing import INTERPOLATIONS, Preprocessing, check_image_size
from tresnet_jax.progress import ProgressBar
from tresnet_jax.runtime.parallel import data_mesh, first_gpu_index, select_devices
from tresnet_jax.runtime.precision import CHOICES, canonical, compute_dtype
from tresnet_jax.runtime.xla_options import pointwise_as_matmul_for
from tresnet_jax.train.flags import add_settings, given_section
from tresnet_jax.weights.info import Reported, WeightsInfo
from tresnet_jax.weights.storage import write_file_atomically

# Images per device when --batch-size is not given, by backend: a GPU needs large batches to
# keep busy, a CPU gains nothing from them.
DEFAULT_PER_DEVICE_BATCH = {"cpu": 64, "gpu": 256, "tpu": 256}
SYNTHETIC_IMAGES = 50_000  # as many as ImageNet's validation set
# train.py's, as it declares them
RUN_SETTINGS = ("model.tf32", "run.num_devices", "run.progress", "run.compilation_cache")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = parser.add_argument_group("weights")
    weights.add_argument(
        "--model", help="weights name, pretrained tag, hf-hub:OWNER/NAME or architecture (default: tresnet_m)"
    )
    weights.add_argument(
        "--weights", help="weights directory, or a .pth/.pt/.bin/.safetensors file (--model: its architecture)"
    )
    add_multi_label_argument(parser)
    data = parser.add_argument_group("data (default: --dataset imagenet2012)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--val_dir", "--val-dir", type=Path, help="folder per class (sorted WordNet ids)")
    source.add_argument("--dataset", help="prepared TFDS dataset NAME[:SPLIT], e.g. imagenet_v2, imagenette, voc/2007")
    source.add_argument(
        "--val-labels", type=Path, metavar="CSV", help="multi-label images: a CSV image,labels (space-separated names)"
    )
    source.add_argument(
        "--synthetic-data",
        type=int,
        nargs="?",
        const=SYNTHETIC_IMAGES,
        metavar="IMAGES",
        help=f"random images (default {SYNTHETIC_IMAGES}), made from their index and preprocessed like files: "
        "nothing read from disk or decoded",
    )
    data.add_argument("--data_dir", "--data-dir", help="TFDS data directory (default: TFDS's)")
    data.add_argument(
        "--classes",
        type=Path,
        metavar="FILE",
        help="the model's classes, one name a line in the order of its outputs: with --val-labels, the CSV's names "
        "in this order (default: sorted); with --class-embeddings, the classes its rows are word vectors of",
    )
    data.add_argument(
        "--class-embeddings",
        type=Path,
        metavar="FILE.npy",
        help=f"zero-shot ML-Decoder weights: the classes to score, one {WORD_DIM}-wide word vector a line of "
        "--classes (a float .npy array)",
    )
    prep = parser.add_argument_group("preprocessing (default: the weights' pretrained configuration)")
    prep.add_argument("--image-size", type=int)
    prep.add_argument("--crop-pct", type=float)
    prep.add_argument("--interpolation", choices=INTERPOLATIONS)
    prep.add_argument(
        "--squish",
        action=argparse.BooleanOptionalAction,
        help="resize to size x size, no crop (official 448 eval; ASL's weights squish by default)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--precision",
        "--dtype",
        type=canonical,
        choices=CHOICES,
        default="auto",
        help="compute precision (float32, bfloat16, float16 are taken too); auto: bf16 on GPU/TPU, else fp32",
    )
    per_device = ", ".join(f"{n} on {backend}" for backend, n in DEFAULT_PER_DEVICE_BATCH.items())
    run.add_argument("--batch-size", type=int, help=f"global batch (default per device: {per_device})")
    run.add_argument(
        "--decode",
        choices=DECODE_CHOICES,
        default="auto",
        help="where JPEGs are decoded, resized and cropped: on the GPU in batches (nvJPEG through torchvision, "
        "the [torch] extra; logits differ slightly from PIL's, see the README) or by PIL on the host's cores "
        "(the official evaluation's pixels); auto (default): the GPU when there is one and the decoder loads",
    )
    run.add_argument("--output", type=Path, help="write metrics and settings as JSON")
    run.add_argument("--save-logits", type=Path, help="write logits, labels (and files) as .npz, dataset order")
    add_settings(parser, RUN_SETTINGS)
    add_multihost_arguments(parser)
    args = parser.parse_args(argv)
    if args.image_size is not None:
        check_image_size(args.image_size)
    if args.synthetic_data is not None and args.synthetic_data <= 0:
        parser.error("--synthetic-data must be positive")
    if args.classes is not None and args.val_labels is None and args.class_embeddings is None:
        parser.error("--classes goes with --val-labels or --class-embeddings")
    if args.class_embeddings is not None and args.classes is None:
        parser.error("--class-embeddings needs --classes: the names of its rows, one a line")
    for path in (args.output, args.save_logits):
        if path is not None and not path.absolute().parent.is_dir():
            parser.error(f"{path.parent}: no such directory")
    return args


def weights_argument(args: argparse.Namespace) -> str:
    return args.weights or args.model or "tresnet_m"


def default_batch_size(mesh: jax.sharding.Mesh) -> int:
    """The global batch when --batch-size is not given: DEFAULT_PER_DEVICE_BATCH per device."""
    return DEFAULT_PER_DEVICE_BATCH.get(jax.default_backend(), DEFAULT_PER_DEVICE_BATCH["gpu"]) * mesh.devices.size


def preprocessing(args: argparse.Namespace, info: WeightsInfo) -> Preprocessing:
    """The weights' preprocessing with the flags given over it."""
    return info.preprocessing.replace(
        input_size=args.image_size, crop_pct=args.crop_pct, interpolation=args.interpolation, squish=args.squish
    )


def open_source(args: argparse.Namespace) -> Source:
    if args.val_dir is not None:
        return FolderSource.scan(args.val_dir)
    if args.val_labels is not None:
        if args.classes is None:  # the names the CSV uses, read with it
            return CsvSource.read(args.val_labels)
        return CsvSource.read(args.val_labels, read_class_file(args.classes), str(args.classes))
    return open_split(args.dataset or "imagenet2012", args.data_dir)


def zero_shot_classes(args: argparse.Namespace) -> ZeroShotClasses | None:
    """The classes and word vectors of --classes and --class-embeddings, when given."""
    if args.class_embeddings is None:
        return None
    return read_zero_shot_classes(args.classes, args.class_embeddings, WORD_DIM)


# What to do when the weights and the data disagree on the number of classes an image, by the weights' kind.
LABEL_KIND_REMEDY = {
    True: "evaluate them on multi-label data (--dataset voc/2007, coco/2014, --val-labels CSV)",
    False: "evaluate multi-label weights (trained with --loss asl/bce, converted with --tag or --multi-label; "
    "a PyTorch file: --multi-label)",
}


def report(
    args, result: EvalResult, info: WeightsInfo, weights_hash: str, prep, source, dtype, batch, mesh, label_map,
    decoder, own_names: Sequence[str] | None,
) -> dict:  # fmt: skip
    """Everything a results file records, for comparing runs later; ``own_names``: the names of
    the model's classes, as the weights or --classes give them."""
    device = mesh.devices.flat[0]
    reported = info.reported or Reported()
    if result.per_class_ap is not None:
        from_data = {int(c): str(name) for name, c in zip(source.class_names, label_map.classes, strict=True)}
        names = class_names(label_map.num_classes, own_names, from_data)
        per_class = zip(names, result.per_class_ap.tolist(), strict=True)
        quality = {
            "per_class_AP": {name: None if math.isnan(ap) else ap for name, ap in per_class},
            "reported_mAP": reported.mAP,
        }
    else:
        quality = {"reported_top1": reported.top1}
    return {
        **result.metrics(),
        **quality,
        "model": info.model,
        "head": info.head.describe(),
        "num_classes": label_map.num_classes,
        "class_embeddings": None if args.class_embeddings is None else str(args.class_embeddings),
        "weights": weights_argument(args),
        "weights_sha256": weights_hash,
        "source": info.to_json()["source"],
        "tag": info.tag,
        "dataset": source.name,
        "preprocessing": prep.to_json(),
        "decoder": decoder.name if decoder is not None else "PIL (host)",
        "dtype": jnp.dtype(dtype).name,
        "batch_size": batch,
        "devices": mesh.devices.size,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "processes": jax.process_count(),
        "jax_version": jax.__version__,
        "skipped_images": [{"image": name, "reason": reason} for name, reason in result.skipped],
    }


def save_logits(path: Path, result: EvalResult, source) -> None:
    arrays = {"logits": result.logits, "labels": result.labels}
    if isinstance(source, FolderSource | CsvSource):
        arrays["files"] = np.asarray(source.files)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_file_atomically(path, write)


@command
def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    zero_shot = zero_shot_classes(args)  # the files read and checked before anything else
    run, model_settings = given_section(args, "run"), given_section(args, "model")
    reserve_for(args.decode)
    start_run(args, run.compilation_cache)
    lead = jax.process_index() == 0
    # Before anything is read: --decode gpu without a GPU decoder is refused here.
    decoder, note = (None, None) if args.synthetic_data else select_decoder(args.decode, first_gpu_index())
    if note and lead:
        print(note)
    dtype = compute_dtype(args.precision)
    # The data before the weights: a missing dataset is reported at once.
    source = None if args.synthetic_data else open_source(args)
    numerics = {"allow_tf32": model_settings.tf32, "pointwise_as_matmul": pointwise_as_matmul_for()}
    options = {"architecture": args.model if args.weights else None, "multi_label": args.multi_label}
    loaded = load(weights_argument(args), dtype=dtype, **options, **numerics)
    model, variables, info = loaded.model, loaded.variables, loaded.info
    weights_said = f"these weights ({info.model}, {info.head.describe()} head, {info.num_classes} classes)"
    check_zero_shot_input(info.head.zero_shot, zero_shot is not None, weights_said)
    # A zero-shot model's classes are those it is given: scored in their order, named by them.
    classes, names = (len(zero_shot.names), zero_shot.names) if zero_shot else (model.num_classes, info.class_names)
    source = source or SyntheticSource(args.synthetic_data, classes, info.multi_label)
    check_label_kind(source.name, source.multi_label, info.multi_label, "these weights are", LABEL_KIND_REMEDY)
    prep = preprocessing(args, info)
    label_map = model_labels(source, classes, names)
    devices = select_devices(run.num_devices)
    mesh = data_mesh(devices)
    batch = args.batch_size or default_batch_size(mesh)
    weights_hash = fingerprint(variables)
    if lead:
        print(f"weights: {loaded.origin}")
        scored = f"{classes} classes" + (f" of {args.class_embeddings} (zero-shot)" if zero_shot else "")
        print(f"model: {info.model}, {info.head.describe()} head, {scored}, tag {info.tag}, sha256 {weights_hash[:16]}")
        print(
            f"data: {source.name}, {len(source)} images; preprocessing {prep.input_size}px, crop {prep.crop_pct}, "
            f"{prep.interpolation}{', squish' if prep.squish else ''}"
        )
        print(
            f"devices: {mesh.devices.size} x {devices[0].device_kind} in {jax.process_count()} process(es); "
            f"batch {batch}; {jnp.dtype(dtype).name}"
        )
    bar = ProgressBar(len(source), "eval", enabled=lead and run.progress)
    setup_seconds = time.perf_counter() - started
    embeddings = None if zero_shot is None else zero_shot.embeddings
    result = evaluate(
        model, variables, source, prep, label_map, batch, mesh, args.save_logits is not None, bar.update, decoder,
        embeddings,
    )  # fmt: skip
    bar.close()
    if lead:
        quality = (
            f"mAP {result.mean_ap:.3f}" if result.top1 is None else f"top-1 {result.top1:.3f} | top-5 {result.top5:.3f}"
        )
        print(
            f"images {result.num_images} | {quality} | loss {result.loss:.4f} | "
            f"{result.images_per_second:.1f} images/s | skipped {len(result.skipped)}"
        )
        print(
            f"seconds: set-up {setup_seconds:.1f} (weights, data index, devices), "
            f"compile {result.compile_seconds:.1f}, first batch {result.first_batch_seconds:.1f}, "
            f"evaluation {result.wall_seconds:.1f} (first batch included), "
            f"in all {time.perf_counter() - started:.1f} since the command started"
        )
        if decoder is not None:
            print(decoder_report(decoder))
        for name, reason in result.skipped[:20]:
            print(f"skipped {name}: {reason}")
        if len(result.skipped) > 20:
            print(f"... and {len(result.skipped) - 20} more skipped (all listed in --output)")
        reported = info.reported or Reported()
        if reported.top1 is not None and info.tag and result.top1 is not None:
            print(f"reported top-1 of {info.tag} (timm, ImageNet-1k val): {reported.top1:.3f}")
        if reported.mAP is not None and result.mean_ap is not None:
            print(f"reported mAP of {info.tag} ({reported.dataset}): {reported.mAP:.1f}")
        if args.output is not None:
            summary = report(
                args, result, info, weights_hash, prep, source, dtype, batch, mesh, label_map, decoder, names
            )
            summary["setup_seconds"] = setup_seconds
            write_file_atomically(args.output, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
            print(f"wrote {args.output}")
        if args.save_logits is not None:
            save_logits(args.save_logits, result, source)
            print(f"wrote {args.save_logits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
