"""What a FITS file declares, read from its raw header blocks before astropy parses it.

astropy trusts the structural keys: an HDU with ``NAXIS = 2147483648`` makes it build a
list of two billion axes, and a whole-file gzip or bzip2 exposure is decompressed before
anything can be refused (5 s of CPU for 1.8 KB declaring 2 GiB). :func:`preflight` walks
the headers itself, card by card (only the structural keys are parsed), checks each
against the limits, and skips each HDU's data by its declared size: a seek in a plain
file, a bounded read in a compressed one, whose declared total is checked first.
"""

from __future__ import annotations

import bz2
from collections.abc import Callable, Iterator
import gzip
import math
import re
from typing import IO, NamedTuple

BLOCK = 2880
CARD = 80
MAX_HEADER_BLOCKS = 1000  # 36,000 cards: far beyond any exposure's header
BYTES_PER_PIXEL_OF_A_PLANE = 16  # a compressed file may declare at most this many bytes per allowed plane pixel
_BITPIX = (8, 16, 32, 64, -32, -64)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_STRUCTURAL = re.compile(r"^(BITPIX|NAXIS\d*|PCOUNT|GCOUNT|XTENSION|ZIMAGE|ZBITPIX|ZNAXIS\d*|ZTILE\d+)$")


class DeclaredTooMuch(ValueError):
    """A header declares something beyond the limits, or a structural key that is not
    usable; the message names the HDU, the key and its value."""


def _opener(head: bytes) -> tuple[Callable[..., IO[bytes]], bool]:
    """How to read a file that starts with ``head``: (open function, whole-file compressed)."""
    if head.startswith(b"\x1f\x8b"):
        return gzip.open, True
    if head.startswith(b"BZh"):
        return bz2.open, True
    return open, False


