"""Multi-label training and evaluation: the asymmetric loss against timm's
``AsymmetricLossMultiLabel`` (values and gradients) and optax, and mAP against scikit-learn."""

import torch  # first: before anything that might import TensorFlow (see conftest.py)

# isort: split

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import average_precision_score
from timm.loss.asymmetric_loss import AsymmetricLossMultiLabel

from tresnet_jax.metrics import average_precision_per_class, mean_average_precision
from tresnet_jax.train.losses import asymmetric_loss, binary_cross_entropy

# (gamma_neg, gamma_pos, clip)
SETTINGS = [(4.0, 0.0, 0.05), (4.0, 1.0, 0.05), (2.0, 0.0, 0.0), (0.0, 0.0, 0.0), (4.0, 0.0, None)]
SHAPES = [(8, 20), (3, 80), (16, 5)]


def random_case(seed, shape, dtype=np.float32, scale=10.0):
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-scale, scale, shape).astype(dtype)
    targets = (rng.random(shape) < 0.3).astype(dtype)
    return logits, targets


def timm_loss(logits, targets, setting, monkeypatch=None, grad=False):
    """timm's loss with the batch-mean reduction (ours); float64 when ``monkeypatch`` is given.

    timm casts the logits to float32 (``x.float()``); for a float64 reference that cast is made a
    no-op for the call, the rest of its code unchanged.
    """
    gamma_neg, gamma_pos, clip = setting
    criterion = AsymmetricLossMultiLabel(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, reduction="batchmean")
    x = torch.tensor(logits, requires_grad=grad)
    with monkeypatch.context() if monkeypatch else contextlib.nullcontext() as patch:
        if patch is not None:
            patch.setattr(torch.Tensor, "float", lambda self: self)
        loss = criterion(x, torch.tensor(targets))
    assert loss.dtype == x.dtype
    if not grad:
        return loss.item()
    loss.backward()
    return loss.item(), x.grad.numpy()


def relative(got, expected):
    return abs(got - expected) / abs(expected)


# float64 on both sides. The one difference in the arithmetic: timm's 1 - p is 1 - sigmoid(x),
# whose absolute error (2^-53 from rounding p) is relative error 2^-53 * (1 + e^x) <= 2.5e-12 in
# 1 - p for |x| <= 10; the log turns it into <= 2.5e-12 absolute per element (weights <= 1).
# The loss averages ~1 per element for these random cases, so the relative difference is
# ~1e-12 at most; asserted at 1e-10 (measured: <= 4e-13). Beyond |x| ~ 18.4 both clamp at eps.
@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_timm_in_float64(setting, monkeypatch):
    cases = [random_case(seed, shape, np.float64) for seed, shape in enumerate(SHAPES)]
    cases.append(random_case(7, (4, 30), np.float64, scale=30.0))  # some clamped at eps
    with jax.enable_x64(True):
        for logits, targets in cases:
            got = asymmetric_loss(jnp.asarray(logits), jnp.asarray(targets), *setting)
            assert got.dtype == jnp.float64
            assert relative(float(got), timm_loss(logits, targets, setting, monkeypatch)) < 1e-10


# float32, timm as shipped, with clipping (clip > 0): 1 - p_m >= clip, so no cancellation is
# amplified. Per element, timm's 1 - p carries <= 2^-25 absolute error (rounding p), relative
# <= 2^-25 / 0.05 = 6e-7 in 1 - p_m and so <= 6e-7 absolute in its log; the weights' errors
# are <= gamma * 2^-24 relative, or multiply a log that is as small as the error is large
# ((1 - p)^gamma_pos times -log p ~ 1 - p). With ~1 of loss per element that is <= ~1e-6
# relative, plus float32 rounding of the logs, products and the (pairwise) sum: a few ulps plus
# log2(n) ulps, ~1e-6. Asserted at 1e-5 (measured over 200 seeds: <= 5e-7).
# Without clipping timm's float32 1 - sigmoid(x) loses up to 2^-25 * e^10 = 7e-4 relative for
# negatives at x = 10, enough to move the sum by ~1.4e-5 (measured): that is timm's rounding,
# which ours avoids (1 - p = sigmoid(-x)); those settings are checked in float64 above and for
# float32 accuracy below.
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s[2]])
def test_matches_timm_in_float32(setting):
    for seed, shape in enumerate(SHAPES):
        logits, targets = random_case(seed, shape)
        got = asymmetric_loss(logits, targets, *setting)
        assert got.dtype == jnp.float32
        assert relative(float(got), timm_loss(logits, targets, setting)) < 1e-5


