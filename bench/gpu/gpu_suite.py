"""Every figure the project needs from a GPU, in one command that fits a short lease.

    python bench/gpu/gpu_suite.py --output $OUT/gpu --photos runs/photos     # on the GPU: about 8 min
    python bench/gpu/gpu_suite.py --output runs/smoke --smoke                 # every code path at toy sizes, CPU

The first six sections' budgets fill the default --time-limit (480 s): in that call the last
three are recorded as skipped, and they run in calls of their own (below).

Sections, in this order; each runs on its own (an error is recorded with its traceback and the
next section runs), within its time budget (what does not fit is recorded as skipped), and
writes DIR/<section>.json as each of its figures comes in; DIR/summary.md is rewritten after
every section:

  environment   GPU, driver, CUDA, cuDNN, JAX/jaxlib/PyTorch/timm versions, the bf16 peak used below
  correctness   tresnet_m against timm on the same device in true float32 (and with TF32), its
                bf16 and fp16 logits against float32 on photographs (bench/gpu/numerics.py)
  inference     images/s of M, L, XL in bf16 and fp16 at a batch that fills the GPU: JAX against
                timm AMP eager (NCHW and channels_last) and torch.compile, interleaved in one process
  training      the training step of M, bf16, batch 256, compared the same way; compile time
                (cold, or read back from the persistent cache), the fraction of the bf16 peak
  max_batch     the largest training batch of each side (fresh processes, a search bounded in
                probes and time), the compile time from the persistent cache, peak memory per image
  end_to_end    the library's compiled evaluation and training steps (what eval.py and train.py
                run) on synthetic batches fed from the host, and the host's JPEG decoding rate
                (bench/gpu/end_to_end.py; the input pipeline itself: bench/input_pipeline.py)
  jpeg_pipeline train.py and eval.py as commands, M bf16 batch 256, on 4,096 ImageNet-like JPEGs
                (24,576 files with hard links; a few progressive, a few PNG named .jpg) written by
                every host core, against the same commands on synthetic data: images/s, host cores
                and core-ms per image (from /proc), the decoder's lines; --augment device --decode
                auto, then the host path (bench/gpu/jpeg_pipeline.py). Targets: train JPEG ÷
                synthetic >= 0.8, eval >= 0.7, <= 1.0 host core-ms per training image
  more_models   what the inference and training sections leave out or for last: XL's training
                step, XL inference, L in fp16 (inference, training), JAX against timm AMP eager;
                an item this run's inference or training section measured is skipped
  ml_decoder    ML-Decoder on TResNet-L (V2) at 448, COCO's 80 classes in 80 groups, bf16
                (bench/ml_decoder.py): its share of the training step (the step with it against
                the fc head's, and the head alone), and our head's inference against the
                official head (timm's copy, PyTorch AMP eager) on the same feature maps with the
                same weights. Target: ours ÷ official >= 1.0

The jpeg_pipeline section on its own, in one call of a lent machine (about 7.5 min with start-up;
runs/ holds the persistent cache between calls):

    python bench/gpu/gpu_suite.py --output $OUT/gpu --sections environment,jpeg_pipeline,more_models \\
        --time-limit 450

The ml_decoder section on its own (about 3 min with start-up):

    python bench/gpu/gpu_suite.py --output $OUT/gpu --sections environment,ml_decoder --time-limit 240

JAX's persistent compilation cache lives in --cache-dir (default runs/gpu_suite_cache, kept
between calls on a warm lent machine, so a second run compiles nothing).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# PyTorch shares the GPU with JAX in this process: JAX must not take most of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import dataclasses
import datetime
import gc
import json
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import torch

from bench import ml_decoder
from bench.benchmark import measure
from bench.gpu import end_to_end, flops, jpeg_pipeline, numerics
from bench.gpu.max_batch import bounded_search, probe
from bench.gpu.photos import photographs
from bench.gpu.suite_report import markdown
from bench.report import add_speedups, environment
from bench.spec import BenchSpec
from bench.timm_side import torch_device
from tresnet_jax.cli import COMPILATION_CACHE_ENV, command, enable_compilation_cache
from tresnet_jax.errors import InputError
from tresnet_jax.model.registry import ARCHITECTURES

EAGER = ("eager", "channels_last")
ALL_TIMM = (*EAGER, "compile")
SECTIONS = ("environment", "correctness", "inference", "training", "max_batch", "end_to_end", "jpeg_pipeline",
            "more_models", "ml_decoder")  # fmt: skip
TARGETS = {"jax_over_best_eager": 1.25, "jax_over_compile": 1.0, "training_peak_fraction": 0.35,
           "ml_decoder_ours_over_official": 1.0, **jpeg_pipeline.TARGETS}  # fmt: skip
# Seconds per section (the first six: 480 in all, the default --time-limit); the run as a whole
# starts nothing after --time-limit.
# Set from the first lease's item times (H200, 2026-11-26): an inference item 16-35 s with its
# compile, the training comparison 116 s (torch.compile's first call 57 s), a max-batch probe
# 9-17 s from the cache.
# jpeg_pipeline, more_models and ml_decoder are estimates until a lease measures them.
BUDGETS = {"environment": 10, "correctness": 30, "inference": 170, "training": 130, "max_batch": 80, "end_to_end": 60,
           "jpeg_pipeline": 330, "more_models": 160, "ml_decoder": 170}  # fmt: skip
# Seconds an item takes on an H200 (measured on the first lease, rounded up; estimates for the
# items it skipped, and for jpeg_pipeline's and more_models': writing 4,096 JPEGs on 16 cores, a
# train.py of 80 steps with its start-up, cold compile and export, an eval.py of 24,576 images,
# the training comparison of XL): an item starts only when its section has that much left.
NEEDS = {"check": 10, "inference": 30, "timm_compile_infer": 25, "timm_compile_train": 65, "probe_jax": 35,
         "probe_timm": 20, "e2e_eval": 10, "e2e_train": 35, "e2e_decode": 5, "jpeg_write": 25, "jpeg_weights": 5,
         "jpeg_train": 70, "jpeg_eval": 30, "more_infer": 40, "more_train": 90, "ml_share": 130,
         "ml_head": 25}  # fmt: skip
# jpeg_pipeline's runs, most wanted first: (command, key, data, flags). ``data`` is "folder" (the
# JPEGs) or "synthetic" (random 64-pixel images made from their index, resized by the host's
# pool, no JPEG decoded; train.py: as many as the folder's files, so that its epochs end at the
# same steps).
JPEG_RUNS = (
    ("train", "train_jpeg", "folder", ("--augment", "device", "--decode", "auto")),
    ("train", "train_synthetic", "synthetic", ("--augment", "device")),
    ("eval", "eval_jpeg", "folder", ("--decode", "auto")),
    ("eval", "eval_synthetic", "synthetic", ()),
    ("train", "train_jpeg_host", "folder", ("--augment", "host", "--decode", "host")),
    ("eval", "eval_jpeg_host", "folder", ("--decode", "host")),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time budgets of one run: a lent GPU's by default, toy ones for --smoke."""

    image_size: int = 224
    check_model: str = numerics.MODEL
    check_size: int = 224
    checks: tuple[str, ...] = ("fp32", "fp32_tf32", "bf16", "fp16")
    infer_batch: int = 256
    # (model, precision, timm variants), most wanted first: later ones go when time runs out
    inference: tuple[tuple[str, str, tuple[str, ...]], ...] = (
        ("tresnet_m", "bf16", ALL_TIMM),
        ("tresnet_m", "fp16", EAGER),
        ("tresnet_l", "bf16", EAGER),
        ("tresnet_xl", "bf16", EAGER),
        ("tresnet_l", "fp16", EAGER),
        ("tresnet_xl", "fp16", EAGER),
    )
    train_model: str = "tresnet_m"
    train_precision: str = "bf16"
    train_batch: int = 256
    train_variants: tuple[str, ...] = ALL_TIMM
    warmup: int = 2
    windows: int = 5
    steps: int = 10
    max_batch_limit: int = 4096
    max_batch_probes: int = 3  # per framework, after the probe at the training batch
    max_batch_resolution: int = 8
    probe_timeout_s: float = 240.0
    e2e_batch: int = 256
    e2e_steps: int = 20
    repeated_steps: int = 2  # training steps run twice from the same state: are they repeatable?
    decode_images: int = 512
    # jpeg_pipeline: train.py and eval.py on a folder of JPEGs (bench/gpu/jpeg_pipeline.py)
    jpeg_images: int = 4096
    jpeg_progressive: int = 32  # of them progressive JPEGs
    jpeg_png: int = 8  # of them PNG bytes named .jpg
    jpeg_copies: int = 6  # each file and 5 hard links of it: 24,576 files, more than training reads
    jpeg_eval_synthetic: int = 65536  # eval.py's synthetic images: about 4 s at its H200 rate
    jpeg_model: str = "tresnet_m"
    jpeg_precision: str = "bf16"
    jpeg_batch: int = 256
    jpeg_train_steps: int = 80  # 20,480 images
    jpeg_log_every: int = 10
    jpeg_skip_rows: int = 2  # rows left out of the rate: compilation, warm-up, the pool filling
    jpeg_runs: tuple[tuple[str, str, str, tuple[str, ...]], ...] = JPEG_RUNS
    # more_models: what the inference and training sections leave out or leave for last, most
    # wanted first: (model, mode, precision, batch, timm variants)
    more_models: tuple[tuple[str, str, str, int, tuple[str, ...]], ...] = (
        ("tresnet_xl", "train", "bf16", 256, EAGER),
        ("tresnet_xl", "infer", "bf16", 256, EAGER),
        ("tresnet_l", "infer", "fp16", 256, EAGER),
        ("tresnet_l", "train", "fp16", 256, EAGER),
        ("tresnet_xl", "infer", "fp16", 256, EAGER),
    )
    # ml_decoder: ML-Decoder's COCO-448 configuration (bench/ml_decoder.py)
    ml_model: str = "tresnet_v2_l"
    ml_image_size: int = 448
    ml_classes: int = 80
    ml_groups: int = 80
    ml_precision: str = "bf16"
    ml_train_batch: int = 32
    ml_head_batch: int = 256
    budgets: dict[str, float] = dataclasses.field(default_factory=lambda: dict(BUDGETS))
    needs: dict[str, float] = dataclasses.field(default_factory=lambda: dict(NEEDS))

    def with_model(self, model: str) -> Plan:
        """Every section's items on ``model`` (``--model``), each item once."""
        inference: dict[str, tuple] = {}
        for _, precision, variants in self.inference:
            inference.setdefault(precision, (model, precision, variants))
        more: dict[tuple, tuple] = {}
        for _, mode, precision, batch, variants in self.more_models:
            more.setdefault((mode, precision, batch), (model, mode, precision, batch, variants))
        return dataclasses.replace(
            self, check_model=model, inference=tuple(inference.values()), train_model=model, jpeg_model=model,
            more_models=tuple(more.values()), ml_model=model,
        )  # fmt: skip


