"""JPEG decoding in batches on the GPU (nvJPEG, through torchvision), the crop and the resize
there too, handed to JAX through DLPack (``to_jax``); choosing the decoder (``select_decoder``)
and sharing the GPU's memory with JAX (``reserve_decoder_memory``).

A ``BatchDecoder`` is given only what ``jpeg_header.gpu_rejection`` accepts and returns the
positions it did not decode for the host's path; a batched call that fails anyway is retried
image by image, so one bad file neither fails a batch nor changes an image.

The resize reproduces PIL's (``Image.resize(..., box=...)``) with ``pil_resample``'s weights,
rounding after each pass, applied as two matrix products per image. It agrees with PIL to one
level (Pillow 13 sometimes runs its vertical pass first, and then its rounding differs on some
pixels). What differs more is the JPEG decoder: nvJPEG's IDCT and chroma upsampling against
libjpeg-turbo's, a few levels on smooth content.

A decoder is not trusted untried: before it is chosen, ``probe_mismatch`` decodes a JPEG of
smooth colour waves made in memory and compares its pixels with PIL's (``DECODER_MAX_LEVELS``);
once a run's images flow, ``resized_mismatch`` compares the first batch's first JPEGs, decoded
and resized, with PIL's full-scale decode resized alike (``DECODER_MEAN_LEVELS``), and
``gpu_batches`` keeps the run on the host's path when they differ.

The same code runs on ``torch.device("cpu")`` (torchvision's libjpeg-turbo decoder), which the
tests use. PyTorch is an optional extra: it is imported only when a decoder is made.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tresnet_jax.data.jpeg_header import gpu_rejection
from tresnet_jax.data.pil_resample import resample_weights
from tresnet_jax.data.preprocess import decode_pil
from tresnet_jax.errors import InputError, reason_of

if TYPE_CHECKING:
    import jax
    import torch

DECODE_CHOICES = ("auto", "gpu", "host")
Box = tuple[float, float, float, float]  # left, top, right, bottom in full-resolution pixels
# GPU memory left to the decoder: a batch of 256 ImageNet photographs decodes to ~150 MB, the
# float copies of the largest (12 Mpixel) images are ~150 MB each, nvJPEG keeps its own buffers.
DECODER_RESERVE_BYTES = 4 << 30
JAX_DEFAULT_FRACTION = 0.75  # what JAX preallocates when nobody says otherwise
MIN_JAX_FRACTION = 0.5

# How far another JPEG decoder (nvJPEG) may be from PIL's libjpeg-turbo, in levels of 0-255, on
# smooth images (``colour_waves``: gradients of at most 2 pi 100 / 160 = 3.9 levels a pixel),
# derived, not measured:
# - IDCT: IEEE 1180 keeps each decoder within 1 level of the exact IDCT, so two decoders within
#   2 of each other per Y, Cb, Cr sample, hence within 2 + 1.772 * 2 < 6 in B (B = Y + 1.772 Cb),
#   less in R and G; the conversion to RGB rounds once in each: 1 more.
# - Chroma upsampling (libjpeg's triangle "fancy" filter against nvJPEG's replication): at most
#   1/4 of the step between chroma samples 2 pixels apart, <= 1/4 * 2 * 3.9 < 2 levels of Cb or
#   Cr, so < 1.772 * 2 < 4 in B.
# - The resize is a convex combination (bilinear), so it does not grow a difference; its two
#   roundings may each add 1 (and Pillow's pass order may move one).
# Hence at most 6 + 1 + 4 + 2 = 13 levels anywhere. On average the IDCT terms nearly vanish
# (IEEE 1180 bounds the mean error by 0.015 a sample) and the others are about half their
# bounds: <= 2 levels. Only the mean holds on photographs (a sharp chroma edge moves the
# upsampling term far past its bound on a few pixels); torchvision's own test of its CUDA decoder
# asks the same of nvJPEG against libjpeg-turbo on its photographs (mean difference < 2).
DECODER_MAX_LEVELS = 13
DECODER_MEAN_LEVELS = 2.0
PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
# The probe: colour waves in three directions 120 degrees apart, one channel each, 4:2:0 at
# quality 90, 96 pixels square (6 x 6 MCUs): as smooth as the bounds ask, with chroma far from
# grey (Cb 55-200, Cr 72-227), so that a wrong colour conversion or chroma upsampling leaves
# them. Simulated in numpy from its pixels' YCbCr planes (largest, mean difference from PIL's
# decode, the JPEG's own loss of 0.8 on average included):
# channels swapped 201, 72; chroma dropped 140, 55; video range 23, 9.8; BT.709's coefficients
# 24, 8.1; chroma 2 pixels off 14, 3.5; while replicating chroma instead of filtering it (what
# another correct decoder may do) stays at 8, 1.5.
PROBE_SIDE = 96
PROBE_WAVES = ((0.0, 0.0), (math.pi / 3, 2 * math.pi / 3), (2 * math.pi / 3, 4 * math.pi / 3))  # (angle, phase)


def _torch() -> Any:
    """PyTorch, imported when a decoder is first needed (an optional extra). torchvision 0.29
    deprecates its decoders for TorchCodec's (a DeprecationWarning Python hides by default): a
    TorchCodec backend would be another BatchDecoder."""
    import torch

    return torch


class BatchDecoder:
    """Decodes a batch of JPEGs in one call on ``device`` and crops and resizes them there;
    ``counts`` says how many images it decoded, rejected, and how often a batched call failed."""

    def __init__(self, device: torch.device, name: str) -> None:
        self.device, self.name = device, name
        self.counts = {"decoded": 0, "rejected": 0, "batch_retries": 0}
        # The first batch's check (``gpu_batches.trusted``), once per decoder, so once per run:
        # whether it ran, and why the decoder's pixels were not used (None: they are).
        self.checked = False
        self.mismatch: str | None = None

    @classmethod
    def cuda(cls, index: int = 0) -> BatchDecoder:
        """nvJPEG on CUDA device ``index`` (the GPU of this process's JAX devices)."""
        return cls(_torch().device("cuda", index), f"nvJPEG on cuda:{index}")

    @classmethod
    def cpu(cls) -> BatchDecoder:
        """libjpeg-turbo through torchvision on the CPU: the same code, for the tests."""
        return cls(_torch().device("cpu"), "torchvision on the CPU")

    def decode_resized(
        self, encoded: Sequence[bytes], boxes: Sequence[Box], size: int, interpolation: str = "bilinear"
    ) -> tuple[torch.Tensor, list[int]]:
        """The images' boxes resized to ``size`` x ``size`` (PIL's ``resize(box=...)``):
        uint8 (n_ok, size, size, 3) on the device in the order given, and the positions it did
        not decode (rejected from the bytes, or failing the decoder), for the host."""
        torch = _torch()
        taken = [i for i, data in enumerate(encoded) if gpu_rejection(data) is None]
        images = self._decode([encoded[i] for i in taken])
        kept = [i for i, image in zip(taken, images, strict=True) if image is not None]
        rejected = sorted(set(range(len(encoded))) - set(kept))
        self.counts["decoded"] += len(kept)
        self.counts["rejected"] += len(rejected)
        if not kept:
            return torch.empty((0, size, size, 3), dtype=torch.uint8, device=self.device), rejected
        resized = self.resize(
            [image for image in images if image is not None], [boxes[i] for i in kept], size, interpolation
        )
        return resized, rejected

    def decode_pixels(self, encoded: bytes) -> np.ndarray:
        """One JPEG decoded as uint8 (H, W, 3) numpy on the host, raising what the decoder
        raises: for the probe, which compares it with PIL's."""
        torch = _torch()
        from torchvision.io import ImageReadMode, decode_jpeg

        tensor = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        image = decode_jpeg([tensor], mode=ImageReadMode.RGB, device=self.device)[0]
        return image.permute(1, 2, 0).cpu().numpy()

    def _decode(self, encoded: list[bytes]) -> list[torch.Tensor | None]:
        """One batched call; if it fails, one call per image (None where that fails too)."""
        torch = _torch()
        from torchvision.io import ImageReadMode, decode_jpeg

        if not encoded:
            return []
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except (RuntimeError, ValueError):  # what torchvision's checks and nvJPEG's errors raise
            self.counts["batch_retries"] += 1
        images = []
        for tensor in tensors:
            try:
                images.append(decode_jpeg([tensor], mode=ImageReadMode.RGB, device=self.device)[0])
            except (RuntimeError, ValueError):
                images.append(None)
        return images

    def resize(
        self, images: Sequence[torch.Tensor], boxes: Sequence[Box], size: int, interpolation: str = "bilinear"
    ) -> torch.Tensor:
        """Decoded images (uint8 (3, H, W) on the device) -> their boxes resized to uint8 (n,
        size, size, 3) as PIL's ``resize(box=...)``: its two passes, horizontal then vertical,
        each rounding to 8 bits, as products with a (size x region) weight matrix per axis built
        on the device from the taps (one small transfer for the batch)."""
        torch = _torch()
        if not images:
            return torch.empty((0, size, size, 3), dtype=torch.uint8, device=self.device)
        heights = np.asarray([image.shape[1] for image in images])
        widths = np.asarray([image.shape[2] for image in images])
        lefts, tops, rights, bottoms = np.asarray(boxes, np.float64).T
        x_first, x_weights = resample_weights(lefts, rights, widths, size, interpolation)
        y_first, y_weights = resample_weights(tops, bottoms, heights, size, interpolation)
        taps = max(x_weights.shape[-1], y_weights.shape[-1])
        first = np.stack([x_first, y_first], 1)  # (n, 2, size)
        weights = np.zeros((len(images), 2, size, taps), np.float32)
        weights[:, 0, :, : x_weights.shape[-1]] = x_weights
        weights[:, 1, :, : y_weights.shape[-1]] = y_weights
        spans = first[..., None] + np.arange(taps)  # input pixel of each tap
        low = first.min(-1)  # (n, 2): the region each image's taps read
        high = np.where(weights != 0, spans + 1, 0).max((-2, -1))
        index = np.clip(spans - low[..., None, None], 0, np.maximum(high - low, 1)[..., None, None] - 1)
        index_d, weights_d = torch.from_numpy(index).to(self.device), torch.from_numpy(weights).to(self.device)
        out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=self.device)
        with _full_float32(torch):
            for i, image in enumerate(images):
                (x0, y0), (x1, y1) = low[i].tolist(), high[i].tolist()
                matrices = torch.zeros((2, size, max(x1 - x0, y1 - y0)), dtype=torch.float32, device=self.device)
                matrices.scatter_add_(2, index_d[i], weights_d[i])  # zero-weight taps add nothing
                rows = torch.matmul(image[:, y0:y1, x0:x1].float(), matrices[0, :, : x1 - x0].T)
                rows = rows.add_(0.5).floor_().clamp_(0, 255)
                torch.matmul(matrices[1, :, : y1 - y0], rows, out=out[i])
        return out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def upload(self, rows: np.ndarray) -> torch.Tensor:
        """Host rows (numpy) onto the decoder's device."""
        return _torch().from_numpy(np.ascontiguousarray(rows)).to(self.device)

    def gather(
        self,
        total: int,
        size: int,
        decoded: torch.Tensor | None,
        decoded_at: Sequence[int],
        host: np.ndarray | None,
        host_at: Sequence[int],
    ) -> torch.Tensor:
        """uint8 (total, size, size, 3) on the device: the decoded rows at ``decoded_at``, the
        host's rows at ``host_at``, zeros elsewhere."""
        torch = _torch()
        batch = torch.zeros((total, size, size, 3), dtype=torch.uint8, device=self.device)
        if len(decoded_at):
            batch[torch.as_tensor(list(decoded_at), device=self.device)] = decoded
        if len(host_at):
            batch[torch.as_tensor(list(host_at), device=self.device)] = self.upload(host)
        return batch


