"""The building blocks of TResNet, NHWC, with PyTorch-equal semantics.

Every layer computes as its ``Numerics`` say: in ``dtype`` (float32, bfloat16 or float16) while
its parameters and BatchNorm statistics stay float32, its convolutions and matrix products at
the precision the model carries; reductions (BatchNorm statistics, squeeze-excite and global
pooling) accumulate in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Init:
    """One initial distribution of the original, drawn two ways: as a Flax initializer
    (``init(key, shape, dtype)``, for ``Module.init``) and on the host with NumPy (``draw``, for
    ``create_model``, which compiles nothing). ``kind``: ``kaiming`` (normal, std
    sqrt(2 / fan_out), fan_out = out features x kernel area), ``normal`` (std ``scale``),
    ``uniform`` (+-``scale``) or ``constant`` (``scale``)."""

    kind: str
    scale: float = 0.0

    def std(self, shape: tuple[int, ...]) -> float:
        if self.kind == "kaiming":
            return math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1]))
        return self.scale

    def __call__(self, key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, -self.scale, self.scale)
        if self.kind == "constant":
            return jnp.full(shape, self.scale, dtype)
        return jax.random.normal(key, shape, dtype) * jnp.asarray(self.std(shape), dtype)

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "uniform":
            return rng.uniform(-self.scale, self.scale, shape).astype(np.float32)
        if self.kind == "constant":
            return np.full(shape, self.scale, np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(self.std(shape))


KAIMING = Init("kaiming")  # what the original initialises every conv (and the SE's 1x1 convs) with
ZEROS, ONES = Init("constant", 0.0), Init("constant", 1.0)


def torch_default_bias_init(fan_in: int) -> Init:
    """PyTorch's default bias init for conv and linear layers: U(-1/sqrt(fan_in), +)."""
    return Init("uniform", 1.0 / math.sqrt(fan_in))


@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """A variable's shape and initial distribution, known without tracing the model."""

    shape: tuple[int, ...]
    init: Init


Specs = dict[tuple[str, ...], VariableSpec]  # (collection, module..., leaf) -> spec


def nested(prefix: tuple[str, ...], specs: Specs) -> Specs:
    """``specs`` of a submodule, placed under the module path ``prefix`` (after the collection)."""
    return {(path[0], *prefix, *path[1:]): spec for path, spec in specs.items()}


