"""JPEG decoding in batches on a decoder's device (here torchvision's CPU decoder, the same code
as nvJPEG's): PIL's crops and resizes, what the decoder must not be given, the host's fallback,
and streams that match the host's batch for batch."""

import io
import itertools
import math
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from tests.blocked_imports import run_without
from tests.images import CLASSES, image_folder
from tresnet_jax.data import gpu_decode
from tresnet_jax.data.augment import AugmentConfig, crop_box, decode_crop
from tresnet_jax.data.gpu_batches import decoded_eval_batches, decoded_train_batches
from tresnet_jax.data.gpu_decode import (
    BatchDecoder,
    decoder_peak_memory,
    memory_fraction,
    reserve_decoder_memory,
    select_decoder,
    to_jax,
)
from tresnet_jax.data.jpeg_header import gpu_rejection
from tresnet_jax.data.pipeline import MAX_CONSECUTIVE_UNREADABLE
from tresnet_jax.data.preprocess import decode_pil, eval_box, pil_transform
from tresnet_jax.data.sources import FolderSource, LabelMap, SyntheticSource, model_labels
from tresnet_jax.data.train_stream import StreamSpec, train_batches
from tresnet_jax.errors import InputError
from tresnet_jax.evaluation import preprocessed_batches
from tresnet_jax.preprocessing import Preprocessing

# torchvision 0.29 deprecates its decoders for TorchCodec's; the decoder still uses them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# How far another JPEG decoder (nvJPEG) may be from PIL's libjpeg-turbo on ``smooth`` images
# (colour gradients of at most 2 pi 100 / 160 = 3.9 levels a pixel), derived, not measured:
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
# bounds: <= 2 levels.
MAX_LEVELS = 13
MEAN_LEVELS = 2.0
SIZE = 64


@pytest.fixture(scope="module")
def decoder():
    return BatchDecoder.cpu()


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=NO_CUDA)])
def any_decoder(request):
    """The CPU decoder, and nvJPEG where there is a GPU (the streams hand their images to JAX,
    which these tests keep on the CPU: they use the CPU decoder only)."""
    return BatchDecoder.cpu() if request.param == "cpu" else select_decoder("gpu")[0]


def smooth(height: int, width: int, seed: int) -> np.ndarray:
    """Colour waves of 160 pixels, one direction and phase per channel: smooth at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    angles, phases = rng.uniform(0, math.pi, 3), rng.uniform(0, 2 * math.pi, 3)
    waves = [
        np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / 160 + p) for a, p in zip(angles, phases, strict=True)
    ]
    return np.clip(127.5 + 100 * np.stack(waves, -1), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray | Image.Image, fmt: str = "JPEG", **options) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def assert_close(actual: np.ndarray, expected: np.ndarray, mean: float = MEAN_LEVELS, most: int = MAX_LEVELS) -> None:
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() <= mean, diff.mean()
    assert diff.max() <= most, diff.max()


def pil_box(encoded: bytes, box, size: int = SIZE) -> np.ndarray:
    """PIL's crop: the full-scale decode of ``augment.decode_crop(draft=False)`` for any box."""
    return np.asarray(decode_pil(encoded, "x").resize((size, size), Image.Resampling.BILINEAR, box=box))


# --- The decoder -------------------------------------------------------------------------------
def test_decode_resized_agrees_with_pils_crops_and_eval_transform_in_order(any_decoder):
    shapes = [(200, 300), (333, 257), (256, 256), (480, 360), (150, 90)]
    encoded = [encode(smooth(h, w, i), quality=90) for i, (h, w) in enumerate(shapes)]
    rng = np.random.default_rng(0)
    boxes = [crop_box((w, h), rng, (0.08, 1.0), (3 / 4, 4 / 3)) for h, w in shapes]
    boxes[-1] = (10.5, 3.25, 80.75, 140.0)  # fractional, and upscaled
    images, rejected = any_decoder.decode_resized(encoded, boxes, SIZE)
    assert rejected == []
    assert images.shape == (len(shapes), SIZE, SIZE, 3)
    assert images.dtype == torch.uint8
    assert images.device == any_decoder.device
    expected = [pil_box(data, box) for data, box in zip(encoded, boxes, strict=True)]
    for row, reference in zip(images.cpu().numpy(), expected, strict=True):
        assert_close(row, reference)
    # In order: each row is nearest its own image's reference.
    distance = [[np.abs(row.astype(int) - ref).mean() for ref in expected] for row in images.cpu().numpy()]
    assert np.argmin(distance, 1).tolist() == list(range(len(shapes)))

    prep = Preprocessing(SIZE)
    boxes = [eval_box((w, h), prep) for h, w in shapes]
    images, rejected = any_decoder.decode_resized(encoded, boxes, SIZE)
    for row, data in zip(images.cpu().numpy(), encoded, strict=True):
        assert_close(row, pil_transform(decode_pil(data, "x"), prep))
    peak = decoder_peak_memory(any_decoder)
    assert peak is None if any_decoder.device.type == "cpu" else peak > 0


