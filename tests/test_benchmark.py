"""The benchmark end to end on a tiny configuration (no timing is asserted), its batch-size
search, and its one-line errors."""

import json

import pytest

from bench import benchmark
from bench.max_batch import largest_fitting
from bench.report import add_speedups

TINY = ["--image-size", "64", "--warmup", "1", "--windows", "2", "--steps", "1", "--no-compilation-cache"]
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


def test_inference_sweep_writes_rows_for_both_frameworks_and_a_png(tmp_path, capsys):
    compare = ["--compare", "timm", "--timm-variants", "eager"]
    args = [*TINY, "--mode", "infer", "--sweep", "--batch-sizes", "1,2", *compare]
    assert benchmark.main([*args, "--output", str(tmp_path)]) == 0
    rows = read(tmp_path / "tresnet_m_infer_fp32_64px_sweep.json")
    expected = [("jax", 1), ("timm_eager", 1), ("jax", 2), ("timm_eager", 2)]
    assert [(r["runner"], r["batch_size"]) for r in rows] == expected
    for row in rows:
        assert set(row) >= ROW_FIELDS
        assert row["images_per_s"] > 0
        assert len(row["windows_ms"]) == 2
        assert row["jax_speedup"] > 0
    assert rows[0]["compile_s"] > 0
    assert rows[0]["xla_temp_bytes"] > 0
    png = (tmp_path / "tresnet_m_infer_fp32_64px_sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "| timm_eager | 2 |" in capsys.readouterr().out


def test_training_step_runs_for_both_frameworks(tmp_path):
    args = [*TINY, "--mode", "train", "--batch-size", "2", "--compare", "timm", "--timm-variants", "eager"]
    assert benchmark.main([*args, "--output", str(tmp_path)]) == 0
    rows = read(tmp_path / "tresnet_m_train_fp32_64px_b2.json")
    assert [r["runner"] for r in rows] == ["jax", "timm_eager"]
    assert all(set(r) >= ROW_FIELDS and r["mode"] == "train" for r in rows)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "error: batch size must be >= 1, got 0"),
        (["--model", "tresnet_s"], "error: unknown model 'tresnet_s'"),
        (["--image-size", "100"], "error: image size must be a positive multiple of 32, got 100"),
        (["--sweep", "--batch-sizes", "4,x"], "error: --batch-sizes must be comma-separated integers"),
        (["--compare", "timm", "--timm-variants", "eager,jit"], "error: unknown timm variant 'jit'"),
        (["--windows", "0"], "error: --windows must be >= 1"),
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