def space_to_depth(x: Array, block: int = 4) -> Array:
    """(N, H, W, C) -> (N, H/b, W/b, b*b*C), channel = (dy*b + dx)*C + c, as in the original."""
    n, h, w, c = x.shape
    if h % block or w % block:
        raise ValueError(f"TResNet needs image sides divisible by {block}, got {h}x{w}")
    with jax.named_scope("space_to_depth"):  # names the ops in profiles, computes nothing
        x = x.reshape(n, h // block, block, w // block, block, c)
        x = x.transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h // block, w // block, block * block * c)


def _blur_axis(x: Array, axis: int) -> Array:
    """[1, 2, 1]/4 along one spatial axis, reflect padding 1, stride 2 (output ceil(n/2))."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    x = jnp.pad(x, pad, mode="reflect")
    out = (n + 1) // 2

    def taps(start: int) -> Array:
        return lax.slice_in_dim(x, start, start + 2 * out - 1, stride=2, axis=axis)

    return (taps(0) + taps(2)) * 0.25 + taps(1) * 0.5


def blur_downsample(x: Array) -> Array:
    """Anti-aliased stride-2 downsampling: the fixed binomial 3x3 blur (outer([1,2,1])/16).

    Written as two separable strided weighted sums rather than a depthwise convolution:
    identical numbers, and XLA compiles it to cheap fused element-wise code, where a
    depthwise convolution (and above all its gradient) is a slow path.
    """
    with jax.named_scope("blur"):
        return _blur_axis(_blur_axis(x, 1), 2)


def avg_pool_shortcut(x: Array) -> Array:
    """AvgPool 2x2, stride 2, ceil mode, padding excluded from the count (PyTorch semantics)."""
    _, h, w, _ = x.shape
    with jax.named_scope("avg_pool_shortcut"):
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)), count_include_pad=False)


def conv2d(
    x: Array, kernel: Array, *, precision: lax.Precision | None = None, pointwise_as_matmul: bool = False
) -> Array:
    """Stride-1 convolution with zero 'same' padding: NHWC input, HWIO kernel, odd kernel size,
    at ``precision`` (None: JAX's default).

    With ``pointwise_as_matmul`` a 1x1 convolution is written as the matrix product it is. On
    XLA:CPU that makes its weight gradient a matrix product too, where the convolution's weight
    gradient runs over a transposed copy of the input into which XLA re-fuses, and recomputes,
    the residual additions of every earlier block (a faster training step, the same inference:
    BENCHMARKS.md, changes 3 and 5). Same numbers up to float rounding.
    """
    if pointwise_as_matmul and kernel.shape[:2] == (1, 1):
        # A plain 2-D product: as a 4-D einsum XLA:CPU lays out the backward pass with
        # transposed copies of the gradients (the step is 9-17 % slower).
        n, h, w, c = x.shape
        rows = jnp.matmul(x.reshape(n * h * w, c), kernel[0, 0], precision=precision)
        return rows.reshape(n, h, w, kernel.shape[-1])
    pad = [(kernel.shape[0] // 2,) * 2, (kernel.shape[1] // 2,) * 2]
    return lax.conv_general_dilated(
        x, kernel, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How a model computes its convolutions and matrix products: in ``dtype``, at
    ``precision`` (None: JAX's default), 1x1 convolutions as matrix products or not
    (``conv2d``). A model makes its own with ``Numerics.of`` and hands them to every layer, so
    its numbers do not depend on where it is called from."""

    dtype: Dtype
    precision: lax.Precision | None
    pointwise_as_matmul: bool

    @classmethod
    def of(cls, dtype: Dtype, allow_tf32: bool = False, pointwise_as_matmul: bool = False) -> Numerics:
        """A model's numerics, the one rule: float32 computes in true float32 (``HIGHEST``)
        unless ``allow_tf32``, which leaves float32 at JAX's default: TF32 on NVIDIA GPUs since
        Ampere (10 mantissa bits instead of 23), bfloat16 passes on TPUs, float32 on the CPU.
        bfloat16 and float16 models compute at JAX's default precision."""
        true_float32 = jnp.dtype(dtype) == jnp.float32 and not allow_tf32
        return cls(dtype, lax.Precision.HIGHEST if true_float32 else None, pointwise_as_matmul)

    def in_float32(self) -> Numerics:
        """The same precision, computing in float32 (the logits of a bfloat16 model)."""
        return dataclasses.replace(self, dtype=jnp.float32)

    def conv(self, x: Array, kernel: Array) -> Array:
        """``conv2d`` in ``dtype`` of a float32 ``kernel``."""
        return conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            precision=self.precision,
            pointwise_as_matmul=self.pointwise_as_matmul,
        )

    def dense(self, x: Array, kernel: Array, bias: Array) -> Array:
        """``x @ kernel + bias`` in ``dtype`` of float32 parameters."""
        product = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
        return product + bias.astype(self.dtype)


FLOAT32 = Numerics.of(jnp.float32)  # a layer's default: true float32, 1x1 convolutions as convolutions


def conv_specs(in_features: int, features: int, kernel_size: int) -> Specs:
    return {("params", "kernel"): VariableSpec((kernel_size, kernel_size, in_features, features), KAIMING)}


def batch_norm_specs(features: int, zero_init: bool = False) -> Specs:
    return {
        ("params", "scale"): VariableSpec((features,), ZEROS if zero_init else ONES),
        ("params", "bias"): VariableSpec((features,), ZEROS),
        ("batch_stats", "mean"): VariableSpec((features,), ZEROS),
        ("batch_stats", "var"): VariableSpec((features,), ONES),
    }


def conv_norm_act_specs(in_features: int, features: int, kernel_size: int, zero_init_norm: bool = False) -> Specs:
    return nested(("conv",), conv_specs(in_features, features, kernel_size)) | nested(
        ("bn",), batch_norm_specs(features, zero_init_norm)
    )


def dense_specs(in_features: int, features: int, kernel_init: Init) -> Specs:
    return {
        ("params", "kernel"): VariableSpec((in_features, features), kernel_init),
        ("params", "bias"): VariableSpec((features,), torch_default_bias_init(in_features)),
    }


def squeeze_excite_specs(channels: int, reduced: int) -> Specs:
    """fc1/fc2 are 1x1 convs in PyTorch (kaiming init), dense layers here."""
    return nested(("fc1",), dense_specs(channels, reduced, KAIMING)) | nested(
        ("fc2",), dense_specs(reduced, channels, KAIMING)
    )


def declare(module: nn.Module, specs: Specs) -> dict[str, Any]:
    """Create a Linen module's own (one-level) variables from their specs; returns them by leaf
    name, those outside ``params`` as ``flax`` Variables (so training can update statistics)."""
    out = {}
    for (collection, name), spec in specs.items():
        if collection == "params":
            out[name] = module.param(name, spec.init, spec.shape, jnp.float32)
        else:
            out[name] = module.variable(collection, name, _draw_variable, module, spec)
    return out


def _draw_variable(module: nn.Module, spec: VariableSpec) -> Array:
    """A variable outside ``params``, drawn with a key only when random (ML-Decoder's queries),
    so BatchNorm's constant statistics take none."""
    key = module.make_rng("params") if spec.init.kind != "constant" else None
    return spec.init(key, spec.shape, jnp.float32)


def batch_norm(
    x: Array,
    scale: Array,
    bias: Array,
    mean: Array,
    var: Array,
    train: bool,
    axis_name: str | None = None,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
) -> tuple[Array, Array, Array]:
    """BatchNorm over N, H, W with PyTorch's semantics: ``(y, running mean, running var)``.

    In training, normalises with the biased batch variance and keeps the unbiased one in the
    running statistics, as ``torch.nn.BatchNorm2d`` does; ``momentum`` follows the Flax
    convention (0.9 here equals PyTorch's 0.1). With ``axis_name`` the batch statistics are
    averaged over that mapped axis (synchronised BatchNorm across devices). ``y`` has x's dtype.
    """
    new_mean, new_var = mean, var
    if train:
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        batch_mean = jnp.mean(xf, axes)
        mean_sq = jnp.mean(jnp.square(xf), axes)
        count = math.prod(x.shape[:-1])
        if axis_name is not None:
            batch_mean, mean_sq = lax.pmean((batch_mean, mean_sq), axis_name)
            count = count * lax.psum(1, axis_name)
        batch_var = jnp.maximum(mean_sq - jnp.square(batch_mean), 0.0)
        unbiased = batch_var * (count / jnp.maximum(count - 1, 1))
        new_mean = momentum * mean + (1 - momentum) * batch_mean
        new_var = momentum * var + (1 - momentum) * unbiased
        mean, var = batch_mean, batch_var
    mul = scale * lax.rsqrt(var + epsilon)
    add = bias - mean * mul
    return (x.astype(jnp.float32) * mul + add).astype(x.dtype), new_mean, new_var


def squeeze_excite(x: Array, fc1: Callable[[Array], Array], fc2: Callable[[Array], Array]) -> Array:
    """Spatial mean (float32) -> fc1 -> ReLU -> fc2 -> sigmoid -> channel scale of ``x``."""
    s = fc2(jax.nn.relu(fc1(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))))
    return x * jax.nn.sigmoid(s)[:, None, None, :].astype(x.dtype)


