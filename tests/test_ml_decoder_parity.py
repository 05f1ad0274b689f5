"""ML-Decoder checkpoints (Alibaba-MIIL/ML_Decoder) converted by the command-line tool reproduce
the official head on timm's bodies (``tests/ml_decoder_reference.py``), and go back.

Each case: the official head, random, on a random timm body with non-trivial BatchNorm
statistics -> a checkpoint as the official code saves it (or in timm's layout) -> converted by
the command line, which reads the architecture, K, g, the classes and zero-shot off the tensors
and stores the weights under their name (a published file's: its tag) -> loaded by that name ->
Flax logits vs the reference's in float32. TResNet-M at 96 x 96 (3 x 3 tokens to attend to),
the official layout both ways, in the fast tier; timm's layout (OpenImages' 200 groups), the
default 100 queries (ImageNet-shaped) and ML-Decoder's L at 448 and XL (one image each) in the
full run, L and XL converted in memory by ``convert_checkpoint`` (what the command line calls:
reading a file and storing the result do not depend on the variant, as in test_parity.py).
Bound: test_parity's, max |diff| <= 1e-4 * max(1, max |reference|); the same float32
operations in another order (measured: 8e-7 to 2.3e-6).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import traverse_util

import tresnet_jax
import tresnet_jax.nnx
from tests.ml_decoder_reference import (
    MLDecoder,
    OfficialMLDecoder,
    ZeroShotMLDecoder,
    load_official,
    ml_decoder_model,
    official_checkpoint,
    randomize_head,
    set_word_vectors,
    timm_layout,
)
from tests.reference import parity_error, random_images, torch_logits
from tresnet_jax.cli import convert as torch_to_flax
from tresnet_jax.cli import to_torch as flax_to_torch
from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import ML_DECODER, HeadSpec, variable_shapes
from tresnet_jax.model.ml_decoder import num_queries
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, resolve
from tresnet_jax.weights.conversion import (
    choose_config,
    convert_checkpoint,
    identify,
    variables_to_official_state_dict,
)
from tresnet_jax.weights.ml_decoder_layout import head_state_dict, read_head
from tresnet_jax.weights.torch_io import write_official_checkpoint
from tresnet_jax.weights.torch_layout import OFFICIAL, TIMM, to_torch_array, torch_key

PARITY_BOUND = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    """A checkpoint to convert and what the converter must find in it."""

    model: str
    classes: int  # zero-shot: the class names the checkpoint comes with
    queries: int  # K the tensors have
    group_size: int  # g
    file: str = "model.pth"
    num_of_groups: int = -1  # the official constructor's (-1: K = min(100, classes))
    zero_shot: bool = False
    layout: str = "official"
    flags: tuple[str, ...] = ()
    tag: str | None = None  # what the converter must record
    size: int = 96
    batch: int = 2
    command_line: bool = True  # else convert_checkpoint in memory


CASES = {
    # Found by its published file name: the tag, multi-label, ML-Decoder's squish at 224.
    "coco": Case("tresnet_m", 80, 80, 1, file="tresnet_m_COCO_224_84_2.pth", tag="tresnet_m.ml_decoder_coco_224"),
    # timm's layout, the tag given: 200 queries of g = 49 outputs, the last 195 unused.
    "openimages": Case(
        "tresnet_m", 9605, 200, 49, num_of_groups=200, layout=TIMM, file="oi.pth",
        flags=("--tag", "tresnet_m.ml_decoder_openimages_224"), tag="tresnet_m.ml_decoder_openimages_224",
    ),
    "imagenet": Case("tresnet_m", 1000, 100, 10),  # untagged: the default 100 queries, g = 10
    "zero_shot": Case("tresnet_m", 7, 7, 1, zero_shot=True),  # at run time, a query a class scored
    "l_448": Case(
        "tresnet_v2_l", 80, 80, 1, file="tresnet_l_COCO__448_90_0.pth", tag="tresnet_v2_l.ml_decoder_coco_448",
        size=448, batch=1, command_line=False,
    ),
    "xl": Case(
        "tresnet_v2_xl", 80, 80, 1, file="tresnet_xl_COCO_640_91_4.pth", tag="tresnet_v2_xl.ml_decoder_coco_640",
        batch=1, command_line=False,
    ),
}  # fmt: skip
FAST = ("coco", "zero_shot")  # the official layout both ways; timm's: test_timm_layout_..., "openimages"
UNSEEN = 5  # zero-shot: the classes scored, word vectors other than the checkpoint's classes


@dataclasses.dataclass
class ConvertedCase:
    """A case's reference, checkpoint and conversion."""

    case: Case
    reference: torch.nn.Module
    checkpoint: dict  # as saved
    model: tresnet_jax.TResNet
    variables: dict
    info: tresnet_jax.WeightsInfo
    directory: Path | None  # the weights directory (None: converted in memory)
    word_vectors: np.ndarray | None


