"""Train or fine-tune TResNet, data parallel over every local device (and host).

    python train.py --model tresnet_m --dataset imagenet2012 --workdir runs/m1
    python train.py --model tresnet_m --init tresnet_m --dataset cifar10 --num-classes 10 \\
        --image-size 224 --epochs 20 --workdir runs/c10
    python train.py --model tresnet_m --train_dir data/train --val_dir data/val --workdir runs/f1
    python train.py --model tresnet_m --init tresnet_m --head ml-decoder --train-labels train.csv \\
        --val-labels val.csv --loss asl --optimizer adam --lr 1e-4 --workdir runs/mld
    python train.py --recipe cifar100 --workdir runs/c100                # the authors' settings
    python train.py --recipe cifar100 --lr 1e-4 --print-config           # a flag beside it wins
    python train.py --recipe list

Started again with the same command, a run continues from its last checkpoint in --workdir.
SIGTERM or Ctrl-C stops it after the current step with a checkpoint of that step (exit code
128 + the signal's number); a second Ctrl-C stops it at once.
Defaults follow the TResNet recipe: one-cycle schedule, SGD (Nesterov), label smoothing 0.1,
decoupled weight decay 1e-4 (not on norms and biases), EMA of the weights, inception crop +
flip, RandAugment (2 ops, magnitude 9), Cutout 0.5, the fc head (or --head ml-decoder: ML-Decoder's,
with --num-groups K queries that are never trained). The final weights are written to
<workdir>/weights (and weights_ema) for eval.py --weights and tresnet_jax.load.
A recipe (--recipe NAME, tresnet_jax/train/recipes/NAME.toml) replaces those defaults with the
authors' fine-tuning settings for one dataset; config.json records its name and every value.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax

from tresnet_jax.cli import add_multihost_arguments, command, start_run
from tresnet_jax.data.gpu_decode import reserve_for
from tresnet_jax.errors import InputError
from tresnet_jax.runtime.xla_options import request_deterministic_gpu_ops
from tresnet_jax.train.config import TrainConfig, from_flat
from tresnet_jax.train.flags import add_settings, given_settings
from tresnet_jax.train.preemption import exit_code, signals_for_the_main_thread
from tresnet_jax.train.recipes import load_recipe, recipe_table
from tresnet_jax.train.run import Run, Stopped


def build_parser() -> argparse.ArgumentParser:
    """A flag for every setting of TrainConfig (``train.flags``), and the command's own."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="GPU: deterministic kernels, the same bits in every process (slower); see the README",
    )
    add_settings(parser)
    add_multihost_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, TrainConfig | None]:
    """The command's own flags and the run's TrainConfig: the flags given over a recipe's values
    (when one is named) over the defaults. ``--recipe list``: no config (nothing else is read or
    checked). A value the config refuses is a usage error (exit 2), named as its flag; an
    unknown recipe is an InputError."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_settings(args)
    recipe = given.get("run.recipe")
    if recipe == "list":
        return args, None
    values = load_recipe(recipe).defaults(given) | given if recipe else given
    try:
        cfg = from_flat(values)
    except InputError as err:
        parser.error(f"{err}{f' (recipe {recipe})' if recipe else ''}")
    if cfg.run.workdir is None and not args.print_config:
        parser.error("the following arguments are required: --workdir")
    return args, cfg


@command
def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    if cfg is None:
        print("\n".join(recipe_table()))
        return 0
    if args.print_config:  # nothing started, nothing written
        print(json.dumps(cfg.to_json(), indent=2))
        return 0
    with signals_for_the_main_thread() as stops:
        if args.deterministic:
            request_deterministic_gpu_ops()
        reserve_for(cfg.data.decode)
        start_run(args, cfg.run.compilation_cache)
        try:
            result = Run(cfg).run(stops)
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