# Ours in float32 against ours in float64, all settings. No cancellation: log-sigmoids, 1 - p as
# sigmoid(-x), 1 - p_m >= clip. Each term is within a few ulps (the pow multiplies the relative
# error of its base by gamma: 4 ulps), every term is >= 0, so the pairwise sum adds log2(n) ulps:
# ~20 * 2^-24 = 1.2e-6 at worst. Asserted at 1e-5 (measured: <= 6e-7).
@pytest.mark.parametrize("setting", SETTINGS)
def test_float32_is_accurate(setting):
    for seed, shape in enumerate(SHAPES):
        logits, targets = random_case(seed, shape)
        got = float(asymmetric_loss(logits, targets, *setting))
        with jax.enable_x64(True):
            exact = float(
                asymmetric_loss(jnp.asarray(logits, jnp.float64), jnp.asarray(targets, jnp.float64), *setting)
            )
        assert relative(got, exact) < 1e-5


@pytest.mark.parametrize("setting", [(4.0, 1.0, 0.05), (2.0, 0.0, None)])
def test_gradient_matches_torch_autograd(setting, monkeypatch):
    # float64 both sides; the gradient flows through the focusing weights in both (timm's
    # default). The same 2^-53 * e^10 argument as for the value bounds the difference per
    # element by ~1e-11 of the largest component.
    logits, targets = random_case(11, (6, 24), np.float64)
    expected_loss, expected = timm_loss(logits, targets, setting, monkeypatch, grad=True)
    with jax.enable_x64(True):
        loss, grad = jax.jit(jax.value_and_grad(lambda x: asymmetric_loss(x, jnp.asarray(targets), *setting)))(
            jnp.asarray(logits)
        )
    assert relative(float(loss), expected_loss) < 1e-10
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-9, atol=1e-10 * np.abs(expected).max())
    assert (expected == 0).any() == (setting[2] is not None)  # clipped negatives: no gradient


def soft_targets(seed, shape, dtype):
    """Label smoothing / mixup targets: uniform in [0, 1], and random_case's multi-hot smoothed by
    0.1 (0.05 and 0.95)."""
    _, multi_hot = random_case(seed, shape, dtype)
    uniform = np.random.default_rng(100 + seed).random(shape).astype(dtype)
    return [uniform, (multi_hot * 0.9 + 0.05).astype(dtype)]


