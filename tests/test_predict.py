"""predict.py: the top-5 classes of images with their probabilities (softmax of the same logits
as timm's), the classes above a threshold for multi-label weights (tests/test_asl_weights.py),
and one line for an image it cannot read."""

import numpy as np
import pytest
import torch

from tests.classifier import CLASSIFIER_SIZE
from tresnet_jax.cli import predict as predict_cli

pytestmark = pytest.mark.usefixtures("tiny_model")  # the classifier is tests/tiny_model.py's TResNet


def test_predict_prints_top5_with_probabilities(classifier, capsys):
    _, weights, expected, _, files = classifier
    code = predict_cli.main([files[0], files[1], "--weights", str(weights), "--image-size", str(CLASSIFIER_SIZE)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"weights: {weights}, converted in memory"
    assert lines[1] == f"{files[0]}:"
    assert lines[7] == f"{files[1]}:"
    probabilities = torch.softmax(torch.from_numpy(expected[0]), -1).numpy()
    best = int(np.argmax(probabilities))
    percent, *name = lines[2].split()
    assert name == ["class", str(best)]
    assert float(percent.rstrip("%")) == pytest.approx(100 * probabilities[best], abs=0.02)


def test_predict_reports_unreadable_images(folder, classifier, capsys):
    _, weights, *_ = classifier
    code = predict_cli.main([str(folder / "n01440764" / "corrupt.jpg"), "--weights", str(weights)])
    assert code == 1
    assert "corrupt.jpg: unreadable image" in capsys.readouterr().err
