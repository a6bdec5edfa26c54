"""Reader and writer of the .acz container, version 1 (spec/FORMAT.md).

This module knows bytes, not maths: it imports neither torch nor ``codec/``.
The reader validates every length, count and offset before it trusts it and
raises the named errors of :mod:`aligncodec.formats.errors`.

Layout (all integers little-endian)::

    Preamble (64 B) | Header (sections) | zero pad to 64 | tensor data ... (each 64-aligned)

A tensor's data is a sequence of *streams* (raw bytes, a zstd frame, or chunked
rANS symbols with an integer frequency table); what the streams mean is given
by the tensor's coding mode, interpreted in ``codec/``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from aligncodec.formats import errors as E

# --------------------------------------------------------------------------- constants

MAGIC = b"\x89ACZ\r\n\x1a\n"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)  # retired ids are never reused (spec §2)

PREAMBLE_SIZE = 64
DATA_ALIGN = 64
SECTION_ALIGN = 8
STREAM_ALIGN = 8

SECTION_METADATA = 1
SECTION_TENSOR = 2
SECTION_FLAG_REQUIRED = 0x0001
FIRST_EXTENSION_KIND = 0x0100

MAX_NDIM = 8
MAX_NAME_BYTES = 4096
MAX_STREAMS = 64
MAX_ALPHABET = 1 << 16
MAX_PRECISION = 16
MAX_CHUNK_SYMBOLS = 1 << 24

# Defaults of the reader's limits (overridable per reader).
DEFAULT_MAX_HEADER_BYTES = 256 << 20
DEFAULT_MAX_TENSOR_BYTES = 64 << 30

# dtype code -> (name, bytes per element). Names as in safetensors.
DTYPES: dict[int, tuple[str, int]] = {
    1: ("F32", 4),
    2: ("F16", 2),
    3: ("BF16", 2),
    4: ("F64", 8),
    5: ("I8", 1),
    6: ("I16", 2),
    7: ("I32", 4),
    8: ("I64", 8),
    9: ("U8", 1),
    10: ("BOOL", 1),
    11: ("U16", 2),
    12: ("U32", 4),
    13: ("U64", 8),
    14: ("F8_E4M3", 1),
    15: ("F8_E5M2", 1),
}
DTYPE_CODES = {name: code for code, (name, _) in DTYPES.items()}

# coding modes (meaning defined in spec §7, implemented in codec/)
MODE_STORED = 0
MODE_FLOAT_SPLIT = 1
MODE_ECSQ = 2  # lossy, codec/lossy.py (spec §7.4)
MODE_NAMES = {MODE_STORED: "stored", MODE_FLOAT_SPLIT: "float-split", MODE_ECSQ: "ecsq"}

# stream coders
CODER_RAW = 0
CODER_ZSTD = 1
CODER_RANS = 2
CODER_RANS_LANES = 3  # interleaved lanes (spec §6.6)
CODER_NAMES = {CODER_RAW: "raw", CODER_ZSTD: "zstd", CODER_RANS: "rans", CODER_RANS_LANES: "rans-lanes"}
MAX_LANES = 32  # one GPU warp per chunk

RANS_STATE_LOWER = 1 << 16  # L: state interval [L, 2^32)

_PREAMBLE = struct.Struct("<8sHHIQQII I16sI".replace(" ", ""))
_SECTION = struct.Struct("<HHI")
_TENSOR_FIXED = struct.Struct("<HBBHHQQII")
_STREAM = struct.Struct("<BBHIQQ")
_RANS_AUX = struct.Struct("<BBHIIIII")
assert _PREAMBLE.size == PREAMBLE_SIZE and _TENSOR_FIXED.size == 32
assert _STREAM.size == 24 and _RANS_AUX.size == 24


def crc32(data) -> int:
    """CRC-32 of spec §8 (IEEE 802.3 / zlib, reflected poly 0xEDB88320, init and final xor 0xFFFFFFFF)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# --------------------------------------------------------------------------- LEB128


