"""Debian's Chromium driven by Playwright (no browser download), and real PNG slices."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-domain-reliability",
]


def png(width: int, height: int, pixels: bytes) -> bytes:
    """An 8-bit greyscale PNG (the format masks come in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + pixels[y * width : (y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def mask_png(index: int, size: int = 64) -> bytes:
    """A disc whose radius and place move with the slice index, as an organ's section does."""
    radius = size * (0.15 + 0.2 * abs(math.sin(index / 7)))
    cx = size / 2 + size * 0.15 * math.cos(index / 5)
    cy = size / 2
    pixels = bytes(
        255 if (x - cx) ** 2 + (y - cy) ** 2 <= radius**2 else 0
        for y in range(size)
        for x in range(size)
    )
    return png(size, size, pixels)


def write_slices(folder: Path, indexes: range | list[int], prefix: str = "liver") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in indexes:
        path = folder / f"{prefix}_{index:04d}.png"
        path.write_bytes(mask_png(index))
        paths.append(path)
    return paths
