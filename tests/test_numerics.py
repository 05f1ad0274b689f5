"""The numerics a model carries, whatever calls it: the precision of its convolutions and matrix
products (true float32 unless ``allow_tf32``; JAX's default for bfloat16) in the programs that
``tresnet_jax.jit``, ``nnx.jit`` and the StableHLO export lower, and its 1x1 convolutions as
convolutions or matrix products by its ``pointwise_as_matmul``, not by the backend that traces it.
XLA:GPU runs a HIGHEST float32 convolution or product in float32, not TF32, so these lowered
programs are what keeps the parity with timm on every backend. On tests/tiny_model.py's TResNet:
only lowered, never compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax import lax

import tresnet_jax
import tresnet_jax.nnx
from tests.settings import config
from tests.tiny_model import SPEC
from tresnet_jax.evaluation import batch_spec, make_eval_step
from tresnet_jax.export import STABLEHLO_PLATFORMS, onnx_model, stablehlo_export
from tresnet_jax.model.architecture import variable_specs
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.model.linen import TResNet
from tresnet_jax.runtime.parallel import BATCH_AXIS, data_mesh
from tresnet_jax.runtime.xla_options import pointwise_as_matmul_for
from tresnet_jax.train.step import create_state, make_optimizer, make_train_step

CLASSES, SIZE = 10, 32
IMAGES = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
# The plan's convolution kernels (stem, branches, shortcuts) and dense layers (squeeze-excite, head).
KERNELS = [spec.shape for path, spec in variable_specs(SPEC, CLASSES).items() if path[-2:] == ("conv", "kernel")]
POINTWISE = sum(shape[:2] == (1, 1) for shape in KERNELS)
DENSE = sum(path[-1] == "kernel" and path[-2] != "conv" for path in variable_specs(SPEC, CLASSES))


def products(program: str) -> dict[str, list[str]]:
    """The lines of a lowered program's convolutions and matrix products, by kind."""
    lines = program.splitlines()
    return {op: [line for line in lines if f"stablehlo.{op}" in line] for op in ("convolution", "dot_general")}


def assert_precision(program: str, highest: bool, copies: int = 1) -> None:
    """Every convolution and matrix product of ``program`` (the model's, ``copies`` times) at
    HIGHEST (``highest``) or at JAX's default (none at HIGHEST)."""
    found = products(program)
    assert len(found["convolution"]) == copies * len(KERNELS)
    assert len(found["dot_general"]) == copies * DENSE
    assert all(("HIGHEST" in line) == highest for lines in found.values() for line in lines)


def linen_program(model: TResNet) -> str:
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    return tresnet_jax.jit(model.apply).lower(variables, IMAGES).as_text()


CASES = [
    pytest.param({}, True, id="float32"),
    pytest.param({"allow_tf32": True}, False, id="float32-tf32"),
    pytest.param({"dtype": jnp.bfloat16}, False, id="bfloat16"),
]


@pytest.mark.parametrize(("attributes", "highest"), CASES)
def test_tresnet_jax_jit_lowers_the_precision_the_model_carries(attributes, highest):
    model = TResNet(SPEC, CLASSES, **attributes)
    assert model.numerics.precision == (lax.Precision.HIGHEST if highest else None)
    assert_precision(linen_program(model), highest)


def test_the_training_gradient_keeps_true_float32():
    """The convolutions' and products' transposes in the backward pass carry the precision too."""
    model = TResNet(SPEC, CLASSES)
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES)

    def loss(params, batch_stats, images):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2)

    grad = jax.grad(loss)
    program = tresnet_jax.jit(grad).lower(variables["params"], variables["batch_stats"], IMAGES).as_text()
    found = products(program)
    # forward, input gradient (but the stem's) and weight gradient of every convolution
    assert len(found["convolution"]) == 3 * len(KERNELS) - 1
    assert all("HIGHEST" in line for lines in found.values() for line in lines)


@pytest.mark.parametrize(("attributes", "highest"), CASES)
def test_nnx_jit_lowers_the_precision_the_model_carries(attributes, highest):
    linen = TResNet(SPEC, CLASSES, **attributes, pointwise_as_matmul=True)
    model = tresnet_jax.nnx.from_linen_variables(linen, random_variables(SPEC, CLASSES))
    assert (model.allow_tf32, model.pointwise_as_matmul) == (linen.allow_tf32, True)
    assert model.numerics == linen.numerics
    program = nnx.jit(lambda m, x: m(x)).lower(model, IMAGES).as_text()
    found = products(program)  # with 1x1 convolutions as products here
    assert (len(found["convolution"]), len(found["dot_general"])) == (len(KERNELS) - POINTWISE, DENSE + POINTWISE)
    assert all(("HIGHEST" in line) == highest for lines in found.values() for line in lines)


