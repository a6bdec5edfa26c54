"""Streams: the parts of a tensor's data (spec/FORMAT.md §5, §6) — raw bytes, one zstd
frame, or chunked rANS symbols with an integer frequency table — their serialisation
and their validating parser. What the streams mean is given by the tensor's coding
mode, interpreted in ``codec/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from aligncodec.formats import errors as E
from aligncodec.formats.constants import (
    CODER_RANS, CODER_RANS_LANES, CODER_RAW, CODER_ZSTD, MAX_ALPHABET, MAX_CHUNK_SYMBOLS, MAX_LANES, MAX_PRECISION, STREAM_ALIGN,
)
from aligncodec.formats.layout import RANS_AUX, STREAM, align

# --------------------------------------------------------------------------- LEB128


def leb128_encode(values: Sequence[int]) -> bytes:
    v = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if v.ndim == 1 and v.dtype.kind in "iu" and v.size:  # vectorized: the encoder writes 1,024-entry tables by the hundred
        v = v.astype(np.int64)
        if int(v.min()) < 0:
            raise ValueError("LEB128 values are unsigned")
        if int(v.max()) < 1 << 56:
            groups = (v[:, None] >> (7 * np.arange(8, dtype=np.int64))) & 0x7F
            nb = 1 + sum((v >= (1 << (7 * j))).astype(np.int64) for j in range(1, 8))
            j = np.arange(8)[None, :]
            groups |= np.where(j < nb[:, None] - 1, 0x80, 0)
            return groups.astype(np.uint8)[j < nb[:, None]].tobytes()
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


def _leb128_decode_valid(buf, count: int, max_value: int) -> np.ndarray | None:
    """numpy form of :func:`leb128_decode` for a well-formed table (a loader reads hundreds of
    1,024-entry tables); None when anything is off, and the loop below names the fault."""
    b = np.frombuffer(buf, dtype=np.uint8)
    if count < 1 or b.size < count:
        return None
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or ends[-1] != b.size - 1:
        return None
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    if int(lens.max()) > 3 or np.any((b[ends] == 0) & (lens > 1)):
        return None
    v = np.zeros(count, dtype=np.int64)
    for j in range(3):
        m = lens > j
        v[m] |= (b[starts[m] + j].astype(np.int64) & 0x7F) << (7 * j)
    if int(v.max()) > max_value:
        return None
    return v.astype(np.uint32)


def leb128_decode(buf: bytes, count: int, max_value: int) -> np.ndarray:
    """Decode exactly ``count`` unsigned LEB128 values that fill ``buf`` exactly.

    Raises StreamError on overlong encodings (more than 3 bytes, or a redundant
    zero final byte), values above ``max_value``, truncation or bytes left over."""
    fast = _leb128_decode_valid(buf, count, max_value)
    if fast is not None:
        return fast
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
    interleaved in decode order; symbol t of a chunk belongs to lane t mod lanes, §6.6)."""

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


def serialized_size(s: Stream) -> int:
    """len(serialize_stream(s)), without building it."""
    if isinstance(s, (RawStream, ZstdStream)):
        return STREAM.size + len(s.data)
    if isinstance(s, RansStream):
        f = np.asarray(s.freqs)
        table = len(f) + int(np.count_nonzero(f >= 1 << 7)) + int(np.count_nonzero(f >= 1 << 14))  # values < 2^17: <= 3 bytes
        if len(f) and int(f.max()) >= 1 << 21:
            table = len(leb128_encode(f))
        return STREAM.size + align(RANS_AUX.size + table + 4 * len(s.chunk_lengths), STREAM_ALIGN) + len(s.payload)
    raise TypeError(f"not a stream: {type(s).__name__}")


def serialize_stream(s: Stream) -> bytes:
    if isinstance(s, RawStream):
        return STREAM.pack(CODER_RAW, 0, 0, 0, len(s.data), len(s.data)) + bytes(s.data)
    if isinstance(s, ZstdStream):
        return STREAM.pack(CODER_ZSTD, 0, 0, 0, int(s.size), len(s.data)) + bytes(s.data)
    if isinstance(s, RansStream):
        table = leb128_encode(s.freqs)
        n_chunks = len(s.chunk_lengths)
        aux_size = align(RANS_AUX.size + len(table) + 4 * n_chunks, STREAM_ALIGN)
        aux = bytearray(aux_size)
        if not 1 <= s.lanes <= MAX_LANES:
            raise ValueError(f"rANS lanes must be 1..{MAX_LANES}")
        RANS_AUX.pack_into(aux, 0, s.precision, 0, 0 if s.lanes == 1 else s.lanes, s.alphabet_size, s.chunk_symbols, n_chunks, len(table), 0)
        aux[RANS_AUX.size : RANS_AUX.size + len(table)] = table
        ct = np.asarray(s.chunk_lengths, dtype="<u4").tobytes()
        aux[RANS_AUX.size + len(table) : RANS_AUX.size + len(table) + len(ct)] = ct
        return STREAM.pack(s.coder, 0, 0, aux_size, int(s.n_symbols), len(s.payload)) + bytes(aux) + bytes(s.payload)
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
        if n - pos < STREAM.size:
            raise E.TruncatedError(f"stream {i} header truncated")
        coder, r0, r1, aux_size, count_field, payload_size = STREAM.unpack_from(mv, pos)
        if r0 or r1:
            raise E.HeaderError(f"stream {i}: reserved field not zero")
        pos += STREAM.size
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
    if len(aux) < RANS_AUX.size:
        raise E.StreamError(f"stream {i}: rANS aux too short")
    precision, r0, r1, alphabet, chunk_symbols, n_chunks, table_size, r2 = RANS_AUX.unpack_from(aux, 0)
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
    need = align(RANS_AUX.size + table_size + 4 * n_chunks, STREAM_ALIGN)
    if len(aux) != need:
        raise E.StreamError(f"stream {i}: aux size {len(aux)} != {need}")
    if any(aux[RANS_AUX.size + table_size + 4 * n_chunks :]):
        raise E.LayoutError(f"stream {i}: non-zero padding in rANS aux")
    freqs = leb128_decode(bytes(aux[RANS_AUX.size : RANS_AUX.size + table_size]), alphabet, 1 << precision)
    if int(freqs.sum(dtype=np.uint64)) != 1 << precision:
        raise E.StreamError(f"stream {i}: frequencies sum to {int(freqs.sum())}, not 2^{precision}")
    off = RANS_AUX.size + table_size
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


def check_rans_stream(stream: RansStream, n_symbols: int, alphabet_size: int) -> None:
    """Check that a parsed rANS stream is what a coding mode expects, before decoding: exactly
    ``n_symbols`` symbols, an alphabet of at most ``alphabet_size``."""
    if stream.n_symbols != n_symbols:
        raise E.StreamError(f"rANS stream has {stream.n_symbols} symbols, {n_symbols} expected")
    if stream.alphabet_size > alphabet_size:
        raise E.StreamError(f"rANS alphabet of {stream.alphabet_size} symbols, at most {alphabet_size} allowed")
