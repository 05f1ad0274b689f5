"""The benchmark end to end on a tiny configuration (no timing is asserted): tests/tiny_model.py's
TResNet on both sides, registered in JAX and in timm; its batch-size search, and its one-line
errors; bench/ml_decoder.py's two heads on the same weights, its share arithmetic and errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bench import benchmark, ml_decoder
from bench.gpu.max_batch import largest_fitting
from bench.report import add_speedups
from bench.spec import BenchSpec
from bench.timing import Timing
from bench.xla_profile import program_ops
from tests.tiny_model import NAME as TINY_MODEL
from tests.tiny_model import register_in_timm
from tresnet_jax.model.layers import conv2d

TINY = ["--model", TINY_MODEL, "--image-size", "64", "--warmup", "1", "--windows", "2", "--steps", "1",
        "--no-compilation-cache"]  # fmt: skip
ROW_FIELDS = {
    "runner", "framework", "model", "mode", "precision", "batch_size", "image_size", "images_per_s", "step_ms",
    "windows_ms", "spread", "first_call_s", "compile_s", "peak_memory_bytes",
}  # fmt: skip


def read(path):
    document = json.loads(path.read_text())
    assert set(document) >= {"environment", "config", "results"}
    assert document["environment"]["versions"]["jax"]
    assert document["environment"]["cpu_cores"] >= 1
    return document["results"]


@pytest.fixture
def tiny_everywhere(tiny_model):
    """tresnet_tiny in JAX's registry during the test and in timm's (where it stays: timm has no
    way to remove a model, and a model of a test's own name disturbs nothing)."""
    register_in_timm()
    return tiny_model


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_everywhere")
def test_inference_sweep_writes_rows_for_both_frameworks_and_a_png(tmp_path, capsys):
    compare = ["--compare", "timm", "--timm-variants", "eager"]
    args = [*TINY, "--mode", "infer", "--sweep", "--batch-sizes", "1,2", *compare]
    assert benchmark.main([*args, "--output", str(tmp_path)]) == 0
    rows = read(tmp_path / "tresnet_tiny_infer_fp32_64px_sweep.json")
    expected = [("jax", 1), ("timm_eager", 1), ("jax", 2), ("timm_eager", 2)]
    assert [(r["runner"], r["batch_size"]) for r in rows] == expected
    for row in rows:
        assert set(row) >= ROW_FIELDS
        assert row["images_per_s"] > 0
        assert len(row["windows_ms"]) == 2
        assert row["jax_speedup"] > 0
    assert rows[0]["compile_s"] > 0
    assert rows[0]["xla_temp_bytes"] > 0
    png = (tmp_path / "tresnet_tiny_infer_fp32_64px_sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "| timm_eager | 2 |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_everywhere")
def test_training_step_runs_for_both_frameworks(tmp_path):
    args = [*TINY, "--mode", "train", "--batch-size", "2", "--compare", "timm", "--timm-variants", "eager"]
    assert benchmark.main([*args, "--output", str(tmp_path)]) == 0
    rows = read(tmp_path / "tresnet_tiny_train_fp32_64px_b2.json")
    assert [r["runner"] for r in rows] == ["jax", "timm_eager"]
    assert all(set(r) >= ROW_FIELDS and r["mode"] == "train" for r in rows)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "error: batch size must be >= 1, got 0"),
        (["--model", "tresnet_s"], "error: unknown model 'tresnet_s'"),
        (["--image-size", "102"], "error: image size must be a positive multiple of 4, got 102"),
        (["--sweep", "--batch-sizes", "4,x"], "error: --batch-sizes must be comma-separated integers"),
        (["--compare", "timm", "--timm-variants", "eager,jit"], "error: unknown timm variant 'jit'"),
        (["--windows", "0"], "error: --windows must be >= 1, got 0"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    assert benchmark.main([*flags, "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("capacity", "start", "limit", "resolution", "expected"),
    [(300, 8, 1024, 1, 300), (300, 8, 1024, 16, 288), (5000, 8, 1024, 1, 1024), (0, 8, 64, 1, 0), (3, 8, 64, 1, 3)],
)
def test_largest_fitting_batch_search(capacity, start, limit, resolution, expected):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= capacity

    found = largest_fitting(fits, start, limit, resolution)
    assert found == expected
    assert all(b <= limit for b in tried)
    assert len(tried) <= 2 * limit.bit_length() + 2


def test_speedup_is_jax_over_each_runner_at_the_same_batch():
    rows = [
        {"runner": "jax", "batch_size": 8, "images_per_s": 30.0},
        {"runner": "timm_eager", "batch_size": 8, "images_per_s": 20.0},
        {"runner": "timm_compile", "batch_size": 8, "error": "no compiler"},
    ]
    speedups = [r.get("jax_speedup") for r in add_speedups(rows)]
    assert speedups == [1.0, 1.5, None]


def test_a_torch_compile_that_fails_becomes_a_failure_row(monkeypatch):
    def no_compiler(spec, variant, device):
        raise RuntimeError("no working C++ compiler\nlong details")

    monkeypatch.setattr(benchmark, "timm_runner", no_compiler)
    row = benchmark.timm_runner_or_failure(BenchSpec(), "compile", None)
    assert row["runner"] == "timm_compile"
    assert row["error"] == "RuntimeError: no working C++ compiler"
    with pytest.raises(RuntimeError):
        benchmark.timm_runner_or_failure(BenchSpec(), "eager", None)


def test_profile_categories_of_convolutions_and_their_gradients():
    """As in a training step: weights are arguments, the images get no gradient."""

    def loss(w1, w2, x):
        return jnp.sum(conv2d(conv2d(x, w1), w2) ** 2)

    w1, w2, x = jnp.ones((3, 3, 4, 16)), jnp.ones((3, 3, 16, 24)), jnp.ones((2, 8, 8, 4))
    ops = program_ops(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w1, w2, x).compile().as_text())
    categories = [op.category for op in ops.values() if op.category.startswith("conv")]
    assert sorted(categories) == ["conv forward"] * 2 + ["conv input-gradient"] + ["conv weight-gradient"] * 2


# --- the CPU path of the convolutions (what the benchmark drove) against the plain one -----------


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_pointwise_matmul_path_equals_the_convolution_with_gradients(kernel_size):
    rng = np.random.default_rng(kernel_size)
    x = jnp.asarray(rng.normal(size=(2, 7, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 6, 4)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(2, 7, 5, 4)), jnp.float32)
    plain, plain_vjp = jax.vjp(lambda x, w: conv2d(x, w, pointwise_as_matmul=False), x, w)
    fast, fast_vjp = jax.vjp(lambda x, w: conv2d(x, w, pointwise_as_matmul=True), x, w)
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_vjp(dy), plain_vjp(dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_steps_compile_convolutions_with_xla_unless_defaults_are_asked_for(monkeypatch):
    """The library's compiled steps keep XLA:CPU's convolutions off YNNPACK (BENCHMARKS.md)."""
    from tresnet_jax.runtime.xla_options import DEFAULTS_VARIABLE, compiler_options

    x, w = jnp.ones((1, 16, 16, 32)), jnp.ones((3, 3, 32, 32))  # large enough for YNNPACK to take it

    def program(options):
        return jax.jit(conv2d, compiler_options=options).lower(x, w).compile().as_text().lower()

    assert "ynn" in program({})
    assert "ynn" not in program(compiler_options())
    monkeypatch.setenv(DEFAULTS_VARIABLE, "1")
    assert compiler_options() == {}


# --- bench/ml_decoder.py ---------------------------------------------------------------------
PARITY_BOUND = 1e-4  # tests/test_parity.py's bound on max |diff| / max(1, max |reference|)


@pytest.mark.usefixtures("tiny_model")
def test_our_ml_decoder_gives_the_official_head_s_logits_with_its_weights():
    """The benchmark's two heads compute the same thing: timm's copy of the official head, run on
    PyTorch 2 through the benchmark's patch, with our weights in its layout, on the same feature
    maps (a 2x2 map of tests/tiny_model.py's 512 features, 7 classes in 3 groups, 2 outputs
    each)."""
    spec = ml_decoder.check(ml_decoder.DecoderSpec(TINY_MODEL, 64, 7, 3, "fp32", 2))
    runners, agreement = ml_decoder.head_runners(spec, torch.device("cpu"))
    assert [r.name for r in runners] == ["jax_head", "official_head"]
    assert agreement["max_abs_diff_over_max_abs"] <= PARITY_BOUND
    assert 0 < agreement["relative_l2"] <= PARITY_BOUND
    for runner in runners:
        runner.run(1)


def test_the_head_s_share_is_read_two_ways():
    timings = {name: Timing(s, (s,)) for name, s in (("ml_decoder_step", 2.0), ("fc_step", 1.5), ("head_alone", 0.4))}
    assert ml_decoder.share_of(timings) == {
        "step_s_ml_decoder": 2.0, "step_s_fc": 1.5, "head_alone_s": 0.4, "share_by_difference": 0.25,
        "share_by_head_alone": 0.2,
    }  # fmt: skip
    assert ml_decoder.flops_share_of({"ml_decoder_step": 10.0, "fc_step": 9.0}) == {"flops_share": 0.1}
    assert ml_decoder.flops_share_of({"ml_decoder_step": 10.0}) == {"flops_share": None}  # no count from XLA


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image-size", "100"], "error: image size must be a multiple of 32 (the head reads the /32 map), got 100"),
        (["--num-groups", "81"], "error: num_groups 81 is more than the 80 classes"),
        (["--windows", "0"], "error: --warmup must be >= 0, --windows and --steps >= 1"),
    ],
)
def test_ml_decoder_bench_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    assert ml_decoder.main([*flags, "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())
