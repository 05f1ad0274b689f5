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
from PIL import Image, JpegImagePlugin

from tests.blocked_imports import run_without
from tests.images import CLASSES, image_folder, photo
from tresnet_jax.data import gpu_decode
from tresnet_jax.data.augment import AugmentConfig, crop_box, decode_crop
from tresnet_jax.data.gpu_batches import (
    CHECKED_IMAGES,
    decoded_eval_batches,
    decoded_train_batches,
    first_jpegs,
    trusted,
)
from tresnet_jax.data.gpu_decode import (
    DECODER_MAX_LEVELS,
    DECODER_MEAN_LEVELS,
    BatchDecoder,
    colour_waves,
    decoder_peak_memory,
    decoder_report,
    level_difference,
    memory_fraction,
    probe_jpeg,
    probe_mismatch,
    reserve_decoder_memory,
    resized_mismatch,
    select_decoder,
    to_jax,
)
from tresnet_jax.data.jpeg_header import gpu_rejection
from tresnet_jax.data.pipeline import MAX_CONSECUTIVE_UNREADABLE
from tresnet_jax.data.preprocess import EvalTransform, decode_pil, eval_box, pil_transform
from tresnet_jax.data.sources import FolderSource, LabelMap, SyntheticSource, model_labels
from tresnet_jax.data.train_stream import StreamSpec, train_batches, train_keys
from tresnet_jax.errors import InputError
from tresnet_jax.evaluation import preprocessed_batches
from tresnet_jax.preprocessing import Preprocessing

# torchvision 0.29 deprecates its decoders for TorchCodec's; the decoder still uses them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# How far another JPEG decoder (nvJPEG) may be from PIL's libjpeg-turbo on ``smooth`` images (and,
# the mean only, on photographs): derived in gpu_decode, where the decoder's checks use them too.
MAX_LEVELS = DECODER_MAX_LEVELS
MEAN_LEVELS = DECODER_MEAN_LEVELS
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
    """Colour waves of 160 pixels, one direction and phase per channel drawn from ``seed``:
    smooth at every scale."""
    rng = np.random.default_rng(seed)
    angles, phases = rng.uniform(0, math.pi, 3), rng.uniform(0, 2 * math.pi, 3)
    return colour_waves(height, width, list(zip(angles, phases, strict=True)))


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


# --- Trusting the decoder: the probe and the first batch's check ------------------------------
class Brightened(BatchDecoder):
    """The CPU decoder with every resized row ``levels`` brighter: a decoder whose pixels are
    wrong, as a wrong colour conversion would make them."""

    def __init__(self, levels: int):
        super().__init__(torch.device("cpu"), "torchvision on the CPU")
        self.levels = levels

    def decode_resized(self, *args, **kwargs):
        rows, refused = super().decode_resized(*args, **kwargs)
        return (rows.int() + self.levels).clamp(0, 255).to(torch.uint8), refused


def test_the_probe_is_a_smooth_colourful_baseline_jpeg():
    """What the bounds assume (at most 3.9 levels a pixel) and what makes a wrong colour
    conversion show: chroma far from grey, 4:2:0 so that the upsampling is exercised."""
    encoded = probe_jpeg()
    assert gpu_rejection(encoded) is None
    with Image.open(io.BytesIO(encoded)) as image:
        assert image.size == (gpu_decode.PROBE_SIDE, gpu_decode.PROBE_SIDE)
        assert JpegImagePlugin.get_sampling(image) == 2  # 4:2:0
    pixels = colour_waves(gpu_decode.PROBE_SIDE, gpu_decode.PROBE_SIDE, gpu_decode.PROBE_WAVES).astype(int)
    assert max(np.abs(np.diff(pixels, axis=0)).max(), np.abs(np.diff(pixels, axis=1)).max()) == 4
    chroma = np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("YCbCr"))[..., 1:].astype(int)
    assert (chroma.min((0, 1)).tolist(), chroma.max((0, 1)).tolist()) == ([55, 72], [200, 227])


