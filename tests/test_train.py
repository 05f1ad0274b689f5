"""train.py: it learns, it is data parallel over devices and hosts without changing the result,
it resumes exactly, it handles fp16 overflow, fine-tuning and bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import eval as eval_cli
import predict as predict_cli
import train as train_cli
import tresnet_jax
from tests.blocked_imports import run_without
from tests.multihost import describe, run_processes
from tests.reference import random_timm_model
from tests.tfds_folders import prepare_from_folders
from tresnet_jax.errors import InputError
from tresnet_jax.initialization import random_variables
from tresnet_jax.model import TResNet
from tresnet_jax.parallel import BATCH_AXIS, data_mesh, replicate, shard_batch
from tresnet_jax.storage import read_variables
from tresnet_jax.trainer import TrainConfig, check_memory, initial_variables, suggest_batch_size
from tresnet_jax.training import OptimConfig, create_state, make_optimizer, make_train_step

REPO = Path(__file__).resolve().parent.parent
SIZE = 32
VAL_IMAGES = 400


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's 1797 handwritten digits (8x8) as PNG folders, upscaled to 32x32: 1397 to
    train on, 400 held out."""
    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.images))
    for k, i in enumerate(order):
        folder = root / ("val" if k < VAL_IMAGES else "train") / f"digit{data.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (data.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for this module's runs, in and out of process: the
    same training program compiled once serves the reference and the resumed runs."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def exported(workdir: Path, name: str = "export") -> dict:
    return read_variables(workdir / name)


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# --- learning for real ------------------------------------------------------------------------


def test_learns_digits_and_exports_weights_eval_can_read(digits, tmp_path, capsys):
    """From scratch, 2 epochs of 1397 digits at 32x32 with AdamW: held-out top-1 >= 90 %
    (measured 98.25 %). One device: the multi-device tests below cover sharding, and a single
    copy of the optimizer update keeps this, the suite's longest test, short."""
    workdir = tmp_path / "run"
    args = ["--model", "tresnet_m", "--train_dir", digits / "train", "--val_dir", digits / "val",
            "--image-size", SIZE, "--batch-size", 32, "--epochs", 2, "--optimizer", "adamw", "--lr", 2e-3,
            "--randaugment-ops", 0, "--cutout", 0, "--no-flip", "--crop-min-scale", 0.7, "--ema-decay", 0,
            "--eval-every", 0, "--workdir", workdir, "--no-progress", "--no-compilation-cache", "--num-devices", 1]
    assert train_cli.main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    final = metrics(workdir)[-1]
    assert final["step"] == 2 * (1397 // 32)
    assert final["val_top1"] >= 90.0, final
    assert "compiled the training step in" in out
    config = json.loads((workdir / "config.json").read_text())
    assert (config["lr"], config["label_smoothing"], config["schedule"]) == (2e-3, 0.1, "onecycle")
    # The export is a weights directory: tresnet_jax.load and eval.py read it and agree.
    model, _ = tresnet_jax.load(workdir / "export")
    metadata = tresnet_jax.load_metadata(workdir / "export")
    assert (model.num_classes, metadata["source"]["step"]) == (10, final["step"])
    assert metadata["class_names"] == [f"digit{d}" for d in range(10)]
    # predict.py names the dataset's classes.
    image = next((digits / "val" / "digit3").iterdir())
    assert predict_cli.main([str(image), "--model", str(workdir / "export")]) == 0
    top5 = capsys.readouterr().out.splitlines()[-5:]
    assert all(re.fullmatch(r"\s+\d+\.\d\d%  digit\d", line) for line in top5), top5
    results = tmp_path / "eval.json"
    code = eval_cli.main([str(a) for a in ["--weights", workdir / "export", "--val_dir", digits / "val",
                                           "--batch-size", 40, "--output", results, "--no-progress"]])
    assert code == 0
    assert json.loads(results.read_text())["top1"] == pytest.approx(final["val_top1"])


# --- the same run on 1 device, 2 devices, 2 processes, and stopped and resumed ----------------

TINY = ["--model", "tresnet_m", "--image-size", SIZE, "--batch-size", 8, "--max-steps", 4,
        "--checkpoint-every", 2, "--log-every", 1, "--lr", 0.05, "--eval-every", 0, "--no-progress"]


def tiny_args(digits, workdir, *extra):
    return [str(a) for a in [*TINY, "--train_dir", digits / "train", "--workdir", workdir, *extra]]


def train_command(digits, workdir, *extra):
    return [sys.executable, REPO / "train.py", *tiny_args(digits, workdir, *extra)]


def one_device_env(compilation_cache):
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "TRESNET_JAX_COMPILATION_CACHE": compilation_cache}