# The resize alone, on the same pixels, differs from PIL's by rounding only: each output within
# 1 level (bilinear: a convex combination; bicubic's negative lobes can carry a difference one
# level further), about half of them at worst (when Pillow runs its passes in the other order).
RESIZE_MOST = {"bilinear": 1, "bicubic": 2}
RESIZE_MEAN = 0.5
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("squish", [False, True])
def test_resize_reproduces_pils_box_resize_on_the_same_pixels(any_decoder, interpolation, squish):
    """No JPEG here. Noise images, so that a box off by a pixel would show; for nearest, smooth
    ones: where a source position falls exactly on a pixel edge, floating-point rounding picks
    either neighbour (PIL accumulates its positions), at most 3.9 levels apart on them."""
    rng = np.random.default_rng(1)
    shapes = [(97, 131), (256, 170), (40, 56), (301, 300)]
    if interpolation == "nearest":
        pixels, most = [smooth(h, w, i) for i, (h, w) in enumerate(shapes)], 4
    else:
        pixels, most = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes], RESIZE_MOST[interpolation]
    prep = Preprocessing(SIZE, interpolation=interpolation, squish=squish)
    boxes = [eval_box((w, h), prep) for h, w in shapes]
    tensors = [torch.from_numpy(p).permute(2, 0, 1).contiguous().to(any_decoder.device) for p in [*pixels, pixels[0]]]
    out = any_decoder.resize(tensors, [*boxes, (3, 7, 50, 30)], SIZE, interpolation).cpu().numpy()
    for row, image in zip(out, pixels, strict=False):  # the eval transform
        assert_close(row, pil_transform(Image.fromarray(image), prep), RESIZE_MEAN, most)
    expected = Image.fromarray(pixels[0]).resize((SIZE, SIZE), FILTERS[interpolation], box=(3, 7, 50, 30))
    assert_close(out[-1], np.asarray(expected), RESIZE_MEAN, most)


def odd_files() -> dict[str, bytes]:
    base = smooth(120, 160, 7)
    good = encode(base, quality=90)
    return {
        "progressive": encode(base, quality=90, progressive=True),
        "cmyk": encode(Image.fromarray(base).convert("CMYK"), quality=90),
        "png named .jpg": encode(base, "PNG"),
        "truncated": good[: len(good) // 2],
        "garbage": b"not an image at all",
        "empty": b"",
    }


def bogus_huffman() -> bytes:
    """A JPEG whose headers pass every check before decoding but whose Huffman table is
    impossible: the decoder fails on it, and so does PIL."""
    data = bytearray(encode(smooth(60, 80, 11), quality=90))
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 21] = bytes([255] * 16)  # far more than 256 codes
    return bytes(data)


def fail_on(monkeypatch, refused: list[bytes]) -> None:
    """torchvision's decoder raising, batched or alone, whenever one of ``refused`` is among its
    inputs: as nvJPEG may on files the byte checks pass."""
    import torchvision.io

    original = torchvision.io.decode_jpeg

    def decode_jpeg(inputs, *args, **kwargs):
        if any(bytes(t.numpy()) in refused for t in inputs):
            raise RuntimeError("nvJPEG: NVJPEG_STATUS_BAD_JPEG")
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)