class HduExtent(NamedTuple):
    """Where one HDU lies in a file (bytes from the file's start)."""

    index: int
    cards: dict[str, str]  # its structural cards: key -> value text
    header_start: int
    data_start: int
    data_bytes: int  # declared, before the padding to whole 2880-byte blocks

    @property
    def end(self) -> int:
        """The end of its data, padded (where the next HDU starts)."""
        return self.data_start + -(-self.data_bytes // BLOCK) * BLOCK


def preflight(path: str, max_hdus: int, max_pixels: int) -> None:
    """Walk the headers of the FITS file at ``path`` (plain, gzip or bzip2) and raise
    :class:`DeclaredTooMuch` for a structural key that is not a usable number, more than
    ``max_hdus`` HDUs, an image plane (or compressed image) of more than ``max_pixels``
    pixels, or a compressed file declaring more in all than 16 bytes per allowed pixel.
    A file that ends early is left to the reader, which reports it."""
    with open(path, "rb") as raw:
        opener, compressed = _opener(raw.read(4))
    budget = max_pixels * BYTES_PER_PIXEL_OF_A_PLANE if compressed else math.inf
    with opener(path, "rb") as stream:
        for extent in walk(stream, max_hdus, max_pixels, compressed):
            budget -= extent.data_bytes
            if budget < 0:
                raise DeclaredTooMuch(f"the compressed file declares more than {max_pixels * BYTES_PER_PIXEL_OF_A_PLANE} "
                                      "bytes of data in all; decompress it, or send planes no larger than allowed")


def not_fits_reason(exc: BaseException) -> str | None:
    """What to tell a user when astropy refuses a file for lacking its SIMPLE card (its own
    text advises an astropy option), else None."""
    if "No SIMPLE card found" in str(exc):
        return "not a FITS file (it does not start with the SIMPLE card every FITS file starts with)"
    return None


def is_whole_file_compressed(head: bytes) -> bool:
    """The file starting with ``head`` (its first 4 bytes) is gzip or bzip2 compressed as a whole."""
    return _opener(head)[1]


def walk(stream: IO[bytes], max_hdus: int, max_pixels: int, compressed: bool = False) -> Iterator[HduExtent]:
    """The HDUs of the FITS stream (at its start), one by one, each checked as
    :func:`preflight` says; their data is skipped, not read (a seek, or for a
    ``compressed`` stream bounded reads)."""
    index, position = 0, 0
    while True:
        header = _header(stream, index)
        if header is None:
            return
        cards, blocks = header
        if index >= max_hdus:
            raise DeclaredTooMuch(f"more than {max_hdus} HDUs; an exposure has its image, mask, variance and archive tables only")
        extent = HduExtent(index, cards, position, position + blocks * BLOCK, _data_bytes(cards, index, max_pixels))
        yield extent
        _skip(stream, extent.end - extent.data_start, compressed)
        index, position = index + 1, extent.end


def _header(stream: IO[bytes], index: int) -> tuple[dict[str, str], int] | None:
    """The structural cards of the next header (key -> value text) and its length in
    blocks; None at the end of the file."""
    cards: dict[str, str] = {}
    for blocks in range(1, MAX_HEADER_BLOCKS + 1):
        block = stream.read(BLOCK)
        if len(block) < BLOCK:
            return None  # the end (or a truncated file: the reader says which)
        for start in range(0, BLOCK, CARD):
            card = block[start:start + CARD].decode("ascii", "replace")
            key = card[:8].rstrip()
            if key == "END":
                return cards, blocks
            if card[8:10] == "= " and _STRUCTURAL.match(key):
                cards[key] = card[10:].split("/", 1)[0].strip()
    raise DeclaredTooMuch(f"HDU {index} has a header of more than {MAX_HEADER_BLOCKS} blocks")


def _integer(cards: dict[str, str], key: str, index: int, default: int | None, low: int, high: float) -> int:
    """The whole number at ``key`` within [low, high], else DeclaredTooMuch naming it."""
    text = cards.get(key)
    if text is None:
        if default is None:
            raise DeclaredTooMuch(f"HDU {index} header lacks {key}")
        return default
    if not _INTEGER.fullmatch(text) or not low <= int(text) <= high:
        raise DeclaredTooMuch(f"HDU {index} header key {key} = {text} is not a whole number from {low} to {high:g}")
    return int(text)


def _data_bytes(cards: dict[str, str], index: int, max_pixels: int) -> int:
    """Bytes of data the header declares, after checking its structural keys and, for
    images, their pixels against ``max_pixels``."""
    bitpix = _integer(cards, "BITPIX", index, None, -64, 64)
    if bitpix not in _BITPIX:
        raise DeclaredTooMuch(f"HDU {index} header key BITPIX = {bitpix} is not one of {', '.join(map(str, _BITPIX))}")
    naxis = _integer(cards, "NAXIS", index, None, 0, 999)
    axes = [_integer(cards, f"NAXIS{i}", index, None, 0, 2**62) for i in range(1, naxis + 1)]
    pcount = _integer(cards, "PCOUNT", index, 0, 0, 2**62)
    gcount = _integer(cards, "GCOUNT", index, 1, 1, 2**31)
    image = index == 0 or cards.get("XTENSION", "").strip("' ").upper() == "IMAGE"
    if image and axes and math.prod(axes) > max_pixels:
        raise DeclaredTooMuch(f"HDU {index} declares {' x '.join(map(str, axes))} = {math.prod(axes)} pixels, "
                              f"more than the {max_pixels} allowed")
    if cards.get("ZIMAGE") == "T":
        znaxis = _integer(cards, "ZNAXIS", index, None, 0, 999)
        zaxes = [_integer(cards, f"ZNAXIS{i}", index, None, 0, 2**62) for i in range(1, znaxis + 1)]
        if zaxes and math.prod(zaxes) > max_pixels:
            raise DeclaredTooMuch(f"HDU {index} (compressed) declares {' x '.join(map(str, zaxes))} = {math.prod(zaxes)} pixels, "
                                  f"more than the {max_pixels} allowed")
    return abs(bitpix) // 8 * gcount * (pcount + (math.prod(axes) if axes else 0))


def _skip(stream: IO[bytes], size: int, compressed: bool) -> None:
    """Move past ``size`` bytes of data: a seek, or (compressed) reads of 1 MiB, which
    decompress only what the file really holds."""
    if not compressed:
        stream.seek(size, 1)
        return
    while size > 0:
        chunk = stream.read(min(size, 2**20))
        if not chunk:
            return
        size -= len(chunk)
