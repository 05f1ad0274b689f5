"""eval.py as a two-host job: two processes on this machine joined by jax.distributed (gloo CPU
collectives), each with two fake CPU devices, count every image exactly once and agree with a
single-process run."""

import concurrent.futures
import json
import sys

import numpy as np
import pytest

from tests import tiny_model
from tests.classifier import fitted_classifier
from tests.images import image_folder
from tests.multihost import coordinator_flags, describe, run_processes
from tests.multilabel_digits import CLASS_NAMES, write_canvases
from tresnet_jax.cli import eval as eval_cli
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.preprocessing import Preprocessing
from tresnet_jax.weights.info import WeightsInfo
from tresnet_jax.weights.storage import save_weights

pytestmark = pytest.mark.slow  # processes of their own: not in the fast tier

EVAL_WITH_TINY = tiny_model.REGISTER + "import eval\nsys.exit(eval.main(sys.argv[1:]))\n"  # eval.py, tresnet_tiny known
SIZE = 64
PROCESSES, DEVICES_PER_PROCESS = 2, 2
BATCH = 8  # 4 rows per process, 2 per device: divides neither the 21 files nor the 20 readable ones
# Measured: the two-process logits equal the single-process ones bit for bit here (both runs put
# 2 rows on each device); with other rows per device they differ by up to 4.8e-6.
LOGIT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folder_and_weights(tmp_path_factory):
    """tests/tiny_model.py's TResNet fitted to the folder's 8 classes (tests/classifier.py)."""
    folder = image_folder(tmp_path_factory.mktemp("images") / "val")
    tiny_model.register_in_timm()
    path = tmp_path_factory.mktemp("weights") / "tiny_8cls.pth"
    _, weights, *_ = fitted_classifier(folder, path, SIZE, model_name=tiny_model.NAME)
    return folder, weights


def eval_args(folder, weights):
    return [
        "--weights",
        weights,
        "--val_dir",
        folder,
        "--image-size",
        SIZE,
        "--batch-size",
        BATCH,
        "--no-progress",
    ]


@pytest.mark.usefixtures("tiny_model")
def test_two_processes_count_every_image_once(folder_and_weights, tmp_path, capsys):
    folder, weights = folder_and_weights
    out = tmp_path / "out"
    out.mkdir()

    def flags(address, n, i):  # each process is told to write its own files: only process 0 may
        return [
            *coordinator_flags(address, n, i),
            "--output",
            out / f"results{i}.json",
            "--save-logits",
            out / f"logits{i}.npz",
        ]

    command = [sys.executable, "-c", EVAL_WITH_TINY, *eval_args(folder, weights)]
    env = {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        "TRESNET_JAX_WEIGHTS": str(tmp_path / "no_weights"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    # The two processes spend much of their time starting and compiling on one core each: the
    # single-process reference runs here meanwhile.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_processes, command, PROCESSES, env=env, timeout=240, cwd=tmp_path, flags=flags)
        code = eval_cli.main(
            [str(a) for a in eval_args(folder, weights)]
            + ["--output", str(tmp_path / "single.json"), "--save-logits", str(tmp_path / "single.npz")]
        )
        runs = job.result()
    assert code == 0, capsys.readouterr()
    assert [r.returncode for r in runs] == [0] * PROCESSES, describe(runs)
    assert sorted(p.name for p in out.iterdir()) == ["logits0.npz", "results0.json"], describe(runs)
    assert "wrote" not in runs[1].stdout, describe(runs)
    assert "images 20" not in runs[1].stdout, describe(runs)

    results = json.loads((out / "results0.json").read_text())
    assert (results["processes"], results["devices"], results["batch_size"]) == (
        PROCESSES,
        PROCESSES * DEVICES_PER_PROCESS,
        BATCH,
    )
    assert results["images"] == 20
    assert results["skipped"] == 1
    assert results["skipped_images"][0]["image"] == str(folder / "n01440764" / "corrupt.jpg")
    assert "unreadable image" in results["skipped_images"][0]["reason"]
    saved = np.load(out / "logits0.npz")

    # The same evaluation in one process (this one: 4 fake devices, see conftest.py).
    single = json.loads((tmp_path / "single.json").read_text())
    reference = np.load(tmp_path / "single.npz")
    assert single["processes"] == 1
    assert 10 < single["top1"] < 100  # the fitted head makes the comparison of top-1 a real one
    for key in ("images", "skipped", "top1", "top5"):
        assert results[key] == pytest.approx(single[key], abs=1e-5), key
    assert results["loss"] == pytest.approx(single["loss"], rel=1e-5)

    np.testing.assert_array_equal(saved["files"], reference["files"])
    np.testing.assert_array_equal(saved["labels"], reference["labels"])
    readable = np.isfinite(reference["logits"]).all(axis=1)
    assert readable.sum() == 20
    np.testing.assert_array_equal(np.isnan(saved["logits"]), np.isnan(reference["logits"]))
    scale = max(1.0, np.abs(reference["logits"][readable]).max())
    assert np.abs(saved["logits"][readable] - reference["logits"][readable]).max() <= LOGIT_TOLERANCE * scale


@pytest.mark.usefixtures("tiny_model")
def test_two_processes_give_the_multi_label_map_of_one(tmp_path, capsys):
    """Multi-label: the mAP is computed from every image's logits, gathered from both processes;
    it equals the one-process mAP (2 rows a device in both runs: the same logits bit for bit),
    and the missing image is skipped once."""
    _, val_csv = write_canvases(tmp_path / "canvases", train_images=0, val_images=20)
    with open(val_csv, "a") as file:
        file.write("images/missing.png,digit1\n")
    # Multi-label weights as train.py exports them (random ones: the comparison is of two runs).
    weights = tmp_path / "weights"
    metadata = WeightsInfo(
        tiny_model.NAME, len(CLASS_NAMES), multi_label=True, class_names=CLASS_NAMES,
        preprocessing=Preprocessing(32, squish=True),
    )  # fmt: skip
    save_weights(weights, random_variables(tiny_model.SPEC, len(CLASS_NAMES), seed=1), metadata)
    args = ["--weights", weights, "--val-labels", val_csv, "--batch-size", BATCH, "--no-progress"]
    out = tmp_path / "out"
    out.mkdir()
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    flags = lambda address, n, i: [*coordinator_flags(address, n, i), "--output", out / f"results{i}.json"]  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        command = [sys.executable, "-c", EVAL_WITH_TINY, *args]
        job = pool.submit(run_processes, command, PROCESSES, env=env, timeout=240, cwd=tmp_path, flags=flags)
        single_code = eval_cli.main([str(a) for a in [*args, "--output", tmp_path / "single.json"]])
        runs = job.result()
    assert single_code == 0, capsys.readouterr()
    assert [r.returncode for r in runs] == [0] * PROCESSES, describe(runs)
    results = json.loads((out / "results0.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert (results["processes"], single["processes"]) == (PROCESSES, 1)
    assert results["images"] == single["images"] == 20
    assert results["skipped"] == single["skipped"] == 1
    assert results["skipped_images"][0]["image"] == str(val_csv.parent / "images" / "missing.png")
    assert "top1" not in results
    assert results["mAP"] == pytest.approx(single["mAP"], abs=1e-9)
    assert results["per_class_AP"] == pytest.approx(single["per_class_AP"], abs=1e-9)