def test_what_the_decoder_cannot_take_is_refused_from_the_bytes_and_the_rest_decoded(any_decoder):
    good = encode(smooth(120, 160, 1), quality=90)
    grey = encode(Image.fromarray(smooth(90, 70, 2)).convert("L"), quality=90)
    subsampled = encode(smooth(64, 96, 3), quality=80, subsampling=1)  # 4:2:2
    assert [gpu_rejection(data) for data in (good, grey, subsampled)] == [None, None, None]
    odd = odd_files()
    reasons = {name: gpu_rejection(data) for name, data in odd.items()}
    assert all(reasons.values()), reasons
    assert "SOF2" in reasons["progressive"]
    assert "CMYK" in reasons["cmyk"]
    assert "end-of-image" in reasons["truncated"]

    batch = [good, *odd.values(), grey, subsampled]
    boxes = [
        (0, 0, *Image.open(io.BytesIO(data)).size) if gpu_rejection(data) is None else (0, 0, 1, 1) for data in batch
    ]
    images, rejected = any_decoder.decode_resized(batch, boxes, SIZE)
    assert rejected == list(range(1, len(odd) + 1))
    # Greyscale comes out as RGB, as PIL's convert("RGB") makes it.
    for row, data, box in zip(images.cpu().numpy(), [good, grey, subsampled], [boxes[0], *boxes[-2:]], strict=True):
        assert_close(row, pil_box(data, box))


def test_a_failing_batched_call_is_retried_image_by_image(any_decoder, monkeypatch):
    """One image the batched call fails on: that image alone is handed back, the rest decoded."""
    encoded = [encode(smooth(100 + 10 * i, 120, i), quality=90) for i in range(4)]
    fail_on(monkeypatch, [encoded[2]])
    retries = any_decoder.counts["batch_retries"]
    boxes = [(0, 0, 120, 100 + 10 * i) for i in range(4)]
    images, rejected = any_decoder.decode_resized(encoded, boxes, SIZE)
    assert rejected == [2]
    assert any_decoder.counts["batch_retries"] == retries + 1
    for row, i in zip(images.cpu().numpy(), (0, 1, 3), strict=True):
        assert_close(row, pil_box(encoded[i], boxes[i]))
    assert gpu_rejection(bogus_huffman()) is None
    assert any_decoder.decode_resized([bogus_huffman()], [(0, 0, 80, 60)], SIZE)[1] == [0]


# --- Streams -----------------------------------------------------------------------------------
class MemorySource:
    """Small smooth JPEGs (sides below twice the crop, so that the host's crop decodes at full
    scale, as the decoder does) and, at given indices, the files the decoder refuses."""

    def __init__(self, size: int, odd: dict[int, bytes] | None = None):
        shapes = [(72, 96), (100, 80), (64, 64), (120, 90), (90, 126)]
        self.images = [encode(smooth(*shapes[i % len(shapes)], i), quality=90) for i in range(size)]
        for index, data in (odd or {}).items():
            self.images[index] = data
        self.class_names = [str(c) for c in range(5)]

    name = "memory"

    def __len__(self) -> int:
        return len(self.images)

    def record(self, index: int) -> tuple[bytes, int]:
        return self.images[index], index % 5

    def describe(self, index: int) -> str:
        return f"memory[{index}]"


LABELS = LabelMap(np.arange(5), 5)


def test_train_batches_match_the_host_stream_with_the_odd_files_on_the_host(decoder, monkeypatch):
    """Odd files in their slots: refused from their bytes (1, 4, 6, 13, 14), failing the decoder
    (17: PIL cannot read it either; 20: PIL can), greyscale (9, decoded)."""
    odd = odd_files()
    grey = encode(Image.fromarray(smooth(80, 100, 9)).convert("L"), quality=90)
    placed = {1: "progressive", 4: "cmyk", 6: "png named .jpg", 13: "truncated", 14: "garbage"}
    source = MemorySource(24, {9: grey, 17: bogus_huffman(), **{index: odd[name] for index, name in placed.items()}})
    fail_on(monkeypatch, [source.images[20]])
    augment = AugmentConfig(image_size=SIZE)
    spec = StreamSpec(8, seed=5)
    host_reports, reports = [], []
    host_stream = train_batches(source, spec, augment, 2, LABELS, lambda *r: host_reports.append(r), 2, True)
    stream = decoded_train_batches(source, spec, augment, 2, LABELS, decoder, lambda *r: reports.append(r), 2)
    host, ours = list(itertools.islice(host_stream, 5)), list(itertools.islice(stream, 5))
    # The same images in the same order, for the same reasons (PIL's own messages name objects).
    assert [(name, reason[:30]) for name, reason in reports] == [(n, r[:30]) for n, r in host_reports]
    assert sorted(name for name, _ in reports) == ["memory[13]", "memory[14]", "memory[17]"]
    refused = {index for index, data in enumerate(source.images) if gpu_rejection(data) is not None} | {20}
    for expected, batch in zip(host, ours, strict=True):  # 5 steps of 3 an epoch: into the next epoch
        assert batch["image"].shape == (8, SIZE, SIZE, 3)
        assert batch["image"].dtype == np.uint8
        np.testing.assert_array_equal(batch["label"], expected["label"])
        np.testing.assert_array_equal(batch["augment_ids"], expected["augment_ids"])
        images = np.asarray(batch["image"])
        for row, host_row, (_, index) in zip(images, expected["image"], expected["augment_ids"], strict=True):
            if index in refused:  # the host's own crop, bit for bit
                np.testing.assert_array_equal(row, host_row)
            else:
                assert_close(row, host_row)
    # Replacements reached the stream (13 and 14 gave their places to 15, 17 to 18), and 20 came
    # through the host.
    used = set(np.concatenate([b["augment_ids"][:, 1] for b in ours]).tolist())
    assert not {13, 14, 17} & used
    assert 20 in used


