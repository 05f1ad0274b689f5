"""What is read of a JPEG's bytes before decoding it: whether the batched GPU decoder may be given
it (``gpu_rejection``) and its size (``header_size``).

The batched decoder takes baseline 8-bit JPEGs, greyscale or YCbCr with common chroma
subsampling, ending in an end-of-image marker. Everything else (progressive, arithmetic-coded,
CMYK/YCCK, Adobe RGB, truncated, PNG named .jpg, not an image) is rejected here, from the
markers up to the first scan and the last bytes, and the decoder leaves it to the host's path.
"""

from __future__ import annotations

import io

from PIL import Image

_SOF_BASELINE = 0xC0
_OTHER_SOF = {0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length field
_LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2)}  # 4:4:4, 4:2:2, 4:4:0, 4:2:0


def gpu_rejection(encoded: bytes) -> str | None:
    """Why the batched decoder must not be given these bytes, or None for a baseline JPEG it
    takes. Reads the markers up to the first scan only: microseconds."""
    if encoded[:2] != b"\xff\xd8":
        return "not a JPEG"
    if encoded.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return "no end-of-image marker (truncated, or data after the image)"
    frame, adobe_transform, pos = None, None, 2
    while pos + 4 <= len(encoded):
        if encoded[pos] != 0xFF:
            return "malformed marker segments"
        marker = encoded[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(encoded[pos + 2 : pos + 4], "big")
        segment = encoded[pos + 4 : pos + 2 + length]
        if marker in _OTHER_SOF:
            return f"not a baseline JPEG (SOF{marker - 0xC0})"
        if marker == _SOF_BASELINE:
            frame = segment
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        elif marker == 0xDA:  # start of scan: the header is over
            return _frame_rejection(frame, adobe_transform)
        elif marker == 0xD9:
            return "no image data"
        pos += 2 + length
    return "no start of scan"


def _frame_rejection(frame: bytes | None, adobe_transform: int | None) -> str | None:
    if frame is None or len(frame) < 6:
        return "no baseline frame header"
    precision, components = frame[0], frame[5]
    height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
    if precision != 8 or height == 0 or width == 0:
        return f"{precision}-bit samples or an unknown size"
    if components == 1:
        return None
    if components != 3 or len(frame) < 6 + 3 * components:
        return f"{components} colour components (CMYK or YCCK)"
    if adobe_transform == 0:
        return "RGB stored without the YCbCr transform (Adobe)"
    sampling = [(frame[7 + 3 * c] >> 4, frame[7 + 3 * c] & 15) for c in range(3)]
    if sampling[0] not in _LUMA_SAMPLING or sampling[1] != (1, 1) or sampling[2] != (1, 1):
        return f"unusual chroma subsampling {sampling}"
    return None


def header_size(encoded: bytes) -> tuple[int, int]:
    """(width, height) from an image's header, without decoding it."""
    with Image.open(io.BytesIO(encoded)) as image:
        return image.size
