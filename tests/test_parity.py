"""Converted weights reproduce timm, for every variant and both checkpoint layouts.

Each case: a timm model with every tensor random -> saved as a checkpoint file -> converted
by the command-line tool -> loaded by name or path -> Flax outputs vs timm outputs in float32
(the official layout of the variants other than tresnet_m: converted in memory, see
``variant``).
Bound: max |diff| <= 1e-4 * max(1, max |reference|), on logits and every stage's features.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import tresnet_jax
from tests.reference import (
    official_state_dict,
    parity_error,
    random_images,
    random_timm_model,
    timm_name,
    torch_logits,
    torch_stage_features,
)
from tresnet_jax.cli import convert as torch_to_flax
from tresnet_jax.cli import to_torch as flax_to_torch
from tresnet_jax.model.registry import resolve
from tresnet_jax.weights.conversion import convert_state_dict, variables_to_state_dict

PARITY_BOUND = 1e-4
IMAGES = random_images(2, 64, 64, seed=7)
# Key counts of the official checkpoints (TRESNET.md): proves the test's official layout is real.
OFFICIAL_KEYS = {"tresnet_m": 374, "tresnet_l": 535, "tresnet_xl": 649, "tresnet_l_v2": 642, "tresnet_v2_l": 642}
TIMM_KEYS = {"tresnet_m": 434, "tresnet_l": 620, "tresnet_xl": 752, "tresnet_l_v2": 746, "tresnet_v2_l": 746}
# The official TResNet-L-V2's only published weights have 196 classes; with that many the
# converter recognises the official model (slopes 1e-6) without being told.
CLASSES = {"tresnet_l_v2": 196}


@functools.cache
def forward_all(model):
    """One compiled function giving the logits and the five feature maps; one a model, for both
    checkpoint layouts (compiling is most of a case's time on the CPU)."""
    return jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="stage_features")))


def convert_cli(args):
    assert torch_to_flax.main([str(a) for a in args]) == 0


# tresnet_m in the fast tier, every variant in the full run.
@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=() if name == "tresnet_m" else pytest.mark.slow) for name in OFFICIAL_KEYS],
)
def variant(request, tmp_path_factory):
    """Per variant: timm references for both layouts and their conversions, as (timm model, the
    converted model's name, Linen model, variables, the checkpoint's key count). The timm layout
    goes through the command line and a weights directory for every variant; the official
    layout does for tresnet_m, and through ``convert_state_dict`` (what the command line calls)
    for the others: reading a file and storing the result do not depend on the variant, and
    writing and reading a large model's weights directory takes seconds."""
    name = request.param
    classes = CLASSES.get(name, 1000)
    work = tmp_path_factory.mktemp(name)
    cases = {}
    for layout, seed in (("timm", 0), ("official", 1)):
        reference = random_timm_model(name, classes, seed=seed, positive_gammas=layout == "official")
        state_dict = reference.state_dict()
        if layout == "official":
            state_dict = {"model": official_state_dict(reference, seed), "epoch": 300}
            keys = len(state_dict["model"])
        else:
            keys = len(state_dict)
        if layout == "official" and name != "tresnet_m":
            converted = convert_state_dict({k: v.numpy() for k, v in state_dict["model"].items()})
            model = tresnet_jax.TResNet(converted.model.arch, converted.checkpoint_classes)
            cases[layout] = (reference, converted.model_name, model, converted.variables, keys)
            continue
        path = work / f"{name}_{layout}.pth"
        torch.save(state_dict, path)
        # timm's tresnet_v2_l tensors are ambiguous with 1000 classes: name the model there.
        model_flag = ["--model", name] if layout == "timm" and name == "tresnet_l_v2" else []
        convert_cli([path, "--output", work / layout, *model_flag])
        model, variables = tresnet_jax.load(work / layout)
        cases[layout] = (reference, tresnet_jax.load_metadata(work / layout).model, model, variables, keys)
    return name, cases, work


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_converted_logits_and_stage_features_equal_timm(variant, layout):
    name, cases, _ = variant
    reference, converted_name, model, variables, keys = cases[layout]
    assert keys == (OFFICIAL_KEYS if layout == "official" else TIMM_KEYS)[name]
    assert converted_name == name
    logits, stages = forward_all(model)(variables, IMAGES)
    assert parity_error(logits, torch_logits(reference, IMAGES)) <= PARITY_BOUND
    for ours, theirs in zip(stages, torch_stage_features(reference, IMAGES), strict=True):
        assert ours.shape == theirs.shape
        assert parity_error(ours, theirs) <= PARITY_BOUND


