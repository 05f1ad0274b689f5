"""The building blocks of TResNet, NHWC, with PyTorch-equal semantics.

Every layer computes in ``dtype`` (float32, bfloat16 or float16) while its parameters and
BatchNorm statistics stay float32; reductions (BatchNorm statistics, squeeze-excite and global
pooling) accumulate in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Array = jax.Array

# Kaiming-normal, fan_out, gain sqrt(2): what the original initialises every conv with.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init for conv and linear layers: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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


def conv2d(x: Array, kernel: Array, pointwise_as_matmul: bool | None = None) -> Array:
    """Stride-1 convolution with zero 'same' padding: NHWC input, HWIO kernel, odd kernel size.

    With ``pointwise_as_matmul`` (default: when JAX's default backend is the CPU) a 1x1
    convolution is written as the matrix product it is. On XLA:CPU that makes its weight
    gradient a matrix product too, where the convolution's weight gradient runs over a
    transposed copy of the input into which XLA re-fuses, and recomputes, the residual
    additions of every earlier block. Same numbers up to float rounding; other backends keep
    the convolution.
    """
    if pointwise_as_matmul is None:
        pointwise_as_matmul = jax.default_backend() == "cpu"
    if pointwise_as_matmul and kernel.shape[:2] == (1, 1):
        # A plain 2-D product: as a 4-D einsum XLA:CPU lays out the backward pass with
        # transposed copies of the gradients (the step is 9-17 % slower).
        n, h, w, c = x.shape
        return (x.reshape(n * h * w, c) @ kernel[0, 0]).reshape(n, h, w, kernel.shape[-1])
    pad = [(kernel.shape[0] // 2,) * 2, (kernel.shape[1] // 2,) * 2]
    return lax.conv_general_dilated(x, kernel, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
    """Bias-free stride-1 'same' convolution (``conv2d``), kernel ``(k, k, in, out)`` stored
    float32 under the name ``kernel`` as Flax's ``nn.Conv`` stores it."""

    features: int
    kernel_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        return conv2d(x.astype(self.dtype), kernel.astype(self.dtype))


class BatchNorm(nn.Module):
    """BatchNorm over N, H, W with PyTorch's semantics.

    Normalises with the biased batch variance and keeps the unbiased one in the running
    statistics, as ``torch.nn.BatchNorm2d`` does. ``momentum`` follows the Flax convention
    (0.9 here equals PyTorch's 0.1). With ``axis_name`` the batch statistics are averaged over
    that mapped axis (synchronised BatchNorm across devices).
    """

    use_running_average: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    scale_init: nn.initializers.Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            mean_sq = jnp.mean(jnp.square(xf), axes)
            count = math.prod(x.shape[:-1])
            if self.axis_name is not None:
                mean, mean_sq = lax.pmean((mean, mean_sq), self.axis_name)
                count = count * lax.psum(1, self.axis_name)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * unbiased

        mul = scale * lax.rsqrt(var + self.epsilon)
        add = bias - mean * mul
        return (x.astype(jnp.float32) * mul + add).astype(self.dtype)


class ConvNormAct(nn.Module):
    """Conv (stride 1, 'same' padding, no bias) -> BatchNorm -> optional LeakyReLU -> optional
    anti-aliased stride-2 downsampling. Submodules are named ``conv`` and ``bn`` as in timm."""

    features: int
    kernel_size: int
    slope: float | None  # LeakyReLU negative slope; None: no activation
    downsample: bool = False
    zero_init_norm: bool = False
    train: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = Conv(self.features, self.kernel_size, dtype=self.dtype, name="conv")(x)
        x = BatchNorm(
            use_running_average=not self.train,
            dtype=self.dtype,
            axis_name=self.axis_name,
            scale_init=nn.initializers.zeros if self.zero_init_norm else nn.initializers.ones,
            name="bn",
        )(x)
        if self.slope is not None:
            x = nn.leaky_relu(x, self.slope)
        if self.downsample:
            x = blur_downsample(x)
        return x


class SqueezeExcite(nn.Module):
    """Spatial mean -> fc1 -> ReLU -> fc2 -> sigmoid -> channel scale (fc1/fc2 are 1x1 convs in
    PyTorch, dense layers here)."""

    reduced: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        s = nn.relu(self._fc(self.reduced, channels, "fc1")(s))
        s = self._fc(channels, self.reduced, "fc2")(s)
        return x * nn.sigmoid(s)[:, None, None, :].astype(x.dtype)

    def _fc(self, width: int, fan_in: int, name: str) -> nn.Dense:
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_kernel_init,
            bias_init=torch_default_bias_init(fan_in),
            name=name,
        )
