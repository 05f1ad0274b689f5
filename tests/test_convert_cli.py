"""The converter on bad and unusual input: one clear line, a non-zero exit, nothing written."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import tresnet_jax
from tests.reference import random_timm_model, torch_logits
from tresnet_jax.cli import convert as torch_to_flax

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def m_state_dict():
    return random_timm_model("tresnet_m", seed=5).state_dict()


def run(args, capsys):
    code = torch_to_flax.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_fails(args, capsys, message, root=None):
    code, _, err = run(args, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert message in lines[0], lines[0]
    if root is not None:
        assert not root.exists() or not any(root.iterdir()), list(root.iterdir())
    return lines[0]


def test_missing_file(tmp_path, weights_root, capsys):
    assert_fails([tmp_path / "nope.pth"], capsys, "nope.pth: no such file", weights_root)


def test_directory_is_not_a_checkpoint(tmp_path, weights_root, capsys):
    assert_fails([tmp_path], capsys, "is a directory", weights_root)


def test_text_file_is_not_a_checkpoint(tmp_path, weights_root, capsys):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    assert_fails([path], capsys, "not a PyTorch checkpoint", weights_root)


def test_truncated_checkpoint(tmp_path, weights_root, m_state_dict, capsys):
    path = tmp_path / "full.pth"
    torch.save(m_state_dict, path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_fails([cut], capsys, "truncated or corrupt checkpoint", weights_root)


def test_corrupt_safetensors(tmp_path, weights_root, m_state_dict, capsys):
    path = tmp_path / "model.safetensors"
    save_file(m_state_dict, str(path))
    path.write_bytes(path.read_bytes()[:1000])
    assert_fails([path], capsys, "truncated or corrupt safetensors file", weights_root)


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_execution_is_refused_and_never_runs(tmp_path, weights_root, capsys):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"body.conv1.0.weight": Payload(marker)}}, path)
    message = assert_fails([path], capsys, "refused: the pickle would import", weights_root)
    assert "system (possible code execution)" in message
    assert not marker.exists()


def test_plain_pickle_with_code_is_refused(tmp_path, weights_root, capsys):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"body.conv1.0.weight": Payload(marker)}, f, protocol=4)
    assert_fails([path], capsys, "refused by the safe (weights-only) loader", weights_root)
    assert not marker.exists()


def test_other_architecture_names_the_keys(tmp_path, weights_root, capsys):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    message = assert_fails([path], capsys, "not a TResNet checkpoint", weights_root)
    assert "missing body.conv1.conv.weight" in message
    assert "unexpected conv1.weight, bn1.weight, bn1.bias and" in message


def test_damaged_tresnet_names_missing_unexpected_and_mismatched(tmp_path, weights_root, m_state_dict, capsys):
    state_dict = dict(m_state_dict)
    del state_dict["body.layer3.4.conv1.conv.weight"]
    state_dict["body.layer3.4.extra.weight"] = torch.zeros(3)
    state_dict["body.layer1.0.se.fc1.weight"] = torch.zeros(32, 64, 1, 1)
    path = tmp_path / "damaged.pth"
    torch.save(state_dict, path)
    message = assert_fails([path], capsys, "checkpoint does not match tresnet_m: ", weights_root)
    assert "missing body.layer3.4.conv1.conv.weight" in message
    assert "unexpected body.layer3.4.extra.weight" in message
    assert "shape mismatch: body.layer1.0.se.fc1.weight is (32, 64, 1, 1), expected (64, 64, 1, 1)" in message


def test_model_flag_contradicting_the_tensors(tmp_path, weights_root, m_state_dict, capsys):
    path = tmp_path / "m.pth"
    torch.save(m_state_dict, path)
    message = assert_fails([path, "--model", "tresnet_l"], capsys, "does not match tresnet_l (it looks like tresnet_m)")
    assert "shape mismatch: body.conv1.conv.weight is (64, 48, 3, 3), expected (76, 48, 3, 3)" in message
    assert not weights_root.exists()


def test_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path, weights_root, m_state_dict, capsys):
    path = tmp_path / "m.pth"
    torch.save(m_state_dict, path)
    assert run([path], capsys)[0] == 0
    stored = weights_root / "tresnet_m"
    before = (stored / "metadata.json").read_text()
    # Nothing in "m.pth" names its weights: no tag, no reported accuracy, the model's preprocessing.
    info = tresnet_jax.load_metadata("tresnet_m")
    assert (info.tag, info.reported, info.preprocessing.input_size) == (None, None, 224)
    assert_fails([path], capsys, "exists; pass --force to replace it")
    assert (stored / "metadata.json").read_text() == before
    assert run([path, "--force", "--num-classes", "10"], capsys)[0] == 0
    assert tresnet_jax.load_metadata("tresnet_m").num_classes == 10
    assert sorted(p.name for p in weights_root.iterdir()) == ["tresnet_m"]  # no temporary leftovers


@pytest.mark.parametrize(
    ("failure", "exit_code", "message"),
    [
        (OSError(28, "No space left on device"), 1, "error: [Errno 28] No space left on device"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_failure_while_writing_leaves_nothing_and_keeps_the_old_output(
    tmp_path, weights_root, m_state_dict, capsys, monkeypatch, failure, exit_code, message
):
    import orbax.checkpoint as ocp

    path = tmp_path / "m.pth"
    torch.save(m_state_dict, path)
    assert run([path], capsys)[0] == 0
    before = (weights_root / "tresnet_m" / "metadata.json").read_text()

    def fail_midway(self, directory, *args, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "partial").write_bytes(b"half")
        raise failure

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail_midway)
    code, _, err = run([path, "--force"], capsys)
    assert (code, err.strip()) == (exit_code, message)
    assert sorted(p.name for p in weights_root.iterdir()) == ["tresnet_m"]
    assert (weights_root / "tresnet_m" / "metadata.json").read_text() == before


def test_fine_tuning_head_and_wrapped_prefixed_checkpoint(tmp_path, weights_root, m_state_dict, capsys):
    """A DataParallel checkpoint under 'state_dict' with --num-classes 10: the backbone is
    kept, the head replaced, and the tool says so."""
    wrapped = {"state_dict": {f"module.{k}": v for k, v in m_state_dict.items()}, "epoch": 3}
    path = tmp_path / "pytorch_model.bin"
    torch.save(wrapped, path)
    code, out, _ = run([path, "--num-classes", "10", "--name", "m_c10"], capsys)
    assert code == 0
    assert "note: replaced the 1000-class head by a new 10-class one (seed 0)" in out
    model, variables = tresnet_jax.load("m_c10")
    assert model.num_classes == 10
    assert variables["params"]["head"]["fc"]["kernel"].shape == (2048, 10)
    np.testing.assert_array_equal(
        variables["params"]["body"]["conv1"]["conv"]["kernel"],
        m_state_dict["body.conv1.conv.weight"].numpy().transpose(2, 3, 1, 0),
    )
    info = tresnet_jax.load_metadata("m_c10")
    assert (info.tag, info.reported) == (None, None)
    assert info.source.num_classes == 1000


def test_no_head(tmp_path, weights_root, m_state_dict, capsys):
    path = tmp_path / "m.pth"
    torch.save(m_state_dict, path)
    code, out, _ = run([path, "--num-classes", "0"], capsys)
    assert code == 0
    assert "note: dropped the 1000-class head: the model outputs pooled features" in out
    model, variables = tresnet_jax.load("tresnet_m")
    assert "head" not in variables["params"]
    assert model.num_classes == 0


def test_load_of_a_name_neither_stored_nor_cached_says_how_to_fetch_it(weights_root):
    with pytest.raises(tresnet_jax.InputError, match=r"timm/tresnet_xl\.miil_in1k: .* `hf download timm/tresnet_xl"):
        tresnet_jax.load("tresnet_xl")


@pytest.mark.slow
def test_command_line_entry_point(tmp_path, weights_root):
    """The script as a user runs it: usage errors exit 2, bad input exits 1 with one line."""
    script = REPO / "convert" / "torch_to_flax.py"
    env = {**os.environ, "TRESNET_JAX_WEIGHTS": str(weights_root)}
    usage = subprocess.run([sys.executable, script, "x.pth", "--model", "resnet50"], capture_output=True, text=True)
    assert usage.returncode == 2
    assert "invalid choice: 'resnet50'" in usage.stderr
    missing = subprocess.run([sys.executable, script, tmp_path / "x.pth"], capture_output=True, text=True, env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: {tmp_path / 'x.pth'}: no such file"


@pytest.fixture(scope="module")
def decoder_checkpoint():
    """An official ML-Decoder file's content (``tests.ml_decoder_reference``): TResNet-M, 80
    classes, K 80."""
    from tests.ml_decoder_reference import ml_decoder_model, official_checkpoint

    return official_checkpoint(ml_decoder_model("tresnet_m", 80, seed=6), [f"class {i}" for i in range(80)])


def with_head_change(checkpoint: dict, change) -> dict:
    state_dict = dict(checkpoint["model"])
    change(state_dict)
    return {**checkpoint, "model": state_dict}


DECODER = "head.decoder."
BAD_HEADS = {
    "groups": (
        lambda sd: sd.update({DECODER + "duplicate_pooling": sd[DECODER + "duplicate_pooling"][:79]}),
        "head.decoder.duplicate_pooling has 79 groups, head.decoder.query_embed.weight 80 queries",
    ),
    "classes": (  # 81 classes: more than K x g = 80 outputs
        lambda sd: sd.update({DECODER + "duplicate_pooling_bias": torch.zeros(81)}),
        "head.decoder.duplicate_pooling_bias has 81 classes for 80 queries, which ML-Decoder gives "
        "int(81 / 80 + 0.999) = 2 outputs each; head.decoder.duplicate_pooling (80, 768, 1) gives them 1",
    ),
    "partial": (
        lambda sd: sd.pop(DECODER + "layers.0.linear1.weight"),
        "ML-Decoder head, official layout: missing head.decoder.layers.0.linear1.weight",
    ),
    "packed": (
        lambda sd: sd.update({DECODER + "layers.0.multihead_attn.in_proj_weight": torch.zeros(768, 768)}),
        "shape mismatch: head.decoder.layers.0.multihead_attn.in_proj_weight is (768, 768), expected (2304, 768)",
    ),
    "with_fc": (
        lambda sd: sd.update({"head.fc.weight": torch.zeros(80, 2048), "head.fc.bias": torch.zeros(80)}),
        "ML-Decoder head, official layout: unexpected head.fc.weight, head.fc.bias",
    ),
    "mixed": (
        lambda sd: sd.update({"head.embed_standart.bias": sd.pop(DECODER + "embed_standart.bias")}),
        "the ML-Decoder head mixes the official layout (head.decoder.embed_standart, ...) and timm's",
    ),
}


@pytest.mark.parametrize("bad", list(BAD_HEADS))
def test_partial_or_inconsistent_ml_decoder_head(bad, tmp_path, weights_root, decoder_checkpoint, capsys):
    change, message = BAD_HEADS[bad]
    path = tmp_path / "tresnet_m_COCO_224_84_2.pth"
    torch.save(with_head_change(decoder_checkpoint, change), path)
    line = assert_fails([path], capsys, message, weights_root)
    assert line.startswith(f"error: {path}: ")


def test_a_tag_of_another_head_is_refused(tmp_path, weights_root, decoder_checkpoint, capsys):
    """An ML-Decoder checkpoint under an fc head's tag, and an fc checkpoint under an
    ML-Decoder's tag, of the same architecture and classes: one line, nothing written."""
    decoder = tmp_path / "decoder.pth"
    torch.save(decoder_checkpoint, decoder)
    assert_fails(
        [decoder, "--tag", "tresnet_m.asl_coco_224"],
        capsys,
        "tag tresnet_m.asl_coco_224 has the head fc, the weights the head ML-Decoder (K 80)",
        weights_root,
    )
    fc = tmp_path / "fc.pth"
    reference = random_timm_model("tresnet_m", num_classes=80, seed=5)
    torch.save(reference.state_dict(), fc)
    assert_fails(
        [fc, "--tag", "tresnet_m.ml_decoder_coco_224"],
        capsys,
        "tag tresnet_m.ml_decoder_coco_224 has the head ML-Decoder (K 80), the weights the head fc",
        weights_root,
    )


