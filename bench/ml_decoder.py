"""ML-Decoder's cost (issue 26): its share of the training step, and its inference against the
official head on PyTorch, in one process on one device.

    python bench/ml_decoder.py                                # both parts: TResNet-L (V2), 448, COCO's 80 classes
    python bench/ml_decoder.py --part head --head-batch 16 --windows 9
    python bench/ml_decoder.py --part share --model tresnet_m --image-size 224 --share-batch 4 --output runs/bench

share: the training step of the model with ML-Decoder (80 groups for 80 classes, as ML-Decoder's
COCO weights) against the same backbone with the fc head, and the head's own forward and
backward in training mode on the last stage's feature map (towards its parameters and the map,
as inside the step). Each step: forward in training mode (ML-Decoder's dropout on), sigmoid
cross-entropy over the classes, backward, SGD with momentum 0.9, BatchNorm statistics; the state
donated, compiled with the library's compiler options. The head's share is read two ways:
(ML-Decoder step - fc step) ÷ ML-Decoder step, and the head alone ÷ ML-Decoder step; and from
XLA's count of each step's floating-point operations, which no other load on the machine moves.

head: inference of our head (``model.linen.MLDecoderHead``, jitted with the library's options)
against the official one, timm's copy ``timm.layers.ml_decoder.MLDecoder`` (eager,
``inference_mode``), with the same weights, on the same feature maps (ours NHWC; theirs NCHW, as
timm's backbone hands them over). timm's copy fails on PyTorch 2: its ``nn.TransformerDecoder``
looks up ``self_attn``, which the decoder layer has not; here the decoder's forward calls its one
layer directly, which is what the TransformerDecoder computes (one layer, no final norm). The
patch is made on the instance in this file, never in the library.

Runners take turns window by window and keep their median window (``bench.timing``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU with JAX
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import tresnet_jax
from bench.jax_side import benchmarked, cost_notes, memory_notes, train_loop
from bench.report import device_name, environment, write_json
from bench.spec import BenchSpec, validate
from bench.timing import Runner, Timing, time_runners, timed
from bench.timm_side import AUTOCAST_DTYPES, synchronize, torch_device
from tresnet_jax.cli import command, enable_compilation_cache
from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import ML_DECODER, HeadSpec
from tresnet_jax.model.linen import MLDecoderHead
from tresnet_jax.model.registry import resolve
from tresnet_jax.runtime.xla_options import compiler_options

PARTS = ("share", "head")
PRECISIONS = ("fp32", "bf16")  # no loss scaling here: float16 training is left out
STRIDE = 32  # the last stage's feature map is the image size / 32
QKV = ("query", "key", "value")  # nn.MultiheadAttention's packed in_proj, in its order


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """One configuration: the backbone, input size, classes and groups, precision and batch."""

    model: str = "tresnet_v2_l"
    image_size: int = 448
    num_classes: int = 80
    num_groups: int | None = 80
    precision: str = "fp32"
    batch_size: int = 1

    @property
    def head(self) -> HeadSpec:
        return HeadSpec(ML_DECODER, self.num_groups)

    @property
    def feature_shape(self) -> tuple[int, int, int, int]:
        side = self.image_size // STRIDE
        return (self.batch_size, side, side, resolve(self.model).arch.num_features)

    def bench_spec(self, mode: str) -> BenchSpec:
        return BenchSpec(self.model, mode, self.precision, self.batch_size, self.image_size, self.num_classes)


def check(spec: DecoderSpec) -> DecoderSpec:
    """One line for a configuration that cannot run."""
    validate(spec.bench_spec("train"))
    if spec.precision not in PRECISIONS:
        raise InputError(f"precision {spec.precision!r}: this benchmark runs {', '.join(PRECISIONS)}")
    if spec.image_size % STRIDE:
        raise InputError(
            f"image size must be a multiple of {STRIDE} (the head reads the /{STRIDE} map), got {spec.image_size}"
        )
    spec.head.check_classes(spec.num_classes)
    return spec


# --- the head's share of the training step -------------------------------------------------------


class State(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any
    constants: Any  # ML-Decoder's queries: carried through the step, never updated


def make_train_step(model: tresnet_jax.TResNet, optimizer: optax.GradientTransformation, key: jax.Array) -> Callable:
    """(state, images, targets) -> (state, loss): the multi-label step of either head."""

    def loss_fn(params, batch_stats, constants, images, targets):
        variables = {"params": params, "batch_stats": batch_stats, **constants}
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean(), updates["batch_stats"]

    def step(state: State, images: jax.Array, targets: jax.Array) -> tuple[State, jax.Array]:
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, state.constants, images, targets
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return State(optax.apply_updates(state.params, updates), batch_stats, opt_state, state.constants), loss

    return step


def _inputs(spec: DecoderSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images uniform in [0, 1] and multi-hot targets (a few classes an image)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(spec.batch_size, spec.image_size, spec.image_size, 3)).astype(np.float32)
    return images, (rng.uniform(size=(spec.batch_size, spec.num_classes)) < 0.05).astype(np.float32)


def step_runner(name: str, spec: DecoderSpec, head: HeadSpec, options: dict[str, str]) -> Runner:
    """The training step with ``head``, compiled ahead of time and run once."""
    loaded = tresnet_jax.create_model(spec.model, num_classes=spec.num_classes, head=head)
    model = benchmarked(loaded.model, spec.bench_spec("train"))
    optimizer = optax.sgd(0.01, momentum=0.9)
    variables = loaded.variables
    constants = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    state = State(variables["params"], variables["batch_stats"], optimizer.init(variables["params"]), constants)
    images, targets = (jax.device_put(a) for a in _inputs(spec))
    start = time.perf_counter()
    jitted = jax.jit(make_train_step(model, optimizer, jax.random.key(0)), donate_argnums=0)
    lowered = jitted.lower(state, images, targets)
    compiled, compile_s = timed(lambda: lowered.compile(compiler_options=options))
    run = train_loop(compiled, state, images, targets)
    run(1)
    notes = memory_notes(compiled) | cost_notes(compiled)
    return Runner(name, "jax", run, time.perf_counter() - start, compile_s, notes=notes)


def head_step_runner(spec: DecoderSpec, options: dict[str, str]) -> Runner:
    """ML-Decoder alone in training mode: forward with dropout, the loss, the gradients towards
    its parameters and the feature map (what the backward pass of the step does in the head)."""
    loaded = tresnet_jax.create_model(spec.model, num_classes=spec.num_classes, head=spec.head)
    model = benchmarked(loaded.model, spec.bench_spec("train"))
    head = MLDecoderHead(spec.num_classes, spec.head, model.numerics)
    params, constants = loaded.variables["params"]["head"], {"constants": loaded.variables["constants"]["head"]}
    features = jnp.asarray(np.random.default_rng(1).normal(size=spec.feature_shape), model.numerics.dtype)
    _, targets = (jax.device_put(a) for a in _inputs(spec))
    keys = jax.random.split(jax.random.key(0), spec.batch_size)

    def loss_fn(params, features):
        logits = head.apply({"params": params, **constants}, features, dropout_keys=keys)
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean()

    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(params, features)
    compiled, compile_s = timed(lambda: lowered.compile(compiler_options=options))

    def run(steps: int) -> None:
        jax.block_until_ready([compiled(params, features) for _ in range(steps)])

    run(1)
    notes = memory_notes(compiled) | cost_notes(compiled)
    return Runner("head_alone", "jax", run, time.perf_counter() - start, compile_s, notes=notes)


def measure_share(spec: DecoderSpec, warmup: int, windows: int, steps: int) -> dict[str, Any]:
    """Seconds per training step with ML-Decoder, with fc, and of the head alone; its share."""
    options = compiler_options()
    runners = [
        step_runner("ml_decoder_step", spec, spec.head, options),
        step_runner("fc_step", spec, HeadSpec(), options),
        head_step_runner(spec, options),
    ]
    timings, other_load = time_runners(runners, warmup, windows, steps)
    flops = {r.name: r.notes.get("xla_flops") for r in runners}
    return {**dataclasses.asdict(spec), **share_of(timings), **flops_share_of(flops), "other_load_cores": other_load,
            "runners": _rows(runners, timings, spec.batch_size)}  # fmt: skip


def share_of(timings: dict[str, Timing]) -> dict[str, float]:
    """The head's share of the step: by the difference of the two steps, and by the head alone."""
    with_head, with_fc, alone = (timings[k].step_s for k in ("ml_decoder_step", "fc_step", "head_alone"))
    return {
        "step_s_ml_decoder": with_head,
        "step_s_fc": with_fc,
        "head_alone_s": alone,
        "share_by_difference": (with_head - with_fc) / with_head,
        "share_by_head_alone": alone / with_head,
    }


