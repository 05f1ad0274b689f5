"""eval.py against an independent computation: PIL preprocessing and the timm model with the
same weights (tests/tiny_model.py's TResNet, in JAX's registry and timm's:
what eval.py does with a model does not depend on its size; parity on the published variants
is tests/test_parity.py's)."""

import json
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny_model
from tests.blocked_imports import run_without
from tests.classifier import CLASSIFIER_SIZE, pil_preprocess
from tests.tfds_folders import corrupt_record, prepare_from_folders
from tresnet_jax.cli import convert as torch_to_flax
from tresnet_jax.cli import eval as eval_cli
from tresnet_jax.data.gpu_decode import BatchDecoder
from tresnet_jax.data.tfds_reader import open_split
from tresnet_jax.runtime.parallel import data_mesh

pytestmark = pytest.mark.usefixtures("tiny_model")  # eval.py finds tresnet_tiny by its tensors
SIZE = CLASSIFIER_SIZE  # small inputs keep the model cheap on CPU
# eval.py's pixels equal the reference's (both are PIL's), so its logits differ from timm's only
# by float32 arithmetic in two frameworks: the parity tests' bound for the same inputs.
LOGIT_BOUND = 1e-4


def test_weights_and_data_of_other_label_kinds_are_one_line_before_anything_is_compiled(
    folder, classifier, tmp_path, capsys
):
    """Single-label weights on multi-label data (a labels CSV) and multi-label weights on a
    single-label folder: one line each, no results written."""
    images = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png") and "corrupt" not in p.name)
    rows = "".join(f"{path},{path.parent.name}\n" for path in images[:4])
    (tmp_path / "labels.csv").write_text("image,labels\n" + rows)
    code, _, err = run_eval(eval_args(classifier, tmp_path, "--val-labels", tmp_path / "labels.csv"), capsys)
    assert_one_line_error(code, err, "these weights are single-label (one class an image) but ")
    assert "is multi-label (several classes an image): evaluate multi-label weights" in err
    _, weights, *_ = classifier
    multi = tmp_path / "multi"
    assert torch_to_flax.main([str(weights), "--output", str(multi), "--multi-label"]) == 0
    capsys.readouterr()
    args = ["--weights", multi, "--val_dir", folder, "--output", tmp_path / "results.json", "--no-progress"]
    code, _, err = run_eval(args, capsys)
    assert_one_line_error(code, err, "these weights are multi-label (several classes an image) but ")
    assert "evaluate them on multi-label data" in err
    assert not (tmp_path / "results.json").exists()


def top_k_accuracy(logits, labels, k):
    top = np.argsort(-logits, axis=1)[:, :k]
    return 100 * np.mean([label in row for label, row in zip(labels, top, strict=True)])


def run_eval(args, capsys):
    code = eval_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def eval_args(classifier, tmp_path, *extra):
    _, weights, *_ = classifier
    return [
        "--weights",
        weights,
        "--image-size",
        SIZE,
        "--no-progress",
        "--output",
        tmp_path / "results.json",
        "--save-logits",
        tmp_path / "logits.npz",
        *extra,
    ]


def test_folder_eval_equals_pil_and_timm(folder, classifier, tmp_path, capsys):
    _, _, expected, labels, files = classifier
    code, out, _ = run_eval(eval_args(classifier, tmp_path, "--val_dir", folder, "--batch-size", 8), capsys)
    assert code == 0, out
    results = json.loads((tmp_path / "results.json").read_text())
    saved = np.load(tmp_path / "logits.npz")
    readable = np.isin(saved["files"], files)
    np.testing.assert_array_equal(saved["files"][readable], files)
    logits = saved["logits"][readable]
    assert np.abs(logits - expected).max() <= LOGIT_BOUND * max(1.0, np.abs(expected).max())
    np.testing.assert_array_equal(saved["labels"][readable], labels)
    assert results["images"] == len(files) == 20
    assert results["top1"] == pytest.approx(top_k_accuracy(expected, labels, 1))
    assert results["top5"] == pytest.approx(top_k_accuracy(expected, labels, 5))
    assert 10 < results["top1"] < 100  # the fitted head makes top-1 a real test
    loss = -np.mean(torch.log_softmax(torch.from_numpy(expected), -1).numpy()[np.arange(20), labels])
    assert results["loss"] == pytest.approx(loss, rel=1e-3)
    # The corrupt file is skipped, counted and listed, its row left empty.
    assert results["skipped"] == 1
    assert results["skipped_images"][0]["image"].endswith("n01440764/corrupt.jpg")
    assert np.isnan(saved["logits"][~readable]).all()
    assert (saved["labels"][~readable] == -1).all()
    assert "skipped 1" in out
    assert f"images 20 | top-1 {results['top1']:.3f}" in out
    assert (results["model"], results["dtype"], results["preprocessing"]["input_size"]) == (
        tiny_model.NAME,
        "float32",
        SIZE,
    )