# Toy sizes, every code path once; float32, which XLA:CPU compiles and runs fastest (the
# precision is a parameter of the same code). train.py's JPEG run reads its 48 files once: more
# than its input pool holds in flight, so the rows after the first still count host work.
SMOKE = Plan(
    image_size=32, check_size=32, checks=("fp32", "fp32_tf32"), infer_batch=2,
    inference=(("tresnet_m", "fp32", EAGER),), train_precision="fp32", train_batch=2, train_variants=EAGER,
    warmup=0, windows=1, steps=1, max_batch_limit=2, max_batch_probes=1, probe_timeout_s=300, e2e_batch=2,
    e2e_steps=1, repeated_steps=1, decode_images=8, jpeg_images=24, jpeg_progressive=1, jpeg_png=1, jpeg_copies=2,
    jpeg_precision="fp32", jpeg_batch=4, jpeg_train_steps=12, jpeg_log_every=1, jpeg_skip_rows=1,
    jpeg_runs=(("train", "train_jpeg", "folder", ("--augment", "device", "--decode", "host")),
               ("eval", "eval_jpeg", "folder", ("--decode", "host"))),
    more_models=(("tresnet_m", "infer", "fp32", 2, EAGER),), ml_image_size=64, ml_precision="fp32", ml_train_batch=2,
    ml_head_batch=2, budgets=dict.fromkeys(SECTIONS, 900.0),
    needs=dict.fromkeys(NEEDS, 0.0),
)  # fmt: skip


