"""The GPU device suite: ``bench/gpu/gpu_suite.py --smoke`` on the CPU, in a process where
TensorFlow cannot be imported, as on the lent GPU machines, and the suite's parts (the bounded
batch search, budgets, reports, the JPEG section's comparisons)."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import synthetic_images
from bench.gpu import gpu_suite, jpeg_pipeline, photos
from bench.gpu.flops import bf16_peak_tflops, flops_per_image
from bench.gpu.max_batch import bounded_search
from bench.gpu.numerics import agreement
from bench.gpu.suite_report import markdown
from tests import tiny_model
from tests.blocked_imports import blocker

REPO = Path(__file__).resolve().parent.parent
PARITY_BOUND = 1e-4  # tests/test_parity.py's bound on max |diff| / max(1, max |timm|)
# The smoke runs every section on tests/tiny_model.py's model (the same kinds of layer as the
# published TResNets; what is measured does not depend on the size): registered for JAX in the
# suite and the commands it starts (train.py, eval.py, the max-batch probes), and for timm
# where timm builds it.
TINY_IN_EVERY_PROCESS = """
if any(arg.endswith(("train.py", "eval.py", "gpu_suite.py", "bench.gpu.max_batch")) for arg in sys.orig_argv):
    from tests import tiny_model
    tiny_model.register()
    if any(arg.endswith("gpu_suite.py") or arg.startswith("timm") for arg in sys.orig_argv):
        tiny_model.register_in_timm()
"""


# --- the suite end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``gpu_suite.py --smoke --model tresnet_tiny`` run once, every section: (the finished
    process, each section's JSON, summary.md, the output folder)."""
    root = tmp_path_factory.mktemp("smoke")
    (root / "site").mkdir()
    # The suite and every process it starts: TensorFlow is not found, as on the lent machines.
    site = blocker({"tensorflow", "tensorflow_datasets"}) + TINY_IN_EVERY_PROCESS
    (root / "site" / "sitecustomize.py").write_text(site)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "site"), str(REPO)]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    command = [sys.executable, str(REPO / "bench" / "gpu" / "gpu_suite.py"), "--smoke", "--output", str(root / "out"),
               "--cache-dir", str(root / "cache"), "--model", tiny_model.NAME]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    results = {p.stem: json.loads(p.read_text()) for p in (root / "out").glob("*.json")}
    return done, results, (root / "out" / "summary.md").read_text(), root / "out"


@pytest.mark.slow
def test_smoke_runs_every_section_without_tensorflow(smoke):
    done, results, summary, _ = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(results) == sorted(gpu_suite.SECTIONS)
    # more_models' only item is the inference section's: measured once (its own path: below)
    measured = [{"item": "tresnet_tiny_fp32_infer", "reason": "measured by the inference section"}]
    for name, record in results.items():
        skipped = measured if name == "more_models" else []
        assert (record["status"], record["failed"], record["skipped"]) == ("done", [], skipped), name
    assert results["end_to_end"]["results"]["data"]["tensorflow_importable"] is False
    for heading in ("## Correctness", "## Inference", "## Training step", "## Largest training batch", "## End to end",
                    "## train.py and eval.py on JPEGs", "## More models", "## ML-Decoder"):  # fmt: skip
        assert heading in summary
    assert "| tresnet_tiny | fp32 | 2 |" in summary
    problems = summary[summary.index("## Skipped and failed") :].strip().splitlines()
    assert problems[2:] == ["- more_models: tresnet_tiny_fp32_infer skipped (measured by the inference section)"]


@pytest.mark.slow
def test_smoke_correctness_is_timm_parity_in_float32(smoke):
    _, results, _, _ = smoke
    checks = results["correctness"]["results"]
    assert checks["images"]["shape"] == [12, 32, 32, 3]  # scikit-image's photographs here
    assert checks["images"]["model"] == tiny_model.NAME
    assert checks["fp32"]["matmul_precision"] == "highest"
    assert checks["fp32"]["vs_timm_float32"] <= PARITY_BOUND
    # On the CPU, TF32 is float32: the "TF32" run agrees with float32 to rounding.
    assert checks["fp32_tf32"]["vs_timm_float32"] <= PARITY_BOUND
    assert checks["fp32_tf32"]["relative_l2_vs_fp32"] <= 1e-5
    assert (checks["fp32_tf32"]["top1_agreement"], checks["fp32_tf32"]["top5_agreement"]) == (1.0, 1.0)