@pytest.fixture(scope="module", params=[pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in CASES])
def converted(request, tmp_path_factory):
    case = CASES[request.param]
    work = tmp_path_factory.mktemp(request.param)
    seed = list(CASES).index(request.param)
    reference = ml_decoder_model(case.model, case.classes, case.num_of_groups, case.zero_shot, seed=seed)
    names = [f"class {i}" for i in range(case.classes)]
    checkpoint = official_checkpoint(reference, names, seed)
    if case.layout == TIMM:
        checkpoint = {"model": timm_layout(reference.state_dict()), "idx_to_class": checkpoint["idx_to_class"]}
    path = work / case.file
    torch.save(checkpoint, path)
    if case.command_line:
        # Stored by its name (a published file's: its tag) and loaded by it, as a user does.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TRESNET_JAX_WEIGHTS", str(work / "weights"))
            assert torch_to_flax.main([str(path), *case.flags]) == 0
            name = case.tag or case.model
            model, variables = tresnet_jax.load(name)
            info, directory = tresnet_jax.load_metadata(name), work / "weights" / name
    else:
        state_dict = {k: v.numpy() for k, v in checkpoint["model"].items()}
        result, info = convert_checkpoint(state_dict, path, class_names=names)
        model = tresnet_jax.TResNet(info.arch, info.num_classes, head_spec=info.head)
        variables, directory = result.variables, None
    word_vectors = None
    if case.zero_shot:
        word_vectors = np.random.default_rng(seed).normal(size=(UNSEEN, 300)).astype(np.float32)
        set_word_vectors(reference, word_vectors)
    return ConvertedCase(case, reference, checkpoint, model, variables, info, directory, word_vectors)


def forward(model, variables, images, class_embeddings=None):
    """The logits, operation by operation: each operation compiles once for every case of its
    shapes (the body's for all of TResNet-M's heads), where compiling the whole model would
    take most of a case's time on the CPU."""
    return np.asarray(model.apply(variables, images, class_embeddings=class_embeddings))


def test_converted_logits_equal_the_official_head(converted):
    case = converted.case
    images = random_images(case.batch, case.size, case.size, seed=case.size)
    expected = torch_logits(converted.reference, images)
    logits = forward(converted.model, converted.variables, images, converted.word_vectors)
    assert logits.shape == (case.batch, UNSEEN if case.zero_shot else case.classes)
    assert np.abs(expected).max() > 1.0  # logits spread: a wrong split or order cannot pass
    error = parity_error(logits, expected)
    print(f"{case.model} {case.classes} classes, K {case.queries}: max |diff| / max |logit| = {error:.2e}")
    assert error <= PARITY_BOUND


def test_the_record_says_what_the_tensors_are(converted):
    """Architecture, head (K, g, zero-shot), classes and names, layout and tag, from the tensors
    and the file: a published file name gives its tag, which makes the weights multi-label."""
    case, info, variables = converted.case, converted.info, converted.variables
    head = HeadSpec(ML_DECODER, zero_shot=True) if case.zero_shot else HeadSpec(ML_DECODER, case.queries)
    published = PRETRAINED[case.tag].head if case.tag else head
    assert (info.model, info.head, info.num_classes) == (case.model, published, case.classes)
    assert info.class_names == tuple(f"class {i}" for i in range(case.classes))
    assert (info.tag, info.multi_label, info.source.layout) == (case.tag, case.tag is not None, case.layout)
    assert info.preprocessing.squish  # ML-Decoder's validate.py: a plain resize to the input size
    group = variables["params"]["head"]["group_fc"]["kernel"]
    if case.zero_shot:
        assert group.shape == (768, 1)
        assert "constants" not in variables
    else:
        assert group.shape == (case.queries, 768, case.group_size)
        assert variables["constants"]["head"]["queries"].shape == (case.queries, 768)