# Soft targets against timm: one focusing weight per element, (1 - pt)**(gamma_pos * y +
# gamma_neg * (1 - y)), on the logits of the 0/1 comparisons above, so the logs' bounds carry
# over. The one new difference is the weight's base: timm's 1 - pt is 1 minus a rounded pt
# (absolute error ~1 ulp of 1: 2^-53, 2^-24), ours y * (1 - p) + (1 - y) * p_m, without the
# cancellation. That is relative 2^-24 / (1 - pt) in the base and e times that in the weight b**e
# (e the exponent, <= 4): <= 2e ulps of the term where 1 - pt >= 1/2. Where 1 - pt is small the
# loss term it weights is small too, <= ~37 (1 - pt) (y log p with 1 - p or y small, (1 - y)
# log(1 - p_m) with p_m or 1 - y small), so the product's error is <= 37 e b**e 2^-24: <= 37 *
# 2^-24 = 2.2e-6 for e < 1, less for e >= 1 once b is small. With ~1 of loss per element that is
# <= ~2e-6 relative in float32 (asserted at 1e-5; measured <= 3.8e-7, <= 5.2e-7 over 200 seeds)
# and ~4e-15 in float64. Float64 without clipping, the scale-30 case dominates: for 10 < |x| <
# 18.4 timm's 1 - sigmoid(x) errs by up to 2^-53 e^18.4 = 1e-8 absolute, not yet clamped, and soft
# targets use that log for every element, where 0/1 targets use it for negatives only. Measured:
# <= 7.2e-12 (<= 1.3e-14 at scale 10; the 0/1 targets above reach 4.2e-11 over 200 seeds, as high
# as soft ones), asserted at the same 1e-10.
@pytest.mark.parametrize("setting", SETTINGS)
def test_soft_targets_match_timm_in_float64(setting, monkeypatch):
    cases = [(seed, shape, 10.0) for seed, shape in enumerate(SHAPES)] + [(7, (4, 30), 30.0)]
    with jax.enable_x64(True):
        for seed, shape, scale in cases:
            logits, _ = random_case(seed, shape, np.float64, scale)
            for targets in soft_targets(seed, shape, np.float64):
                got = asymmetric_loss(jnp.asarray(logits), jnp.asarray(targets), *setting)
                assert got.dtype == jnp.float64
                assert relative(float(got), timm_loss(logits, targets, setting, monkeypatch)) < 1e-10


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s[2]])
def test_soft_targets_match_timm_in_float32(setting):
    for seed, shape in enumerate(SHAPES):
        logits, _ = random_case(seed, shape)
        for targets in soft_targets(seed, shape, np.float32):
            got = asymmetric_loss(logits, targets, *setting)
            assert got.dtype == jnp.float32
            assert relative(float(got), timm_loss(logits, targets, setting)) < 1e-5


# The weight's base 1 - pt is 0 for clipped negatives (p <= clip) and, in float32, once
# sigmoid(-|x|) underflows (|x| > ~104), and b**e has an infinite derivative at b = 0 for e < 1
# (NaN in JAX for e = 0); the logs saturate at log(eps). Both signs, 0/1 and soft targets, float32
# and float64: the loss and its gradient stay finite.
@pytest.mark.parametrize("setting", [(4.0, 0.0, 0.05), (4.0, 1.0, 0.05), (0.0, 0.0, None)])
def test_gradient_is_finite_for_saturated_logits(setting):
    signs = np.array([1.0, -1.0] * 6)
    multi_hot = np.repeat([[1.0, 1.0, 0.0, 0.0]], 3, axis=0).reshape(12)
    soft = np.random.default_rng(5).random(12)
    targets = np.stack([multi_hot, multi_hot * 0.9 + 0.05, soft, np.full(12, 0.5)])
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.float64):
            y = jnp.asarray(targets, dtype)
            value_and_grad = jax.jit(jax.value_and_grad(lambda x, y=y: asymmetric_loss(x, y, *setting)))
            for magnitude in (50.0, 1e4):
                loss, grad = value_and_grad(jnp.asarray(np.tile(magnitude * signs, (4, 1)), dtype))
                assert grad.dtype == dtype
                assert np.isfinite(float(loss))
                assert np.isfinite(np.asarray(grad)).all(), (dtype, magnitude)