@contextlib.contextmanager
def _full_float32(torch: Any) -> Iterator[None]:
    """Float32 products in full float32 while resizing: TF32 (10-bit mantissas, if a user turned
    it on) would move many pixels by one level."""
    matmul = torch.backends.cuda.matmul
    before, matmul.allow_tf32 = matmul.allow_tf32, False
    try:
        yield
    finally:
        matmul.allow_tf32 = before


# --- Choosing a decoder, and sharing the GPU with JAX ------------------------------------------
def select_decoder(choice: str, index: int = 0) -> tuple[BatchDecoder | None, str | None]:
    """``--decode``: ``gpu`` -> the CUDA decoder, InputError when there is none; ``auto`` -> it
    when there is one, else (None, a note to print once); ``host`` -> (None, None)."""
    if choice not in DECODE_CHOICES:
        raise InputError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {choice!r}")
    if choice == "host":
        return None, None
    why = cuda_unavailable(index)
    if why is None:
        return BatchDecoder.cuda(index), None
    if choice == "gpu":
        raise InputError(f"--decode gpu: {why}")
    return None, f"JPEG decoding stays on the host: {why}"


def nvidia_device_files() -> bool:
    """Whether the NVIDIA driver shows a GPU here (Linux: /dev/nvidia0, ...; elsewhere: assumed)."""
    return sys.platform != "linux" or any(Path("/dev").glob("nvidia[0-9]*"))