@pytest.fixture(scope="module")
def reference_run(digits, tmp_path_factory, compilation_cache):
    """4 steps of batch 8 in a process with one device, uninterrupted; its compiled program is
    cached for the killed and restarted runs."""
    workdir = tmp_path_factory.mktemp("reference")
    done = subprocess.run([str(a) for a in train_command(digits, workdir)], env=one_device_env(compilation_cache),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir


def distance_relative_to_training(got: dict, want: dict, start: dict) -> float:
    """|got - want| / |want - start|, Euclidean norms over all the arrays of the trees at once:
    how far apart two trained results are, relative to how far training moved them."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    got, want, start = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])
                        for tree in (got, want, start))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want - start))


def test_two_devices_follow_the_same_loss_curve(digits, tmp_path, reference_run):
    """Same global batch on 1 and 2 devices: only the order of float32 additions differs (the
    gradient pmean, the BatchNorm statistics). From the same state one step of each differs by
    about 1e-6 of the update in norm (a few roundings, 6e-8, times the cancellation in the
    gradient sums), but this recipe is unstable (peak lr right after a one-step warm-up; the
    loss jumps to 11.6 at step 3) and steps 3-4 magnify any difference in the weights ~300-fold.
    The final weights then differ by up to 1.3e-4 in single elements (the small updates of the
    zero-initialised BatchNorms ending residual branches), and the in-device order does it too:
    1 device with XLA:CPU's default convolutions against 1 device with ours differ as much as
    1 against 2 or 4 devices. An element-wise tolerance is a lottery on the CPU (SIMD widths,
    kernels). Measured over those orderings: losses within 2.5e-6, the weights' distance 8e-6
    to 2.1e-4 of their training update, the BatchNorm statistics' 3e-6 to 6e-6. The bounds
    (1e-4, 1e-2, 1e-3) leave 40-180x for other CPUs, and real bugs land far beyond them: a psum
    for the pmean (gradients doubled) gives losses 1.2e-2 apart at step 2, weights 1.8 and
    statistics 0.20; per-device BatchNorm statistics 1.5e-2 at step 1, 1.1 and 0.23."""
    assert train_cli.main(tiny_args(digits, tmp_path, "--num-devices", 2, "--no-compilation-cache")) == 0
    one, two = metrics(reference_run), metrics(tmp_path)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    start, _ = initial_variables(TrainConfig(workdir=str(tmp_path)), 10)
    for collection, bound in (("params", 1e-2), ("batch_stats", 1e-3)):
        distance = distance_relative_to_training(
            exported(tmp_path)[collection], exported(reference_run)[collection], start[collection]
        )
        assert distance < bound, (collection, distance)


def test_two_processes_end_with_the_parameters_of_one(digits, tmp_path, reference_run):
    """Multi-host for real: 2 processes on localhost joined by jax.distributed (gloo CPU
    collectives), one device each, the global batch split between them; compared as 1 and 2
    devices are, for the same reasons (only the order of additions differs)."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "TRESNET_JAX_COMPILATION_CACHE": "off"}
    results = run_processes(train_command(digits, tmp_path), 2, env=env, timeout=420)
    assert all(r.returncode == 0 for r in results), describe(results)
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(tmp_path)], [r["loss"] for r in metrics(reference_run)], rtol=1e-4
    )
    start, _ = initial_variables(TrainConfig(workdir=str(tmp_path)), 10)
    for collection, bound in (("params", 1e-2), ("batch_stats", 1e-3)):  # why: the test above
        distance = distance_relative_to_training(
            exported(tmp_path)[collection], exported(reference_run)[collection], start[collection]
        )
        assert distance < bound, (collection, distance)


def test_killed_and_restarted_run_ends_exactly_like_an_uninterrupted_one(digits, tmp_path, reference_run,
                                                                        compilation_cache):
    """SIGKILL right after the step-2 checkpoint, then the same command again: bit-identical
    weights to the uninterrupted run in the same conditions (one device, same program)."""
    env = one_device_env(compilation_cache)
    command = [str(a) for a in train_command(digits, tmp_path)]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "2").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    output = run.communicate()[0]
    assert (tmp_path / "checkpoints" / "2").exists(), output
    assert not (tmp_path / "export").exists(), "the run finished before it could be killed"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from the checkpoint at step 2" in again.stdout
    for name in ("export", "export_ema"):
        assert_trees_equal(exported(tmp_path, name), exported(reference_run, name))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference_run)]