class Budget:
    """A section's time: it may start an item while the item's expected need fits."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.clock, self.end = clock, clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()

    def allows(self, need: float) -> bool:
        return self.left() >= need


class Record:
    """One section's JSON file, rewritten whole (through a temporary file and a rename) every
    time a figure comes in, so a run cut off at any moment leaves valid files."""

    def __init__(self, path: Path, section: str):
        self.path, self.start = path, time.monotonic()
        self.data: dict[str, Any] = {"section": section, "status": "running", "results": {}}
        self.data |= {"skipped": [], "failed": []}
        self.write()

    def put(self, key: str, value: Any) -> None:
        self.data["results"][key] = value
        self.write()

    def skip(self, item: str, reason: str) -> None:
        self.data["skipped"].append({"item": item, "reason": reason})
        self.write()

    def attempt(self, key: str, measure_item: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """``measure_item()`` stored under ``key`` with the seconds it took, or its error (the
        section goes on)."""
        start = time.monotonic()
        try:
            value = measure_item()
        except Exception as err:  # noqa: BLE001 - one item's failure must not end the section
            self.data["failed"].append(key)
            self.put(key, {"error": _error_line(err), "traceback": traceback.format_exc(limit=8)})
            return None
        self.put(key, {**value, "seconds": time.monotonic() - start})
        return value

    def finish(self, error: BaseException | None = None) -> None:
        self.data["status"] = "failed" if error else "done"
        self.data["seconds"] = time.monotonic() - self.start
        if error is not None:
            self.data["error"] = _error_line(error)
            self.data["traceback"] = traceback.format_exc(limit=12)
        self.write()

    def write(self) -> None:
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(temporary, self.path)


@dataclasses.dataclass
class Context:
    plan: Plan
    output: Path
    cache_dir: str
    photos: Path | None
    device: torch.device


# --- the sections --------------------------------------------------------------------------------


def environment_section(ctx: Context, record: Record, budget: Budget) -> None:
    env = environment(str(ctx.device), torch.get_num_threads(), ctx.cache_dir)
    device = jax.local_devices()[0]
    name = _device_name(ctx)
    record.put("environment", env)
    cuda = ctx.device.type == "cuda"
    record.put("gpu", {
        "name": name, "jax_device_kind": device.device_kind, "jax_devices": len(jax.local_devices()),
        "jax_bytes_limit": (device.memory_stats() or {}).get("bytes_limit"), "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "nvidia_smi": _nvidia_smi(), "bf16_peak_tflops": flops.bf16_peak_tflops(name),
    })  # fmt: skip


def correctness_section(ctx: Context, record: Record, budget: Budget) -> None:
    images, source = photographs(ctx.plan.check_size, ctx.photos)
    record.put("images", {"source": source, "shape": list(images.shape), "model": ctx.plan.check_model})
    checks = list(ctx.plan.checks)
    found = numerics.check_numerics(images, checks, ctx.device, ctx.plan.check_model)
    for done, (name, figures) in enumerate(found, start=1):
        record.put(name, figures)
        if done < len(checks) and not budget.allows(ctx.plan.needs["check"]):
            for later in checks[done:]:
                record.skip(later, "time budget")
            break


def inference_section(ctx: Context, record: Record, budget: Budget) -> None:
    plan = ctx.plan
    for model, precision, variants in plan.inference:
        key = f"{model}_{precision}"
        if not budget.allows(plan.needs["inference"]):
            record.skip(key, "time budget")
            continue
        need = plan.needs["inference"] + plan.needs["timm_compile_infer"]
        variants = _affordable(variants, budget, need, record, key)
        spec = BenchSpec(model, "infer", precision, plan.infer_batch, plan.image_size)
        record.attempt(key, lambda spec=spec, variants=variants: _compare(spec, variants, ctx))


def training_section(ctx: Context, record: Record, budget: Budget) -> None:
    plan = ctx.plan
    key = f"{plan.train_model}_{plan.train_precision}"
    spec = BenchSpec(plan.train_model, "train", plan.train_precision, plan.train_batch, plan.image_size)
    variants = _affordable(plan.train_variants, budget, plan.needs["timm_compile_train"], record, key)
    record.attempt(key, lambda: _with_flops(_compare(spec, variants, ctx), spec, ctx))


def max_batch_section(ctx: Context, record: Record, budget: Budget) -> None:
    """Each side probed at the training batch first (JAX: the training section's program, read
    from the persistent cache), then a search from the batch its peak memory predicts."""
    plan = ctx.plan
    spec = BenchSpec(plan.train_model, "train", plan.train_precision, plan.train_batch, plan.image_size)
    env = {"JAX_COMPILATION_CACHE_DIR": ctx.cache_dir} if ctx.cache_dir else {}
    probes: dict[str, list[dict[str, Any]]] = {"jax": [], "timm_eager": []}

    def run_probe(framework: str, batch: int, timeout_s: float = plan.probe_timeout_s) -> dict[str, Any]:
        result = {"batch": batch, **probe(framework, spec.with_batch(batch), timeout_s, env)}
        probes[framework].append(result)
        return result

    first = {
        framework: record.attempt(f"{framework}_at_training_batch", lambda f=framework: run_probe(f, spec.batch_size))
        for framework in probes
    }
    for framework, need in (("jax", plan.needs["probe_jax"]), ("timm_eager", plan.needs["probe_timm"])):

        def fits(batch: int, framework: str = framework, need: float = need) -> bool | None:
            known = [p["fits"] for p in probes[framework] if p["batch"] == batch]
            if known:
                return known[0]
            if not budget.allows(need):
                record.skip(f"{framework} probe at batch {batch}", "time budget")
                return None
            try:  # a probe compiles a new batch size cold: it may take longer than expected
                return run_probe(framework, batch, min(plan.probe_timeout_s, budget.left()))["fits"]
            except subprocess.TimeoutExpired:
                reason = f"stopped at the section's end ({need:.0f} s expected)"
                record.skip(f"{framework} probe at batch {batch}", reason)
                return None

        start = _predicted_max_batch(first[framework], spec.batch_size, plan)
        record.attempt(f"{framework}_search", lambda fits=fits, f=framework, b=start: _search(fits, b, probes[f], plan))


def end_to_end_section(ctx: Context, record: Record, budget: Budget) -> None:
    plan = ctx.plan
    run = (plan.train_model, plan.train_precision, plan.e2e_batch, plan.image_size, plan.e2e_steps)
    record.put("data", {"tensorflow_importable": _importable("tensorflow"), "batches": "synthetic uint8 from the host"})
    items = (
        ("training_step", "e2e_train", lambda: end_to_end.training_rate(*run, plan.repeated_steps)),
        ("evaluation_step", "e2e_eval", lambda: end_to_end.evaluation_rate(*run)),
        ("host_jpeg_decoding", "e2e_decode", lambda: end_to_end.jpeg_decode_rate(plan.decode_images, plan.image_size)),
    )
    _measure_in_turn(items, ctx, record, budget)


def jpeg_pipeline_section(ctx: Context, record: Record, budget: Budget) -> None:
    """train.py and eval.py as commands (bench/gpu/jpeg_pipeline.py) on a folder of ImageNet-like
    JPEGs and on synthetic data, in the order of ``plan.jpeg_runs``; the ratios against the
    targets after each run. Images, workdirs and weights go to a temporary folder, removed at the
    end; each command's log, metrics and JSON to DIR/jpeg_pipeline/."""
    plan, needs = ctx.plan, ctx.plan.needs
    with tempfile.TemporaryDirectory(prefix="jpeg_pipeline-") as scratch:
        setup = jpeg_pipeline.Setup(
            plan.jpeg_model, plan.jpeg_precision, plan.jpeg_batch, plan.image_size, plan.jpeg_train_steps,
            plan.jpeg_log_every, plan.jpeg_skip_rows, Path(scratch), ctx.output / "jpeg_pipeline",
        )  # fmt: skip
        folder, files = setup.scratch / "images", plan.jpeg_images * plan.jpeg_copies
        environment = jpeg_pipeline.noted_environment()
        counts = {"images_written": plan.jpeg_images, "files": files, "host_cores": os.cpu_count()}
        shown = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(setup).items()}
        record.put("setup", {**shown, **counts, "environment": environment})
        written = None
        if budget.allows(needs["jpeg_write"]):
            written = record.attempt("images", lambda: jpeg_pipeline.write_images(
                folder, plan.jpeg_images, plan.jpeg_progressive, plan.jpeg_png, plan.jpeg_copies,
                setup.logs / "write_images.log", budget.left()))  # fmt: skip
        else:
            record.skip("images", "time budget")
        weights: Path | None = None
        for command, key, data, flags in plan.jpeg_runs:
            need = needs[f"jpeg_{command}"] + (needs["jpeg_weights"] if command == "eval" and weights is None else 0)
            if data == "folder" and written is None:
                record.skip(key, "no images")
                continue
            if not budget.allows(need):
                record.skip(key, "time budget")
                continue
            if command == "eval" and weights is None:
                made = record.attempt("eval_weights", lambda: jpeg_pipeline.random_weights(
                    setup.scratch / "weights", plan.jpeg_model))  # fmt: skip
                if made is None:
                    record.skip(key, "no weights")
                    continue
                weights = Path(made["directory"])
            where = ["--train_dir" if command == "train" else "--val_dir", str(folder)]
            synthetic = files if command == "train" else plan.jpeg_eval_synthetic  # train: the folder's epochs
            source = where if data == "folder" else ["--synthetic-data", str(synthetic)]
            run = jpeg_pipeline.train_run if command == "train" else partial(jpeg_pipeline.eval_run, weights=weights)
            record.attempt(key, partial(run, setup, key, source, flags, timeout_s=budget.left()))
            record.put("ratios", jpeg_pipeline.ratios(record.data["results"]))
            gpu, pil = setup.logs / "eval_jpeg.npz", setup.logs / "eval_jpeg_host.npz"
            if key in ("eval_jpeg", "eval_jpeg_host") and gpu.exists() and pil.exists():
                record.attempt("eval_logits_decode_auto_against_pil", partial(jpeg_pipeline.logits_agreement, gpu, pil))