@pytest.mark.slow
def test_eval_reads_a_folder_without_tensorflow(folder, classifier, tmp_path):
    """As on a GPU machine with neither TensorFlow nor TFDS: the same results, the corrupt file
    skipped and named, and the time to the first batch reported."""
    _, _, expected, labels, _ = classifier
    args = [str(a) for a in eval_args(classifier, tmp_path, "--val_dir", folder, "--batch-size", 8)]
    code = f"{tiny_model.REGISTER}import eval; sys.exit(eval.main({args!r}))"
    done = run_without({"tensorflow", "tensorflow_datasets"}, code)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["images"], results["skipped"]) == (20, 1)
    assert results["top1"] == pytest.approx(top_k_accuracy(expected, labels, 1))
    assert f"skipped {folder / 'n01440764' / 'corrupt.jpg'}: unreadable image" in done.stdout
    assert re.search(
        r"seconds: set-up [\d.]+ .*, compile [\d.]+, first batch [\d.]+, evaluation [\d.]+ .*, "
        r"in all [\d.]+ since the command started",
        done.stdout,
    ), done.stdout
    assert 0 < results["first_batch_seconds"] <= results["wall_seconds"]


@pytest.mark.parametrize("devices", [1, 2, 3])
def test_every_image_counted_once_on_any_device_count(folder, classifier, tmp_path, capsys, devices):
    """21 files (one corrupt) in global batches of 2 per device: none divides the set."""
    _, _, expected, labels, _ = classifier
    args = eval_args(classifier, tmp_path, "--val_dir", folder, "--batch-size", 2 * devices, "--num-devices", devices)
    code, out, _ = run_eval(args, capsys)
    assert code == 0, out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["images"], results["skipped"], results["devices"]) == (20, 1, devices)
    assert results["top1"] == pytest.approx(top_k_accuracy(expected, labels, 1))
    saved = np.load(tmp_path / "logits.npz")
    assert np.isfinite(saved["logits"]).all(axis=1).sum() == 20


@pytest.mark.slow
def test_sharded_tfds_split_rows_follow_the_split_and_a_corrupt_record_is_named(
    folder, classifier, tmp_path, capsys, weights_root
):
    """A split in 2 shards of 20 records (TFDS interleaves shards in blocks of 16 when it reads a
    whole split), one record corrupted after writing: row i of --save-logits is record i of the
    split as TFDS itself reads it (split[i:i+1]), and the corrupt record is skipped and named by
    its index. Weights by the name they were converted under."""
    import tensorflow_datasets as tfds

    model, checkpoint, *_ = classifier
    assert torch_to_flax.main([str(checkpoint), "--name", "m_8cls"]) == 0  # --model takes this name
    capsys.readouterr()
    doubled = tmp_path / "doubled"  # 20 readable images twice: 40 records
    for path in folder.rglob("*.*"):
        if "corrupt" not in path.name:
            for copy in ("a", "b"):
                (doubled / path.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, doubled / path.parent.name / f"{copy}_{path.name}")
    data_dir = tmp_path / "tfds"
    name = prepare_from_folders("TinyImages", data_dir, {"validation": doubled}, num_shards=2)
    builder = tfds.builder_from_directory(str(next(data_dir.glob("*/*/dataset_info.json")).parent))
    assert builder.info.splits["validation"].shard_lengths == [20, 20]
    reference, labels = [], []
    for i in range(40):  # TFDS decodes record i; the reference preprocessing and timm score it
        example = next(iter(tfds.as_numpy(builder.as_dataset(split=f"validation[{i}:{i + 1}]"))))
        labels.append(int(example["label"]))
        Image.fromarray(example["image"]).save(tmp_path / "record.png")
        with torch.no_grad():
            image = torch.from_numpy(pil_preprocess(tmp_path / "record.png", SIZE)).permute(2, 0, 1)[None]
            reference.append(model(image)[0].numpy())
    reference = np.stack(reference)
    split = open_split(f"{name}:validation", str(data_dir))
    broken = 27  # TFDS itself would stop at it (its reader checks every record's checksum)
    corrupt_record(next(data_dir.glob("*/*/*validation*-00001-of-00002")), split.record(broken)[0])

    args = eval_args(classifier, tmp_path, "--dataset", f"{name}:validation", "--data_dir", data_dir, "--batch-size", 8)
    args[:2] = ["--model", "m_8cls"]
    code, out, _ = run_eval(args, capsys)
    assert code == 0, out
    assert f"weights: weights 'm_8cls' from {weights_root / 'm_8cls'}" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "tiny_images/1.0.0:validation"
    assert (results["images"], results["skipped"]) == (39, 1)
    assert results["skipped_images"][0]["image"] == f"tiny_images/1.0.0:validation[{broken}]"
    assert f"skipped tiny_images/1.0.0:validation[{broken}]: unreadable image" in out
    saved = np.load(tmp_path / "logits.npz")
    readable = np.arange(40) != broken
    assert np.isnan(saved["logits"][broken]).all()
    assert saved["labels"][broken] == -1
    np.testing.assert_array_equal(saved["labels"][readable], np.asarray(labels)[readable])
    bound = LOGIT_BOUND * max(1.0, np.abs(reference).max())
    assert np.abs(saved["logits"][readable] - reference[readable]).max() <= bound
    top1 = top_k_accuracy(reference[readable], np.asarray(labels)[readable], 1)
    assert results["top1"] == pytest.approx(top1)