def test_round_trip_flax_torch_flax_is_exact_and_timm_loads_strictly(variant, tmp_path):
    name, cases, work = variant
    reference, _, _, variables, _ = cases["timm"]
    out = tmp_path / "back.safetensors"
    assert flax_to_torch.main([str(work / "timm"), str(out)]) == 0
    from safetensors.torch import load_file

    state_dict = load_file(out)
    fresh = timm.create_model(timm_name(name), num_classes=CLASSES.get(name, 1000))
    fresh.load_state_dict(state_dict, strict=True)
    loaded = fresh.state_dict()
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key
    again = convert_state_dict({k: v.numpy() for k, v in state_dict.items()}, resolve(name)).variables
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, jax.tree_util.tree_map(np.asarray, variables))


@pytest.fixture(scope="module")
def tresnet_m_timm(tmp_path_factory):
    reference = random_timm_model("tresnet_m", seed=3)
    path = tmp_path_factory.mktemp("m") / "model.safetensors"
    save_file(reference.state_dict(), str(path))
    converted = convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()})
    return reference, path, tresnet_jax.TResNet(tresnet_jax.ARCHITECTURES["tresnet_m"]), converted.variables


@pytest.mark.slow
@pytest.mark.parametrize(("height", "width"), [(368, 368), (132, 200)])
def test_large_and_non_square_inputs(tresnet_m_timm, height, width):
    """368: the transfer recipes' (flowers102, cars196), not a multiple of 32 (stage 3's 23 x 23
    halved: rounded up); 132 x 200: sides that are multiples of 4 (the space-to-depth stem) but
    not of 32, odd at every stride (ceil-mode pooling, blur padding), and not square. The
    published 448 runs in tests/test_ml_decoder_parity.py (tresnet_v2_l at 448 with ML-Decoder)."""
    reference, _, model, variables = tresnet_m_timm
    images = random_images(1, height, width, seed=height)
    logits, stages = forward_all(model)(variables, images)
    assert parity_error(logits, torch_logits(reference, images)) <= PARITY_BOUND
    assert parity_error(stages[-1], torch_stage_features(reference, images)[-1]) <= PARITY_BOUND


@pytest.mark.slow
def test_imagenet21k_head_from_safetensors(tmp_path, weights_root):
    reference = random_timm_model("tresnet_m", num_classes=11221, seed=4)
    path = tmp_path / "tresnet_m.miil_in21k" / "model.safetensors"
    path.parent.mkdir()
    save_file(reference.state_dict(), str(path))
    convert_cli([path])  # stored by name in the weights root
    info = tresnet_jax.load_metadata("tresnet_m")
    assert (info.num_classes, info.tag) == (11221, "tresnet_m.miil_in21k")
    model, variables = tresnet_jax.load("tresnet_m")
    logits = jax.jit(model.apply)(variables, IMAGES)
    assert logits.shape == (2, 11221)
    assert parity_error(logits, torch_logits(reference, IMAGES)) <= PARITY_BOUND


def test_training_mode_forward_and_batch_statistics_equal_timm(tresnet_m_timm):
    """BatchNorm in training mode: batch statistics for the output, and PyTorch's running
    statistics update (momentum 0.1, unbiased variance)."""
    reference, _, model, variables = tresnet_m_timm
    reference = copy.deepcopy(reference).train()  # the fixture is shared: train a copy
    images = random_images(4, 64, 64, seed=11)
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    for key, value in variables_to_state_dict({"batch_stats": updates["batch_stats"]}).items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_allclose(value, reference.state_dict()[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
    # Batch statistics of 4 small images amplify float32 rounding: measured 3.7e-5.
    assert parity_error(logits, expected) <= PARITY_BOUND


# Measured on these 8 random 64x64 images and random weights: relative L2 error of the logits
# 3.5e-3 (bfloat16) and 4.9e-4 (float16) at 224x224; see the README for the figures.
REDUCED_PRECISION_BOUNDS = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(REDUCED_PRECISION_BOUNDS))
def test_reduced_precision_against_float32(tresnet_m_timm, dtype):
    reference, _, model, variables = tresnet_m_timm
    images = random_images(8, 64, 64, seed=12)
    expected = torch_logits(reference, images)
    logits = np.asarray(jax.jit(model.clone(dtype=dtype).apply)(variables, images))
    assert logits.dtype == np.float32
    relative_l2 = np.linalg.norm(logits - expected) / np.linalg.norm(expected)
    assert relative_l2 <= REDUCED_PRECISION_BOUNDS[dtype]
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
