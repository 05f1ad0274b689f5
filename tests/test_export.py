"""The ONNX and StableHLO exports against the Flax model they were made from, and their
command lines on bad input.

Weights: a timm TResNet-M with random tensors (BatchNorm gammas of both signs and betas, a head
that spreads the logits) whose running statistics are those of a batch of images, converted
and stored as a weights directory for 64x64 inputs. Random running statistics would wash the
input out of the logits (they differed by 0.009 between images, of 3.6 in all); measured ones
keep it in (2.4 of 3.4), so an export that lost or scrambled any of it could not pass. Bound,
as for the conversion parity: max |export - Flax| <= 1e-4 * max(1, max |Flax logit|), float32.
These weights amplify rounding: float32 implementations differ by 1.5-3.1e-5 on them (Flax
against timm: 3.1e-5 with 1x1 convolutions as convolutions, 2.8e-5 as matrix products; Flax
compiled with and without the CPU options); the ONNX file measured 2.6e-5, the StableHLO 1.8e-5
(both made with 1x1 convolutions as convolutions, as the model they are compared with).
"""

import json

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import tresnet_jax
from tests import tiny_model
from tests.blocked_imports import run_without
from tests.reference import parity_error, random_images, random_timm_model
from tresnet_jax import HeadSpec, Preprocessing, WeightsInfo
from tresnet_jax.cli.export import onnx_main, stablehlo_main
from tresnet_jax.model.initialization import replace_head
from tresnet_jax.model.ml_decoder import WORD_DIM
from tresnet_jax.model.registry import resolve
from tresnet_jax.weights.conversion import convert_state_dict
from tresnet_jax.weights.storage import save_weights

SIZE, CLASSES = 64, 10
IMAGES = random_images(3, SIZE, SIZE, seed=21)
PARITY_BOUND = 1e-4
# The float16 file against the float32 model: twice the Flax model's own float16 error on these
# weights and images (relative L2 of the logits, measured 3.4e-2: these random weights amplify
# rounding; the file measured 2.6e-2, as onnxruntime's CPU runs float16 convolutions in float32).
FLOAT16_BOUND = 7e-2


def with_measured_statistics(model: torch.nn.Module, images: np.ndarray) -> torch.nn.Module:
    """BatchNorm running statistics := those of ``images`` (one pass in training mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the passes: here, the one batch
    with torch.no_grad():
        model.train()(torch.from_numpy(images).permute(0, 3, 1, 2))
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(weights directory, the Flax model's float32 logits of IMAGES)."""
    directory = tmp_path_factory.mktemp("export") / "tresnet_m_random"
    reference = with_measured_statistics(random_timm_model("tresnet_m", CLASSES, seed=3), random_images(8, SIZE, SIZE))
    converted = convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, resolve("tresnet_m"))
    preprocessing = Preprocessing(SIZE, crop_pct=0.875, interpolation="bilinear")
    save_weights(directory, converted.variables, WeightsInfo("tresnet_m", CLASSES, preprocessing=preprocessing))
    model, variables = tresnet_jax.load(directory)
    logits = np.asarray(jax.jit(model.apply)(variables, IMAGES))
    # The images give logits far apart, so an export that lost the input could not pass.
    assert np.abs(logits - logits[0]).max() > 1000 * PARITY_BOUND * max(1.0, np.abs(logits).max())
    return directory, logits