def test_the_probe_passes_with_this_machines_decoders(any_decoder):
    """torchvision's CPU decoder is libjpeg-turbo, as PIL's: the same pixels. nvJPEG (with a
    GPU) within the bounds, on the probe and on photographs resized as evaluation resizes them."""
    encoded = probe_jpeg()
    assert probe_mismatch(any_decoder.decode_pixels, any_decoder.name) is None
    mean, most = level_difference(any_decoder.decode_pixels(encoded), np.asarray(decode_pil(encoded, "probe")))
    if any_decoder.device.type == "cpu":
        assert (mean, most) == (0.0, 0)
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    photos = [encode(photo(name), quality=90) for name in names]
    boxes = [eval_box(Image.open(io.BytesIO(data)).size, Preprocessing(224)) for data in photos]
    counts = dict(any_decoder.counts)
    assert resized_mismatch(any_decoder, photos, boxes, names, 224) is None
    assert any_decoder.counts == counts  # the check's images are not counted as the run's


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p + 2, None),  # mean 2.0, largest 2: within both bounds
        (lambda p: p + 3, (3, 3.0)),  # over the mean's bound
        (lambda p: np.where(np.arange(p.size).reshape(p.shape) == 0, p + 14, p), (14, 14 / 96 / 96 / 3)),  # one value
        (lambda p: p + 20, (20, 20.0)),
        (lambda p: p[..., ::-1], (201, 72.04390914351852)),  # channels swapped
    ],
    ids=["+2", "+3", "one +14", "+20", "BGR"],
)
def test_a_decoder_further_from_pil_than_the_bounds_fails_the_probe_with_the_numbers(change, expected):
    cpu = BatchDecoder.cpu()

    def decode(data: bytes) -> np.ndarray:
        return change(cpu.decode_pixels(data).astype(np.int16)).astype(np.uint8)  # the probe stays in 27..228

    why = probe_mismatch(decode, "a decoder")
    if expected is None:
        assert why is None
        return
    most, mean = expected
    assert why == (
        f"a decoder decodes a test JPEG up to {most} levels from PIL's (mean {mean:.1f}); two correct JPEG "
        "decoders differ by at most 13 (mean 2) on it"
    )


def test_a_decoder_returning_another_shape_fails_the_probe():
    cpu = BatchDecoder.cpu()
    why = probe_mismatch(lambda data: cpu.decode_pixels(data)[:64], "a decoder")
    assert why == "a decoder decodes a 96x96 test JPEG to shape (64, 96, 3)"