# In the full run only: the fast tier keeps the conversion's parity (the way back is the same table).
@pytest.mark.slow
@pytest.mark.parametrize("converted", ["coco", "zero_shot"], indirect=True)
def test_flax_to_torch_writes_the_official_checkpoint_which_the_reference_reloads(converted, tmp_path):
    """Back through the command line: ``{"model": <official layout>, "idx_to_class": ...}``,
    the keys the official code saves, strictly loaded into a fresh reference (other random
    weights), which then gives the original's logits (InPlaceABN's |w| + 1e-5 and back: a
    rounding a scale)."""
    case = converted.case
    out = tmp_path / "back.pth"
    assert flax_to_torch.main([str(converted.directory), str(out)]) == 0
    written = torch.load(out, weights_only=True)
    assert set(written) == {"model", "idx_to_class"}
    assert written["idx_to_class"] == converted.checkpoint["idx_to_class"]
    assert written["model"].keys() == converted.checkpoint["model"].keys()
    fresh = ml_decoder_model(case.model, case.classes, case.num_of_groups, case.zero_shot, seed=99)
    load_official(fresh, written)
    if case.zero_shot:
        set_word_vectors(fresh, converted.word_vectors)
    images = random_images(2, 64, 64, seed=5)
    assert parity_error(torch_logits(fresh, images), torch_logits(converted.reference, images)) <= 1e-6


@pytest.mark.parametrize("converted", ["coco"], indirect=True)
def test_scales_inplace_abn_cannot_hold_go_to_the_official_layout_computing_the_same(converted):
    """Weights trained here may have BatchNorm scales InPlaceABN's |w| + 1e-5 cannot be:
    negative, below 1e-5, zero. The official layout rewrites them (sign into the conv, size into
    the running variance) and the reference computes what the variables compute."""
    rng = np.random.default_rng(0)
    flat = traverse_util.flatten_dict(converted.variables)
    for path, value in flat.items():
        if path[-1] == "scale" and path[1] == "body":
            draw = rng.random(value.shape)
            value = np.where(draw < 0.3, -value, value)
            flat[path] = np.where(draw > 0.95, 0.0, np.where(draw > 0.9, 1e-7 * np.sign(value), value))
    variables = traverse_util.unflatten_dict(flat)
    fresh = ml_decoder_model("tresnet_m", 80, seed=98)
    official = variables_to_official_state_dict(variables, converted.info.arch)
    load_official(fresh, {"model": {k: torch.from_numpy(np.array(v)) for k, v in official.items()}})
    images = random_images(2, 96, 96, seed=96)
    assert parity_error(torch_logits(fresh, images), forward(converted.model, variables, images)) <= PARITY_BOUND


@pytest.mark.parametrize("converted", ["coco"], indirect=True)
def test_nnx_equals_linen(converted):
    model = tresnet_jax.nnx.from_linen_variables(converted.model, converted.variables)
    images = random_images(2, 96, 96, seed=96)
    logits = model(images)
    reference = forward(converted.model, converted.variables, images)
    # The same operations on the same float32 inputs (test_nnx.py's bound).
    assert float(np.abs(logits - reference).max()) <= 1e-6 * max(1.0, float(np.abs(reference).max()))


def test_published_file_names_give_their_tags_only_with_their_head():
    """Each ML-Decoder zoo file, by its published name, gets its tag when its tensors have the
    tag's head (K as read off them); not an ASL file name, nor fc tensors under ML-Decoder's."""
    for cfg in PRETRAINED.values():
        if cfg.source == "ml_decoder":
            head = HeadSpec(ML_DECODER, num_queries(cfg.num_classes, cfg.head.num_groups))
            chosen = choose_config(resolve(cfg.architecture), cfg.num_classes, f"downloads/{cfg.file}", head=head)
            assert chosen.tag == cfg.tag
    m = resolve("tresnet_m")
    assert choose_config(m, 80, "MS_COCO_TRresNet_M_224_81.8.pth", head=HeadSpec(ML_DECODER, 80)).tag is None
    assert choose_config(m, 80, "tresnet_m_COCO_224_84_2.pth").tag is None
    assert choose_config(m, 80, "tresnet_m_COCO_224_84_2.pth", head=HeadSpec(ML_DECODER, 40)).tag is None