def assert_one_line_error(code, err, message):
    assert code == 1
    assert err.strip().count("\n") == 0, err
    assert err.startswith("error: "), err
    assert message in err, err


def test_empty_folder(classifier, tmp_path, capsys):
    (tmp_path / "empty" / "n01440764").mkdir(parents=True)
    code, _, err = run_eval(eval_args(classifier, tmp_path, "--val_dir", tmp_path / "empty"), capsys)
    assert_one_line_error(code, err, "no images in its 1 class folders")
    assert not (tmp_path / "results.json").exists()


def test_missing_dataset_says_how_to_prepare_it(classifier, tmp_path, capsys):
    code, _, err = run_eval(eval_args(classifier, tmp_path, "--data_dir", tmp_path / "none"), capsys)
    assert_one_line_error(code, err, "dataset imagenet2012 is not prepared")
    assert f"tfds build imagenet2012 --data_dir {tmp_path / 'none'}" in err
    code, _, err = run_eval(eval_args(classifier, tmp_path, "--dataset", "imagenette", "--data_dir", tmp_path), capsys)
    assert_one_line_error(code, err, f"prepare it with: tfds build imagenette --data_dir {tmp_path}")


def test_class_count_mismatch(folder, classifier, tmp_path, capsys):
    shutil.copytree(folder, tmp_path / "val")
    shutil.rmtree(tmp_path / "val" / "n01514668")
    code, _, err = run_eval(eval_args(classifier, tmp_path, "--val_dir", tmp_path / "val"), capsys)
    assert_one_line_error(code, err, "the model has 8 classes but")
    assert "has 7 (n01440764, n01443537, n01484850, ...): these weights do not fit this dataset" in err


def test_batch_size_must_split_over_devices(folder, classifier, tmp_path, capsys):
    args = eval_args(classifier, tmp_path, "--val_dir", folder, "--batch-size", 5, "--num-devices", 2)
    code, _, err = run_eval(args, capsys)
    assert_one_line_error(code, err, "batch size 5 does not split over 2 devices")


def test_gpu_decoding_without_a_gpu_is_one_line_before_anything_is_written(classifier, folder, tmp_path, capsys):
    code, _, err = run_eval(eval_args(classifier, tmp_path, "--val_dir", folder, "--decode", "gpu"), capsys)
    assert_one_line_error(code, err, "--decode gpu: ")
    assert not (tmp_path / "results.json").exists()


def test_batched_decoding_evaluates_the_same_images_as_pil(folder, classifier, tmp_path, capsys, monkeypatch):
    """--decode gpu's path with its decoder on the CPU: the same images read and skipped, in the
    same order, with the same labels; the pixels within a level of PIL's (tests/test_gpu_decode.py),
    so the logits stay close to timm's on PIL's pixels (a box off by a pixel row moves them far
    more)."""
    _, _, expected, labels, files = classifier
    decoder = BatchDecoder.cpu()
    monkeypatch.setattr(eval_cli, "select_decoder", lambda choice, index: (decoder, None))
    args = eval_args(classifier, tmp_path, "--val_dir", folder, "--batch-size", 8, "--decode", "gpu")
    code, out, _ = run_eval(args, capsys)
    assert code == 0, out
    results = json.loads((tmp_path / "results.json").read_text())
    saved = np.load(tmp_path / "logits.npz")
    assert results["decoder"] == decoder.name
    assert decoder.counts["decoded"] > 0
    assert "images decoded" in out
    readable = np.isin(saved["files"], files)
    np.testing.assert_array_equal(saved["files"][readable], files)
    np.testing.assert_array_equal(saved["labels"][readable], labels)
    assert (results["images"], results["skipped"]) == (20, 1)
    assert results["skipped_images"][0]["image"].endswith("n01440764/corrupt.jpg")
    assert np.abs(saved["logits"][readable] - expected).max() <= 0.05 * np.abs(expected).max()


def test_evaluation_batch_defaults_to_a_gpus_size_on_a_gpu(monkeypatch):
    mesh = data_mesh(jax.devices()[:2])
    assert eval_cli.default_batch_size(mesh) == 2 * 64
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert eval_cli.default_batch_size(mesh) == 2 * 256