def test_a_cuda_decoder_failing_the_probe_is_refused_or_left_for_the_host(monkeypatch):
    """A machine that has CUDA as far as PyTorch says, whose decoder gives pixels 20 levels off:
    ``auto`` stays on the host with one line, ``gpu`` is refused with one line."""
    wrong = BatchDecoder.cpu()
    monkeypatch.setattr(wrong, "decode_pixels", lambda data: BatchDecoder.cpu().decode_pixels(data) + 20)
    monkeypatch.setattr(gpu_decode, "nvidia_device_files", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(BatchDecoder, "cuda", classmethod(lambda cls, index=0: wrong))
    why = (
        "torchvision's CUDA JPEG decoder decodes a test JPEG up to 20 levels from PIL's (mean 20.0); "
        "two correct JPEG decoders differ by at most 13 (mean 2) on it"
    )
    assert gpu_decode.cuda_unavailable() == why
    assert select_decoder("auto") == (None, f"JPEG decoding stays on the host: {why}")
    with pytest.raises(InputError) as raised:
        select_decoder("gpu")
    assert str(raised.value) == f"--decode gpu: {why}"
    monkeypatch.setattr(wrong, "decode_pixels", BatchDecoder.cpu().decode_pixels)  # a right one is taken
    assert select_decoder("gpu") == (wrong, None)


def test_the_first_batch_check_keeps_a_right_decoder_silently(capsys):
    source = MemorySource(16)
    decoder = BatchDecoder.cpu()
    augment = AugmentConfig(image_size=SIZE)
    batches = list(
        itertools.islice(
            decoded_train_batches(source, StreamSpec(8, seed=3), augment, 0, LABELS, decoder, workers=2), 2
        )
    )
    assert capsys.readouterr().out == ""
    assert (decoder.checked, decoder.mismatch) == (True, None)
    assert decoder.counts["decoded"] == 16  # the two batches' images, not the check's 4 on top
    assert not isinstance(batches[0]["image"], np.ndarray)  # the decoder's rows, as a jax.Array
    assert "failed" not in decoder_report(decoder)


def test_a_wrong_decoder_gives_way_to_the_host_stream_with_one_line(capsys):
    """Rows 20 levels off: the first batch's check prints one line naming the first image it
    decoded both ways, and the run's streams, training and then validation, are the host's."""
    source = MemorySource(16)
    decoder = Brightened(20)
    augment = AugmentConfig(image_size=SIZE)
    spec = StreamSpec(8, seed=3)
    first = next(train_keys(source, spec, 2))[1]
    ours = list(itertools.islice(decoded_train_batches(source, spec, augment, 2, LABELS, decoder, workers=2), 3))
    host = list(itertools.islice(train_batches(source, spec, augment, 2, LABELS, None, 2, True), 3))
    why = (
        f"memory[{first}] decoded by torchvision on the CPU is 20.0 levels from PIL's on average (at most 20); "
        "two correct JPEG decoders differ by at most 2 on average"
    )
    assert capsys.readouterr().out == f"JPEG decoding stays on the host: {why}\n"
    assert decoder.mismatch == why
    for batch, expected in zip(ours, host, strict=True):
        for key in ("image", "label", "augment_ids"):
            np.testing.assert_array_equal(batch[key], expected[key])
        assert isinstance(batch["image"], np.ndarray)
    # Validation of the same run: the host's batches, no second line.
    prep = Preprocessing(SIZE)
    ours = list(decoded_eval_batches(source, prep, 0, 16, LABELS, 6, 3, {}, decoder, workers=2))
    host = list(preprocessed_batches(source, prep, 0, 16, LABELS, 6, 3, {}, workers=2))
    for batch, expected in zip(ours, host, strict=True):
        for key in ("image", "label", "mask", "index"):
            np.testing.assert_array_equal(batch[key], expected[key])
    assert capsys.readouterr().out == ""
    assert decoder.counts["decoded"] == 0
    assert decoder_report(decoder).endswith(
        "; its pixels failed the first batch's check, so the run decoded on the host"
    )


def test_the_check_of_an_evaluation_names_the_worst_of_its_first_jpegs(capsys):
    """Evaluation alone (eval.py): its first batch checked; refused files are passed over, and
    the line names the image furthest from PIL's."""
    source = MemorySource(12, {0: odd_files()["progressive"], 2: b"broken"})
    found = first_jpegs(source, EvalTransform(Preprocessing(SIZE)), [(0, i) for i in range(6)], CHECKED_IMAGES)
    assert [name for _, _, name in found] == ["memory[1]", "memory[3]", "memory[4]", "memory[5]"]
    decoder = BatchDecoder.cpu()
    original = decoder.decode_resized

    def darker_third(encoded, boxes, size, interpolation="bilinear"):
        rows, refused = original(encoded, boxes, size, interpolation)
        if len(encoded) == CHECKED_IMAGES:  # the check's call: the 3rd image 30 levels darker, the 2nd 5
            rows[2] = (rows[2].int() - 30).clamp(0, 255).to(torch.uint8)
            rows[1] = (rows[1].int() - 5).clamp(0, 255).to(torch.uint8)
        return rows, refused

    decoder.decode_resized = darker_third
    prep = Preprocessing(SIZE)
    skipped = {}
    ours = list(decoded_eval_batches(source, prep, 0, 12, LABELS, 6, 2, skipped, decoder, workers=2))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert out[0].startswith("JPEG decoding stays on the host: memory[4] decoded by torchvision on the CPU is ")
    assert out[0].endswith(
        " levels from PIL's on average (at most 30); two correct JPEG decoders differ by at most 2 on average"
    )
    host_skipped = {}
    host = list(preprocessed_batches(source, prep, 0, 12, LABELS, 6, 2, host_skipped, workers=2))
    assert list(skipped) == list(host_skipped) == [2]  # PIL's reasons name a BytesIO object's address
    assert skipped[2].startswith("unreadable image (cannot identify image file")
    for batch, expected in zip(ours, host, strict=True):
        np.testing.assert_array_equal(batch["image"], expected["image"])


def test_a_first_batch_without_jpegs_leaves_the_check_to_the_next_stream():
    decoder = Brightened(20)
    source = SyntheticSource(8, num_classes=5)
    assert trusted(decoder, source, EvalTransform(Preprocessing(SIZE)), [(0, i) for i in range(8)])
    assert (decoder.checked, decoder.mismatch) == (False, None)
    assert not trusted(decoder, MemorySource(4), EvalTransform(Preprocessing(SIZE)), [(0, i) for i in range(4)])
    assert decoder.checked


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