def test_stablehlo_export_is_true_float32_with_plain_convolutions():
    """The export traces the model at its precision, its 1x1 convolutions as convolutions
    whatever the model was built with (once per platform: the convolutions lower per platform)."""
    model = TResNet(SPEC, CLASSES, pointwise_as_matmul=True)
    exported = jax.export.deserialize(stablehlo_export(model, random_variables(SPEC, CLASSES), SIZE))
    assert exported.platforms == STABLEHLO_PLATFORMS
    assert_precision(exported.mlir_module(), highest=True, copies=len(STABLEHLO_PLATFORMS))


def test_onnx_export_has_every_convolution_whatever_the_model_was_built_with():
    model = TResNet(SPEC, CLASSES, pointwise_as_matmul=True)
    proto = onnx_model(model, random_variables(SPEC, CLASSES), SIZE, {})
    ops = [node.op_type for node in proto.graph.node]
    assert (ops.count("Conv"), ops.count("MatMul")) == (len(KERNELS), DENSE)


def test_pointwise_as_matmul_is_the_model_s_choice_not_the_backend_s():
    assert (len(KERNELS), POINTWISE, DENSE) == (14, 7, 7)  # what the counts below stand for
    plain = products(linen_program(TResNet(SPEC, CLASSES)))
    assert (len(plain["convolution"]), len(plain["dot_general"])) == (len(KERNELS), DENSE)
    fast = products(linen_program(TResNet(SPEC, CLASSES, pointwise_as_matmul=True)))
    assert (len(fast["convolution"]), len(fast["dot_general"])) == (len(KERNELS) - POINTWISE, DENSE + POINTWISE)
    # On a machine built for the CPU backend the choice is the product; elsewhere, the convolution.
    assert (pointwise_as_matmul_for("cpu"), pointwise_as_matmul_for("gpu"), pointwise_as_matmul_for("tpu")) == (
        True,
        False,
        False,
    )


def test_both_ways_of_writing_1x1_convolutions_give_the_same_logits():
    flat = traverse_util.flatten_dict(random_variables(SPEC, CLASSES, seed=2))
    rng = np.random.default_rng(3)
    for path, value in flat.items():  # every residual branch counts: no norm starts at zero
        if path[-1] == "scale":
            flat[path] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    head = ("params", "head", "fc", "kernel")  # logits of a few units, not of a hundredth
    flat[head] = rng.normal(0, 4 / np.sqrt(flat[head].shape[0]), flat[head].shape).astype(np.float32)
    variables = jax.device_put(traverse_util.unflatten_dict(flat))
    images = np.random.default_rng(0).uniform(size=IMAGES.shape).astype(np.float32)
    plain = tresnet_jax.jit(TResNet(SPEC, CLASSES).apply)(variables, images)
    fast = tresnet_jax.jit(TResNet(SPEC, CLASSES, pointwise_as_matmul=True).apply)(variables, images)
    # The same sums in another order (measured: 4.2e-7, of logits up to 1.8).
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-6 * max(1.0, float(jnp.max(jnp.abs(plain)))))


@pytest.mark.parametrize(("dtype", "allow_tf32", "highest"), [(jnp.float32, False, True), (jnp.float32, True, False),
                                                              (jnp.bfloat16, False, False)])  # fmt: skip
def test_float32_steps_are_true_float32_unless_tf32_is_asked_for(dtype, allow_tf32, highest):
    """The library's compiled evaluation and training steps carry the model's precision."""
    mesh = data_mesh(jax.devices()[:1])
    model = TResNet(SPEC, CLASSES, dtype=dtype, allow_tf32=allow_tf32)
    images = jnp.zeros((1, SIZE, SIZE, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    evaluation = make_eval_step(model, mesh, False).lower(variables, batch_spec(2, SIZE, mesh)).as_text()
    cfg = config(precision="fp32" if dtype == jnp.float32 else "bf16")
    train_model = model.clone(axis_name=BATCH_AXIS)
    tx = make_optimizer(cfg, 2)
    state = jax.eval_shape(lambda: create_state(TResNet(SPEC, CLASSES).init(jax.random.key(0), images), tx, cfg))
    batch = {k: v for k, v in batch_spec(2, SIZE, mesh).items() if k in ("image", "label")}
    training = make_train_step(train_model, tx, cfg, 2, mesh).lower(state, batch).as_text()
    for program in (evaluation, training):
        assert program.count("stablehlo.convolution") > 0
        convolutions = [line for line in program.splitlines() if "stablehlo.convolution" in line]
        assert all(("precision HIGHEST" in line) == highest for line in convolutions)