def test_the_decoders_crop_is_the_hosts_full_scale_crop_with_the_same_draws(decoder):
    source = MemorySource(16)
    augment = AugmentConfig(image_size=SIZE, crop_scale=(0.3, 1.0))
    batch = next(decoded_train_batches(source, StreamSpec(8, seed=2), augment, 0, LABELS, decoder, workers=2))
    for row, (epoch, index) in zip(np.asarray(batch["image"]), batch["augment_ids"], strict=True):
        rng = np.random.default_rng((2, int(epoch), int(index)))
        assert_close(row, np.asarray(decode_crop(source.images[index], "x", rng, augment, draft=False)))


def test_an_undecodable_dataset_stops_with_the_host_streams_error(decoder):
    source = MemorySource(MAX_CONSECUTIVE_UNREADABLE + 8, {i: b"broken" for i in range(MAX_CONSECUTIVE_UNREADABLE + 8)})
    with pytest.raises(InputError, match=f"memory: {MAX_CONSECUTIVE_UNREADABLE} consecutive unreadable images"):
        next(
            decoded_train_batches(source, StreamSpec(8), AugmentConfig(image_size=SIZE), 0, LABELS, decoder, workers=2)
        )


def test_eval_batches_match_preprocessed_batches_on_a_mixed_folder(tmp_path, decoder):
    """Photographs and generated images, JPEG and PNG, greyscale, CMYK, RGBA and a corrupt file."""
    source = FolderSource.scan(image_folder(tmp_path / "folder"))
    labels = model_labels(source, len(CLASSES), CLASSES)
    prep = Preprocessing(SIZE)
    args = (source, prep, 1, len(source), labels, 6, 5)
    host_skipped, skipped = {}, {}
    host = list(preprocessed_batches(*args, host_skipped, workers=2))
    ours = list(decoded_eval_batches(*args, skipped, decoder, workers=2))
    assert len(ours) == len(host) == 5
    assert skipped == host_skipped
    assert len(skipped) == 1
    refused = {i for i in range(len(source)) if gpu_rejection(source.record(i)[0]) is not None}
    assert refused
    assert set(range(1, len(source))) - refused  # both paths are exercised
    for expected, batch in zip(host, ours, strict=True):
        for key in ("label", "mask", "index"):
            np.testing.assert_array_equal(batch[key], expected[key])
            assert batch[key].dtype == expected[key].dtype
        images = np.asarray(batch["image"])
        assert images.shape == expected["image"].shape
        for row, host_row, index in zip(images, expected["image"], expected["index"], strict=True):
            if index < 0 or index in refused:  # padding, and the host's own rows: exact
                np.testing.assert_array_equal(row, host_row)
            else:  # photographs: sharp edges, so only the mean is bounded (antialiasing averages)
                assert_close(row, host_row, most=255)


def test_eval_images_the_decoder_fails_on_are_read_by_pil_or_skipped_in_place(decoder, monkeypatch):
    """5: the decoder fails, PIL reads it (its row is PIL's); 3 and 11: nobody reads them (the
    batch is refilled from the next images, as the host's batches are); 8: refused from the bytes."""
    source = MemorySource(20, {3: bogus_huffman(), 11: bogus_huffman(), 8: odd_files()["progressive"]})
    fail_on(monkeypatch, [source.images[5]])
    prep = Preprocessing(SIZE)
    host_skipped, skipped = {}, {}
    host = list(preprocessed_batches(source, prep, 0, 20, LABELS, 6, 4, host_skipped, workers=2))
    ours = list(decoded_eval_batches(source, prep, 0, 20, LABELS, 6, 4, skipped, decoder, workers=2))
    assert skipped == host_skipped
    assert sorted(skipped) == [3, 11]
    for expected, batch in zip(host, ours, strict=True):
        for key in ("label", "mask", "index"):
            np.testing.assert_array_equal(batch[key], expected[key])
        for row, host_row, index in zip(np.asarray(batch["image"]), expected["image"], expected["index"], strict=True):
            if index in (-1, 5, 8):
                np.testing.assert_array_equal(row, host_row)
            else:
                assert_close(row, host_row)