def more_models_section(ctx: Context, record: Record, budget: Budget) -> None:
    """The comparisons with timm that the inference and training sections leave out (XL's
    training step, L in fp16) or leave for last, each skipped when this run's inference or
    training section already measured it (in DIR/inference.json, DIR/training.json)."""
    plan = ctx.plan
    measured = {mode: _measured(ctx.output / f"{section}.json") for mode, section in
                (("infer", "inference"), ("train", "training"))}  # fmt: skip
    for model, mode, precision, batch, variants in plan.more_models:
        key = f"{model}_{precision}_{mode}"
        if (model, precision, batch) in measured[mode]:
            record.skip(key, f"measured by the {'inference' if mode == 'infer' else 'training'} section")
            continue
        if not budget.allows(plan.needs[f"more_{mode}"]):
            record.skip(key, "time budget")
            continue
        spec = BenchSpec(model, mode, precision, batch, plan.image_size)
        record.attempt(
            key, lambda spec=spec, v=variants: {"mode": spec.mode, **_with_flops(_compare(spec, v, ctx), spec, ctx)}
        )


def ml_decoder_section(ctx: Context, record: Record, budget: Budget) -> None:
    """ML-Decoder's share of the training step, then our head's inference against the official
    one's (bench/ml_decoder.py), each item when its budget allows."""
    plan = ctx.plan
    base = ml_decoder.DecoderSpec(plan.ml_model, plan.ml_image_size, plan.ml_classes, plan.ml_groups, plan.ml_precision)
    share = ml_decoder.check(dataclasses.replace(base, batch_size=plan.ml_train_batch))
    head = ml_decoder.check(dataclasses.replace(base, batch_size=plan.ml_head_batch))
    items = (
        ("head_share", "ml_share", lambda: ml_decoder.measure_share(share, plan.warmup, plan.windows, plan.steps)),
        ("head_inference", "ml_head",
         lambda: ml_decoder.measure_head(head, ctx.device, plan.warmup, plan.windows, plan.steps)),
    )  # fmt: skip
    _measure_in_turn(items, ctx, record, budget)