@pytest.mark.slow
def test_smoke_compares_jax_with_timm_and_reads_the_cache_back(smoke):
    _, results, _, _ = smoke
    inference = results["inference"]["results"]["tresnet_tiny_fp32"]
    training = results["training"]["results"]["tresnet_tiny_fp32"]
    for result in (inference, training):
        assert [row["runner"] for row in result["rows"]] == ["jax", "timm_eager", "timm_channels_last"]
        assert all(row["images_per_s"] > 0 for row in result["rows"])
        assert result["jax_over_best_eager"] > 0
        assert result["jax_over_compile"] is None  # no torch.compile in the smoke
    assert training["stated_flops_per_image"] is None  # no stated count for this model: no peak fraction
    assert "peak_fraction" not in training["rows"][0]
    # The cache was empty: the training step compiled cold and was written; the max-batch probe,
    # a fresh process, read that same program back.
    jax_row = training["rows"][0]
    assert (jax_row["compilation_cache"]["hits"], jax_row["compilation_cache"]["writes"] >= 1) == (0, True)
    probes = results["max_batch"]["results"]
    assert probes["jax_at_training_batch"]["fits"] is True
    assert probes["jax_at_training_batch"]["compilation_cache"]["hits"] >= 1
    assert probes["timm_eager_at_training_batch"]["fits"] is True
    for side in ("jax", "timm_eager"):  # the limit is the training batch: nothing more to probe
        assert probes[f"{side}_search"]["largest_fitting"] == 2
        assert [p["batch"] for p in probes[f"{side}_search"]["probes"]] == [2]


@pytest.mark.slow
def test_smoke_runs_the_library_steps_end_to_end(smoke):
    _, results, _, _ = smoke
    e2e = results["end_to_end"]["results"]
    assert e2e["evaluation_step"]["images_counted"] == 2 * 2  # a first batch and one timed
    assert e2e["training_step"]["repeatable"] is True  # the CPU is deterministic
    assert np.isfinite(e2e["training_step"]["last_loss"])
    assert e2e["host_jpeg_decoding"]["images"] == 8


@pytest.mark.slow
def test_smoke_measures_ml_decoder_s_share_and_its_inference_against_the_official_head(smoke):
    _, results, summary, _ = smoke
    found = results["ml_decoder"]["results"]
    share, head = found["head_share"], found["head_inference"]
    assert (share["model"], share["image_size"], share["batch_size"]) == (tiny_model.NAME, 64, 2)
    assert [r["runner"] for r in share["runners"]] == ["ml_decoder_step", "fc_step", "head_alone"]
    assert min(share["step_s_ml_decoder"], share["step_s_fc"], share["head_alone_s"]) > 0
    assert [r["runner"] for r in head["runners"]] == ["jax_head", "official_head"]
    assert head["ours_over_official"] > 0
    # The same weights on the same feature maps, float32 on both sides: the official head's logits.
    assert head["agreement"]["max_abs_diff_over_max_abs"] <= PARITY_BOUND
    assert "## ML-Decoder (tresnet_tiny, 64 px, 80 classes in 80 groups, fp32)" in summary
    assert "- inference, ours ÷ the official head (timm's copy, PyTorch eager; batch 2): " in summary