def cuda_unavailable(index: int = 0) -> str | None:
    """Why JPEGs cannot be decoded on CUDA device ``index`` (one line), or None when they can:
    PyTorch or torchvision missing, no CUDA device, or the probe (``probe_mismatch``) failing
    there or giving pixels too far from PIL's."""
    if not nvidia_device_files():  # known without importing PyTorch (2 s)
        return "no NVIDIA GPU on this machine (no /dev/nvidia*)"
    try:
        torch = _torch()
        import torchvision.io  # noqa: F401  (the decoder's module: missing without the extra)
    except ImportError:
        return "PyTorch with torchvision is not installed (pip install 'tresnet-jax[torch]')"
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    if index >= torch.cuda.device_count():
        return f"no CUDA device {index} (PyTorch sees {torch.cuda.device_count()})"
    try:
        return probe_mismatch(BatchDecoder.cuda(index).decode_pixels, "torchvision's CUDA JPEG decoder")
    except (RuntimeError, ValueError) as err:
        return f"torchvision cannot decode JPEG on cuda:{index} ({reason_of(err).splitlines()[0]})"


def colour_waves(height: int, width: int, waves: Sequence[tuple[float, float]]) -> np.ndarray:
    """uint8 (height, width, 3): channel c a sine wave of 160 pixels in direction ``waves[c][0]``
    with phase ``waves[c][1]``, 127.5 +- 100: smooth at every scale (``DECODER_MAX_LEVELS``)."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / 160 + p) for a, p in waves]
    return np.clip(127.5 + 100 * np.stack(channels, -1), 0, 255).astype(np.uint8)


def probe_jpeg() -> bytes:
    """The probe's JPEG (``PROBE_WAVES``), made in memory: baseline, YCbCr 4:2:0."""
    buffer = io.BytesIO()
    pixels = colour_waves(PROBE_SIDE, PROBE_SIDE, PROBE_WAVES)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, subsampling=2)
    return buffer.getvalue()


