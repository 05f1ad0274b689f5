"""The architecture's numbers, shapes, dtypes and initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tresnet_jax
from tresnet_jax.model.architecture import variable_shapes
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import ARCHITECTURES, resolve

# Parameter counts of the 1000-class models (TRESNET.md, = timm's).
PARAMS_1000 = {
    "tresnet_m": 31_389_032,
    "tresnet_l": 55_989_256,
    "tresnet_xl": 78_436_244,
    "tresnet_v2_l": 46_174_824,
    "tresnet_l_v2": 46_174_824,
    # ML-Decoder's XL: timm's TResNet(layers=[3, 8, 34, 5], v2=True) counted on the meta device.
    "tresnet_v2_xl": 69_300_712,
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_parameter_count_equals_published(name):
    shapes = variable_shapes(resolve(name).arch, 1000)
    count = sum(int(np.prod(shape)) for path, shape in shapes.items() if path[0] == "params")
    assert count == PARAMS_1000[name]


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("tresnet_m", (64, 64, 128, 1024, 2048)),
        pytest.param("tresnet_l", (76, 76, 152, 1216, 2432), marks=pytest.mark.slow),
        pytest.param("tresnet_xl", (83, 83, 166, 1328, 2656), marks=pytest.mark.slow),
        pytest.param("tresnet_v2_l", (64, 256, 512, 1024, 2048), marks=pytest.mark.slow),
    ],
)
def test_stage_feature_shapes_any_multiple_of_32(name, channels):
    model = TResNet(resolve(name).arch, 10)
    x = jax.ShapeDtypeStruct((2, 96, 160, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    stages = jax.eval_shape(lambda v, x: model.apply(v, x, method="stage_features"), variables, x)
    assert [s.shape for s in stages] == [
        (2, 24, 40, channels[0]),
        (2, 24, 40, channels[1]),
        (2, 12, 20, channels[2]),
        (2, 6, 10, channels[3]),
        (2, 3, 5, channels[4]),
    ]
    logits = jax.eval_shape(model.apply, variables, x)
    assert logits.shape == (2, 10)
    assert logits.dtype == jnp.float32


def test_no_head_returns_pooled_features_and_any_class_count():
    for classes, width in ((0, 2048), (11221, 11221), (3, 3)):
        model = TResNet(resolve("tresnet_m").arch, classes)
        x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        assert ("head" in variables["params"]) == (classes > 0)
        assert jax.eval_shape(model.apply, variables, x).shape == (1, width)


@pytest.fixture(scope="module")
def fresh_m():
    return tresnet_jax.create_model("tresnet_m", num_classes=1000, seed=3)


def test_init_mirrors_the_original(fresh_m):
    _, variables = fresh_m
    flat = traverse_util.flatten_dict(variables["params"])
    # kaiming normal, fan_out: std sqrt(2 / (out_channels * k * k))
    kernel = np.asarray(flat[("body", "layer3", "0", "conv2", "conv", "kernel")])
    assert kernel.shape == (3, 3, 256, 256)
    assert kernel.std() == pytest.approx(np.sqrt(2 / (256 * 9)), rel=0.02)
    # the last norm of every residual branch starts at zero, the others at one
    zero = [p for p, v in flat.items() if p[-1] == "scale" and not np.any(v)]
    assert len(zero) == 3 + 4 + 11 + 3
    assert all(p[-3] in ("conv2", "conv3") for p in zero)
    assert all(np.all(np.asarray(v) == 1) for p, v in flat.items() if p[-1] == "scale" and p not in zero)
    head = np.asarray(flat[("head", "fc", "kernel")])
    assert head.std() == pytest.approx(0.01, rel=0.02)
    assert np.all(np.asarray(variables["batch_stats"]["body"]["conv1"]["bn"]["var"]) == 1)


def test_bfloat16_compute_keeps_float32_parameters_and_logits(fresh_m):
    model, variables = fresh_m
    bf16 = model.clone(dtype=jnp.bfloat16)
    x = jnp.ones((1, 64, 64, 3))
    stages = jax.eval_shape(lambda v: bf16.apply(v, x, method="stage_features"), variables)
    assert all(s.dtype == jnp.bfloat16 for s in stages)
    assert jax.eval_shape(lambda v: bf16.apply(v, x), variables).dtype == jnp.float32
    _, updates = jax.eval_shape(lambda v: bf16.apply(v, x, train=True, mutable=["batch_stats"]), variables)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updates))


def test_training_mode_updates_batch_statistics(fresh_m):
    model, variables = fresh_m
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)), jnp.float32)
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    before = variables["batch_stats"]["body"]["conv1"]["bn"]["mean"]
    after = updates["batch_stats"]["body"]["conv1"]["bn"]["mean"]
    assert not np.allclose(before, after)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(tresnet_jax.InputError, match="unknown model 'tresnet_s'; closest known: tresnet_m, "):
        tresnet_jax.create_model("tresnet_s")
    closest = r"closest known: tresnet_m\.miil_in21k, tresnet_m\.miil_in1k, "
    with pytest.raises(tresnet_jax.InputError, match=rf"unknown model 'tresnet_m\.miil_in2k'; {closest}"):
        tresnet_jax.create_model("tresnet_m.miil_in2k")


def test_registry_holds_the_published_configurations():
    cfg = tresnet_jax.PRETRAINED["tresnet_m.miil_in1k_448"]
    assert cfg.preprocessing == tresnet_jax.Preprocessing(448, crop_pct=0.875, interpolation="bilinear")
    assert (cfg.num_classes, cfg.top1) == (1000, 81.710)
    assert tresnet_jax.default_config("tresnet_m").tag == "tresnet_m.miil_in21k_ft_in1k"
    assert tresnet_jax.default_config("tresnet_m", 11221).tag == "tresnet_m.miil_in21k"
    models = ["tresnet_m", "tresnet_l", "tresnet_xl", "tresnet_v2_l", "tresnet_l_v2", "tresnet_v2_xl"]
    assert tresnet_jax.list_models() == models
    # ML-Decoder's zoo: K and the preprocessing of its validate.py; an architecture's default
    # configuration is never one of them (a plain tresnet_v2_l with 196 classes has an fc head).
    coco = tresnet_jax.PRETRAINED["tresnet_v2_l.ml_decoder_coco_448"]
    assert coco.head == tresnet_jax.HeadSpec("ml_decoder", num_groups=80)
    assert (coco.num_classes, coco.mean_ap, coco.multi_label) == (80, 90.1, True)
    assert coco.preprocessing == tresnet_jax.Preprocessing(448, crop_pct=1.0, squish=True)
    assert tresnet_jax.PRETRAINED["tresnet_m.ml_decoder_openimages_224"].head.num_groups == 200
    assert tresnet_jax.default_config("tresnet_v2_l", 196).head == tresnet_jax.HeadSpec()


# Tracing the larger variants' init takes seconds: tresnet_m in the fast tier, all of them in the full run.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n == "tresnet_m" else pytest.mark.slow) for n in ARCHITECTURES]
)
def test_variable_specs_are_the_modules_variables(name):
    """The shapes create_model draws without tracing are exactly those Flax's init creates."""
    for classes in (10, 0):
        model = TResNet(resolve(name).arch, classes)
        traced = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
        shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(traced).items()}
        assert shapes == variable_shapes(resolve(name).arch, classes)


