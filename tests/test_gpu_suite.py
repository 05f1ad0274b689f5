"""The GPU device suite (``bench/gpu/gpu_suite.py --smoke``, on the CPU, in a process where
TensorFlow cannot be imported, as on the lent GPU machines) and the parts of the GPU path a
CPU can check: true float32 in the compiled steps, BatchNorm per device or synchronised,
metrics read one step late, deterministic GPU kernels on request, eval's default batch."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval as eval_cli
import train as train_cli
import tresnet_jax
from bench.gpu import gpu_suite, photos
from bench.gpu.flops import bf16_peak_tflops, flops_per_image
from bench.gpu.max_batch import bounded_search
from bench.gpu.numerics import agreement
from tests.blocked_imports import blocker
from tests.tiny_model import SPEC as TINY  # one block a stage
from tresnet_jax.evaluation import batch_spec, make_eval_step
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.model.linen import TResNet
from tresnet_jax.runtime.parallel import BATCH_AXIS, data_mesh, replicate, shard_batch
from tresnet_jax.runtime.xla_options import DETERMINISTIC_GPU_FLAG, TF32_VARIABLE, request_deterministic_gpu_ops
from tresnet_jax.train.config import TrainConfig, check_resumable
from tresnet_jax.train.metrics import LaggedMetrics
from tresnet_jax.train.step import OptimConfig, create_state, make_optimizer, make_train_step

REPO = Path(__file__).resolve().parent.parent
PARITY_BOUND = 1e-4  # tests/test_parity.py's bound on max |diff| / max(1, max |timm|)


# --- the suite end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``gpu_suite.py --smoke`` run once: (the finished process, each section's JSON, summary.md)."""
    root = tmp_path_factory.mktemp("smoke")
    (root / "site").mkdir()
    # The suite and every process it starts: TensorFlow is not found, as on the lent machines.
    (root / "site" / "sitecustomize.py").write_text(blocker({"tensorflow", "tensorflow_datasets"}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "site"), str(REPO)]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    command = [sys.executable, str(REPO / "bench" / "gpu" / "gpu_suite.py"), "--smoke", "--output", str(root / "out"),
               "--cache-dir", str(root / "cache")]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    results = {p.stem: json.loads(p.read_text()) for p in (root / "out").glob("*.json")}
    return done, results, (root / "out" / "summary.md").read_text()


def test_smoke_runs_every_section_without_tensorflow(smoke):
    done, results, summary = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(results) == sorted(gpu_suite.SECTIONS)
    for name, record in results.items():
        assert (record["status"], record["failed"], record["skipped"]) == ("done", [], []), name
    assert results["end_to_end"]["results"]["data"]["tensorflow_importable"] is False
    for heading in ("## Correctness", "## Inference", "## Training step", "## Largest training batch", "## End to end"):
        assert heading in summary
    assert "| tresnet_m | fp32 | 2 |" in summary
    assert "## Skipped and failed" not in summary


def test_smoke_correctness_is_timm_parity_in_float32(smoke):
    _, results, _ = smoke
    checks = results["correctness"]["results"]
    assert checks["images"]["shape"] == [12, 32, 32, 3]  # scikit-image's photographs here
    assert checks["fp32"]["matmul_precision"] == "highest"
    assert checks["fp32"]["vs_timm_float32"] <= PARITY_BOUND
    # On the CPU, TF32 is float32: the "TF32" run agrees with float32 to rounding.
    assert checks["fp32_tf32"]["vs_timm_float32"] <= PARITY_BOUND
    assert checks["fp32_tf32"]["relative_l2_vs_fp32"] <= 1e-5
    assert (checks["fp32_tf32"]["top1_agreement"], checks["fp32_tf32"]["top5_agreement"]) == (1.0, 1.0)


def test_smoke_compares_jax_with_timm_and_reads_the_cache_back(smoke):
    _, results, _ = smoke
    inference = results["inference"]["results"]["tresnet_m_fp32"]
    training = results["training"]["results"]["tresnet_m_fp32"]
    for result in (inference, training):
        assert [row["runner"] for row in result["rows"]] == ["jax", "timm_eager", "timm_channels_last"]
        assert all(row["images_per_s"] > 0 for row in result["rows"])
        assert result["jax_over_best_eager"] > 0
        assert result["jax_over_compile"] is None  # no torch.compile in the smoke
    assert training["stated_flops_per_image"] == pytest.approx(3 * 2 * 5.75e9 * (32 / 224) ** 2)
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


def test_smoke_runs_the_library_steps_end_to_end(smoke):
    _, results, _ = smoke
    e2e = results["end_to_end"]["results"]
    assert e2e["evaluation_step"]["images_counted"] == 2 * 2  # a first batch and one timed
    assert e2e["training_step"]["repeatable"] is True  # the CPU is deterministic
    assert np.isfinite(e2e["training_step"]["last_loss"])
    assert e2e["host_jpeg_decoding"]["images"] == 8


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


# --- the GPU path, as far as a CPU can check it -------------------------------------------------

SIZE = 32


@pytest.mark.parametrize(("dtype", "tf32", "highest"), [(jnp.float32, None, True), (jnp.float32, "1", False),
                                                        (jnp.bfloat16, None, False)])  # fmt: skip