def flops_share_of(flops: dict[str, float | None]) -> dict[str, float | None]:
    """The head's share of the step's floating-point work as XLA counts it (the same on a busy
    machine as on an idle one): (ML-Decoder step - fc step) ÷ ML-Decoder step."""
    with_head, with_fc = flops.get("ml_decoder_step"), flops.get("fc_step")
    return {"flops_share": (with_head - with_fc) / with_head if with_head and with_fc else None}


# --- our head against the official one ----------------------------------------------------------


def official_state_dict(params: dict[str, Any], queries: np.ndarray) -> dict[str, torch.Tensor]:
    """Our head's variables (``params/head``, the queries) in timm's ``MLDecoder`` layout:
    PyTorch's (out, in) weights, the packed q/k/v projection of ``nn.MultiheadAttention``."""

    def t(x: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(x, np.float32))

    attention = params["attention"]
    layer = "decoder.layers.0."
    state = {
        "embed_standart.weight": t(params["embed"]["kernel"]).T,
        "embed_standart.bias": t(params["embed"]["bias"]),
        "query_embed.weight": t(queries),
        "duplicate_pooling": t(params["group_fc"]["kernel"]),
        "duplicate_pooling_bias": t(params["group_fc"]["bias"]),
        layer + "multihead_attn.in_proj_weight": torch.cat([t(attention[n]["kernel"]).T for n in QKV]),
        layer + "multihead_attn.in_proj_bias": torch.cat([t(attention[n]["bias"]) for n in QKV]),
        layer + "multihead_attn.out_proj.weight": t(attention["out"]["kernel"]).T,
        layer + "multihead_attn.out_proj.bias": t(attention["out"]["bias"]),
    }  # fmt: skip
    for name in ("linear1", "linear2"):
        state |= {
            layer + f"{name}.weight": t(params[name]["kernel"]).T,
            layer + f"{name}.bias": t(params[name]["bias"]),
        }
    for name in ("norm1", "norm2", "norm3"):
        state |= {layer + f"{name}.weight": t(params[name]["scale"]), layer + f"{name}.bias": t(params[name]["bias"])}
    return {k: v.contiguous() for k, v in state.items()}