@pytest.mark.slow
def test_smoke_runs_train_py_and_eval_py_on_jpegs(smoke):
    _, results, summary, out = smoke
    record = results["jpeg_pipeline"]
    assert (record["status"], record["failed"], record["skipped"]) == ("done", [], [])
    results = record["results"]
    plan = gpu_suite.SMOKE
    written = results["images"]
    assert (written["images"], written["progressive"], written["png_named_jpg"]) == (plan.jpeg_images, 1, 1)
    assert written["files"] == plan.jpeg_images * plan.jpeg_copies
    train = results["train_jpeg"]
    assert "--augment device --decode host" in train["command"]
    assert f"--model {tiny_model.NAME}" in train["command"]
    assert (train["returncode"], train["rows"], train["steps"]) == (0, plan.jpeg_train_steps, plan.jpeg_train_steps)
    assert train["rows_used"] == plan.jpeg_train_steps - plan.jpeg_skip_rows
    assert train["images_per_s"] > 0
    assert train["unreadable_images"] == 0  # the progressive JPEG and the PNG named .jpg were read
    assert train["host_cores"] > 0
    assert train["host_core_ms_per_image"] > 0
    assert train["columns"]["host_ms_per_image"] > 0  # the input pool's own count, beside ours
    evaluated = results["eval_jpeg"]
    assert (evaluated["images"], evaluated["skipped_images"]) == (written["files"], 0)
    assert evaluated["images_per_s"] > 0
    assert results["ratios"]["targets"] == jpeg_pipeline.TARGETS
    assert "| train_jpeg |" in summary
    assert "| eval_jpeg |" in summary
    logs = sorted(p.name for p in (out / "jpeg_pipeline").iterdir())
    assert logs == [
        "eval_jpeg.json",
        "eval_jpeg.log",
        "eval_jpeg.npz",
        "train_jpeg.log",
        "train_jpeg_metrics.jsonl",
        "write_images.log",
    ]


def test_a_model_for_every_section_replaces_each_item_s_model_once():
    plan = gpu_suite.Plan().with_model("tresnet_l")
    assert (plan.check_model, plan.train_model, plan.jpeg_model) == ("tresnet_l",) * 3
    assert [(m, p) for m, p, _ in plan.inference] == [("tresnet_l", "bf16"), ("tresnet_l", "fp16")]
    assert [(m, mode, p) for m, mode, p, *_ in plan.more_models] == [
        ("tresnet_l", "train", "bf16"), ("tresnet_l", "infer", "bf16"), ("tresnet_l", "infer", "fp16"),
        ("tresnet_l", "train", "fp16"),
    ]  # fmt: skip


# --- the suite's parts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "start", "probes", "limit", "expected", "tried"),
    [
        (700, 600, 3, 4096, (664, 728), [600, 664, 728]),  # up by steps until one fails
        (700, 800, 3, 4096, (672, 736), [800, 736, 672]),  # down by steps until one fits
        (700, 600, 6, 4096, (696, 704), [600, 664, 728, 696, 712, 704]),  # then halving to the resolution
        (5000, 600, 3, 640, (640, None), [600, 640]),  # no further than the limit
        (0, 2, 3, 4096, (None, 1), [2, 1]),  # nothing fits
    ],
)
def test_bounded_search_for_the_largest_batch(capacity, start, probes, limit, expected, tried):
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= capacity

    assert bounded_search(fits, start, step=64, limit=limit, probes=probes, resolution=8) == expected
    assert calls == tried


def test_bounded_search_stops_when_time_runs_out():
    answers = iter([True, None])
    assert bounded_search(lambda batch: next(answers), 256, step=32, limit=4096, probes=5) == (256, None)


def test_a_failing_item_or_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(ctx, record, budget):
        record.attempt("first", lambda: 1 / 0)
        record.attempt("second", lambda: {"images_per_s": 3.0})
        raise RuntimeError("no such device\nmore")

    def fine(ctx, record, budget):
        record.put("answer", {"value": 42})

    monkeypatch.setattr(gpu_suite, "SECTION_FUNCTIONS", {"inference": broken, "training": fine})
    ctx = gpu_suite.Context(gpu_suite.SMOKE, tmp_path, None, None, gpu_suite.torch_device())
    documents = gpu_suite.run_sections(ctx, ["inference", "training"], time_limit=None)
    inference = json.loads((tmp_path / "inference.json").read_text())
    assert documents["inference"] == inference
    assert (inference["status"], inference["error"], inference["failed"]) == (
        "failed", "RuntimeError: no such device", ["first"]
    )  # fmt: skip
    assert inference["results"]["first"]["error"] == "ZeroDivisionError: division by zero"
    assert inference["results"]["second"]["images_per_s"] == 3.0
    assert json.loads((tmp_path / "training.json").read_text())["results"]["answer"] == {"value": 42}
    summary = (tmp_path / "summary.md").read_text()
    assert "- inference: failed: RuntimeError: no such device" in summary
    assert "- inference: first failed: ZeroDivisionError: division by zero" in summary


