"""Pretrained weights by name from the Hugging Face hub, offline, against a hub cache laid out
as huggingface_hub lays it (HF_HUB_OFFLINE=1, HF_HUB_CACHE=<tmp>) holding random timm weights."""

import hashlib
import json

import jax
import numpy as np
import pytest
import timm
from flax import traverse_util

import tresnet_jax
from tests.blocked_imports import run_without
from tests.hub_cache import COMMIT, add_repo, timm_files
from tests.reference import parity_error, random_images, random_timm_model, torch_logits
from tresnet_jax.cli import convert as torch_to_flax
from tresnet_jax.cli import predict
from tresnet_jax.factory import choose_weights
from tresnet_jax.preprocessing import Preprocessing
from tresnet_jax.weights.info import WeightsInfo
from tresnet_jax.weights.storage import save_weights

PARITY_BOUND = 1e-4  # as for converted files (test_parity): float32 rounding, far below a wrong tensor
DEFAULT_TAG = "tresnet_m.miil_in21k_ft_in1k"  # timm's default weights of tresnet_m
IMAGES = random_images(2, 64, 64, seed=11)


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The hub cache: timm's default tresnet_m weights, a 5-class TResNet of someone's with
    its own preprocessing, and a repository that is not a TResNet."""
    cache = tmp_path_factory.mktemp("hub_cache")
    reference = random_timm_model("tresnet_m", 1000, seed=7)
    files = timm_files(numpy_state_dict(reference), "tresnet_m", 1000)
    add_repo(cache, f"timm/{DEFAULT_TAG}", files)
    pets = timm_files(numpy_state_dict(random_timm_model("tresnet_m", 5, seed=8)), "tresnet_m", 5)
    config = json.loads(pets["config.json"])
    config["pretrained_cfg"] |= {"input_size": [3, 256, 256], "crop_pct": 0.9, "interpolation": "bicubic"}
    add_repo(cache, "someone/tresnet-pets", {**pets, "config.json": json.dumps(config).encode()})
    add_repo(cache, "someone/resnet18", timm_files(numpy_state_dict(timm.create_model("resnet18")), "resnet18", 1000))
    return {
        "cache": cache,
        "logits": torch_logits(reference, IMAGES),
        "sha256": hashlib.sha256(files["model.safetensors"]).hexdigest(),
    }


@pytest.fixture
def offline(hub, weights_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    return hub


def test_pretrained_by_architecture_equals_timm_and_is_stored_by_tag(offline, weights_root, tmp_path, monkeypatch):
    model, variables = tresnet_jax.create_model("tresnet_m", pretrained=True)
    assert parity_error(jax.jit(model.apply)(variables, IMAGES), offline["logits"]) <= PARITY_BOUND
    info = tresnet_jax.load_metadata(DEFAULT_TAG)
    assert (info.tag, info.reported.top1) == (DEFAULT_TAG, 83.090)
    source = info.source
    assert (source.repo, source.revision, source.sha256, source.file) == (
        f"timm/{DEFAULT_TAG}",
        COMMIT,
        offline["sha256"],
        "model.safetensors",
    )
    assert sorted(p.name for p in weights_root.iterdir()) == [DEFAULT_TAG]
    # The hub cache gone: the second call reads the converted weights, by tag or repository.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    for name in ("tresnet_m", DEFAULT_TAG, f"hf-hub:timm/{DEFAULT_TAG}"):
        _, again = tresnet_jax.load(name)
        for path, leaf in traverse_util.flatten_dict(again).items():
            np.testing.assert_array_equal(leaf, traverse_util.flatten_dict(variables)[path])


@pytest.mark.slow
def test_new_head_with_pretrained_keeps_the_backbone(offline):
    _, pretrained = tresnet_jax.create_model("tresnet_m", pretrained=True)
    model, variables = tresnet_jax.create_model("tresnet_m", pretrained=True, num_classes=7, seed=1)
    assert model.num_classes == 7
    kernel = ("body", "layer3", "2", "conv2", "conv", "kernel")
    np.testing.assert_array_equal(
        traverse_util.flatten_dict(variables["params"])[kernel],
        traverse_util.flatten_dict(pretrained["params"])[kernel],
    )
    # The head is the one a fresh 7-class model with the same seed has.
    _, fresh = tresnet_jax.create_model("tresnet_m", num_classes=7, seed=1)
    np.testing.assert_array_equal(variables["params"]["head"]["fc"]["kernel"], fresh["params"]["head"]["fc"]["kernel"])
    assert jax.jit(model.apply)(variables, IMAGES).shape == (2, 7)


def test_offline_miss_is_one_line_naming_the_repository(offline, weights_root, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray((IMAGES[0] * 255).astype(np.uint8)).save(image)
    assert predict.main([str(image), "--model", "tresnet_l"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: timm/tresnet_l.miil_in1k: model.safetensors is not in the Hugging Face cache and HF_HUB_OFFLINE is "
        "set; fetch it on a connected machine with `hf download timm/tresnet_l.miil_in1k model.safetensors "
        "config.json` (same HF_HUB_CACHE/HF_HOME), or unset HF_HUB_OFFLINE"
    ]
    assert not weights_root.exists() or not any(weights_root.iterdir())


def test_bad_names_and_repositories(offline, weights_root):
    with pytest.raises(tresnet_jax.InputError, match=r"no weights 'tresnet_mm': .*; closest known: tresnet_m, "):
        tresnet_jax.load("tresnet_mm")
    with pytest.raises(tresnet_jax.InputError, match="tresnet_l_v2 has no pretrained weights on the hub"):
        tresnet_jax.load("tresnet_l_v2")
    with pytest.raises(tresnet_jax.InputError, match="not a hub repository"):
        tresnet_jax.load("hf-hub:nobody")
    with pytest.raises(tresnet_jax.InputError, match=r"someone/resnet18: .*not a TResNet checkpoint"):
        tresnet_jax.load("hf-hub:someone/resnet18")
    assert not weights_root.exists() or not any(weights_root.iterdir())  # nothing half-written


def test_other_repositories_keep_their_preprocessing_and_get_no_tag(offline, weights_root):
    model, _ = tresnet_jax.load("hf-hub:someone/tresnet-pets")
    info = tresnet_jax.load_metadata("someone--tresnet-pets")
    assert (model.num_classes, info.tag, info.reported) == (5, None, None)
    assert info.preprocessing == Preprocessing(256, 0.9, "bicubic")


def test_names_resolve_stored_weights_first_then_tags_then_architectures(offline, weights_root):
    _, fresh = tresnet_jax.create_model("tresnet_m", num_classes=10)
    save_weights(weights_root / "tresnet_m", fresh, WeightsInfo("tresnet_m", 10))
    choice = choose_weights("tresnet_m")
    assert (choice.directory, choice.repo) == (weights_root / "tresnet_m", None)
    assert tresnet_jax.load("tresnet_m").model.num_classes == 10
    tag = choose_weights("tresnet_l")
    assert (tag.directory, str(tag.repo)) == (None, "timm/tresnet_l.miil_in1k")
    assert tag.description.startswith("pretrained tresnet_l.miil_in1k (the default weights of tresnet_l), fetched")


def test_converter_takes_a_hub_repository(offline, weights_root, capsys):
    assert torch_to_flax.main([f"hf-hub:timm/{DEFAULT_TAG}", "--name", "m_hub"]) == 0
    out = capsys.readouterr().out
    assert f"fetching timm/{DEFAULT_TAG} from the Hugging Face hub" in out
    assert f"(tag {DEFAULT_TAG})" in out
    assert tresnet_jax.load_metadata("m_hub").source.revision == COMMIT


@pytest.mark.slow
def test_pretrained_path_needs_neither_torch_nor_tensorflow(hub, tmp_path):
    np.save(tmp_path / "images.npy", IMAGES)
    code = f"""