def conv_norm_act_tail(x: Array, slope: float | None, downsample: bool) -> Array:
    """What follows conv + norm: optional LeakyReLU, optional anti-aliased stride-2 downsampling."""
    if slope is not None:
        x = jax.nn.leaky_relu(x, slope)
    return blur_downsample(x) if downsample else x


class Conv(nn.Module):
    """Bias-free stride-1 'same' convolution (``conv2d``), kernel ``(k, k, in, out)`` stored
    float32 under the name ``kernel`` as Flax's ``nn.Conv`` stores it."""

    features: int
    kernel_size: int
    numerics: Numerics = FLOAT32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = declare(self, conv_specs(x.shape[-1], self.features, self.kernel_size))["kernel"]
        return self.numerics.conv(x, kernel)


class BatchNorm(nn.Module):
    """``batch_norm`` as a Linen module: ``scale``/``bias`` parameters, running ``mean``/``var``
    in ``batch_stats``, updated when not ``use_running_average``."""

    use_running_average: bool = True
    zero_init: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        v = declare(self, batch_norm_specs(x.shape[-1], self.zero_init))
        train = not self.use_running_average
        y, mean, var = batch_norm(x, v["scale"], v["bias"], v["mean"].value, v["var"].value, train, self.axis_name)
        if train and not self.is_initializing():
            v["mean"].value, v["var"].value = mean, var
        return y


class ConvNormAct(nn.Module):
    """Conv (stride 1, 'same' padding, no bias) -> BatchNorm -> optional LeakyReLU -> optional
    anti-aliased stride-2 downsampling. Submodules are named ``conv`` and ``bn`` as in timm."""

    features: int
    kernel_size: int
    slope: float | None  # LeakyReLU negative slope; None: no activation
    downsample: bool = False
    zero_init_norm: bool = False
    train: bool = False
    numerics: Numerics = FLOAT32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = Conv(self.features, self.kernel_size, self.numerics, name="conv")(x)
        x = BatchNorm(not self.train, self.zero_init_norm, self.axis_name, name="bn")(x)
        return conv_norm_act_tail(x, self.slope, self.downsample)


class Dense(nn.Module):
    """``Numerics.dense`` as a Linen module with the original's initialisation (``dense_specs``)."""

    features: int
    kernel_init: Init
    numerics: Numerics = FLOAT32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        v = declare(self, dense_specs(x.shape[-1], self.features, self.kernel_init))
        return self.numerics.dense(x, v["kernel"], v["bias"])


class SqueezeExcite(nn.Module):
    """``squeeze_excite`` with its two dense layers named ``fc1`` and ``fc2``."""

    reduced: int
    numerics: Numerics = FLOAT32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fc1 = Dense(self.reduced, KAIMING, self.numerics, name="fc1")
        return squeeze_excite(x, fc1, Dense(x.shape[-1], KAIMING, self.numerics, name="fc2"))