def test_what_does_not_fit_the_time_budget_is_skipped_and_said(tmp_path):
    now = [0.0]
    budget = gpu_suite.Budget(100.0, clock=lambda: now[0])
    record = gpu_suite.Record(tmp_path / "training.json", "training")
    assert gpu_suite._affordable(gpu_suite.ALL_TIMM, budget, 75.0, record, "m") == gpu_suite.ALL_TIMM
    now[0] = 30.0
    assert gpu_suite._affordable(gpu_suite.ALL_TIMM, budget, 75.0, record, "m") == gpu_suite.EAGER
    assert json.loads((tmp_path / "training.json").read_text())["skipped"] == [
        {"item": "m timm_compile", "reason": "time budget"}
    ]
    ctx = gpu_suite.Context(gpu_suite.SMOKE, tmp_path, None, None, gpu_suite.torch_device())
    documents = gpu_suite.run_sections(ctx, ["environment"], time_limit=0.0)
    assert documents["environment"]["skipped"] == [{"item": "environment", "reason": "time limit of the whole run"}]


def test_a_probe_still_running_at_the_section_s_end_is_stopped_and_said(tmp_path, monkeypatch):
    timeouts = []

    def probe(framework, spec, timeout_s, env):
        timeouts.append((framework, spec.batch_size, timeout_s))
        if spec.batch_size == gpu_suite.SMOKE.train_batch:  # the first probe: fits, half the memory used
            return {"fits": True, "peak_memory_bytes": 50, "capacity_bytes": 100}
        raise subprocess.TimeoutExpired("probe", timeout_s)

    monkeypatch.setattr(gpu_suite, "probe", probe)
    plan = dataclasses.replace(gpu_suite.SMOKE, max_batch_limit=64, max_batch_resolution=1)
    ctx = gpu_suite.Context(plan, tmp_path, None, None, gpu_suite.torch_device())
    record = gpu_suite.Record(tmp_path / "max_batch.json", "max_batch")
    gpu_suite.max_batch_section(ctx, record, gpu_suite.Budget(60.0))
    batch = 2 * plan.train_batch  # capacity / peak memory
    assert [(f, b) for f, b, _ in timeouts] == [
        ("jax", plan.train_batch),
        ("timm_eager", plan.train_batch),
        ("jax", batch),
        ("timm_eager", batch),
    ]
    assert all(0 < t <= 60.0 for _, b, t in timeouts if b == batch)  # no probe outlives the budget
    saved = json.loads((tmp_path / "max_batch.json").read_text())
    skipped = [s["item"] for s in saved["skipped"]]
    assert skipped == [f"jax probe at batch {batch}", f"timm_eager probe at batch {batch}"]
    assert saved["results"]["jax_search"]["largest_fitting"] is None


def test_synthetic_jpegs_have_the_special_files_and_do_not_depend_on_the_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_images, "CHUNK", 3)  # 3 chunks: two processes share them
    one = synthetic_images.write_synthetic(tmp_path / "one", 8, progressive=2, png=1)
    two = synthetic_images.write_synthetic(tmp_path / "two", 8, workers=2, progressive=2, png=1)
    assert [p.relative_to(tmp_path / "one") for p in one] == [p.relative_to(tmp_path / "two") for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two, strict=True))
    kinds = []
    for path in one:
        with Image.open(path) as image:
            kinds.append("png" if image.format == "PNG" else "progressive" if image.info.get("progressive") else "")
    assert kinds == ["", "", "progressive", "png", "", "", "progressive", ""]
    assert {p.parent.name for p in one} == {f"class{k}" for k in range(8)}
    links = synthetic_images.link_copies(one[:2], 3)
    assert [p.name for p in links] == ["00000.copy1.jpg", "00000.copy2.jpg", "00001.copy1.jpg", "00001.copy2.jpg"]
    assert links[0].read_bytes() == one[0].read_bytes()


