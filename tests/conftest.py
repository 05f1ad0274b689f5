"""Shared test set-up: everything on the CPU, fake CPU devices for the multi-device tests, and a
private weights root."""

import os

# The tests are CPU tests, on a machine with GPUs too: JAX (and the processes the tests start,
# which inherit the environment) must not pick a GPU up. Set before JAX is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Multi-device code is tested on CPU by splitting the host into fake devices; this must be set
# before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No test reaches the network: the hub is read from caches the tests lay out.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

# Some tests import TensorFlow (to write TFDS datasets), after which importing PyTorch's
# torchvision (through timm) in the same process crashes it: those first, whichever test files
# run and in whatever order.
import timm  # noqa: F401
import torch  # noqa: F401


@pytest.fixture
def weights_root(tmp_path, monkeypatch):
    """A fresh, empty directory as $TRESNET_JAX_WEIGHTS."""
    root = tmp_path / "weights"
    monkeypatch.setenv("TRESNET_JAX_WEIGHTS", str(root))
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's handwritten digits as PNG class folders (``tests/training_runs.py``)."""
    from tests.training_runs import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def tiny_model():
    """``tresnet_tiny`` (``tests/tiny_model.py``) among the architectures during the test."""
    from tests.tiny_model import registered

    with registered() as name:
        yield name


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_of_the_run(tmp_path_factory):
    """The command-line tools' persistent compilation cache (by default the user's ~/.cache) in
    this run's temporary directory, for the processes the tests start too: tests write nothing
    outside it, and no run is faster for what an earlier one compiled."""
    path = tmp_path_factory.mktemp("jax_cache")
    os.environ["TRESNET_JAX_COMPILATION_CACHE"] = str(path)
    return path