def leb128_encode(values: Sequence[int]) -> bytes:
    out = bytearray()
    for v in values:
        v = int(v)
        if v < 0:
            raise ValueError("LEB128 values are unsigned")
        while True:
            b = v & 0x7F
            v >>= 7
            if v:
                out.append(b | 0x80)
            else:
                out.append(b)
                break
    return bytes(out)


def leb128_decode(buf: bytes, count: int, max_value: int) -> np.ndarray:
    """Decode exactly ``count`` unsigned LEB128 values that fill ``buf`` exactly.

    Raises StreamError on overlong encodings (more than 3 bytes, or a redundant
    zero final byte), values above ``max_value``, truncation or bytes left over."""
    out = np.zeros(count, dtype=np.uint32)
    pos = 0
    n = len(buf)
    for i in range(count):
        v = 0
        shift = 0
        while True:
            if pos >= n:
                raise E.StreamError("frequency table truncated")
            b = buf[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if b == 0 and shift > 7:
                    raise E.StreamError("frequency table has a non-minimal LEB128 encoding")
                break
            if shift >= 21:
                raise E.StreamError("frequency table value too long")
        if v > max_value:
            raise E.StreamError(f"frequency {v} exceeds 2^precision")
        out[i] = v
    if pos != n:
        raise E.StreamError("frequency table has bytes left over")
    return out


# --------------------------------------------------------------------------- streams


@dataclass
class RawStream:
    """Bytes stored as they are (coder 0)."""

    data: bytes | memoryview

    coder = CODER_RAW


@dataclass
class ZstdStream:
    """One zstd frame (coder 1) that decompresses to exactly ``size`` bytes."""

    data: bytes | memoryview
    size: int

    coder = CODER_ZSTD


@dataclass
class RansStream:
    """Chunked rANS symbols (coder 2, ``lanes == 1``; coder 3, interleaved lanes), spec §6.

    ``freqs`` sum to 2**precision; chunk i covers symbols
    [i*chunk_symbols, min((i+1)*chunk_symbols, n_symbols)) and occupies
    ``chunk_lengths[i]`` bytes of ``payload``: a u32 final state then u16 words
    (``lanes`` > 1: min(lanes, symbols of the chunk) u32 states, then the lanes' u16 words
    interleaved in decode order; symbol t of a chunk belongs to lane t mod lanes)."""

    precision: int
    chunk_symbols: int
    n_symbols: int
    freqs: np.ndarray  # uint32, len = alphabet size
    chunk_lengths: np.ndarray  # uint32
    payload: bytes | memoryview
    lanes: int = 1

    @property
    def coder(self) -> int:
        return CODER_RANS if self.lanes == 1 else CODER_RANS_LANES

    @property
    def alphabet_size(self) -> int:
        return int(len(self.freqs))

    def chunk_offsets(self) -> np.ndarray:
        """Start offset of every chunk inside ``payload`` (int64), plus the end."""
        off = np.zeros(len(self.chunk_lengths) + 1, dtype=np.int64)
        np.cumsum(self.chunk_lengths, out=off[1:])
        return off


Stream = RawStream | ZstdStream | RansStream


def serialize_stream(s: Stream) -> bytes:
    if isinstance(s, RawStream):
        return _STREAM.pack(CODER_RAW, 0, 0, 0, len(s.data), len(s.data)) + bytes(s.data)
    if isinstance(s, ZstdStream):
        return _STREAM.pack(CODER_ZSTD, 0, 0, 0, int(s.size), len(s.data)) + bytes(s.data)
    if isinstance(s, RansStream):
        table = leb128_encode(s.freqs)
        n_chunks = len(s.chunk_lengths)
        aux_size = align(_RANS_AUX.size + len(table) + 4 * n_chunks, STREAM_ALIGN)
        aux = bytearray(aux_size)
        if not 1 <= s.lanes <= MAX_LANES:
            raise ValueError(f"rANS lanes must be 1..{MAX_LANES}")
        _RANS_AUX.pack_into(aux, 0, s.precision, 0, 0 if s.lanes == 1 else s.lanes, s.alphabet_size, s.chunk_symbols, n_chunks, len(table), 0)
        aux[_RANS_AUX.size : _RANS_AUX.size + len(table)] = table
        ct = np.asarray(s.chunk_lengths, dtype="<u4").tobytes()
        aux[_RANS_AUX.size + len(table) : _RANS_AUX.size + len(table) + len(ct)] = ct
        return _STREAM.pack(s.coder, 0, 0, aux_size, int(s.n_symbols), len(s.payload)) + bytes(aux) + bytes(s.payload)
    raise TypeError(f"not a stream: {type(s).__name__}")


def parse_streams(data: bytes | memoryview, count: int) -> list[Stream]:
    """Parse ``count`` streams that exactly fill ``data`` (spec §5, §6).

    Validates every field before using it; payloads are zero-copy memoryviews
    into ``data`` (no decoding happens here)."""
    mv = memoryview(data)
    n = len(mv)
    pos = 0
    out: list[Stream] = []
    for i in range(count):
        if pos % STREAM_ALIGN:
            raise E.LayoutError("stream not 8-byte aligned")
        if n - pos < _STREAM.size:
            raise E.TruncatedError(f"stream {i} header truncated")
        coder, r0, r1, aux_size, count_field, payload_size = _STREAM.unpack_from(mv, pos)
        if r0 or r1:
            raise E.HeaderError(f"stream {i}: reserved field not zero")
        pos += _STREAM.size
        if aux_size > n - pos or payload_size > n - pos - aux_size:
            raise E.TruncatedError(f"stream {i} extends past the tensor data")
        aux = mv[pos : pos + aux_size]
        payload = mv[pos + aux_size : pos + aux_size + payload_size]
        if coder == CODER_RAW:
            if aux_size:
                raise E.StreamError(f"stream {i}: raw stream with aux bytes")
            if count_field != payload_size:
                raise E.StreamError(f"stream {i}: raw stream size {count_field} != payload {payload_size}")
            out.append(RawStream(payload))
        elif coder == CODER_ZSTD:
            if aux_size:
                raise E.StreamError(f"stream {i}: zstd stream with aux bytes")
            out.append(ZstdStream(payload, int(count_field)))
        elif coder in (CODER_RANS, CODER_RANS_LANES):
            out.append(_parse_rans(i, aux, payload, count_field, coder == CODER_RANS_LANES))
        else:
            raise E.UnsupportedError(f"stream {i}: unknown coder {coder}")
        pos += aux_size + payload_size
        pad = align(pos, STREAM_ALIGN) if i + 1 < count else pos
        if pad > n:
            raise E.TruncatedError(f"stream {i} padding truncated")
        if any(mv[pos:pad]):
            raise E.LayoutError(f"stream {i}: non-zero padding")
        pos = pad
    if pos != n:
        raise E.LayoutError(f"tensor data has {n - pos} bytes after its last stream")
    return out


def _parse_rans(i: int, aux: memoryview, payload: memoryview, n_symbols: int, interleaved: bool = False) -> RansStream:
    if len(aux) < _RANS_AUX.size:
        raise E.StreamError(f"stream {i}: rANS aux too short")
    precision, r0, r1, alphabet, chunk_symbols, n_chunks, table_size, r2 = _RANS_AUX.unpack_from(aux, 0)
    lanes = 1
    if interleaved:  # coder 3: the u16 at aux offset 2 is the lane count (spec §6.6)
        lanes, r1 = r1, 0
        if not 2 <= lanes <= MAX_LANES:
            raise E.StreamError(f"stream {i}: {lanes} rANS lanes, 2..{MAX_LANES} allowed")
    if r0 or r1 or r2:
        raise E.HeaderError(f"stream {i}: reserved field not zero")
    if not 1 <= precision <= MAX_PRECISION:
        raise E.StreamError(f"stream {i}: precision {precision} outside 1..{MAX_PRECISION}")
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise E.StreamError(f"stream {i}: alphabet size {alphabet} outside 1..{MAX_ALPHABET}")
    if not 1 <= chunk_symbols <= MAX_CHUNK_SYMBOLS:
        raise E.StreamError(f"stream {i}: chunk size {chunk_symbols} outside 1..{MAX_CHUNK_SYMBOLS}")
    want_chunks = -(-n_symbols // chunk_symbols)
    if n_chunks != want_chunks:
        raise E.StreamError(f"stream {i}: {n_chunks} chunks, expected {want_chunks}")
    # every table value takes >= 1 byte, every chunk >= 4 bytes: bound before allocating
    if table_size < alphabet or table_size > 3 * alphabet:
        raise E.StreamError(f"stream {i}: frequency table size {table_size} impossible for {alphabet} symbols")
    need = align(_RANS_AUX.size + table_size + 4 * n_chunks, STREAM_ALIGN)
    if len(aux) != need:
        raise E.StreamError(f"stream {i}: aux size {len(aux)} != {need}")
    if any(aux[_RANS_AUX.size + table_size + 4 * n_chunks :]):
        raise E.LayoutError(f"stream {i}: non-zero padding in rANS aux")
    freqs = leb128_decode(bytes(aux[_RANS_AUX.size : _RANS_AUX.size + table_size]), alphabet, 1 << precision)
    if int(freqs.sum(dtype=np.uint64)) != 1 << precision:
        raise E.StreamError(f"stream {i}: frequencies sum to {int(freqs.sum())}, not 2^{precision}")
    off = _RANS_AUX.size + table_size
    lengths = np.frombuffer(aux, dtype="<u4", count=n_chunks, offset=off).astype(np.uint32)
    if n_chunks and (lengths.min() < 4 or np.any(lengths % 2)):
        raise E.StreamError(f"stream {i}: chunk length below 4 or odd")
    if lanes > 1 and n_chunks and np.any(lengths < 4 * lane_counts(n_symbols, chunk_symbols, lanes)):
        raise E.StreamError(f"stream {i}: a chunk is shorter than its lanes' states")
    if int(lengths.sum(dtype=np.uint64)) != len(payload):
        raise E.StreamError(f"stream {i}: chunk lengths sum to {int(lengths.sum())}, payload is {len(payload)}")
    return RansStream(int(precision), int(chunk_symbols), int(n_symbols), freqs, lengths, payload, int(lanes))


def lane_counts(n_symbols: int, chunk_symbols: int, lanes: int) -> np.ndarray:
    """States at the start of every chunk: min(lanes, symbols of the chunk) (spec §6.6)."""
    n_chunks = -(-n_symbols // chunk_symbols)
    w = np.full(n_chunks, min(lanes, chunk_symbols), dtype=np.int64)
    if n_chunks:
        w[-1] = min(lanes, n_symbols - (n_chunks - 1) * chunk_symbols)
    return w


# --------------------------------------------------------------------------- tensor entries


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
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[DTYPE_CODES[self.dtype]][1]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def mode_name(self) -> str:
        return MODE_NAMES.get(self.mode, f"mode-{self.mode}")


def _serialize_entry(e: TensorEntry) -> bytes:
    name = e.name.encode("utf-8")
    fixed = _TENSOR_FIXED.pack(
        len(name), DTYPE_CODES[e.dtype], len(e.shape), e.mode, e.stream_count, e.offset, e.size, e.crc, len(e.params)
    )
    return fixed + struct.pack(f"<{len(e.shape)}Q", *e.shape) + name + e.params


def _parse_entry(p: memoryview, max_tensor_bytes: int) -> TensorEntry:
    if len(p) < _TENSOR_FIXED.size:
        raise E.HeaderError("tensor entry too short")
    name_len, dtype, ndim, mode, nstreams, offset, size, crc, params_len = _TENSOR_FIXED.unpack_from(p, 0)
    if ndim > MAX_NDIM:
        raise E.HeaderError(f"tensor has {ndim} dimensions (max {MAX_NDIM})")
    if name_len == 0 or name_len > MAX_NAME_BYTES:
        raise E.HeaderError(f"tensor name length {name_len} outside 1..{MAX_NAME_BYTES}")
    if not 1 <= nstreams <= MAX_STREAMS:
        raise E.HeaderError(f"stream count {nstreams} outside 1..{MAX_STREAMS}")
    need = _TENSOR_FIXED.size + 8 * ndim + name_len + params_len
    if len(p) != need:
        raise E.HeaderError(f"tensor entry is {len(p)} bytes, fields say {need}")
    if dtype not in DTYPES:
        raise E.UnsupportedError(f"unknown dtype code {dtype}")
    shape = struct.unpack_from(f"<{ndim}Q", p, _TENSOR_FIXED.size)
    pos = _TENSOR_FIXED.size + 8 * ndim
    try:
        name = bytes(p[pos : pos + name_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise E.HeaderError("tensor name is not valid UTF-8") from None
    params = bytes(p[pos + name_len : pos + name_len + params_len])
    nbytes = DTYPES[dtype][1]
    for d in shape:  # checked multiplication: stop as soon as the limit is passed
        nbytes *= d
        if nbytes > max_tensor_bytes:
            raise E.LimitError(f"tensor {name!r} would decode to more than {max_tensor_bytes} bytes")
    return TensorEntry(name, DTYPES[dtype][0], tuple(int(d) for d in shape), int(mode), int(nstreams), int(offset), int(size), int(crc), params)


# --------------------------------------------------------------------------- reader


@dataclass
class Header:
    version: int
    metadata: dict[str, str]
    tensors: list[TensorEntry]
    data_offset: int
    data_size: int
    header_size: int
    extensions: list[tuple[int, int, bytes]] = field(default_factory=list)  # (kind, flags, payload)


READ_BLOCK = 16 << 20


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    """Read exactly n bytes. Large reads go in blocks, so a declared size that the
    stream does not back (a hostile header on a pipe) never allocates more than
    the bytes that actually arrive plus one block."""
    if n <= READ_BLOCK:
        buf = f.read(n)
        if buf is None or len(buf) != n:
            raise E.TruncatedError(f"archive truncated in {what}")
        return buf
    parts = []
    left = n
    while left:
        b = f.read(min(left, READ_BLOCK))
        if not b:
            raise E.TruncatedError(f"archive truncated in {what}")
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def parse_preamble(b: bytes) -> tuple[int, int, int, int, int, int, int]:
    if len(b) < 8 or b[:8] != MAGIC:
        raise E.BadMagicError("not an .acz archive (bad magic number)")
    if len(b) < PREAMBLE_SIZE:
        raise E.TruncatedError("archive truncated in the preamble")
    magic, version, flags, header_size, data_offset, data_size, n_tensors, n_sections, header_crc, reserved, pcrc = _PREAMBLE.unpack(b[:PREAMBLE_SIZE])
    if crc32(b[: PREAMBLE_SIZE - 4]) != pcrc:
        raise E.ChecksumError("preamble checksum mismatch")
    if version not in SUPPORTED_VERSIONS:
        raise E.UnsupportedError(f"format version {version} not supported (this reader knows {list(SUPPORTED_VERSIONS)})")
    if flags or any(reserved):
        raise E.HeaderError("preamble reserved field not zero")
    return version, header_size, data_offset, data_size, n_tensors, n_sections, header_crc


def parse_header(f: BinaryIO, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> Header:
    """Read and validate preamble and header from the current position of ``f``
    (sequential reads only; works on pipes). Leaves ``f`` at the end of the header."""
    version, header_size, data_offset, data_size, n_tensors, n_sections, header_crc = parse_preamble(f.read(PREAMBLE_SIZE) or b"")
    if header_size > max_header_bytes:
        raise E.LimitError(f"header of {header_size} bytes exceeds the limit of {max_header_bytes}")
    if data_offset != align(PREAMBLE_SIZE + header_size, DATA_ALIGN):
        raise E.LayoutError(f"data offset {data_offset} is not the aligned end of the header")
    # each section takes >= 8 bytes, each tensor entry >= 40: bound counts before allocating
    if n_sections * _SECTION.size > header_size or n_tensors * (_SECTION.size + _TENSOR_FIXED.size) > header_size:
        raise E.HeaderError(f"{n_sections} sections / {n_tensors} tensors cannot fit in {header_size} header bytes")
    raw = _read_exact(f, header_size, "the header")
    if crc32(raw) != header_crc:
        raise E.ChecksumError("header checksum mismatch")
    metadata: dict[str, str] | None = None
    tensors: list[TensorEntry] = []
    extensions: list[tuple[int, int, bytes]] = []
    mv = memoryview(raw)
    pos = 0
    for si in range(n_sections):
        if header_size - pos < _SECTION.size:
            raise E.TruncatedError(f"section {si} header truncated")
        kind, flags, length = _SECTION.unpack_from(mv, pos)
        pos += _SECTION.size
        if length > header_size - pos:
            raise E.TruncatedError(f"section {si} extends past the header")
        payload = mv[pos : pos + length]
        end = align(pos + length, SECTION_ALIGN)
        if end > header_size:
            raise E.TruncatedError(f"section {si} padding extends past the header")
        if any(mv[pos + length : end]):
            raise E.LayoutError(f"section {si}: non-zero padding")
        pos = end
        if flags & ~SECTION_FLAG_REQUIRED:
            raise E.HeaderError(f"section {si}: reserved flag bits set")
        if kind == SECTION_METADATA:
            if si != 0:
                raise E.HeaderError("the metadata section must be the first section")
            metadata = _parse_metadata(payload)
        elif kind == SECTION_TENSOR:
            if len(tensors) >= n_tensors:
                raise E.HeaderError(f"more tensor sections than the {n_tensors} declared")
            tensors.append(_parse_entry(payload, max_tensor_bytes))
        elif kind >= FIRST_EXTENSION_KIND:
            if flags & SECTION_FLAG_REQUIRED:
                raise E.UnsupportedError(f"required extension section of kind 0x{kind:04x} is not supported")
            extensions.append((kind, flags, bytes(payload)))
        else:
            raise E.HeaderError(f"section {si}: invalid kind {kind}")
    if pos != header_size:
        raise E.LayoutError(f"header has {header_size - pos} bytes after its last section")
    if metadata is None:
        raise E.HeaderError("no metadata section")
    if len(tensors) != n_tensors:
        raise E.HeaderError(f"{len(tensors)} tensor sections, {n_tensors} declared")
    _check_tensor_layout(tensors, data_size)
    pad = _read_exact(f, data_offset - PREAMBLE_SIZE - header_size, "the header padding")
    if any(pad):
        raise E.LayoutError("non-zero padding after the header")
    return Header(version, metadata, tensors, data_offset, data_size, header_size, extensions)


def _parse_metadata(payload: memoryview) -> dict[str, str]:
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise E.HeaderError(f"metadata is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise E.HeaderError("metadata must be a JSON object of strings")
    return obj


def _check_tensor_layout(tensors: list[TensorEntry], data_size: int) -> None:
    """Canonical layout (spec §4): data in header order, each at the 64-aligned end of the previous,
    names unique, the last ending exactly at data_size."""
    expect = 0
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise E.HeaderError(f"duplicate tensor name {t.name!r}")
        seen.add(t.name)
        if t.offset != expect:
            raise E.LayoutError(f"tensor {t.name!r} at data offset {t.offset}, canonical layout puts it at {expect}")
        if t.size < _STREAM.size * t.stream_count:
            raise E.LayoutError(f"tensor {t.name!r}: {t.size} bytes cannot hold {t.stream_count} streams")
        end = t.offset + t.size
        if end > data_size:
            raise E.LayoutError(f"tensor {t.name!r} ends at {end}, past the data section ({data_size})")
        expect = align(end, DATA_ALIGN)
    last_end = tensors[-1].offset + tensors[-1].size if tensors else 0
    if data_size != last_end:
        raise E.LayoutError(f"data section is {data_size} bytes, its last tensor ends at {last_end}")


class ArchiveReader:
    """Random-access reader of an .acz file.

    >>> with ArchiveReader("model.acz") as r:            # doctest: +SKIP
    ...     for t in r.tensors: print(t.name, t.shape)
    ...     streams = r.read_streams("lm_head.weight")

    The whole header is validated on open; each tensor's data is checked
    against its CRC-32 when read."""

    def __init__(self, path: str | os.PathLike, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES):
        self.path = os.fspath(path)
        self._f = open(self.path, "rb")
        try:
            self.file_size = os.fstat(self._f.fileno()).st_size
            self.header = parse_header(self._f, max_header_bytes=max_header_bytes, max_tensor_bytes=max_tensor_bytes)
            end = self.header.data_offset + self.header.data_size
            if self.file_size < end:
                raise E.TruncatedError(f"archive is {self.file_size} bytes, its header says {end}")
            if self.file_size > end:
                raise E.LayoutError(f"{self.file_size - end} trailing bytes after the data section")
        except BaseException:
            self._f.close()
            raise
        self._index = {t.name: t for t in self.header.tensors}

    # convenience views
    @property
    def tensors(self) -> list[TensorEntry]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def version(self) -> int:
        return self.header.version

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._index[name]
        except KeyError:
            raise E.TensorNotFoundError(f"no tensor named {name!r} in the archive") from None

    def read_data(self, name_or_entry: str | TensorEntry) -> bytes:
        """The tensor's data bytes, CRC-checked."""
        e = name_or_entry if isinstance(name_or_entry, TensorEntry) else self.entry(name_or_entry)
        self._f.seek(self.header.data_offset + e.offset)
        data = _read_exact(self._f, e.size, f"tensor {e.name!r}")
        if crc32(data) != e.crc:
            raise E.ChecksumError(f"tensor {e.name!r}: data checksum mismatch")
        return data

    def read_streams(self, name_or_entry: str | TensorEntry) -> list[Stream]:
        e = name_or_entry if isinstance(name_or_entry, TensorEntry) else self.entry(name_or_entry)
        return parse_streams(self.read_data(e), e.stream_count)

    def check_padding(self) -> None:
        """Check that every byte between tensors is zero (spec §4)."""
        ts = self.header.tensors
        for a, b in zip(ts, ts[1:]):
            gap = b.offset - (a.offset + a.size)
            if gap:
                self._f.seek(self.header.data_offset + a.offset + a.size)
                if any(_read_exact(self._f, gap, "padding")):
                    raise E.LayoutError(f"non-zero padding after tensor {a.name!r}")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ArchiveReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_archive(f: BinaryIO, **limits) -> Iterator[tuple[Header | None, TensorEntry | None, list[Stream] | None]]:
    """Read an archive sequentially from a stream (a pipe works): yields
    ``(header, None, None)`` first, then ``(None, entry, streams)`` per tensor in file order,
    holding one tensor's bytes at a time. Every checksum and padding byte is checked."""
    header = parse_header(f, **limits)
    yield header, None, None
    pos = 0
    for e in header.tensors:
        if e.offset > pos and any(_read_exact(f, e.offset - pos, "padding")):
            raise E.LayoutError(f"non-zero padding before tensor {e.name!r}")
        data = _read_exact(f, e.size, f"tensor {e.name!r}")
        if crc32(data) != e.crc:
            raise E.ChecksumError(f"tensor {e.name!r}: data checksum mismatch")
        pos = e.offset + e.size
        streams = parse_streams(data, e.stream_count)  # views into data: one copy in flight
        del data
        yield None, e, streams
    if f.read(1):
        raise E.LayoutError("trailing bytes after the data section")


# --------------------------------------------------------------------------- writer


class ArchiveWriter:
    """Write an .acz archive tensor by tensor with bounded memory.

    Each :meth:`add` serialises the tensor's streams into a spool file next to
    the target; :meth:`close` orders the tensors by name (so the bytes do not
    depend on the order they were added), writes preamble, header and data to a
    temporary file, fsyncs it and renames it over ``path``. On error nothing is
    left under ``path``."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise TypeError("metadata must map str to str")
        self.metadata = meta
        d = os.path.dirname(os.path.abspath(self.path))
        self._spool = tempfile.TemporaryFile(dir=d, prefix=".acz-spool-")
        self._entries: list[tuple[TensorEntry, int]] = []  # (entry, spool offset)
        self._names: set[str] = set()
        self._closed = False

    def add(self, name: str, dtype: str, shape: Sequence[int], mode: int, streams: Sequence[Stream], params: bytes = b"") -> TensorEntry:
        if self._closed:
            raise ValueError("writer is closed")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unknown dtype {dtype!r}")
        nb = len(name.encode("utf-8"))
        if not 1 <= nb <= MAX_NAME_BYTES:
            raise ValueError(f"tensor name must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
        if len(shape) > MAX_NDIM or not 1 <= len(streams) <= MAX_STREAMS:
            raise ValueError("too many dimensions or streams")
        parts = []
        for i, s in enumerate(streams):
            b = serialize_stream(s)
            if i + 1 < len(streams):
                b += bytes(align(len(b), STREAM_ALIGN) - len(b))
            parts.append(b)
        data = b"".join(parts)
        off = self._spool.seek(0, io.SEEK_END)
        self._spool.write(data)
        entry = TensorEntry(name, dtype, tuple(int(d) for d in shape), int(mode), len(streams), 0, len(data), crc32(data), bytes(params))
        self._entries.append((entry, off))
        self._names.add(name)
        return entry

    def close(self) -> list[TensorEntry]:
        """Finish the archive; returns the entries in file order."""
        if self._closed:
            raise ValueError("writer is closed")
        self._closed = True
        try:
            entries = sorted(self._entries, key=lambda x: x[0].name.encode("utf-8"))
            pos = 0
            for e, _ in entries:
                e.offset = pos
                pos = align(pos + e.size, DATA_ALIGN)
            data_size = entries[-1][0].offset + entries[-1][0].size if entries else 0
            header = build_header(self.metadata, [e for e, _ in entries])
            data_offset = align(PREAMBLE_SIZE + len(header), DATA_ALIGN)
            pre = build_preamble(len(header), data_offset, data_size, len(entries), len(entries) + 1, crc32(header))
            d = os.path.dirname(os.path.abspath(self.path))
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".acz-tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(pre)
                    out.write(header)
                    out.write(bytes(data_offset - PREAMBLE_SIZE - len(header)))
                    written = 0
                    for e, spool_off in entries:
                        out.write(bytes(e.offset - written))
                        self._spool.seek(spool_off)
                        left = e.size
                        while left:
                            buf = self._spool.read(min(left, 8 << 20))
                            out.write(buf)
                            left -= len(buf)
                        written = e.offset + e.size
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            try:  # make the rename durable
                dfd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
            return [e for e, _ in entries]
        finally:
            self._spool.close()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._spool.close()

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()


def build_section(kind: int, flags: int, payload: bytes) -> bytes:
    b = _SECTION.pack(kind, flags, len(payload)) + payload
    return b + bytes(align(len(b), SECTION_ALIGN) - len(b))


def build_header(metadata: dict[str, str], entries: Sequence[TensorEntry], extensions: Sequence[tuple[int, int, bytes]] = ()) -> bytes:
    meta = json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    parts = [build_section(SECTION_METADATA, 0, meta)]
    parts += [build_section(SECTION_TENSOR, 0, _serialize_entry(e)) for e in entries]
    parts += [build_section(k, f, p) for k, f, p in extensions]
    return b"".join(parts)


def build_preamble(header_size: int, data_offset: int, data_size: int, n_tensors: int, n_sections: int, header_crc: int, version: int = FORMAT_VERSION) -> bytes:
    head = _PREAMBLE.pack(MAGIC, version, 0, header_size, data_offset, data_size, n_tensors, n_sections, header_crc, bytes(16), 0)[:-4]
    return head + struct.pack("<I", crc32(head))