def test_jpeg_ratios_and_targets():
    results = {
        "train_jpeg": {"images_per_s": 1700.0, "host_core_ms_per_image": 0.9},
        "train_synthetic": {"images_per_s": 2000.0},
        "eval_jpeg": {"images_per_s": 1000.0, "images_per_s_steady": 1400.0},
        "eval_synthetic": {"images_per_s": 1800.0, "images_per_s_steady": 2100.0},
        "eval_jpeg_host": {"error": "RuntimeError: eval.py failed"},
    }
    found = jpeg_pipeline.ratios(results)
    assert found["train_jpeg_over_synthetic"] == pytest.approx(0.85)
    assert found["eval_jpeg_over_synthetic"] == pytest.approx(1400 / 2100)  # the steady rates
    assert (found["host_core_ms_per_train_image"], found["eval_jpeg_host_over_synthetic"]) == (0.9, None)
    assert found["target_met"] == {
        "train_jpeg_over_synthetic": True, "eval_jpeg_over_synthetic": False, "host_core_ms_per_train_image": True
    }  # fmt: skip
    assert jpeg_pipeline.ratios({})["target_met"] == dict.fromkeys(jpeg_pipeline.TARGETS)


def test_the_jpeg_section_in_the_summary():
    results = {
        "setup": {"model": "tresnet_m", "precision": "bf16", "batch": 256, "image_size": 224, "files": 16384,
                  "images_written": 4096, "host_cores": 16, "skip_rows": 2, "log_every": 10},
        "images": {"images": 4096, "progressive": 32, "png_named_jpg": 8, "mean_size": [595.0, 473.0], "mib": 600.0,
                   "writing_s": 7.5, "workers": 16, "wall_s": 8.0},
        "train_jpeg": {"images_per_s": 6800.0, "images_per_s_window": 6750.0, "compile_s": 31.0, "host_cores": 5.5,
                       "host_core_ms_per_image": 0.81, "unreadable_images": 0, "wall_s": 70.0,
                       "decoding_lines": ["decoding on the GPU (nvJPEG)"]},
        "train_synthetic": {"images_per_s": 7900.0, "wall_s": 40.0},
        "eval_jpeg": {"error": "RuntimeError: eval.py failed (exit 1): boom"},
    }  # fmt: skip
    results["ratios"] = jpeg_pipeline.ratios(results)
    summary = markdown({"jpeg_pipeline": {"results": results}}, gpu_suite.TARGETS)
    assert "## train.py and eval.py on JPEGs (tresnet_m, bf16, batch 256, 224 px; 16384 files" in summary
    assert "in 7.5 s with 16 processes" in summary
    assert "- train.py, JPEG ÷ synthetic: 0.86× (target ≥ 0.8, met)" in summary
    assert "- eval.py, JPEG ÷ synthetic (steady rates): – (target ≥ 0.7)" in summary
    assert "- host core-ms per training image: 0.81 (target ≤ 1.0, met)" in summary
    assert "| train_jpeg | 6800 | 6750 | 31.0 | 5.5 | 0.81 | 0 | 70 | decoding on the GPU (nvJPEG) |" in summary
    assert "| eval_jpeg | failed: RuntimeError: eval.py failed (exit 1): boom |" in summary


def test_training_rate_and_host_cpu_from_the_metrics_rows():
    windows = [(0, 0), (500.0, 9.0), (1000.0, 0.5), (1200.0, 0.7), (1100.0, 0.6)]  # (images/s, host ms per image)
    rows = [{"time": 100.0 + 2 * k, "step": 10 * k, "images_per_second": rate, "host_ms_per_image": ms}
            for k, (rate, ms) in enumerate(windows)]  # fmt: skip
    samples = [(100.0 + t, 3.0 * t) for t in range(0, 9)]  # 3 cores busy throughout
    finished = jpeg_pipeline.Finished(0, 20.0, 40.0, samples, "")
    figures = jpeg_pipeline.training_figures(rows[1:], batch=64, skip_rows=2, finished=finished)
    # rows at steps 10..40; the window runs from step 20 (t=104) to step 40 (t=108): 1,280 images in 4 s
    assert figures["images_per_s"] == 1150.0
    assert figures["images_per_s_window"] == pytest.approx(320.0)
    assert figures["host_cores"] == pytest.approx(3.0)
    assert figures["host_core_ms_per_image"] == pytest.approx(12e3 / 1280)
    assert figures["columns"] == {"host_ms_per_image": pytest.approx(0.65)}
    assert figures["host_core_ms_per_image_whole_run"] == pytest.approx(40e3 / (40 * 64))
    assert jpeg_pipeline.training_figures(rows[:2], 64, 2, finished)["images_per_s"] is None