import importlib.util, numpy as np, sys, jax
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("tensorflow") is None
import tresnet_jax
model, variables = tresnet_jax.create_model("tresnet_m", pretrained=True)
logits = tresnet_jax.jit(model.apply)(variables, np.load({str(tmp_path / "images.npy")!r}))
np.save({str(tmp_path / "logits.npy")!r}, np.asarray(logits))
print("imported:", sorted(m for m in ("torch", "tensorflow", "timm") if m in sys.modules))
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub["cache"]), "TRESNET_JAX_WEIGHTS": str(tmp_path / "w")}
    done = run_without({"torch", "torchvision", "timm", "tensorflow", "tensorflow_datasets"}, code, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported: []" in done.stdout
    assert parity_error(np.load(tmp_path / "logits.npy"), hub["logits"]) <= PARITY_BOUND


def test_new_head_from_a_hub_repository_keeps_its_preprocessing_without_the_tag(offline, weights_root, capsys):
    assert torch_to_flax.main([f"hf-hub:timm/{DEFAULT_TAG}", "--num-classes", "3", "--name", "m3"]) == 0
    info = tresnet_jax.load_metadata("m3")
    assert (info.num_classes, info.tag, info.reported) == (3, None, None)
    assert info.preprocessing.input_size == 224