def official_head(spec: DecoderSpec, params: dict[str, Any], queries: np.ndarray) -> torch.nn.Module:
    """timm's ``MLDecoder`` with our weights, in evaluation mode, runnable on PyTorch 2."""
    from timm.layers.ml_decoder import MLDecoder

    groups = -1 if spec.num_groups is None else spec.num_groups
    head = MLDecoder(spec.num_classes, groups, initial_num_features=spec.feature_shape[-1]).eval()
    head.load_state_dict(official_state_dict(params, queries))
    decoder = head.decoder
    decoder.forward = lambda tgt, memory, *_, **__: decoder.layers[0](tgt, memory)  # the torch-2 patch
    return head


def head_runners(spec: DecoderSpec, device: torch.device) -> tuple[list[Runner], dict[str, float]]:
    """Our head and the official one on the same feature maps with the same weights, each run
    once; and how far apart their logits are."""
    loaded = tresnet_jax.create_model(spec.model, num_classes=spec.num_classes, head=spec.head)
    model = benchmarked(loaded.model, spec.bench_spec("infer"))
    variables = {"params": loaded.variables["params"]["head"], "constants": loaded.variables["constants"]["head"]}
    ours = tresnet_jax.jit(MLDecoderHead(spec.num_classes, spec.head, model.numerics).apply)
    features = np.random.default_rng(1).normal(size=spec.feature_shape).astype(np.float32)
    on_device = jax.device_put(jnp.asarray(features, model.numerics.dtype))

    logits, first_s = timed(lambda: np.asarray(ours(variables, on_device), np.float32))  # compiled here

    def run_ours(steps: int) -> None:
        jax.block_until_ready([ours(variables, on_device) for _ in range(steps)])

    official = official_head(spec, variables["params"], np.asarray(variables["constants"]["queries"])).to(device)
    nchw = torch.from_numpy(features).permute(0, 3, 1, 2).contiguous().to(device)
    dtype = AUTOCAST_DTYPES[spec.precision]

    def forward() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return official(nchw)

    def run_official(steps: int) -> None:
        for _ in range(steps):
            forward()
        synchronize(device)

    reference, official_first_s = timed(lambda: forward().float().cpu().numpy())
    agreement = {
        "max_abs_diff_over_max_abs": float(np.abs(logits - reference).max() / max(1.0, np.abs(reference).max())),
        "relative_l2": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
    }
    runners = [
        Runner("jax_head", "jax", run_ours, first_s),
        Runner("official_head", "torch", run_official, official_first_s),
    ]
    return runners, agreement