@pytest.mark.slow
def test_the_cpu_of_a_command_and_its_children_is_sampled(tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    code = f"import subprocess, sys\n{burn}subprocess.run([sys.executable, '-c', {burn!r}])\n"
    start = time.time()
    finished = jpeg_pipeline.run_command([sys.executable, "-c", code], tmp_path / "log", timeout_s=60)
    assert finished.returncode == 0
    assert 1.2 <= finished.rusage_cpu_s < finished.wall_s + 1.0  # parent and child, reaped
    assert finished.cpu_between(start, time.time()) >= 0.5
    stopped = jpeg_pipeline.run_command([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s", 1.0)
    assert stopped.returncode is None
    assert stopped.wall_s < 30


def test_jpeg_pipeline_skips_what_its_budget_cannot_take(tmp_path):
    plan = dataclasses.replace(gpu_suite.SMOKE, needs=dict(gpu_suite.NEEDS), jpeg_runs=gpu_suite.JPEG_RUNS)
    ctx = gpu_suite.Context(plan, tmp_path, None, None, gpu_suite.torch_device())
    record = gpu_suite.Record(tmp_path / "jpeg_pipeline.json", "jpeg_pipeline")
    gpu_suite.jpeg_pipeline_section(ctx, record, gpu_suite.Budget(10.0))
    reasons = {s["item"]: s["reason"] for s in record.data["skipped"]}
    assert reasons == {"images": "time budget", "train_jpeg": "no images", "train_synthetic": "time budget",
                       "eval_jpeg": "no images", "eval_synthetic": "time budget", "train_jpeg_host": "no images",
                       "eval_jpeg_host": "no images"}  # fmt: skip


def test_more_models_skips_what_this_run_measured_already(tmp_path, monkeypatch):
    rows = [{"runner": "jax", "model": "tresnet_l", "precision": "fp16", "batch_size": 256, "images_per_s": 1.0}]
    (tmp_path / "inference.json").write_text(json.dumps({"results": {"tresnet_l_fp16": {"rows": rows}}}))
    compared, now = [], [0.0]

    def compare(spec, variants, ctx):  # an item takes 90 s
        compared.append(spec)
        now[0] += 90.0
        row = {"runner": "jax", "model": spec.model, "precision": spec.precision, "batch_size": spec.batch_size}
        return {"rows": [{**row, "images_per_s": 300.0}], **gpu_suite.ratios([])}

    monkeypatch.setattr(gpu_suite, "_compare", compare)
    plan = dataclasses.replace(gpu_suite.SMOKE, needs=dict(gpu_suite.NEEDS), more_models=gpu_suite.Plan().more_models)
    ctx = gpu_suite.Context(plan, tmp_path, None, None, gpu_suite.torch_device())
    record = gpu_suite.Record(tmp_path / "more_models.json", "more_models")
    gpu_suite.more_models_section(ctx, record, gpu_suite.Budget(120.0, clock=lambda: now[0]))
    assert [(s.model, s.mode, s.precision) for s in compared] == [("tresnet_xl", "train", "bf16")]
    trained = record.data["results"]["tresnet_xl_bf16_train"]
    assert trained["mode"] == "train"
    assert trained["stated_flops_per_image"] == pytest.approx(3 * 2 * 15.2e9 * (plan.image_size / 224) ** 2)
    assert record.data["skipped"] == [
        {"item": "tresnet_xl_bf16_infer", "reason": "time budget"},
        {"item": "tresnet_l_fp16_infer", "reason": "measured by the inference section"},
        {"item": "tresnet_l_fp16_train", "reason": "time budget"},
        {"item": "tresnet_xl_fp16_infer", "reason": "time budget"},
    ]
    summary = markdown({"more_models": record.data}, gpu_suite.TARGETS)
    assert "| tresnet_xl | bf16 | 256 | 300 | – | – | – | – | – | train |" in summary


def test_photographs_from_a_folder_else_the_bundled_ones(tmp_path, monkeypatch):
    for i, size in enumerate([(300, 200), (64, 96)]):
        photos.generated_image(i, size).save(tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images, source = photos.photographs(32, tmp_path)
    assert (images.shape, images.dtype, source) == ((2, 32, 32, 3), np.float32, f"2 photographs in {tmp_path}")
    assert 0.0 <= images.min() < images.max() <= 1.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        photos.photographs(32, tmp_path / "empty")
    monkeypatch.setattr(photos, "_from_skimage", list)  # a machine without scikit-image
    assert photos.photographs(32)[1] == "4 photographs in notebooks/images"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sections", "inference,speed"], "error: unknown section 'speed'; known: environment, correctness"),
        (["--photos", "no/such/dir"], "error: --photos no/such/dir: no such directory"),
        (["--model", "tresnet_s"], "error: --model tresnet_s: unknown; known: tresnet_m, tresnet_l"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    assert gpu_suite.main(["--output", str(tmp_path / "out"), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_ratios_take_the_best_eager_layout():
    rows = [
        {"runner": "jax", "images_per_s": 300.0},
        {"runner": "timm_eager", "images_per_s": 100.0},
        {"runner": "timm_channels_last", "images_per_s": 200.0},
        {"runner": "timm_compile", "error": "no compiler"},
    ]
    assert gpu_suite.ratios(rows) == {"jax_over_best_eager": 1.5, "jax_over_compile": None}


def test_flops_and_the_peaks_of_the_cards_the_driver_names():
    assert flops_per_image("tresnet_m", 224, "train") == pytest.approx(34.5e9)
    assert flops_per_image("tresnet_m", 448, "infer") == pytest.approx(4 * 11.5e9)
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
             "NVIDIA H200 NVL": 835, "NVIDIA GH200 480GB": 989, "NVIDIA A100-SXM4-80GB": 312,
             "Tesla V100-SXM2-16GB": None}  # fmt: skip
    assert {name: bf16_peak_tflops(name) for name in names} == names


def test_agreement_of_reduced_precision_logits():
    reference = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    assert agreement(reference, reference) == {"relative_l2_vs_fp32": 0.0, "top1_agreement": 1.0, "top5_agreement": 1.0}
    swapped = reference.copy()
    swapped[0, :2] = [4.0, 5.0]  # the first image's top two change places: same top-5 set
    swapped[1, [0, 1]] = [1.5, 0.5]  # the second's fifth and sixth change places
    found = agreement(swapped, reference)
    assert (found["top1_agreement"], found["top5_agreement"]) == (0.5, 0.5)
    assert found["relative_l2_vs_fp32"] == pytest.approx(np.sqrt(2 + 2.5) / np.linalg.norm(reference))


def test_eval_logits_on_the_gpu_path_are_compared_with_pil_s_over_the_images_both_read(tmp_path):
    reference = np.array([[1.0, 2.0, 0.0], [3.0, -1.0, 0.5], [np.nan] * 3, [0.0, 0.0, 4.0]])
    got = reference + np.array([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0] * 3, [0.0, 4.5, 0.0]])
    got[0] = [np.nan] * 3  # unread on one side: left out
    np.savez(tmp_path / "gpu.npz", logits=got)
    np.savez(tmp_path / "pil.npz", logits=reference)
    found = jpeg_pipeline.logits_agreement(tmp_path / "gpu.npz", tmp_path / "pil.npz")
    assert found["images"] == 2
    assert found["max_abs_over_max_abs"] == pytest.approx(4.5 / 4.0)
    assert found["relative_l2"] == pytest.approx(4.5 / np.sqrt(9 + 1 + 0.25 + 16))
    assert found["top1_agreement"] == 0.5  # the last image's top-1 moved to class 1
