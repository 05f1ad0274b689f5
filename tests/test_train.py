"""train.py: it learns, reads TFDS splits and folders, handles fp16
overflow, diverging losses, fine-tuning and bad input. One run done other ways (devices,
processes, interrupted): test_train_resume.py."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import tresnet_jax
from tests import tiny_model
from tests.reference import random_timm_model
from tests.settings import config
from tests.tfds_folders import prepare_from_folders
from tests.training_runs import SIZE, TINY, assert_trees_equal, metrics, subset, tiny_args
from tresnet_jax.cli import eval as eval_cli
from tresnet_jax.cli import predict as predict_cli
from tresnet_jax.cli import train as train_cli
from tresnet_jax.data.gpu_decode import BatchDecoder
from tresnet_jax.errors import InputError
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import resolve
from tresnet_jax.runtime.parallel import BATCH_AXIS, data_mesh, replicate, shard_batch
from tresnet_jax.train import parts as parts_module
from tresnet_jax.train.checkpoints import initial_variables
from tresnet_jax.train.run import check_memory, suggest_batch_size
from tresnet_jax.train.step import create_state, make_optimizer, make_train_step

# The runs train tresnet_tiny (tests/tiny_model.py), the digits learning one included.
pytestmark = pytest.mark.usefixtures("tiny_model")

# --- learning for real ------------------------------------------------------------------------


@pytest.mark.slow
def test_learns_digits_and_exports_weights_eval_can_read(digits, tmp_path, capsys):
    """From scratch, two epochs of 1397 digits at 32x32 with AdamW: held-out top-1 >= 90 %
    (measured 98.0-98.5 % over seeds 0-2 and both XLA:CPU convolution orderings). The model is
    tresnet_tiny: the same layers and training step as the published variants, which the parity
    tests cover; tresnet_m took 157 s here, 43 of its steps 68 s, for 95.75 % after one epoch.
    One device: the multi-device tests cover sharding."""
    workdir = tmp_path / "run"
    args = [
        "--model",
        tiny_model.NAME,
        "--train_dir",
        digits / "train",
        "--val_dir",
        digits / "val",
        "--image-size",
        SIZE,
        "--batch-size",
        32,
        "--epochs",
        2,
        "--optimizer",
        "adamw",
        "--lr",
        2e-3,
        "--randaugment-ops",
        0,
        "--cutout",
        0,
        "--no-flip",
        "--crop-min-scale",
        0.7,
        "--ema-decay",
        0,
        "--eval-every",
        0,
        "--workdir",
        workdir,
        "--no-progress",
        "--num-devices",
        1,
    ]
    assert train_cli.main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    final = metrics(workdir)[-1]
    assert final["step"] == 2 * (1397 // 32)
    assert final["val_top1"] >= 90.0, final
    assert "compiled the training step in" in out
    config = json.loads((workdir / "config.json").read_text())
    assert (config["optim"]["lr"], config["optim"]["label_smoothing"], config["optim"]["schedule"]) == (
        2e-3,
        0.1,
        "onecycle",
    )
    # The export is a weights directory: tresnet_jax.load and eval.py read it and agree.
    model, _ = tresnet_jax.load(workdir / "weights")
    info = tresnet_jax.load_metadata(workdir / "weights")
    assert (model.num_classes, info.source.step) == (10, final["step"])
    assert info.class_names == tuple(f"digit{d}" for d in range(10))
    # predict.py names the dataset's classes.
    image = next((digits / "val" / "digit3").iterdir())
    assert predict_cli.main([str(image), "--model", str(workdir / "weights")]) == 0
    top5 = capsys.readouterr().out.splitlines()[-5:]
    assert all(re.fullmatch(r"\s+\d+\.\d\d%  digit\d", line) for line in top5), top5
    results = tmp_path / "eval.json"
    code = eval_cli.main(
        [
            str(a)
            for a in [
                "--weights",
                workdir / "weights",
                "--val_dir",
                digits / "val",
                "--batch-size",
                40,
                "--output",
                results,
                "--no-progress",
            ]
        ]
    )
    assert code == 0
    assert json.loads(results.read_text())["top1"] == pytest.approx(final["val_top1"])


@pytest.mark.slow
def test_trains_from_a_tfds_dataset_and_validates_on_its_validation_split(digits, tmp_path):
    """A split in 3 shards of 30 records (read by index across shards), its validation split beside it."""
    data_dir = tmp_path / "tfds"
    splits = {
        "train": subset(digits / "train", 9, tmp_path / "train"),
        "validation": subset(digits / "val", 4, tmp_path / "val"),
    }
    name = prepare_from_folders("DigitsForTest", data_dir, splits, num_shards=3)
    workdir = tmp_path / "run"
    args = [*TINY, "--dataset", name, "--data_dir", data_dir, "--workdir", workdir]
    assert train_cli.main([str(a) for a in args]) == 0
    rows = metrics(workdir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert rows[-1]["step"] == 4
    assert 0 <= rows[-1]["val_top1"] <= 100  # evaluated on the 40 held-out digits
    assert (workdir / "weights_ema" / "metadata.json").exists()


# --- precision ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_overflow_skips_the_step_and_halves_the_loss_scale():
    """On tresnet_tiny (XLA:CPU compiles float16 slowly), the real step."""
    mesh = data_mesh(jax.devices()[:1])
    arch = tiny_model.SPEC
    model = TResNet(arch, 10, dtype=jnp.float16, axis_name=BATCH_AXIS)
    cfg = config(lr=0.1, precision="fp16")
    tx = make_optimizer(cfg, 10)
    variables = random_variables(arch, 10)
    state = create_state(variables, tx, cfg).replace(loss_scale=jnp.asarray(2.0**100, jnp.float32))
    state = replicate(state, mesh)
    rng = np.random.default_rng(0)
    batch = shard_batch(
        {"image": rng.integers(0, 255, (2, SIZE, SIZE, 3), dtype=np.uint8), "label": np.array([1, 2], np.int32)}, mesh
    )
    # Compiled ahead of time: the program refuses inputs of any other type than these.
    step = make_train_step(model, tx, cfg, 10, mesh).lower(state, batch).compile()
    before = jax.device_get(state.params)
    state, out = step(state, batch)  # 2**100 times the loss overflows float16 in the backward pass
    assert (float(out["finite"]), float(state.loss_scale), int(state.step)) == (0.0, 2.0**99, 1)
    assert_trees_equal(jax.device_get(state.params), before)
    # The same program takes the state it returned, a new loss scale in it: replicated inputs
    # have the type of its outputs.
    state = state.replace(loss_scale=replicate(jnp.asarray(2.0**10, jnp.float32), mesh))
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


@pytest.mark.slow
def test_diverging_loss_stops_without_writing_a_bad_checkpoint(digits, tmp_path, capsys):
    args = tiny_args(digits, tmp_path, "--checkpoint-every", "1", "--lr", "1e30")
    assert train_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "training stopped and no checkpoint was written after it" in err
    assert err.count("\n") == 1
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [] or max(saved) < int(err.split(" at step ")[1].split()[0])
    assert not (tmp_path / "weights").exists()


# --- fine-tuning, memory, bad input ---------------------------------------------------------------


def test_fine_tuning_keeps_the_backbone_and_replaces_the_head(tmp_path):
    reference = random_timm_model("tresnet_m", seed=2)
    checkpoint = tmp_path / "tresnet_m.pth"
    torch.save(reference.state_dict(), checkpoint)
    cfg = config(workdir=str(tmp_path / "run"), init=str(checkpoint), num_classes=10)
    variables, how = initial_variables(cfg, resolve(cfg.model.name), 10)
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
        initial_variables(config(workdir="x", model="tresnet_l", init=str(checkpoint)), resolve("tresnet_l"), 10)


def test_out_of_memory_names_the_batch_and_the_largest_that_fits():
    assert (
        suggest_batch_size(temp_bytes=8 << 30, fixed_bytes=1 << 30, limit_bytes=4 << 30, per_device_batch=64, devices=8)
        == 8 * 22
    )

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

    with pytest.raises(
        InputError,
        match=r"batch size 512 needs 9.0 GiB per device, more than the 4.0 GiB available; "
        r"the largest that fits is about 176",
    ):
        check_memory(Compiled(), Mesh(), 512)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "no_such_dataset", "--data_dir", "/nonexistent"], "dataset no_such_dataset is not prepared"),
        (["--batch-size", "3", "--num-devices", "2"], "batch size 3 does not split over 2 devices"),
        (["--init", "tresnet_xxl"], "no weights 'tresnet_xxl'"),
        (["--init", "tresnet_xl"], "timm/tresnet_xl.miil_in1k: model.safetensors is not in the Hugging Face cache"),
        (["--decode", "gpu"], "--decode gpu: "),  # no GPU here: which reason depends on the machine's driver
        (["--decode", "gpu", "--augment", "host"], "--decode gpu hands its crops to the augmentation on the device"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(digits, tmp_path, capsys, extra, message, weights_root):
    workdir = tmp_path / "run"
    args = [*TINY, "--workdir", str(workdir), *extra]
    if "--dataset" not in extra:
        args += ["--train_dir", str(digits / "train")]
    assert train_cli.main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1
    if "--decode" in extra:  # refused before anything is read or written
        assert not workdir.exists()


def test_trains_and_validates_through_the_batched_decoder(digits, tmp_path, monkeypatch, capsys):
    """--decode gpu's path with the decoder on the CPU (the same code as on CUDA): the JPEGs are
    decoded and cropped in batches and reach the training step through DLPack; a progressive
    JPEG goes to the host's decoder for its slot; the final validation decodes in batches too."""
    decoder = BatchDecoder.cpu()
    monkeypatch.setattr(parts_module, "select_decoder", lambda choice, index: (decoder, None))
    folder = tmp_path / "jpegs"
    for k, image in enumerate(sorted((digits / "train").rglob("*.png"))[::40]):
        target = folder / image.parent.name / f"{image.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(image).save(target, quality=90, progressive=k == 3)
    workdir = tmp_path / "run"
    args = [*TINY, "--train_dir", folder, "--val_dir", folder, "--workdir", workdir, "--decode", "gpu"]
    assert train_cli.main([str(a) for a in args]) == 0
    assert json.loads((workdir / "config.json").read_text())["data"]["decode"] == "gpu"
    said = re.search(r"JPEG decoder .*: (\d+) images decoded, (\d+) passed to the host", capsys.readouterr().out)
    assert said, "the run reports what its decoder did"
    assert int(said.group(1)) > 0
    rows = metrics(workdir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert "val_top1" in rows[-1]
    # The 4 steps' 32 images (and up to 2 batches read ahead) and the validation set, less the
    # progressive JPEG, which the host decoded (how: tests/test_gpu_decode.py).
    images = sum(1 for _ in folder.rglob("*.jpg"))
    assert 4 * 8 + images - 2 <= decoder.counts["decoded"] <= 6 * 8 + images - 1


def test_unknown_model_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--model", "resnet50", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    known = ", ".join(tresnet_jax.ARCHITECTURES)
    assert f"--model must be one of {known}, got 'resnet50'" in capsys.readouterr().err