def test_fresh_variables_are_seeded_and_on_the_default_device(fresh_m):
    _, variables = fresh_m
    _, same = tresnet_jax.create_model("tresnet_m", seed=3)
    _, other = tresnet_jax.create_model("tresnet_m", seed=4)
    _, keyed = tresnet_jax.create_model("tresnet_m", seed=jax.random.key(3))
    path = ("params", "body", "layer2", "1", "conv1", "conv", "kernel")
    leaf = traverse_util.flatten_dict(variables)[path]
    assert isinstance(leaf, jax.Array)
    assert leaf.devices() == {jax.devices()[0]}
    np.testing.assert_array_equal(leaf, traverse_util.flatten_dict(same)[path])
    assert not np.allclose(leaf, traverse_util.flatten_dict(other)[path])
    assert not np.allclose(leaf, traverse_util.flatten_dict(keyed)[path])
    # A tag's own class count when none is given.
    assert tresnet_jax.create_model("tresnet_m.miil_in21k")[0].num_classes == 11221


def test_flax_init_draws_the_same_distributions():
    """Module.init (Flax's initializers) and create_model (host draws) share one definition."""
    from tresnet_jax.model.layers import Conv, Dense, Init

    kernel = Conv(256, 3).init(jax.random.key(1), jnp.zeros((1, 8, 8, 256)))["params"]["kernel"]
    assert float(kernel.std()) == pytest.approx(np.sqrt(2 / (256 * 9)), rel=0.02)
    bias = Dense(4096, Init("normal", 0.01)).init(jax.random.key(2), jnp.zeros((1, 64)))["params"]["bias"]
    assert float(jnp.abs(bias).max()) <= 1 / 8
    assert float(jnp.abs(bias).max()) > 0.99 / 8  # U(-1/sqrt(64), 1/sqrt(64)) fills its range
