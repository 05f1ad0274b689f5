"""What eval.py is checked against: the official evaluation transform written with PIL, and a
timm classifier for a test image folder whose predictions differ from image to image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.reference import random_timm_model, torch_logits
from tresnet_jax.data.sources import FolderSource

CLASSIFIER_SIZE = 64  # the side the fitted classifier's reference logits are computed at


def pil_preprocess(path, size: int, crop_pct: float = 0.875, squish: bool = False, resample=Image.BILINEAR):
    """The official evaluation transform, written with PIL and numpy as the reference."""
    image = Image.open(path).convert("RGB")
    if squish:
        return np.asarray(image.resize((size, size), resample), np.float32) / 255
    short = int(size / crop_pct)
    width, height = image.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    pixels = np.asarray(image.resize((new_w, new_h), resample), np.float32)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    return pixels[top : top + size, left : left + size] / 255


def fitted_classifier(folder: Path, path: Path, size: int, seed: int = 8, model_name: str = "tresnet_m"):
    """A timm TResNet (``model_name``) for the classes of ``folder`` (``tests.images.image_folder``),
    saved to ``path``: random backbone, and a head fitted (ridge regression on its pooled
    features) so its predictions differ from image to image.

    Returns (timm model, checkpoint path, reference logits and labels of the readable images at
    ``size`` px, their files)."""
    source = FolderSource.scan(folder)
    readable = [i for i, f in enumerate(source.files) if "corrupt" not in f]
    images = np.stack([pil_preprocess(source.files[i], size) for i in readable])
    labels = source.labels[readable]
    model = random_timm_model(model_name, num_classes=len(source.class_names), seed=seed)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)), True)
    features = features.numpy().astype(np.float64)
    mean = features.mean(0)
    targets = 10 * np.eye(len(source.class_names))[labels]
    centred = features - mean
    weight = np.linalg.solve(centred.T @ centred + np.eye(centred.shape[1]), centred.T @ targets)
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.from_numpy(weight.T.astype(np.float32)))
        model.head.fc.bias.copy_(torch.from_numpy((targets.mean(0) - mean @ weight).astype(np.float32)))
    torch.save(model.state_dict(), path)
    logits = torch_logits(model, images)
    return model, path, logits, labels, [source.files[i] for i in readable]