def test_binary_cross_entropy_matches_optax():
    # The same per-element formula (log-sigmoids, no eps clamp reached for |x| <= 10), summed in
    # float32: a pairwise sum of n terms >= 0 differs by <= log2(n) ulps, < 1e-6.
    for seed, shape in enumerate(SHAPES):
        logits, targets = random_case(seed, shape)
        soft = np.random.default_rng(seed).random(shape).astype(np.float32)
        for labels in (targets, soft):
            expected = float(optax.sigmoid_binary_cross_entropy(logits, labels).sum()) / shape[0]
            assert relative(float(binary_cross_entropy(logits, labels)), expected) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_are_upcast(dtype):
    # fp16 alone would round sigmoid(12) to 1 and log(1 - p) to log(eps): float32 does not.
    logits, targets = random_case(5, (4, 10), scale=12.0)
    low = jnp.asarray(logits, dtype)
    loss = jax.jit(asymmetric_loss)(low, targets)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(float(asymmetric_loss(low.astype(jnp.float32), targets)), rel=1e-6)
    grad = jax.grad(lambda x: asymmetric_loss(x, targets, clip=None))(low)
    assert grad.dtype == dtype
    assert bool(jnp.isfinite(grad).all())


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"must both be \(batch, classes\); got \(2, 3\) and \(2, 4\)"):
        asymmetric_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="must both be"):
        binary_cross_entropy(jnp.zeros(3), jnp.zeros(3))


def metric_case(seed, tied):
    rng = np.random.default_rng(seed)
    samples, classes = int(rng.integers(20, 200)), int(rng.integers(3, 15))
    scores = rng.random((samples, classes))
    if tied:
        scores = np.round(scores, 1)  # ~10 distinct values per class: many ties
    targets = (rng.random((samples, classes)) < rng.uniform(0.05, 0.5)).astype(int)
    targets[:, rng.choice(classes, size=2, replace=False)] = 0  # classes without positives
    targets[:, -1] = targets[:, -1] | (scores[:, -1] > 0.5)  # one class with a signal
    return scores, targets


@pytest.mark.parametrize("tied", [False, True])
def test_mean_average_precision_matches_sklearn(tied):
    for seed in range(10):
        scores, targets = metric_case(seed, tied)
        keep = targets.sum(axis=0) > 0
        expected = average_precision_score(targets[:, keep], scores[:, keep], average="macro") * 100
        assert abs(mean_average_precision(scores, targets) - expected) < 1e-6
        per_class = average_precision_per_class(scores, targets)
        assert np.isnan(per_class[~keep]).all()
        np.testing.assert_allclose(
            per_class[keep], average_precision_score(targets[:, keep], scores[:, keep], average=None), atol=1e-12
        )


def test_average_precision_ties_by_hand():
    # Thresholds 0.9 (P 1, R 1/2) and 0.8, where both tied samples enter (P 2/3, R 1): AP = 5/6.
    scores = np.array([[0.9], [0.8], [0.8], [0.1]])
    targets = np.array([[1], [0], [1], [0]])
    assert average_precision_per_class(scores, targets)[0] == pytest.approx(5 / 6, abs=1e-15)
    # bool targets, logits as scores: only the order matters.
    assert mean_average_precision(np.log(scores), targets.astype(bool)) == pytest.approx(500 / 6, abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.zeros(4), np.zeros(4), "must be 2-D .* got 1-D and 1-D"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2)), "must be 2-D .* got 3-D and 2-D"),
        (np.zeros((3, 2)), np.zeros((2, 3)), r"same shape; got \(3, 2\) and \(2, 3\)"),
        (np.array([[0.5, np.nan], [0.1, 0.2]]), np.eye(2), "finite; 1 of 4 are NaN or inf"),
        (np.array([[0.5, np.inf], [0.1, 0.2]]), np.eye(2), "finite"),
        (np.zeros((2, 2)), np.array([[0, 2], [1, 0]]), r"binary \(0 or 1\); found 2 \(1 of 4\)"),
        (np.zeros((2, 2)), np.array([[0, 0.5], [1, 0]]), r"binary \(0 or 1\); found 0\.5"),
        (np.array([["a", "b"]]), np.array([[0, 1]]), "real numbers"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "no class has a positive target"),
    ],
)
def test_metric_rejects_bad_inputs(scores, targets, message):
    with pytest.raises(ValueError, match=message) as error:
        mean_average_precision(scores, targets)
    assert "\n" not in str(error.value)
