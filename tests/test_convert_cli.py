"""The converter on bad and unusual input: one clear line, a non-zero exit, nothing written."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import tresnet_jax
from tests.reference import random_timm_model
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
