"""Train or fine-tune TResNet, data parallel over every local device (and host).

    python train.py --model tresnet_m --dataset imagenet2012 --workdir runs/m1
    python train.py --model tresnet_m --init tresnet_m --dataset cifar10 --num-classes 10 \\
        --image-size 224 --epochs 20 --workdir runs/c10
    python train.py --model tresnet_m --train_dir data/train --val_dir data/val --workdir runs/f1
    python train.py --recipe cifar100 --workdir runs/c100                # the authors' settings
    python train.py --recipe cifar100 --lr 1e-4 --print-config           # a flag beside it wins
    python train.py --recipe list

Started again with the same command, a run continues from its last checkpoint in --workdir.
SIGTERM or Ctrl-C stops it after the current step with a checkpoint of that step (exit code
128 + the signal's number); a second Ctrl-C stops it at once.
Defaults follow the TResNet recipe: one-cycle schedule, SGD (Nesterov), label smoothing 0.1,
decoupled weight decay 1e-4 (not on norms and biases), EMA of the weights, inception crop +
flip, RandAugment (2 ops, magnitude 9), Cutout 0.5. The final weights are exported to
<workdir>/export (and export_ema) for eval.py --weights and tresnet_jax.load.
A recipe (--recipe NAME, tresnet_jax/train/recipes/NAME.toml) replaces those defaults with the
authors' fine-tuning settings for one dataset; config.json records its name and every value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import jax

from tresnet_jax.cli import add_run_arguments, command, start_run
from tresnet_jax.data.gpu_decode import DECODE_CHOICES, reserve_for
from tresnet_jax.model.registry import ARCHITECTURES
from tresnet_jax.runtime.xla_options import request_deterministic_gpu_ops
from tresnet_jax.train.config import AUGMENT_PLACES, LOSSES, RESIZES, TrainConfig
from tresnet_jax.train.preemption import exit_code, signals_for_the_main_thread
from tresnet_jax.train.recipes import load_recipe, recipe_names, recipe_table
from tresnet_jax.train.run import Run, Stopped
from tresnet_jax.train.step import PRECISIONS

DEFAULTS = TrainConfig(workdir="")
SYNTHETIC_IMAGES = 1_281_167  # as many as ImageNet's training set
SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw")
_UNSET = object()  # a flag not given on the command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--workdir", help="the run's directory: config, checkpoints, metrics, exports (required to train)")
    add(
        "--recipe",
        metavar="NAME",
        help=f"start from a fine-tuning recipe ({', '.join(recipe_names())}), or 'list' them; flags given "
        "beside it override its values",
    )
    add("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    add("--model", choices=list(ARCHITECTURES), default=DEFAULTS.model)
    add("--num-classes", type=int, help="default: the training set's number of classes")
    add("--init", help="fine-tune from converted weights: a name, weights directory or PyTorch file")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="TFDS dataset NAME[:SPLIT] prepared on disk (split default: train)")
    data.add_argument("--val-dataset", help="TFDS NAME:SPLIT for validation (default: the dataset's validation)")
    data.add_argument("--train_dir", "--train-dir", help="training images, a folder per class")
    data.add_argument("--val_dir", "--val-dir", help="validation images, a folder per class")
    data.add_argument("--train-labels", metavar="CSV", help="multi-label training set: image,labels rows")
    data.add_argument("--val-labels", metavar="CSV", help="multi-label validation set: image,labels rows")
    data.add_argument("--classes", metavar="FILE", help="class names of the label CSVs, one a line")
    data.add_argument("--data_dir", "--data-dir", help="TFDS data directory")
    data.add_argument(
        "--synthetic-data",
        type=int,
        nargs="?",
        const=SYNTHETIC_IMAGES,
        metavar="IMAGES",
        help=f"random images as an epoch of IMAGES (default {SYNTHETIC_IMAGES}), nothing read or "
        "decoded: the speed of the compiled step alone",
    )
    data.add_argument("--image-size", type=int, default=DEFAULTS.image_size)
    data.add_argument(
        "--decode",
        choices=DECODE_CHOICES,
        default=DEFAULTS.decode,
        help="where JPEGs are decoded, cropped and resized: on the GPU in batches (nvJPEG through torchvision, "
        "the [torch] extra; needs --augment device) or on the host's cores; auto (default): the GPU when "
        "there is one and the decoder loads, as before when a run continues",
    )
    data.add_argument(
        "--resize",
        choices=RESIZES,
        default=DEFAULTS.resize,
        help="crop: inception crop in training, resize + centre crop in evaluation; squish: the whole "
        "image to size x size (ASL)",
    )
    length = parser.add_argument_group("length and batch")
    length.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    length.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    length.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="global batch")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (default: 0.1 x batch/256 for sgd, 8e-4 x batch/256 for adam, adamw)",
    )
    optim.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS.schedule)
    optim.add_argument("--warmup-fraction", type=float, default=DEFAULTS.warmup_fraction)
    optim.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=DEFAULTS.optimizer,
        help="sgd: Nesterov momentum; adam: L2 decay added to the gradients (ASL's torch Adam); adamw: decoupled",
    )
    optim.add_argument("--momentum", type=float, default=DEFAULTS.momentum)
    optim.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    optim.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing)
    optim.add_argument(
        "--loss",
        choices=LOSSES,
        default=DEFAULTS.loss,
        help="cross_entropy: single-label softmax; asl (asymmetric loss), bce: multi-label sigmoids",
    )
    optim.add_argument(
        "--asl-gamma-neg", type=float, default=DEFAULTS.asl_gamma_neg, help="ASL's exponent of negatives"
    )
    optim.add_argument(
        "--asl-gamma-pos", type=float, default=DEFAULTS.asl_gamma_pos, help="ASL's exponent of positives"
    )
    optim.add_argument(
        "--asl-clip", type=float, default=DEFAULTS.asl_clip, help="ASL's probability margin on negatives"
    )
    optim.add_argument("--ema-decay", type=float, default=DEFAULTS.ema_decay, help="0 disables the EMA")
    optim.add_argument(
        "--precision",
        choices=[*PRECISIONS, "auto"],
        default="auto",
        help="auto: bf16 on GPU/TPU, fp32 on CPU; fp16 uses dynamic loss scaling",
    )
    optim.add_argument("--seed", type=int, default=DEFAULTS.seed)
    aug = parser.add_argument_group("augmentation")
    aug.add_argument(
        "--crop-min-scale",
        type=float,
        default=DEFAULTS.crop_min_scale,
        help="inception crop: smallest fraction of the image area kept",
    )
    aug.add_argument(
        "--augment",
        choices=AUGMENT_PLACES,
        default=DEFAULTS.augment,
        help="where flip, RandAugment and Cutout run (the crop is the host's): on the accelerator, batched "
        "in the training step, or on the host's cores; auto (default): device on a GPU or TPU, host on a "
        "CPU-only machine (measured faster there), as before when a run continues",
    )
    aug.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    aug.add_argument("--randaugment-ops", type=int, default=DEFAULTS.randaugment_ops, help="0 disables RandAugment")
    aug.add_argument("--randaugment-magnitude", type=float, default=DEFAULTS.randaugment_magnitude)
    aug.add_argument("--cutout", type=float, default=DEFAULTS.cutout, help="erased square side fraction; 0: off")
    aug.add_argument("--mixup", type=float, default=DEFAULTS.mixup, help="Beta alpha; 0: off")
    aug.add_argument("--cutmix", type=float, default=DEFAULTS.cutmix, help="Beta alpha; 0: off")
    run = parser.add_argument_group("run")
    run.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every, help="epochs; 0: only at the end")
    run.add_argument("--checkpoint-every", type=int, help="steps (default: every epoch)")
    run.add_argument("--keep-checkpoints", type=int, default=DEFAULTS.keep_checkpoints)
    run.add_argument("--log-every", type=int, default=DEFAULTS.log_every, help="steps")
    run.add_argument("--eval-batch-size", type=int)
    run.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.sync_bn,
        help="BatchNorm statistics over the global batch (default; the result does not depend on the "
        "device count) or, --no-sync-bn, each device's shard (no per-layer all-reduce)",
    )
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="GPU: deterministic kernels, the same bits in every process (slower); see the README",
    )
    add_run_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, over a recipe's values when it names one (``--recipe list``: nothing
    else is read or checked). Raises InputError for an unknown recipe."""
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    # Parsed over a namespace of markers: the flags still holding one were not given.
    given = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, _UNSET))))
    args = argparse.Namespace(**{k: defaults[k] if v is _UNSET else v for k, v in given.items()})
    if args.recipe == "list":
        return args
    if args.recipe:
        named = {"flip" if k == "no_flip" else k for k, v in given.items() if v is not _UNSET}
        for name, value in load_recipe(args.recipe).defaults(named).items():
            if name == "flip":
                args.no_flip = not value
            else:
                setattr(args, name, value)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags' values, wherever they came from (a recipe's values bypass argparse's checks)."""
    if args.workdir is None and not args.print_config:
        parser.error("the following arguments are required: --workdir")
    recipe = f" (recipe {args.recipe})" if args.recipe else ""
    choices = {
        "model": list(ARCHITECTURES),
        "schedule": SCHEDULES,
        "optimizer": OPTIMIZERS,
        "loss": LOSSES,
        "resize": RESIZES,
        "precision": [*PRECISIONS, "auto"],
    }
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            parser.error(f"--{name} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}{recipe}")
    if not 0 < args.crop_min_scale <= 1:
        parser.error("--crop-min-scale must be in (0, 1]")
    positive = ("epochs", "batch_size", "log_every", "keep_checkpoints")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_steps is not None and args.max_steps <= 0:
        parser.error("--max-steps must be positive")
    if args.synthetic_data is not None and args.synthetic_data <= 0:
        parser.error("--synthetic-data must be positive")
    if args.num_classes is not None and args.num_classes <= 0:
        parser.error("--num-classes must be positive")
    for name in ("asl_gamma_neg", "asl_gamma_pos"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")
    if not 0 <= args.asl_clip < 1:
        parser.error("--asl-clip must be in [0, 1)")


def config_from(args: argparse.Namespace) -> TrainConfig:
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if jax.default_backend() in ("gpu", "tpu") else "fp32"
    fields = set(TrainConfig.__dataclass_fields__) - {"progress", "compilation_cache", "precision", "flip"}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    return TrainConfig(
        **values,
        precision=precision,
        flip=not args.no_flip,
        progress=not args.no_progress,
        compilation_cache=not args.no_compilation_cache,
    )


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.recipe == "list":
        print("\n".join(recipe_table()))
        return 0
    if args.print_config:  # nothing started, nothing written
        print(json.dumps(dataclasses.asdict(config_from(args)), indent=2))
        return 0
    with signals_for_the_main_thread() as stops:
        if args.deterministic:
            request_deterministic_gpu_ops()
        reserve_for(args.decode)
        start_run(args)
        try:
            result = Run(config_from(args)).run(stops)
        except Stopped as stopped:
            if jax.process_index() == 0:
                print(stopped, flush=True)
            return exit_code(stopped.signum)
    if jax.process_index() == 0:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
        print(f"done at step {result['step']}" + (f": {summary}" if summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
