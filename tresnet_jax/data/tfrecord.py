"""The tfrecord framing (TFDS shards, TensorBoard event files), without TensorFlow: each record
is its length (uint64, little-endian), that length's masked CRC32C (uint32), the payload, and
the payload's masked CRC32C (uint32)."""

from __future__ import annotations

import struct

HEADER = struct.Struct("<QI")  # payload length, masked CRC32C of those 8 bytes
FOOTER_SIZE = 4  # masked CRC32C of the payload


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """tfrecord's checksum: CRC32C, rotated right by 15 bits plus a constant."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def framed(payload: bytes) -> bytes:
    """One record: ``payload`` with its length and checksums."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))