def test_float32_steps_are_true_float32_unless_tf32_is_asked_for(dtype, tf32, highest, monkeypatch):
    """The precision the compiled programs carry (XLA:GPU turns TF32 off for HIGHEST)."""
    if tf32:
        monkeypatch.setenv(TF32_VARIABLE, tf32)
    mesh = data_mesh(jax.devices()[:1])
    model = TResNet(TINY, 10, dtype=dtype)
    images = jnp.zeros((1, SIZE, SIZE, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    evaluation = make_eval_step(model, mesh, False).lower(variables, batch_spec(2, SIZE, mesh)).as_text()
    cfg = OptimConfig(total_steps=2, precision="fp32" if dtype == jnp.float32 else "bf16")
    train_model = TResNet(TINY, 10, dtype=dtype, axis_name=BATCH_AXIS)
    tx = make_optimizer(cfg)
    state = jax.eval_shape(lambda: create_state(TResNet(TINY, 10).init(jax.random.key(0), images), tx, cfg, 0))
    batch = {k: v for k, v in batch_spec(2, SIZE, mesh).items() if k in ("image", "label")}
    training = make_train_step(train_model, tx, cfg, mesh).lower(state, batch).as_text()
    for program in (evaluation, training):
        assert program.count("stablehlo.convolution") > 0
        convolutions = [line for line in program.splitlines() if "stablehlo.convolution" in line]
        assert all(("precision HIGHEST" in line) == highest for line in convolutions)


def test_batchnorm_per_device_is_the_mean_of_the_shards_own_steps():
    """--no-sync-bn: each device normalises its shard with the shard's statistics, and the
    gradients and running statistics are averaged, so one step on 2 devices is the mean of one
    step on each half alone (SGD's first step is linear in the gradients). Synchronised
    statistics would not give that: the halves' statistics differ from the whole batch's."""
    cfg = OptimConfig(total_steps=10, lr=0.05, ema_decay=0.0)
    tx = make_optimizer(cfg)
    state = jax.tree_util.tree_map(np.asarray, create_state(random_variables(TINY, 10), tx, cfg, seed=0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    images[4:] //= 3  # the halves differ in their statistics
    labels = rng.integers(0, 10, 8).astype(np.int32)

    def stepper(devices):
        mesh = data_mesh(jax.devices()[:devices])
        step = make_train_step(TResNet(TINY, 10), tx, cfg, mesh)  # no axis_name: per-device statistics

        def run(rows):
            batch = shard_batch({"image": images[rows], "label": labels[rows]}, mesh)
            new, metrics = step(replicate(state, mesh), batch)
            return jax.device_get({"params": new.params, "batch_stats": new.batch_stats}), float(metrics["loss"])

        return run

    two, two_loss = stepper(2)(slice(0, 8))
    one = stepper(1)
    (first, first_loss), (second, second_loss) = one(slice(0, 4)), one(slice(4, 8))
    np.testing.assert_allclose(two_loss, (first_loss + second_loss) / 2, rtol=1e-5)
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, first, second)
    for got, want in zip(jax.tree_util.tree_leaves(two), jax.tree_util.tree_leaves(mean), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_without_synced_batchnorm_the_device_count_is_a_setting_of_the_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(TrainConfig(str(tmp_path), num_devices=2))))
    check_resumable(tmp_path, TrainConfig(str(tmp_path), num_devices=4))  # synchronised: the same result
    stored = TrainConfig(str(tmp_path), num_devices=2, sync_bn=False)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(stored)))
    with pytest.raises(tresnet_jax.InputError, match=r"other settings \(num_devices 2 -> 4\)"):
        check_resumable(tmp_path, TrainConfig(str(tmp_path), num_devices=4, sync_bn=False))
    args = train_cli.parse_args(["--workdir", str(tmp_path), "--no-sync-bn"])
    assert (train_cli.config_from(args).sync_bn, train_cli.DEFAULTS.sync_bn) == (False, True)


def test_metrics_are_read_one_step_late_except_at_checkpoints():
    lagged = LaggedMetrics()
    logged = []
    log_every, sync_at = 2, {5, 6}  # a checkpoint at 5, the end at 6
    for step in range(1, 7):
        windows = lagged.push(step, f"m{step}", log=step % log_every == 0, sync=step in sync_at)
        logged.append((step, [[s for s, _ in window] for window in windows]))
    # the log due at step 2 is read after step 3 was dispatched, the one at 4 after 5; 5 and 6 at once
    assert logged == [(1, []), (2, []), (3, [[1, 2]]), (4, []), (5, [[3, 4], [5]]), (6, [[6]])]


def test_deterministic_gpu_kernels_are_requested_through_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    request_deterministic_gpu_ops()
    request_deterministic_gpu_ops()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {DETERMINISTIC_GPU_FLAG}"
    assert train_cli.parse_args(["--workdir", "w", "--deterministic"]).deterministic


def test_evaluation_batch_defaults_to_a_gpus_size_on_a_gpu(monkeypatch):
    mesh = data_mesh(jax.devices()[:2])
    assert eval_cli.default_batch_size(mesh) == 2 * 64
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert eval_cli.default_batch_size(mesh) == 2 * 256
