"""Each layer against its PyTorch/timm counterpart, including odd sizes and training mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec
from timm.layers import BlurPool2d, SpaceToDepth

from tresnet_jax.model.layers import BatchNorm, avg_pool_shortcut, blur_downsample, space_to_depth


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def test_space_to_depth_channel_order_equals_pytorch():
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    expected = nhwc(SpaceToDepth(4)(nchw(x)))
    np.testing.assert_array_equal(np.asarray(space_to_depth(jnp.asarray(x))), expected)


def test_space_to_depth_rejects_sides_not_multiple_of_four():
    with pytest.raises(ValueError, match="divisible by 4, got 30x32"):
        space_to_depth(jnp.zeros((1, 30, 32, 3)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 7, 9, 4), (1, 2, 3, 1)])
def test_blur_downsample_equals_timm_blurpool(shape):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    expected = nhwc(BlurPool2d(shape[-1], filt_size=3, stride=2)(nchw(x)))
    out = np.asarray(blur_downsample(jnp.asarray(x)))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 5, 2)])
def test_avg_pool_shortcut_equals_pytorch_ceil_mode_excluding_padding(shape):
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    expected = nhwc(pool(nchw(x)))
    out = np.asarray(avg_pool_shortcut(jnp.asarray(x)))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def _torch_bn_after_step(x: np.ndarray, scale, bias, mean, var):
    bn = torch.nn.BatchNorm2d(x.shape[-1], eps=1e-5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(scale))
        bn.bias.copy_(torch.from_numpy(bias))
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
    bn.train()
    out = nhwc(bn(nchw(x)))
    return out, bn.running_mean.numpy(), bn.running_var.numpy()


def _bn_inputs(seed=3):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(4, 5, 3, 6)) * 2 + 0.7).astype(np.float32)
    scale = rng.uniform(-1, 1, 6).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    mean = rng.normal(size=6).astype(np.float32)
    var = rng.uniform(0.5, 2, 6).astype(np.float32)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
    return x, variables


def test_batchnorm_training_step_equals_pytorch_including_unbiased_running_var():
    x, variables = _bn_inputs()
    out, updates = BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
    expected, mean, var = _torch_bn_after_step(x, *variables["params"].values(), *variables["batch_stats"].values())
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["mean"]), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["var"]), var, rtol=1e-5, atol=1e-6)


def test_batchnorm_inference_uses_running_statistics():
    x, variables = _bn_inputs(4)
    out = BatchNorm().apply(variables, x)
    p, s = variables["params"], variables["batch_stats"]
    expected = (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-5)


def test_batchnorm_synchronised_over_devices_equals_whole_batch():
    """With axis_name, 2 devices holding half the batch each normalise (and update running
    statistics) exactly as one device holding all of it."""
    x, variables = _bn_inputs(5)
    whole, whole_updates = BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])

    mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
    bn = BatchNorm(use_running_average=False, axis_name="batch")

    def per_device(v, xs):
        return bn.apply(v, xs, mutable=["batch_stats"])

    sharded = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec("batch")),
            out_specs=(PartitionSpec("batch"), PartitionSpec()),
        )
    )
    out, updates = sharded(variables, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(whole), rtol=0, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            np.asarray(updates["batch_stats"][name]), np.asarray(whole_updates["batch_stats"][name]), rtol=1e-6
        )
