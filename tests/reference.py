"""timm as the independent reference: random TResNets, their state_dicts in both layouts, and
forward passes in PyTorch."""

from __future__ import annotations

import numpy as np
import timm
import torch
from timm.layers import BlurPool2d, ConvNormAct

INPLACE_ABN_EPS = 1e-5


def timm_name(model_name: str) -> str:
    """timm has no official TResNet-L-V2: it is tresnet_v2_l with other slopes."""
    return "tresnet_v2_l" if model_name == "tresnet_l_v2" else model_name


def random_timm_model(model_name: str, num_classes: int = 1000, seed: int = 0, positive_gammas: bool = False):
    """A timm TResNet in eval mode with every tensor random: conv weights from timm's init,
    BatchNorm gammas of both signs (or, for the official layout, at least 0.05), betas and
    running statistics, and a head that spreads the logits."""
    torch.manual_seed(seed)
    model = timm.create_model(timm_name(model_name), num_classes=num_classes).eval()
    if model_name == "tresnet_l_v2":
        for module in model.modules():
            if isinstance(module, torch.nn.LeakyReLU):
                module.negative_slope = 1e-6
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                gamma = torch.empty_like(module.weight).uniform_(0.05, 1.5)
                sign = torch.ones_like(gamma) if positive_gammas else torch.randint(0, 2, gamma.shape) * 2.0 - 1
                module.weight.copy_(gamma * sign)
                module.bias.uniform_(-0.3, 0.3)
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1000)
        if num_classes:
            head = model.head.fc
            head.weight.normal_(0.0, 1.0 / np.sqrt(head.in_features))
            head.bias.uniform_(-0.5, 0.5)
    return model


def official_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same weights in the official repository's layout (InPlaceABN, Sequential indices).

    InPlaceABN scales by |w| + 1e-5, so each BatchNorm gamma g becomes w = ±(g - 1e-5) with a
    random sign; a stride-2 conv unit is Sequential(Sequential(conv, abn), blur), hence ``.0.0``.
    """
    generator = torch.Generator().manual_seed(seed)
    blurred = {
        name
        for name, module in model.named_modules()
        if isinstance(module, ConvNormAct) and isinstance(module.aa, BlurPool2d)
    }
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        for part, index in ((".conv.", 0), (".bn.", 1)):
            if part in key:
                unit, leaf = key.split(part)
                key = f"{unit}.0.{index}.{leaf}" if unit in blurred else f"{unit}.{index}.{leaf}"
                if part == ".bn." and leaf == "weight":
                    assert bool((value >= INPLACE_ABN_EPS).all()), "official layout needs gammas >= 1e-5"
                    sign = torch.randint(0, 2, value.shape, generator=generator) * 2.0 - 1
                    value = sign * (value - INPLACE_ABN_EPS)
                break
        out[key] = value.clone()
    return out


def torch_logits(model: torch.nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def torch_stage_features(model: torch.nn.Module, images_nhwc: np.ndarray) -> list[np.ndarray]:
    """The stem's and the four stages' outputs, NHWC."""
    with torch.no_grad():
        features = model.forward_intermediates(
            torch.from_numpy(images_nhwc).permute(0, 3, 1, 2), intermediates_only=True
        )
    return [f.permute(0, 2, 3, 1).numpy() for f in features]


def random_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, height, width, 3)).astype(np.float32)


def parity_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max(1, max |reference|): the parity measure the tests bound."""
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / max(1.0, np.abs(reference).max()))