def run(main, args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def nchw(images):
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def test_onnx_equals_flax_at_two_batch_sizes(weights, tmp_path, capsys):
    directory, expected = weights
    path = tmp_path / "m.onnx"
    code, out, err = run(onnx_main, [directory, path], capsys)  # size: the weights' own
    assert code == 0, err
    assert f"images float32 [batch, 3, {SIZE}, {SIZE}]" in out
    proto = onnx.load(path)
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [
        "batch",
        3,
        SIZE,
        SIZE,
    ]
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    # The blur's reflect padding is slices and concatenations: no Pad for TensorRT to refuse.
    assert "Pad" not in {node.op_type for node in proto.graph.node}
    assert {p.key: p.value for p in proto.metadata_props}["model"] == "tresnet_m"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        (logits,) = session.run(None, {"images": nchw(IMAGES[:n])})
        assert logits.shape == (n, CLASSES)
        assert parity_error(logits, expected[:n]) <= PARITY_BOUND


@pytest.mark.slow
def test_onnx_float16_computes_in_float16_close_to_float32(weights, tmp_path, capsys):
    directory, expected = weights
    path = tmp_path / "m16.onnx"
    code, _, err = run(onnx_main, [directory, path, "--dtype", "float16", "--image-size", SIZE], capsys)
    assert code == 0, err
    proto = onnx.load(path)
    kernels = {node.input[1] for node in proto.graph.node if node.op_type == "Conv"}
    assert {i.data_type for i in proto.graph.initializer if i.name in kernels} == {onnx.TensorProto.FLOAT16}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": nchw(IMAGES)})
    assert logits.dtype == np.float32
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) <= FLOAT16_BOUND
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))


SERVE = """
import json
import jax, numpy as np
with open({path!r}, "rb") as f:
    forward = jax.export.deserialize(f.read())
np.save({logits!r}, np.asarray(forward.call(np.load({images!r}))))
print(json.dumps({{"platforms": list(forward.platforms), "input": str(forward.in_avals[0])}}))
"""


@pytest.mark.slow
def test_stablehlo_runs_without_this_package_and_equals_flax(weights, tmp_path, capsys):
    directory, expected = weights
    path = tmp_path / "m.stablehlo"
    path.write_bytes(b"an older export")
    code, _, err = run(stablehlo_main, [directory, path, "--image-size", SIZE, "--force"], capsys)
    assert code == 0, err
    np.save(tmp_path / "images.npy", IMAGES)
    files = {name: str(tmp_path / f"{name}.npy") for name in ("images", "logits")}
    done = run_without({"tresnet_jax", "flax", "torch", "tensorflow"}, SERVE.format(path=str(path), **files))
    assert done.returncode == 0, done.stderr[-3000:]
    described = json.loads(done.stdout.strip().splitlines()[-1])
    assert described == {"platforms": ["cpu", "cuda"], "input": f"float32[batch,{SIZE},{SIZE},3]"}
    assert parity_error(np.load(files["logits"]), expected) <= PARITY_BOUND


@pytest.mark.parametrize("main", [onnx_main, stablehlo_main], ids=["onnx", "stablehlo"])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown weights", "error: no weights 'no_such_weights': not a weights directory"),
        ("size 102", "error: image size must be a positive multiple of 4, got 102"),
        ("existing output", "exists; pass --force to replace it"),
        ("no output directory", "missing: no such directory"),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(main, case, message, weights, tmp_path, weights_root, capsys):
    directory, _ = weights
    output = tmp_path / "out.bin"
    args = [directory, output]
    if case == "unknown weights":
        args[0] = "no_such_weights"
    elif case == "size 102":
        args += ["--image-size", 102]
    elif case == "existing output":
        output.write_bytes(b"keep me")
    else:
        args[1] = tmp_path / "missing" / "out.bin"
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run(main, args, capsys)
    assert code == 1
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("error: ")
    assert message in err
    assert sorted(tmp_path.rglob("*")) == before
    if case == "existing output":
        assert output.read_bytes() == b"keep me"


# --- ML-Decoder ------------------------------------------------------------------------------
# tests/tiny_model.py's TResNet (the head's translation does not depend on the backbone's size)
# with measured BatchNorm statistics, and random ML-Decoder heads: 3 queries for 7 classes, and
# zero-shot. The same bound as above; measured: ONNX 3.6e-7 (fixed queries) and 7.2e-7
# (zero-shot), StableHLO 6.0e-7 and 3.6e-7, of logits up to 1.4 and 2.1.
ML_CLASSES = 7
ML_HEADS = {"ml_decoder": HeadSpec("ml_decoder", num_groups=3), "zero_shot": HeadSpec("ml_decoder", zero_shot=True)}
WORD_VECTORS = {k: np.random.default_rng(k).normal(size=(k, WORD_DIM)).astype(np.float32) for k in (4, 2)}