def level_difference(actual: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """(mean, largest) absolute difference of two uint8 images, in levels."""
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    return float(diff.mean()), int(diff.max())


def probe_mismatch(decode: Callable[[bytes], np.ndarray], name: str) -> str | None:
    """Why ``decode`` (JPEG bytes -> uint8 (H, W, 3)), called ``name``, cannot be trusted to
    decode JPEGs (one line), or None: its pixels of the probe JPEG against PIL's, within the
    difference two correct decoders may have (``DECODER_MAX_LEVELS``, ``DECODER_MEAN_LEVELS``).
    A shape check alone let a decoder with a wrong colour conversion through. Raises what
    ``decode`` raises."""
    encoded = probe_jpeg()
    expected = np.asarray(decode_pil(encoded, "the probe JPEG"))
    decoded = np.asarray(decode(encoded))
    if decoded.shape != expected.shape:
        return f"{name} decodes a {PROBE_SIDE}x{PROBE_SIDE} test JPEG to shape {decoded.shape}"
    mean, most = level_difference(decoded, expected)
    if most > DECODER_MAX_LEVELS or mean > DECODER_MEAN_LEVELS:
        return (
            f"{name} decodes a test JPEG up to {most} levels from PIL's (mean {mean:.1f}); two correct "
            f"JPEG decoders differ by at most {DECODER_MAX_LEVELS} (mean {DECODER_MEAN_LEVELS:g}) on it"
        )
    return None


def resized_mismatch(
    decoder: BatchDecoder,
    encoded: Sequence[bytes],
    boxes: Sequence[Box],
    names: Sequence[str],
    size: int,
    interpolation: str = "bilinear",
) -> str | None:
    """Why ``decoder``'s rows of these JPEGs cannot be trusted (one line, the worst image), or
    None: each decoded and resized by it against PIL's full-scale decode resized alike (what
    ``decode_resized`` reproduces), within ``DECODER_MEAN_LEVELS`` on average (photographs:
    their sharp edges leave only the mean bounded). Images either side cannot decode are left
    out; the decoder's ``counts`` are left as they were (these are not the run's images)."""
    counts = dict(decoder.counts)
    rows, refused = decoder.decode_resized(encoded, boxes, size, interpolation)
    decoder.counts.update(counts)
    kept = [i for i in range(len(encoded)) if i not in set(refused)]
    worst: tuple[float, int, str] | None = None
    for row, i in zip(rows.cpu().numpy(), kept, strict=True):
        try:
            image = decode_pil(encoded[i], names[i])
        except InputError:  # PIL's errors, named
            continue
        reference = np.asarray(image.resize((size, size), PIL_FILTERS[interpolation], box=boxes[i]))
        mean, most = level_difference(row, reference)
        if mean > DECODER_MEAN_LEVELS and (worst is None or mean > worst[0]):
            worst = (mean, most, names[i])
    if worst is None:
        return None
    mean, most, name = worst
    return (
        f"{name} decoded by {decoder.name} is {mean:.1f} levels from PIL's on average (at most {most}); "
        f"two correct JPEG decoders differ by at most {DECODER_MEAN_LEVELS:g} on average"
    )


def memory_fraction(total_bytes: int, reserve_bytes: int = DECODER_RESERVE_BYTES) -> float:
    """The share of a GPU of ``total_bytes`` JAX may take so that ``reserve_bytes`` stay free:
    never more than JAX's default, never less than half."""
    fraction = min(JAX_DEFAULT_FRACTION, 1.0 - reserve_bytes / total_bytes)
    return max(MIN_JAX_FRACTION, math.floor(fraction * 100) / 100)


def reserve_decoder_memory(index: int = 0, reserve_bytes: int = DECODER_RESERVE_BYTES) -> str | None:
    """Cap what JAX takes of GPU ``index`` (XLA_PYTHON_CLIENT_MEM_FRACTION) so that the decoder
    keeps ``reserve_bytes``; returns the value set, or None when left alone (the user chose how
    JAX allocates, or there is no CUDA device for PyTorch).

    Why: JAX preallocates 75% of the GPU at its first use and PyTorch's allocator (the decoded
    images, nvJPEG's buffers) lives in what is left; on a small GPU that is too little, and
    with preallocation off JAX would grow into it. JAX reads the variable once, when its backend
    starts: call this before the first ``jax.devices()``, array or jit (RuntimeError after)."""
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ or os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform":
        return None
    if cuda_unavailable(index) is not None:
        return None
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise RuntimeError("reserve_decoder_memory() must run before JAX initialises its backend")
    total = _torch().cuda.get_device_properties(index).total_memory
    value = f"{memory_fraction(total, reserve_bytes):.2f}"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = value
    return value


def reserve_for(choice: str) -> str | None:
    """``--decode``'s share of the GPU, set before JAX starts: ``reserve_decoder_memory`` unless
    the decoder cannot run (``host``)."""
    return None if choice == "host" else reserve_decoder_memory()


def decoder_peak_memory(decoder: BatchDecoder) -> int | None:
    """The most bytes PyTorch's allocator held on the decoder's GPU at once (decoded images,
    resize buffers; nvJPEG's own allocations are not counted); None on the CPU."""
    if decoder.device.type != "cuda":
        return None
    return int(_torch().cuda.max_memory_allocated(decoder.device))


def decoder_report(decoder: BatchDecoder) -> str:
    """One line on what the decoder did (for a run's log and the GPU suite, which reads it)."""
    counts = decoder.counts
    line = (
        f"JPEG decoder {decoder.name}: {counts['decoded']} images decoded, {counts['rejected']} passed to the host, "
        f"{counts['batch_retries']} batches retried image by image"
    )
    if decoder.mismatch is not None:
        line += "; its pixels failed the first batch's check, so the run decoded on the host"
    peak = decoder_peak_memory(decoder)
    return line if peak is None else f"{line}; decoder memory peak {peak / 2**20:.0f} MiB"


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """A torch tensor as a jax.Array on the same device, through DLPack: no copy through the
    host (JAX's stream waits for torch's work on the tensor; the memory stays torch's until
    JAX drops the array)."""
    import jax.dlpack

    return jax.dlpack.from_dlpack(tensor.contiguous())
