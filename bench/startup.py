"""How long a user waits for a model: ``create_model`` and ``load`` against timm, in one process.

    python bench/startup.py --model tresnet_m --repeats 5 --output runs/startup.json

Times, taking turns: ``timm.create_model(name)`` (random init) and ``tresnet_jax.create_model``;
timm's model built and given a state_dict from a ``.safetensors`` file, and
``tresnet_jax.load`` of stored weights (the second, local read of pretrained weights). The first
call of each is reported apart (it pays for imports and caches), the rest as a median.
Every figure includes putting the variables on the default device and waiting for them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: I001 - torch before anything that may import TensorFlow
import jax
import timm
from safetensors.torch import load_file, save_file

import tresnet_jax
from tresnet_jax.weights.info import WeightsInfo
from tresnet_jax.weights.storage import save_weights


def timed_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, JAX results waited for."""
    start = time.perf_counter()
    result = fn()
    if not isinstance(result, torch.nn.Module):
        jax.block_until_ready(result)
    return time.perf_counter() - start, result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tresnet_m", choices=tresnet_jax.list_models()[:4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        # The first call in the process of each (imports, caches and any compilation included)
        # makes the files the loads read.
        first_timm, timm_model = timed_call(lambda: timm.create_model(args.model))
        first_ours, (_, variables) = timed_call(lambda: tresnet_jax.create_model(args.model))
        weights = Path(tmp) / "weights"
        save_weights(weights, variables, WeightsInfo(args.model, 1000))
        checkpoint = Path(tmp) / "model.safetensors"
        save_file(timm_model.state_dict(), str(checkpoint))

        def timm_load() -> torch.nn.Module:
            model = timm.create_model(args.model)
            model.load_state_dict(load_file(str(checkpoint)))
            return model

        cases = {
            "timm.create_model": lambda: timm.create_model(args.model),
            "tresnet_jax.create_model": lambda: tresnet_jax.create_model(args.model).variables,
            "timm create + load_state_dict(safetensors)": timm_load,
            "tresnet_jax.load (stored weights)": lambda: tresnet_jax.load(weights)[1],
        }
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        seconds["timm.create_model"].append(first_timm)
        seconds["tresnet_jax.create_model"].append(first_ours)
        for repeat in range(args.repeats + 1):
            order = list(cases) if repeat % 2 == 0 else list(reversed(cases))
            for name in order:
                if len(seconds[name]) <= args.repeats:
                    seconds[name].append(timed_call(cases[name])[0])

    results = {
        name: {"first_s": round(ts[0], 3), "median_s": round(statistics.median(ts[1:]), 3), "all_s": ts}
        for name, ts in seconds.items()
    }
    ratio_create = results["tresnet_jax.create_model"]["median_s"] / results["timm.create_model"]["median_s"]
    ratio_load = (
        results["tresnet_jax.load (stored weights)"]["median_s"]
        / results["timm create + load_state_dict(safetensors)"]["median_s"]
    )
    for name, figures in results.items():
        print(f"{name:45s} first {figures['first_s']:7.3f} s   median {figures['median_s']:7.3f} s")
    print(f"create_model: {ratio_create:.2f}x timm's time; load: {ratio_load:.2f}x timm's create + load")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "model": args.model,
            "jax": jax.__version__,
            "torch": torch.__version__,
            "results": results,
            "create_over_timm": ratio_create,
            "load_over_timm": ratio_load,
        }
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
