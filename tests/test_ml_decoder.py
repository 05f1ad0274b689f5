"""ML-Decoder's head on its own: the original's group and query arithmetic, its variables, the
zero-shot input, per-example dropout, group decoding as one contraction, the NNX twin and the
head choice through ``create_model`` and the weights record. Parity with the official code is
tests/test_ml_decoder_parity.py's; training with it tests/test_ml_decoder_training.py's."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import tresnet_jax
import tresnet_jax.nnx
from tests import tiny_model
from tresnet_jax.model import ml_decoder
from tresnet_jax.model.architecture import HeadSpec, variable_shapes
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.model.layers import FLOAT32
from tresnet_jax.model.linen import TResNet
from tresnet_jax.weights.info import WeightsInfo

ARCH = tiny_model.SPEC
IMAGES = np.random.default_rng(0).uniform(size=(3, 64, 64, 3)).astype(np.float32)
ML = HeadSpec("ml_decoder", num_groups=4)
ZSL = HeadSpec("ml_decoder", zero_shot=True)


@pytest.mark.parametrize(
    ("classes", "groups", "queries", "factor"),
    [
        (80, 80, 80, 1),  # COCO: a query per class
        (9605, 200, 200, 49),  # OpenImages: 200 groups, 48.025 -> 49
        (1000, None, 100, 10),  # K defaults to 100
        (80, None, 80, 1),  # ... capped at the class count
        (196, None, 100, 2),  # Stanford Cars
        (10, 3, 3, 4),  # 3.33 + 0.999 -> 4
    ],
)
def test_queries_and_groups_are_the_originals(classes, groups, queries, factor):
    assert ml_decoder.num_queries(classes, groups) == queries
    assert ml_decoder.duplicate_factor(classes, queries) == factor
    shapes = variable_shapes(ARCH, classes, HeadSpec("ml_decoder", groups))
    assert shapes[("constants", "head", "queries")] == (queries, 768)
    assert shapes[("params", "head", "group_fc", "kernel")] == (queries, 768, factor)
    assert shapes[("params", "head", "group_fc", "bias")] == (classes,)


def test_a_group_count_the_original_cannot_decode_is_refused():
    # int(3001 / 1500 + 0.999) = 2: 3000 outputs for 3001 classes (the ceiling would be 3).
    assert ml_decoder.duplicate_factor(3001, 1500) == 2
    with pytest.raises(tresnet_jax.InputError, match=r"1500 groups for 3001 classes: .* gives 2 outputs a group, 3000"):
        HeadSpec("ml_decoder", 1500).check_classes(3001)
    with pytest.raises(tresnet_jax.InputError, match="1500 groups for 3001 classes"):
        variable_shapes(ARCH, 3001, HeadSpec("ml_decoder", 1500))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: HeadSpec("attention"), "unknown head 'attention'; known: fc, ml_decoder"),
        (lambda: HeadSpec("ml_decoder", 0), "num_groups must be a whole number >= 1, got 0"),
        (lambda: HeadSpec("ml_decoder", True), "num_groups must be a whole number >= 1, got True"),
        (lambda: HeadSpec("fc", 10), "num_groups and zero_shot are settings of the ml_decoder head"),
        (lambda: HeadSpec("ml_decoder", 10, zero_shot=True), "a query per class: num_groups does not apply"),
        (lambda: WeightsInfo("tresnet_m", 80, HeadSpec("ml_decoder", 81)), "num_groups 81 is more than the 80"),
        (
            lambda: tresnet_jax.create_model("tresnet_m", num_classes=8, head="ml_decoder", num_groups=9),
            "num_groups 9 is more than the 8 classes",
        ),
        (lambda: tresnet_jax.create_model("tresnet_m", head="transformer"), "unknown head 'transformer'"),
    ],
)
def test_bad_head_settings_are_one_line(make, message):
    with pytest.raises(tresnet_jax.InputError, match=message):
        make()


def test_the_modules_declare_exactly_the_specs():
    """Flax's init creates the variables ``decoder_specs`` declares, queries in ``constants``."""
    for head, extra in ((ML, {}), (ZSL, {"class_embeddings": jnp.zeros((5, 300))})):
        model = TResNet(ARCH, 10, head_spec=head)
        traced = jax.eval_shape(partial(model.init, **extra), jax.random.key(0), IMAGES[:1])
        shapes = {path: value.shape for path, value in traverse_util.flatten_dict(traced).items()}
        assert shapes == variable_shapes(ARCH, 10, head)
        assert (("constants", "head", "queries") in shapes) == (not head.zero_shot)


