"""The PyTorch side: timm's TResNet, eager or ``torch.compile``d, NCHW or channels_last,
with automatic mixed precision for bf16/fp16."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import timm
import torch

from bench.spec import BenchSpec, synthetic_batch
from bench.timing import Runner, timed

# variant -> (channels_last, torch.compile)
TIMM_VARIANTS = {
    "eager": (False, False),
    "channels_last": (True, False),
    "compile": (False, True),
    "compile_channels_last": (True, True),
}
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_device() -> torch.device:
    """The GPU when PyTorch sees one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device to finish (the CPU path is synchronous already)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timm_runner(spec: BenchSpec, variant: str, device: torch.device) -> Runner:
    """timm's model for ``spec`` in one variant (a key of TIMM_VARIANTS), run once.
    ``first_call_s`` counts the first step (with torch.compile: compilation), not creating the
    model."""
    channels_last, compiled = TIMM_VARIANTS[variant]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model(spec.timm_model, num_classes=spec.num_classes)
    model = model.to(device=device, memory_format=memory_format)
    images, labels = synthetic_batch(spec)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device).contiguous(memory_format=memory_format)
    y = torch.from_numpy(labels).long().to(device)
    forward = torch.compile(model) if compiled else model
    autocast = _autocast(spec.precision, device)
    if spec.mode == "infer":
        model.eval()
        step, state_bytes = _infer_step(forward, x, autocast), lambda: _tensor_bytes(model)
    else:
        model.train()
        step, state_bytes = _train_step(model, forward, x, y, autocast, spec)
    tracker = _PeakTracker(device, state_bytes)

    def run(steps: int) -> None:
        with tracker:
            for _ in range(steps):
                step()
            synchronize(device)

    _, first_call_s = timed(lambda: run(1))
    return Runner(f"timm_{variant}", "torch", run, first_call_s, peak_memory=tracker.peak)


def _autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def _infer_step(forward: Callable, x: torch.Tensor, autocast: Callable) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast():
            forward(x)

    return step


def _train_step(
    model: torch.nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor, autocast: Callable, spec: BenchSpec
) -> tuple[Callable[[], None], Callable[[], int]]:
    """SGD with momentum 0.9 on cross-entropy, loss scaling for float16 (standard AMP)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=0.9)
    scaler = torch.amp.GradScaler(x.device.type, enabled=spec.precision == "fp16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def state_bytes() -> int:
        momentum = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return _tensor_bytes(model) + sum(t.numel() * t.element_size() for t in momentum)

    return step, state_bytes


def _tensor_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class _PeakTracker:
    """Peak CUDA memory of one runner while other runners' tensors share the process: the
    model's own state plus the most its steps allocated on top of what was already there."""

    def __init__(self, device: torch.device, state_bytes: Callable[[], int]):
        self.device, self.state_bytes = device, state_bytes
        self.transient = 0
        self.base = 0

    def __enter__(self) -> None:
        if self.device.type == "cuda":
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.transient = max(self.transient, torch.cuda.max_memory_allocated(self.device) - self.base)

    def peak(self) -> int | None:
        return self.state_bytes() + self.transient if self.device.type == "cuda" else None
