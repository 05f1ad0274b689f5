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

from tresnet_jax.cli import COMPILATION_CACHE_ENV, enable_compilation_cache

pytest_plugins = ["tests.timings"]  # where the run's time went, printed at its end


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


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``tests.images.image_folder``: 8 ImageNet class folders of test images, one corrupt."""
    from tests.images import image_folder

    return image_folder(tmp_path_factory.mktemp("images") / "val")


@pytest.fixture(scope="module")
def classifier(folder, tmp_path_factory):
    """A timm tresnet_tiny for the 8 classes of ``folder``, its head fitted to them
    (``tests/classifier.py``): (timm model, checkpoint path, reference logits and labels of the
    readable images at ``CLASSIFIER_SIZE`` px, their files). Its tests need ``tiny_model``."""
    from tests import tiny_model
    from tests.classifier import CLASSIFIER_SIZE, fitted_classifier

    tiny_model.register_in_timm()
    path = tmp_path_factory.mktemp("weights") / "tiny_8cls.pth"
    return fitted_classifier(folder, path, CLASSIFIER_SIZE, model_name=tiny_model.NAME)


@pytest.fixture
def tiny_model():
    """``tresnet_tiny`` (``tests/tiny_model.py``) among the architectures during the test."""
    from tests.tiny_model import registered

    with registered() as name:
        yield name


@pytest.hookimpl(trylast=True)  # after pytest's own, which makes the temporary directory's factory
def pytest_configure(config: pytest.Config) -> None:
    """One persistent compilation cache for the whole run, in its temporary directory: the
    controller makes it before the xdist workers start, and they, the processes the tests start
    (train.py, eval.py and the benchmark's commands) and this process share it through the
    environment, so a program any of them compiled is read back by the others (the key holds
    XLA_FLAGS: processes with other device counts compile their own). Tests write nothing
    outside the run's directory, and no run is faster for what an earlier run compiled."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        path = config._tmp_path_factory.getbasetemp() / "jax_cache"
        path.mkdir(exist_ok=True)
        os.environ[COMPILATION_CACHE_ENV] = str(path)
    enable_compilation_cache()
