"""The TResNet that the tests of train.py's machinery (resume, devices, processes, data, bad
input) train: one block a stage at a quarter of TResNet-M's width, registered as
``tresnet_tiny`` while a test runs. It has every kind of layer the published variants have
(space-to-depth stem, basic and bottleneck blocks, squeeze-excitation, anti-aliased
downsampling), and a command line trains it in 25 s of CPU against 60 s for tresnet_m on the
2-core CI machine (most of it XLA compiling the step). tresnet_m and the other published
variants are covered by the parity tests, the notebook and the GPU suite's smoke."""

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tresnet_jax.model.architecture import ArchSpec
from tresnet_jax.model.registry import ARCHITECTURES

NAME = "tresnet_tiny"
SPEC = ArchSpec(layers=(1, 1, 1, 1), width_factor=0.25)
REPO = Path(__file__).resolve().parent.parent


def register() -> None:
    ARCHITECTURES[NAME] = SPEC


def register_in_timm() -> None:
    """The same network in timm (``timm.create_model(NAME)``), for the benchmark's and the GPU
    suite's comparisons, which build both sides by name."""
    import timm
    from timm.models import register_model
    from timm.models.tresnet import TResNet

    if NAME in timm.list_models(NAME):
        return

    def tresnet_tiny(pretrained: bool = False, **kwargs: object) -> TResNet:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        return TResNet(layers=list(SPEC.layers), width_factor=SPEC.width_factor, **kwargs)

    register_model(tresnet_tiny)


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """``tresnet_tiny`` in the registry inside the ``with`` block."""
    register()
    try:
        yield NAME
    finally:
        del ARCHITECTURES[NAME]


# Python code that registers the model in a process of its own (a ``python -c`` prefix).
REGISTER = f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom tests.tiny_model import register; register()\n"


def train_py(args: Sequence[object]) -> list[str]:
    """The command line ``python train.py *args`` in a process where ``tresnet_tiny`` exists."""
    code = REGISTER + "import train\nsys.exit(train.main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, *(str(a) for a in args)]