def test_synthetic_sources_pass_through(decoder):
    source = SyntheticSource(20, num_classes=5)
    spec = StreamSpec(4, seed=1)
    augment = AugmentConfig(image_size=SIZE)
    ours = next(decoded_train_batches(source, spec, augment, 3, LABELS, decoder))
    host = next(train_batches(source, spec, augment, 3, LABELS, on_device=True))
    for key in ("image", "label", "augment_ids"):
        np.testing.assert_array_equal(np.asarray(ours[key]), host[key])
    prep = Preprocessing(SIZE)
    ours = list(decoded_eval_batches(source, prep, 0, 10, LABELS, 4, 4, {}, decoder))
    host = list(preprocessed_batches(source, prep, 0, 10, LABELS, 4, 4, {}))
    for a, b in zip(ours, host, strict=True):
        for key in ("image", "label", "mask", "index"):
            np.testing.assert_array_equal(np.asarray(a[key]), b[key])


# --- Choosing the decoder, memory, JAX ---------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA")
def test_without_an_nvidia_device_pytorch_is_not_even_imported(monkeypatch):
    monkeypatch.setattr(gpu_decode, "nvidia_device_files", lambda: False)
    monkeypatch.setattr(gpu_decode, "_torch", lambda: pytest.fail("PyTorch imported"))
    with pytest.raises(InputError, match=r"^--decode gpu: no NVIDIA GPU on this machine \(no /dev/nvidia\*\)$"):
        select_decoder("gpu")
    note = "JPEG decoding stays on the host: no NVIDIA GPU on this machine (no /dev/nvidia*)"
    assert select_decoder("auto") == (None, note)


def test_decode_choices_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(gpu_decode, "nvidia_device_files", lambda: True)  # a driver, but PyTorch sees no GPU
    with pytest.raises(InputError, match=r"^--decode gpu: PyTorch sees no CUDA device$"):
        select_decoder("gpu")
    decoder, note = select_decoder("auto")
    assert decoder is None
    assert note == "JPEG decoding stays on the host: PyTorch sees no CUDA device"
    assert select_decoder("host") == (None, None)
    with pytest.raises(InputError, match="must be one of auto, gpu, host"):
        select_decoder("nvjpeg")


@pytest.mark.slow
def test_without_pytorch_the_module_imports_and_auto_stays_on_the_host():
    code = (
        "import sys\n"
        "from tresnet_jax.data import gpu_decode\n"
        "from tresnet_jax.data.gpu_decode import select_decoder\n"
        "gpu_decode.nvidia_device_files = lambda: True\n"
        "assert 'torch' not in sys.modules\n"
        "print(select_decoder('auto')[1])\n"
        "try:\n"
        "    select_decoder('gpu')\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    result = run_without({"torch", "torchvision"}, code, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("JPEG decoding stays on the host: PyTorch with torchvision is not installed")
    assert lines[1].startswith("InputError --decode gpu: PyTorch with torchvision is not installed")


def test_memory_split_leaves_the_decoder_room_only_when_asked(monkeypatch):
    gib = 1 << 30
    assert memory_fraction(141 * gib) == 0.75  # JAX's default already leaves 35 GB
    assert memory_fraction(16 * gib) == 0.75
    assert memory_fraction(12 * gib) == 0.66
    assert memory_fraction(6 * gib) == 0.5  # never below half
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert reserve_decoder_memory() is None
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if not torch.cuda.is_available():  # nothing to share
        assert reserve_decoder_memory() is None
        assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ


def test_to_jax_gives_the_tensors_values_on_its_device():
    tensor = torch.arange(2 * 5 * 5 * 3, dtype=torch.uint8).reshape(2, 3, 5, 5).permute(0, 2, 3, 1)
    array = to_jax(tensor)
    assert array.dtype == np.uint8
    assert array.shape == (2, 5, 5, 3)
    np.testing.assert_array_equal(np.asarray(array), tensor.numpy())
    assert array.devices() == {jax.devices("cpu")[0]}