SECTION_FUNCTIONS = {
    "environment": environment_section,
    "correctness": correctness_section,
    "inference": inference_section,
    "training": training_section,
    "max_batch": max_batch_section,
    "end_to_end": end_to_end_section,
    "jpeg_pipeline": jpeg_pipeline_section,
    "more_models": more_models_section,
    "ml_decoder": ml_decoder_section,
}


# --- helpers of the sections ---------------------------------------------------------------------


def _compare(spec: BenchSpec, variants: Sequence[str], ctx: Context) -> dict[str, Any]:
    """JAX and timm's ``variants`` built and timed side by side (bench/benchmark.py's
    ``measure``), with JAX's ratios to the best timm eager variant and to torch.compile."""
    plan = ctx.plan
    settings = argparse.Namespace(
        xla_defaults=False, also_xla_defaults=False, warmup=plan.warmup, windows=plan.windows, steps=plan.steps
    )
    rows = add_speedups(measure(spec, list(variants), ctx.device, settings))
    _release(ctx.device)
    return {"rows": rows, **ratios(rows)}


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """JAX's images/s over timm's best eager variant (NCHW or channels_last) and over
    torch.compile's; None where a side is missing."""
    rate = {row["runner"]: row["images_per_s"] for row in rows if "images_per_s" in row}
    eager = [rate[f"timm_{v}"] for v in EAGER if f"timm_{v}" in rate]
    jax_rate = rate.get("jax")
    best = max(eager, default=None)
    compiled = rate.get("timm_compile")
    return {
        "jax_over_best_eager": jax_rate / best if jax_rate and best else None,
        "jax_over_compile": jax_rate / compiled if jax_rate and compiled else None,
    }