def test_sigterm_checkpoints_the_current_step_and_the_same_command_resumes_bit_equal(
    digits, tmp_path, reference_run, compilation_cache
):
    """SIGTERM as soon as training starts (a spot machine reclaimed): the run stops after the
    step in flight, between scheduled checkpoints, writes that step's checkpoint and says so;
    the same command then ends with the uninterrupted run's weights, bit for bit."""
    env = one_device_env(compilation_cache)
    command = [str(a) for a in train_command(digits, tmp_path)]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.startswith("compiled the training step"):
            run.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + run.communicate(timeout=120)[0]
    assert run.returncode == 128 + signal.SIGTERM, output
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 4: checkpoint (\S+); the same command continues", output)
    assert stopped, output
    step = int(stopped.group(1))
    assert 1 <= step < 4, output
    print(output)
    assert Path(stopped.group(2)) == tmp_path / "checkpoints" / str(step)
    assert (tmp_path / "checkpoints" / str(step)).exists()
    assert not (tmp_path / "export").exists()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from the checkpoint at step {step}" in again.stdout
    for name in ("export", "export_ema"):
        assert_trees_equal(exported(tmp_path, name), exported(reference_run, name))
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference_run)]


def subset(folder: Path, per_class: int, target: Path) -> Path:
    """The first ``per_class`` images of each class folder, copied under ``target``."""
    for class_folder in sorted(folder.iterdir()):
        (target / class_folder.name).mkdir(parents=True)
        for image in sorted(class_folder.iterdir())[:per_class]:
            shutil.copy(image, target / class_folder.name)
    return target