def test_group_decoding_is_the_originals_loop_over_queries():
    rng = np.random.default_rng(1)
    decoded = rng.normal(size=(2, 4, 768)).astype(np.float32)
    kernel = rng.normal(size=(4, 768, 3)).astype(np.float32)
    bias = rng.normal(size=(10,)).astype(np.float32)
    looped = np.zeros((2, 4, 3), np.float64)
    for i in range(4):  # the original: one matmul per query into a zeroed (N, K, g)
        looped[:, i, :] = decoded[:, i, :].astype(np.float64) @ kernel[i].astype(np.float64)
    expected = looped.reshape(2, 12)[:, :10] + bias
    got = ml_decoder.group_logits(jnp.asarray(decoded), {"kernel": kernel, "bias": bias}, 10, FLOAT32)
    # 768 products of N(0, 1) terms in true float32: |error| ~ 768 * 2^-24 * sum|terms| << 1e-3
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-3, rtol=0)


def test_dropout_drops_a_tenth_and_scales_the_rest():
    """The rate and scaling of each site's masks (which key draws them, and that an example's
    masks are its own: tests/test_ml_decoder_training.py)."""
    dropout = ml_decoder.Dropout(jax.random.split(jax.random.key(0), 2), [(9, 9), (50_000,)])
    kept = np.asarray(dropout(jnp.ones((2, 50_000)), 1))
    np.testing.assert_allclose(np.unique(kept), [0.0, 1 / 0.9], rtol=1e-6)
    dropped = (kept == 0).mean()
    assert abs(dropped - 0.1) < 5 * np.sqrt(0.1 * 0.9 / kept.size)  # five binomial sigmas
    assert dropout.masks[0].shape == (2, 9, 9)
    assert (np.asarray(dropout.masks[1][0]) != np.asarray(dropout.masks[1][1])).any()  # two examples, two draws


def test_zero_shot_scores_the_classes_it_is_given():
    model = TResNet(ARCH, 10, head_spec=ZSL)
    variables = random_variables(ARCH, 10, 0, ZSL)
    words = np.random.default_rng(3).normal(size=(6, 300)).astype(np.float32)
    apply = tresnet_jax.jit(model.apply)
    logits = np.asarray(apply(variables, IMAGES, class_embeddings=words))
    assert logits.shape == (3, 6)
    order = np.array([5, 2, 0, 1, 4, 3])  # a class's score is its query's: permuting permutes
    permuted = np.asarray(apply(variables, IMAGES, class_embeddings=words[order]))
    np.testing.assert_allclose(permuted, logits[:, order], atol=1e-5 * np.abs(logits).max())
    # Refused while tracing, before anything runs.
    with pytest.raises(tresnet_jax.InputError, match="pass their class_embeddings"):
        jax.eval_shape(model.apply, variables, IMAGES)
    with pytest.raises(tresnet_jax.InputError, match=r"must be \(classes, 300\) word vectors, got shape \(6, 299\)"):
        jax.eval_shape(partial(model.apply, class_embeddings=words[:, :299]), variables, IMAGES)
    fixed = TResNet(ARCH, 10, head_spec=ML)
    with pytest.raises(tresnet_jax.InputError, match="this one has learned queries"):
        jax.eval_shape(partial(fixed.apply, class_embeddings=words), random_variables(ARCH, 10, 0, ML), IMAGES)