def test_multi_label_conversion_gives_eval_the_map_scikit_learn_gives_timm(tmp_path, weights_root, tiny_model, capsys):
    """An untagged timm checkpoint converted with --multi-label --classes is recorded multi-label
    with those names, and eval.py's mAP on a labels CSV is scikit-learn's (macro AP over the
    classes with a positive, as tresnet_jax.metrics defines mAP: a class never shown is left
    out) of timm's logits of the same preprocessed images. Its head is fitted (ridge regression
    on the random backbone's features) to scores spread over [-5, 5], which differ from image to
    image. AP depends on each class's order of the images alone, and both orders are the same
    when every gap between two images' scores exceeds twice the largest difference between the
    two sets of logits (checked): then only float64 summation differs (1e-9 of a percent
    bounds it), and the printed mAP, rounded to 3 decimals, is within 5e-4 of it."""
    from sklearn.metrics import average_precision_score

    from tests import tiny_model as tiny
    from tests.classifier import pil_preprocess
    from tests.multilabel_digits import CLASS_NAMES, write_canvases
    from tresnet_jax.cli import eval as eval_cli
    from tresnet_jax.data.labels_csv import CsvSource

    tiny.register_in_timm()
    _, val_csv = write_canvases(tmp_path / "digits", train_images=0, val_images=32, seed=4)
    source = CsvSource.read(val_csv)
    files = [val_csv.parent / row for row in source.files]
    size = 32
    images = np.stack([pil_preprocess(path, size) for path in files])
    names = [*CLASS_NAMES, "unshown"]  # a class of the weights with no positive in the CSV
    reference = random_timm_model(tiny_model, num_classes=len(names), seed=9)
    fit_head(reference, images, np.random.default_rng(9).uniform(-5.0, 5.0, (len(files), len(names))))
    path = tmp_path / "model.pth"
    torch.save(reference.state_dict(), path)
    class_file = tmp_path / "classes.txt"
    class_file.write_text("\n".join(names) + "\n")

    code, _, err = run([path, "--multi-label", "--classes", class_file, "--name", "digits"], capsys)
    assert code == 0, err
    info = tresnet_jax.load_metadata("digits")
    assert (info.multi_label, info.class_names, info.tag) == (True, tuple(names), None)

    output, saved = tmp_path / "eval.json", tmp_path / "logits.npz"
    args = ["--weights", "digits", "--val-labels", val_csv, "--image-size", size, "--batch-size", 8, "--no-progress"]
    assert eval_cli.main([str(a) for a in [*args, "--output", output, "--save-logits", saved]]) == 0
    printed = capsys.readouterr().out
    expected_scores = torch_logits(reference, images)
    ours = np.load(saved)["logits"]
    gaps = np.diff(np.sort(expected_scores, axis=0), axis=0).min()
    assert gaps > 2 * np.abs(ours - expected_scores).max()
    targets = np.zeros((len(files), len(names)), np.int64)
    for row, labels in enumerate(source.labels):
        targets[row, [names.index(source.class_names[c]) for c in labels]] = 1
    shown = targets.sum(0) > 0
    assert not shown[-1]
    assert shown[:-1].sum() >= 8
    sklearn_map = 100 * average_precision_score(targets[:, shown], expected_scores[:, shown], average="macro")
    assert json.loads(output.read_text())["mAP"] == pytest.approx(sklearn_map, abs=1e-9)
    printed_map = float(re.search(r"mAP (\d+\.\d{3})", printed).group(1))
    assert abs(printed_map - sklearn_map) <= 5e-4 + 1e-9

    # The same declaration where eval.py converts the file in memory: the same mAP; undeclared,
    # the file's head is single-label and multi-label data is refused in one line.
    from_file = ["--weights", path, "--val-labels", val_csv, "--classes", class_file, *args[4:]]
    on_the_fly = tmp_path / "on_the_fly.json"
    assert eval_cli.main([str(a) for a in [*from_file, "--multi-label", "--output", on_the_fly]]) == 0
    assert json.loads(on_the_fly.read_text())["mAP"] == json.loads(output.read_text())["mAP"]
    capsys.readouterr()
    assert eval_cli.main([str(a) for a in from_file]) == 1
    refused = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 1
    assert refused[0].endswith("a PyTorch file: --multi-label)")


def fit_head(model: torch.nn.Module, images: np.ndarray, wanted: np.ndarray) -> None:
    """Set the fc head to the ridge regression of ``wanted`` scores on the pooled features."""
    with torch.no_grad():
        features = model.forward_head(model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)), True)
    features = features.numpy().astype(np.float64)
    centred = features - features.mean(0)
    weight = np.linalg.solve(centred.T @ centred + np.eye(centred.shape[1]), centred.T @ wanted)
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.from_numpy(weight.T.astype(np.float32)))
        model.head.fc.bias.copy_(torch.from_numpy((wanted.mean(0) - features.mean(0) @ weight).astype(np.float32)))