def test_trains_from_a_tfds_dataset_and_validates_on_its_validation_split(digits, tmp_path):
    """A split in 3 shards of 30 records (read by index across shards), its validation split beside it."""
    data_dir = tmp_path / "tfds"
    splits = {"train": subset(digits / "train", 9, tmp_path / "train"), "validation": subset(digits / "val", 4,
                                                                                             tmp_path / "val")}
    name = prepare_from_folders("DigitsForTest", data_dir, splits, num_shards=3)
    workdir = tmp_path / "run"
    args = [*TINY, "--dataset", name, "--data_dir", data_dir, "--workdir", workdir, "--no-compilation-cache"]
    assert train_cli.main([str(a) for a in args]) == 0
    rows = metrics(workdir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert rows[-1]["step"] == 4
    assert 0 <= rows[-1]["val_top1"] <= 100  # evaluated on the 40 held-out digits
    assert (workdir / "export_ema" / "metadata.json").exists()


def test_resuming_with_other_settings_is_refused(digits, reference_run, capsys):
    code = train_cli.main(tiny_args(digits, reference_run, "--lr", "0.1", "--no-compilation-cache"))
    assert code == 1
    assert "holds a run with other settings (lr 0.05 -> 0.1); use a new --workdir" in capsys.readouterr().err


# --- precision ---------------------------------------------------------------------------------


def test_fp16_overflow_skips_the_step_and_halves_the_loss_scale():
    """On a TResNet of one block per stage (XLA:CPU compiles float16 slowly), the real step."""
    mesh = data_mesh(jax.devices()[:1])
    arch = tresnet_jax.ArchSpec(layers=(1, 1, 1, 1), width_factor=0.25)
    model = TResNet(arch, 10, dtype=jnp.float16, axis_name=BATCH_AXIS)
    cfg = OptimConfig(total_steps=10, lr=0.1, precision="fp16", loss_scale=2.0**100)
    tx = make_optimizer(cfg)
    variables = random_variables(arch, 10)
    state = replicate(create_state(variables, tx, cfg, seed=0), mesh)
    rng = np.random.default_rng(0)
    batch = shard_batch(
        {"image": rng.integers(0, 255, (2, SIZE, SIZE, 3), dtype=np.uint8), "label": np.array([1, 2], np.int32)}, mesh
    )
    step = make_train_step(model, tx, cfg, mesh)
    before = jax.device_get(state.params)
    state, out = step(state, batch)  # 2**100 times the loss overflows float16 in the backward pass
    assert (float(out["finite"]), float(state.loss_scale), int(state.step)) == (0.0, 2.0**99, 1)
    assert_trees_equal(jax.device_get(state.params), before)
    state = state.replace(loss_scale=jnp.asarray(2.0**10, jnp.float32))
    state, out = step(state, batch)
    assert float(out["finite"]) == 1.0
    assert np.isfinite(float(out["loss"]))
    after = jax.device_get(state.params)
    shortcut = ("body", "layer4", "0", "downsample", "1", "bn", "scale")  # residual branches start at zero
    for path in (("head", "fc", "kernel"), ("body", "conv1", "conv", "kernel"), shortcut):
        old, new = before, after
        for key in path:
            old, new = old[key], new[key]
        assert not np.array_equal(old, new), path


def test_diverging_loss_stops_without_writing_a_bad_checkpoint(digits, tmp_path, capsys):
    args = tiny_args(digits, tmp_path, "--checkpoint-every", "1", "--lr", "1e30", "--num-devices", "1",
                     "--no-compilation-cache")
    assert train_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "training stopped and no checkpoint was written after it" in err
    assert err.count("\n") == 1
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [] or max(saved) < int(err.split(" at step ")[1].split()[0])
    assert not (tmp_path / "export").exists()


# --- fine-tuning, memory, bad input ---------------------------------------------------------------


def test_fine_tuning_keeps_the_backbone_and_replaces_the_head(tmp_path):
    reference = random_timm_model("tresnet_m", seed=2)
    checkpoint = tmp_path / "tresnet_m.pth"
    torch.save(reference.state_dict(), checkpoint)
    cfg = TrainConfig(workdir=str(tmp_path / "run"), init=str(checkpoint), num_classes=10)
    variables, how = initial_variables(cfg, 10)
    assert "backbone loaded, a new 10-class head (it had 1000)" in how
    np.testing.assert_array_equal(
        variables["params"]["body"]["layer3"]["2"]["conv2"]["conv"]["kernel"],
        reference.state_dict()["body.layer3.2.conv2.conv.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["body"]["conv1"]["bn"]["var"], reference.state_dict()["body.conv1.bn.running_var"]
    )
    assert variables["params"]["head"]["fc"]["kernel"].shape == (2048, 10)
    with pytest.raises(InputError, match="checkpoint does not match tresnet_l"):
        initial_variables(TrainConfig(workdir="x", model="tresnet_l", init=str(checkpoint)), 10)


def test_out_of_memory_names_the_batch_and_the_largest_that_fits():
    assert suggest_batch_size(temp_bytes=8 << 30, fixed_bytes=1 << 30, limit_bytes=4 << 30,
                              per_device_batch=64, devices=8) == 8 * 22

    class Analysis:
        temp_size_in_bytes, argument_size_in_bytes, output_size_in_bytes, alias_size_in_bytes = 8 << 30, 1 << 30, 0, 0

    class Compiled:
        def memory_analysis(self):
            return Analysis()

    class Device:
        process_index = 0

        def memory_stats(self):
            return {"bytes_limit": 4 << 30}

    class Mesh:
        devices = np.array([Device()] * 8)

    with pytest.raises(InputError, match=r"batch size 512 needs 9.0 GiB per device, more than the 4.0 GiB available; "
                                         r"the largest that fits is about 176"):
        check_memory(Compiled(), Mesh(), 512)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--dataset", "no_such_dataset", "--data_dir", "/nonexistent"], "dataset no_such_dataset is not prepared"),
     (["--batch-size", "3", "--num-devices", "2"], "batch size 3 does not split over 2 devices"),
     (["--init", "tresnet_xxl"], "no weights 'tresnet_xxl'"),
     (["--init", "tresnet_xl"], "timm/tresnet_xl.miil_in1k: model.safetensors is not in the Hugging Face cache")],
)
def test_bad_input_is_one_line_and_exit_1(digits, tmp_path, capsys, extra, message, weights_root):
    args = [*TINY, "--workdir", str(tmp_path), *extra]
    if "--dataset" not in extra:
        args += ["--train_dir", str(digits / "train")]
    assert train_cli.main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1


def test_unknown_model_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--model", "resnet50", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'resnet50'" in capsys.readouterr().err


def test_trains_on_a_folder_without_tensorflow_and_passes_over_a_corrupt_jpeg(digits, tmp_path):
    """As on a GPU machine with no TensorFlow: train.py reads a folder, and a JPEG that cannot
    be decoded is named, counted and replaced; training goes on."""
    train_dir = subset(digits / "train", 2, tmp_path / "train")
    (train_dir / "digit1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a JPEG header, no image
    images = sum(1 for _ in train_dir.rglob("*.*"))
    workdir = tmp_path / "run"
    args = [str(a) for a in [*TINY, "--train_dir", train_dir, "--workdir", workdir, "--batch-size", images,
                             "--max-steps", 1, "--num-devices", 1, "--no-compilation-cache"]]
    done = run_without({"tensorflow", "tensorflow_datasets"}, f"import sys, train; sys.exit(train.main({args!r}))")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"unreadable training image {train_dir / 'digit1' / 'broken.jpg'}: unreadable image" in done.stdout
    assert metrics(workdir)[-1]["unreadable_images"] == 1
    assert (workdir / "export" / "metadata.json").exists()