def _with_flops(result: dict[str, Any], spec: BenchSpec, ctx: Context) -> dict[str, Any]:
    """Each row's fraction of the card's bf16 peak (stated FLOPs, bench/gpu/flops.py), and XLA's
    own count of the JAX step per image."""
    name = _device_name(ctx)
    per_image = flops.flops_per_image(spec.model, spec.image_size, spec.mode)
    peak = flops.bf16_peak_tflops(name)
    for row in result["rows"]:
        if "images_per_s" in row and peak is not None and per_image is not None:
            row["peak_fraction"] = row["images_per_s"] * per_image / (peak * 1e12)
        if "xla_flops" in row:
            row["xla_flops_per_image"] = row["xla_flops"] / spec.batch_size
    return {**result, "stated_flops_per_image": per_image, "bf16_peak_tflops": peak}


def _device_name(ctx: Context) -> str:
    """The GPU's name as the driver reports it (the CPU's device kind on a CPU)."""
    return torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else jax.local_devices()[0].device_kind


def _affordable(variants: Sequence[str], budget: Budget, need: float, record: Record, key: str) -> tuple[str, ...]:
    """``variants`` without torch.compile when the budget cannot take its compilation."""
    if "compile" in variants and not budget.allows(need):
        record.skip(f"{key} timm_compile", "time budget")
        return tuple(v for v in variants if v != "compile")
    return tuple(variants)