@pytest.mark.slow  # two models compiled in each API; NNX == Linen in evaluation is in the fast tier (parity)
def test_nnx_equals_linen_in_evaluation_and_training():
    linen = TResNet(ARCH, 10, head_spec=ML)
    variables = random_variables(ARCH, 10, 4, ML)
    model = tresnet_jax.nnx.from_linen_variables(linen, variables)
    call = nnx.jit(lambda model, images, keys=None: model(images, dropout_keys=keys))
    np.testing.assert_array_equal(np.asarray(call(model, IMAGES)), np.asarray(jax.jit(linen.apply)(variables, IMAGES)))
    keys = jax.random.split(jax.random.key(1), 3)
    train = jax.jit(partial(linen.apply, train=True, mutable=["batch_stats"]))
    trained, _ = train(variables, IMAGES, dropout_keys=keys)
    model.train()
    np.testing.assert_array_equal(np.asarray(call(model, IMAGES, keys)), np.asarray(trained))
    with pytest.raises(ValueError, match="draws its dropout from dropout_keys"):
        nnx.eval_shape(lambda model: model(IMAGES), model)
    # The queries are never trained: NNX holds them as Constant, which an optimizer over Param skips.
    assert [path for path, _ in nnx.to_flat_state(nnx.state(model, tresnet_jax.nnx.Constant))] == [("head", "queries")]
    back = traverse_util.flatten_dict(tresnet_jax.nnx.to_linen_variables(model))
    assert back.keys() == traverse_util.flatten_dict(variables).keys()


def test_linen_training_draws_from_the_dropout_stream_without_keys():
    model = TResNet(ARCH, 10, head_spec=ML)
    variables = random_variables(ARCH, 10, 0, ML)

    @jax.jit
    def run(key):
        return model.apply(variables, IMAGES, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0]

    first, again, other = (np.asarray(run(jax.random.key(seed))) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_the_head_travels_in_the_weights_record():
    info = WeightsInfo("tresnet_v2_l", 9605, HeadSpec("ml_decoder", 200), multi_label=True)
    document = info.to_json()
    assert document["head"] == {"kind": "ml_decoder", "num_groups": 200, "zero_shot": False}
    assert WeightsInfo.from_json(document) == info
    assert WeightsInfo.from_json({"model": "tresnet_m", "num_classes": 5, "head": "fc"}).head == HeadSpec()
    with pytest.raises(tresnet_jax.InputError, match=r"metadata.json: head 3: expected a record or a name"):
        WeightsInfo.from_json({"model": "tresnet_m", "num_classes": 5, "head": 3})
    with pytest.raises(tresnet_jax.InputError, match=r"headspec num_groups 'x': expected int or null"):
        WeightsInfo.from_json(
            {"model": "tresnet_m", "num_classes": 5, "head": {"kind": "ml_decoder", "num_groups": "x"}}
        )
    fresh = tresnet_jax.create_model("tresnet_m.ml_decoder_coco_224")
    assert (fresh.info.head, fresh.model.head_spec) == (HeadSpec("ml_decoder", 80), HeadSpec("ml_decoder", 80))
    assert fresh.variables["constants"]["head"]["queries"].shape == (80, 768)


@pytest.mark.usefixtures("weights_root")
def test_a_published_model_not_converted_yet_names_its_file():
    message = (
        r"tresnet_v2_xl.ml_decoder_coco_640 is not converted here .* download tresnet_xl_COCO_640_91_4.pth from "
        r"ML-Decoder's model zoo \(https://github.com/Alibaba-MIIL/ML_Decoder/blob/main/MODEL_ZOO.md\), then run "
        r"`python convert/torch_to_flax.py tresnet_xl_COCO_640_91_4.pth --tag tresnet_v2_xl.ml_decoder_coco_640`"
    )
    with pytest.raises(tresnet_jax.InputError, match=message):
        tresnet_jax.load("tresnet_v2_xl.ml_decoder_coco_640")