@pytest.fixture(scope="module")
def ml_decoder_weights(tmp_path_factory):
    """head kind -> (weights directory, {class count of the word vectors (0: none) -> the Flax
    model's float32 logits of IMAGES})."""
    root = tmp_path_factory.mktemp("ml_decoder_export")
    found = {}
    with tiny_model.registered():
        tiny_model.register_in_timm()
        backbone = with_measured_statistics(random_timm_model(tiny_model.NAME, 0, seed=3), random_images(8, SIZE, SIZE))
        spec = resolve(tiny_model.NAME)
        converted = convert_state_dict({k: v.numpy() for k, v in backbone.state_dict().items()}, spec)
        for kind, head in ML_HEADS.items():
            variables = replace_head(converted.variables, spec.arch, ML_CLASSES, 0, head)
            info = WeightsInfo(tiny_model.NAME, ML_CLASSES, head, True, preprocessing=Preprocessing(SIZE))
            directory = save_weights(root / kind, variables, info)
            model, variables = tresnet_jax.load(directory)
            forward = jax.jit(lambda v, x, e, model=model: model.apply(v, x, class_embeddings=e))
            vectors = WORD_VECTORS if head.zero_shot else {0: None}
            found[kind] = directory, {k: np.asarray(forward(variables, IMAGES, e)) for k, e in vectors.items()}
    return found


@pytest.mark.slow  # the fast tier keeps the plain head's export
@pytest.mark.usefixtures("tiny_model")
@pytest.mark.parametrize("kind", list(ML_HEADS))
def test_onnx_of_an_ml_decoder_equals_flax(kind, ml_decoder_weights, tmp_path, capsys):
    """Attention (Einsum), softmax, LayerNorm, the queries repeated for each image (Expand) and
    the group projection; a zero-shot head takes its classes' word vectors as a second input,
    any number of them."""
    directory, expected = ml_decoder_weights[kind]
    path = tmp_path / "ml.onnx"
    code, out, err = run(onnx_main, [directory, path], capsys)
    assert code == 0, err
    proto = onnx.load(path)
    assert {"Einsum", "Expand", "ReduceMax"} <= {node.op_type for node in proto.graph.node}
    inputs = [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in proto.graph.input]
    properties = {p.key: p.value for p in proto.metadata_props}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if kind == "zero_shot":
        assert inputs[1] == ("class_embeddings", ["classes", WORD_DIM])
        assert "class_embeddings float32 [classes, 300] -> logits [batch, classes]" in out
        assert properties["head"] == "zero-shot ML-Decoder"
    else:
        assert [name for name, _ in inputs] == ["images"]
        assert f"-> logits [batch, {ML_CLASSES}]" in out
        assert properties["head"] == "ML-Decoder (K 3)"
    for classes, logits in expected.items():
        for n in (1, 3):
            feeds = {"images": nchw(IMAGES[:n])} | ({"class_embeddings": WORD_VECTORS[classes]} if classes else {})
            (found,) = session.run(None, feeds)
            assert found.shape == (n, classes or ML_CLASSES)
            assert parity_error(found, logits[:n]) <= PARITY_BOUND
    for logits in expected.values():  # the images give different logits: an export that lost them could not pass
        assert np.abs(logits - logits[0]).max() > 100 * PARITY_BOUND * max(1.0, np.abs(logits).max())


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_model")
@pytest.mark.parametrize("kind", ["zero_shot"])  # the fixed-query head exports as the plain one does
def test_stablehlo_of_an_ml_decoder_gives_the_flax_logits(kind, ml_decoder_weights, tmp_path, capsys):
    directory, expected = ml_decoder_weights[kind]
    path = tmp_path / "ml.stablehlo"
    code, _, err = run(stablehlo_main, [directory, path], capsys)
    assert code == 0, err
    forward = jax.export.deserialize(path.read_bytes())
    assert len(forward.in_avals) == (2 if kind == "zero_shot" else 1)
    for classes, logits in expected.items():
        found = np.asarray(forward.call(IMAGES, *([WORD_VECTORS[classes]] if classes else [])))
        assert found.shape == logits.shape
        assert parity_error(found, logits) <= PARITY_BOUND