def _predicted_max_batch(first: dict[str, Any] | None, batch: int, plan: Plan) -> int:
    """Where to start looking: the batch at which peak memory, taken as proportional to the
    batch, would reach the device's capacity; half or twice the batch when either is unknown
    (on the CPU, or when the batch did not fit)."""
    first = first or {}
    peak, capacity = first.get("peak_memory_bytes"), first.get("capacity_bytes")
    if not peak or not capacity:
        return max(1, batch // 2) if first.get("fits") is False else min(2 * batch, plan.max_batch_limit)
    resolution = plan.max_batch_resolution
    return max(resolution, int(batch * capacity / peak) // resolution * resolution)


def _search(fits: Callable[[int], bool | None], start: int, probes: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """The bounded search from ``start`` in steps of about an eighth of it."""
    resolution = plan.max_batch_resolution
    step = max(resolution, start // 8 // resolution * resolution)
    good, bad = bounded_search(fits, start, step, plan.max_batch_limit, plan.max_batch_probes, resolution)
    return {"largest_fitting": good, "smallest_failing": bad, "start": start, "step": step, "probes": probes}


def _measured(path: Path) -> set[tuple[str, str, int]]:
    """(model, precision, batch) of every configuration a section's JSON holds figures of."""
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return set()
    return {
        (row["model"], row["precision"], row["batch_size"])
        for result in results.values()
        if isinstance(result, dict)
        for row in result.get("rows", [])[:1]
        if "images_per_s" in row
    }


def _measure_in_turn(
    items: Sequence[tuple[str, str, Callable[[], Any]]], ctx: Context, record: Record, budget: Budget
) -> None:
    """Each (key, need, measure) while the section's budget allows its need, freeing the
    device's memory after each."""
    for key, need, measure_item in items:
        if budget.allows(ctx.plan.needs[need]):
            record.attempt(key, measure_item)
            _release(ctx.device)
        else:
            record.skip(key, "time budget")


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _nvidia_smi() -> list[str] | None:
    """Name, driver, memory, power limit and SM clock of each GPU, as nvidia-smi reports them."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm"
    try:
        done = subprocess.run([smi, query, "--format=csv"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return None
    return done.stdout.strip().splitlines()


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _error_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


# --- the run -------------------------------------------------------------------------------------


def run_sections(ctx: Context, sections: Sequence[str], time_limit: float | None) -> dict[str, dict[str, Any]]:
    """Every section in turn, each in its own try and budget, none started after ``time_limit``
    seconds; the records as written."""
    deadline = None if time_limit is None else time.monotonic() + time_limit
    documents = {}
    for name in sections:
        left = float("inf") if deadline is None else deadline - time.monotonic()
        record = Record(ctx.output / f"{name}.json", name)
        budget = Budget(min(ctx.plan.budgets[name], left))
        if left <= 0:
            record.skip(name, "time limit of the whole run")
            record.finish()
        else:
            print(f"[{name}] {min(ctx.plan.budgets[name], left):.0f} s budget", flush=True)
            try:
                SECTION_FUNCTIONS[name](ctx, record, budget)
            except Exception as err:  # noqa: BLE001 - a section's failure is a figure; the next section runs
                record.finish(err)
            else:
                record.finish()
            _release(ctx.device)
        documents[name] = record.data
        (ctx.output / "summary.md").write_text(markdown(documents, TARGETS))
        print(f"[{name}] {record.data['status']} in {record.data.get('seconds', 0):.0f} s", flush=True)
    return documents


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="directory for the JSON files and summary.md")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, every code path (CI runs it on the CPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--photos", type=Path, help="folder of photographs for the checks (see bench/gpu/photos.py)")
    parser.add_argument(
        "--time-limit", type=float, help="seconds for the sections, after start-up (default: 480; none with --smoke)"
    )
    parser.add_argument("--cache-dir", help="JAX's persistent compilation cache (default: runs/gpu_suite_cache)")
    parser.add_argument("--model", help="run every section on this model (default: each section's own models)")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise InputError(f"unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}" if unknown else "no sections")
    if args.photos is not None and not args.photos.is_dir():
        raise InputError(f"--photos {args.photos}: no such directory")
    if args.model is not None and args.model not in ARCHITECTURES:
        raise InputError(f"--model {args.model}: unknown; known: {', '.join(ARCHITECTURES)}")
    time_limit = args.time_limit if args.time_limit is not None else (None if args.smoke else 480.0)
    args.output.mkdir(parents=True, exist_ok=True)
    os.environ[COMPILATION_CACHE_ENV] = str(Path(args.cache_dir or "runs/gpu_suite_cache").absolute())
    cache_dir = enable_compilation_cache()
    torch.backends.cudnn.benchmark = True  # timm's own scripts do: the fastest cuDNN algorithms
    plan = SMOKE if args.smoke else Plan()
    plan = plan.with_model(args.model) if args.model else plan
    ctx = Context(plan, args.output, cache_dir, args.photos, torch_device())
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"GPU suite{' (smoke)' if args.smoke else ''}, started {started}: {', '.join(sections)}", flush=True)
    documents = run_sections(ctx, sections, time_limit)
    print(markdown(documents, TARGETS))
    print(f"wrote {args.output}")
    return 0 if all(d["status"] == "done" and not d["failed"] for d in documents.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
