"""Train or fine-tune TResNet, data parallel over every local device (and host).

    python train.py --model tresnet_m --dataset imagenet2012 --workdir runs/m1
    python train.py --model tresnet_m --init tresnet_m --dataset cifar10 --num-classes 10 \\
        --image-size 224 --epochs 20 --workdir runs/c10
    python train.py --model tresnet_m --train_dir data/train --val_dir data/val --workdir runs/f1

Started again with the same command, a run continues from its last checkpoint in --workdir.
SIGTERM or Ctrl-C stops it after the current step with a checkpoint of that step (exit code
128 + the signal's number); a second Ctrl-C stops it at once.
Defaults follow the TResNet recipe: one-cycle schedule, SGD (Nesterov), label smoothing 0.1,
decoupled weight decay 1e-4 (not on norms and biases), EMA of the weights, inception crop +
flip, RandAugment (2 ops, magnitude 9), Cutout 0.5. The final weights are exported to
<workdir>/export (and export_ema) for eval.py --weights and tresnet_jax.load.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from tresnet_jax.cli import add_run_arguments, command, start_run
from tresnet_jax.model.registry import ARCHITECTURES
from tresnet_jax.runtime.xla_options import request_deterministic_gpu_ops
from tresnet_jax.train.config import TrainConfig
from tresnet_jax.train.preemption import exit_code, signals_for_the_main_thread
from tresnet_jax.train.run import Run, Stopped
from tresnet_jax.train.step import PRECISIONS

DEFAULTS = TrainConfig(workdir="")
SYNTHETIC_IMAGES = 1_281_167  # as many as ImageNet's training set


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--workdir", required=True, help="the run's directory: config, checkpoints, metrics, exports")
    add("--model", choices=list(ARCHITECTURES), default=DEFAULTS.model)
    add("--num-classes", type=int, help="default: the training set's number of classes")
    add("--init", help="fine-tune from converted weights: a name, weights directory or PyTorch file")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="TFDS dataset NAME[:SPLIT] prepared on disk (split default: train)")
    data.add_argument("--val-dataset", help="TFDS NAME:SPLIT for validation (default: the dataset's validation)")
    data.add_argument("--train_dir", "--train-dir", help="training images, a folder per class")
    data.add_argument("--val_dir", "--val-dir", help="validation images, a folder per class")
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
    length = parser.add_argument_group("length and batch")
    length.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    length.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    length.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="global batch")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, help="peak learning rate (default: 0.1 x batch/256 for sgd)")
    optim.add_argument("--schedule", choices=["onecycle", "cosine", "constant"], default=DEFAULTS.schedule)
    optim.add_argument("--warmup-fraction", type=float, default=DEFAULTS.warmup_fraction)
    optim.add_argument("--optimizer", choices=["sgd", "adamw"], default=DEFAULTS.optimizer)
    optim.add_argument("--momentum", type=float, default=DEFAULTS.momentum)
    optim.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    optim.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing)
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
    args = parser.parse_args(argv)
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
    return args


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
    with signals_for_the_main_thread() as stops:
        args = parse_args(argv)
        if args.deterministic:
            request_deterministic_gpu_ops()
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
