"""The records of an .acz file (spec/FORMAT.md §3-§8): their byte layouts, the CRC-32
and alignment arithmetic, and the parsed forms the reader returns and the writer takes
(:class:`TensorEntry`, :class:`Header`). Shared by :mod:`.reader`, :mod:`.writer` and
:mod:`.streams`; bytes only (numpy-free, torch-free).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

from aligncodec.formats.constants import DTYPE_SIZES, MODE_NAMES, PREAMBLE_SIZE

# little-endian fixed-size records
PREAMBLE = struct.Struct("<8sHHIQQII I16sI".replace(" ", ""))  # spec §3
SECTION = struct.Struct("<HHI")  # kind, flags, length
TENSOR_FIXED = struct.Struct("<HBBHHQQII")  # the fixed part of a tensor entry (spec §4)
STREAM = struct.Struct("<BBHIQQ")  # stream header (spec §5)
RANS_AUX = struct.Struct("<BBHIIIII")  # rANS stream aux (spec §6)
assert PREAMBLE.size == PREAMBLE_SIZE and TENSOR_FIXED.size == 32
assert STREAM.size == 24 and RANS_AUX.size == 24


try:  # ISA-L's CRC-32 (carry-less multiply): the same function as zlib's, ~7x faster on large tensors
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    _crc32 = zlib.crc32


def crc32(data) -> int:
    """CRC-32 of spec §8 (IEEE 802.3 / zlib, reflected poly 0xEDB88320, init and final xor 0xFFFFFFFF)."""
    return _crc32(data) & 0xFFFFFFFF


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    mode: int
    stream_count: int
    offset: int  # relative to the data section
    size: int
    crc: int
    params: bytes = b""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def mode_name(self) -> str:
        return MODE_NAMES.get(self.mode, f"mode-{self.mode}")


@dataclass
class Header:
    version: int
    metadata: dict[str, str]
    tensors: list[TensorEntry]
    data_offset: int
    data_size: int
    header_size: int
    extensions: list[tuple[int, int, bytes]] = field(default_factory=list)  # (kind, flags, payload)