def shaped_like(name: str, classes: int = 0) -> dict[str, np.ndarray]:
    """A timm-layout state_dict of ``name`` whose tensors have the shapes and hold nothing."""
    shapes = variable_shapes(ARCHITECTURES[name], classes)
    return {torch_key(p): to_torch_array(p, np.broadcast_to(np.float32(0), s)) for p, s in shapes.items()}


def test_architectures_told_apart_by_their_tensors():
    """ML-Decoder's XL [3, 8, 34, 5] is neither TResNet-XL nor L; its L (v1 slopes) is chosen over
    the official TResNet-L-V2 (a 196-class fc head: its Stanford-Cars weights) for an
    ML-Decoder head, whatever the classes."""
    assert identify(shaped_like("tresnet_v2_xl"), OFFICIAL)[0].name == "tresnet_v2_xl"
    assert identify(shaped_like("tresnet_xl"), OFFICIAL)[0].name == "tresnet_xl"
    assert identify(shaped_like("tresnet_v2_l", 196), OFFICIAL)[0].name == "tresnet_l_v2"
    assert identify(shaped_like("tresnet_v2_l"), OFFICIAL, ml_decoder=True)[0].name == "tresnet_v2_l"


def test_timm_layout_reads_as_the_official_and_both_go_back_exactly():
    """timm's copy (its own ``MLDecoder.state_dict()`` keys) names the same tensors one level up:
    the same variables as the official layout, whose parity the cases prove; and back to each
    layout, bit for bit."""
    head = OfficialMLDecoder(100, 20)
    randomize_head(head, 0)
    official = {f"head.{k}": v.numpy() for k, v in head.state_dict().items()}
    timm = {k: v.numpy() for k, v in timm_layout({k: torch.from_numpy(v) for k, v in official.items()}).items()}
    assert timm.keys() == {f"head.{k}" for k in MLDecoder(100, 20).state_dict()}
    read = {layout: read_head(tensors, 2048) for layout, tensors in ((OFFICIAL, official), (TIMM, timm))}
    assert [(r.layout, r.spec, r.num_classes) for r in read.values()] == [
        (layout, HeadSpec(ML_DECODER, 20), 100) for layout in (OFFICIAL, TIMM)
    ]
    assert read[OFFICIAL].variables.keys() == read[TIMM].variables.keys()
    for path, value in read[OFFICIAL].variables.items():
        np.testing.assert_array_equal(value, read[TIMM].variables[path])
    assert read[OFFICIAL].variables[("params", "head", "group_fc", "kernel")].shape == (20, 768, 5)  # g: 100 / 20
    for layout, tensors in ((OFFICIAL, official), (TIMM, timm)):
        back = head_state_dict(read[layout].variables, layout)
        assert back.keys() == tensors.keys()
        for key, value in tensors.items():
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_zero_shot_head_goes_back_exactly_and_the_official_file_is_a_torch_save_one(tmp_path):
    """The zero-shot head (``wordvec_proj`` on the head, no queries) reads and goes back bit for
    bit; the official checkpoint is refused as safetensors (no room for its class names)."""
    head = ZeroShotMLDecoder()
    randomize_head(head, 1)
    official = {f"head.{k}": v.numpy() for k, v in head.state_dict().items()}
    read = read_head(official, 2048)
    assert (read.spec, read.num_classes) == (HeadSpec(ML_DECODER, zero_shot=True), 1)
    back = head_state_dict(read.variables, OFFICIAL)
    assert back.keys() == official.keys()
    for key, value in official.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    refused = tmp_path / "back.safetensors"
    with pytest.raises(InputError, match=r"back.safetensors: .* name a .pth/.pt/.bin file$"):
        write_official_checkpoint(refused, back, None)
    assert not refused.exists()