def measure_head(spec: DecoderSpec, device: torch.device, warmup: int, windows: int, steps: int) -> dict[str, Any]:
    """Images/s of both heads and ours ÷ the official one (same process, taking turns)."""
    runners, agreement = head_runners(spec, device)
    timings, other_load = time_runners(runners, warmup, windows, steps)
    rows = _rows(runners, timings, spec.batch_size)
    return {**dataclasses.asdict(spec), "ours_over_official": rows[0]["images_per_s"] / rows[1]["images_per_s"],
            "agreement": agreement, "other_load_cores": other_load, "runners": rows}  # fmt: skip


def _rows(runners: Sequence[Runner], timings: dict[str, Timing], batch: int) -> list[dict[str, Any]]:
    return [
        {"runner": r.name, "framework": r.framework, "step_ms": timings[r.name].step_s * 1e3,
         "images_per_s": batch / timings[r.name].step_s, "windows_ms": [t * 1e3 for t in timings[r.name].windows_s],
         "spread": timings[r.name].spread, "first_call_s": r.first_call_s, "compile_s": r.compile_s, **r.notes}
        for r in runners
    ]  # fmt: skip


# --- the command line ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "both"], default="both")
    parser.add_argument("--model", default="tresnet_v2_l", help="the backbone (ML-Decoder's COCO-448 one by default)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--num-groups", type=int, default=80, help="ML-Decoder's queries (0: its default, 100)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--share-batch", type=int, default=1, help="training batch of the share part")
    parser.add_argument("--head-batch", type=int, default=8, help="inference batch of the head part")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per runner")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per runner (the median is kept)")
    parser.add_argument("--steps", type=int, help="steps per window (default: share 1, head 10)")
    parser.add_argument("--output", type=Path, help="directory for a JSON record of every window")
    return parser.parse_args(argv)


def _print_share(result: dict[str, Any]) -> None:
    print(f"training step, {result['model']} {result['image_size']} px, batch {result['batch_size']}, "
          f"{result['precision']}: ML-Decoder {result['step_s_ml_decoder']:.3f} s, fc {result['step_s_fc']:.3f} s, "
          f"the head alone {result['head_alone_s']:.3f} s; the head's share {result['share_by_difference']:.1%} "
          f"(by the difference), {result['share_by_head_alone']:.1%} (alone), {_share(result['flops_share'])} "
          f"of XLA's FLOPs; other load {result['other_load_cores'] or 0:.2f} cores")  # fmt: skip


def _share(value: float | None) -> str:
    return "?" if value is None else f"{value:.1%}"


def _print_head(result: dict[str, Any]) -> None:
    ours, official = result["runners"]
    side = result["image_size"] // STRIDE
    print(f"head inference on {result['model']}'s {side}x{side} feature maps, batch {result['batch_size']}, "
          f"{result['precision']}: ours {ours['images_per_s']:.1f} img/s, official {official['images_per_s']:.1f} "
          f"img/s: {result['ours_over_official']:.2f}x; logits apart by "
          f"{result['agreement']['max_abs_diff_over_max_abs']:.1e} (max |diff| / max |logit|); other load "
          f"{result['other_load_cores'] or 0:.2f} cores")  # fmt: skip


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    groups = args.num_groups or None
    base = DecoderSpec(args.model, args.image_size, args.num_classes, groups, args.precision)
    parts = PARTS if args.part == "both" else (args.part,)
    specs = {part: check(dataclasses.replace(base, batch_size=getattr(args, f"{part}_batch"))) for part in parts}
    if args.warmup < 0 or args.windows < 1 or (args.steps is not None and args.steps < 1):
        raise InputError("--warmup must be >= 0, --windows and --steps >= 1")
    enable_compilation_cache()
    device = torch_device()
    env = environment(str(device), torch.get_num_threads(), None)
    print(f"on {device_name(env)}")
    results = {}
    if "share" in specs:
        results["share"] = measure_share(specs["share"], args.warmup, args.windows, args.steps or 1)
        _print_share(results["share"])
    if "head" in specs:
        results["head"] = measure_head(specs["head"], device, args.warmup, args.windows, args.steps or 10)
        _print_head(results["head"])
    if args.output:
        name = f"ml_decoder_{base.model}_{base.image_size}px_{base.precision}.json"
        print(f"wrote {write_json(args.output / name, {'environment': env, 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
