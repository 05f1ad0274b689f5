"""Shared test set-up: fake CPU devices for the multi-device tests, and a private weights root."""

import os

# Multi-device code is tested on CPU by splitting the host into fake devices; this must be set
# before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture
def weights_root(tmp_path, monkeypatch):
    """A fresh, empty directory as $TRESNET_JAX_WEIGHTS."""
    root = tmp_path / "weights"
    monkeypatch.setenv("TRESNET_JAX_WEIGHTS", str(root))
    return root
