"""Lossless coding modes (spec/FORMAT.md §7): ``stored`` and ``float-split``.

``float-split`` codes a float tensor's bits in two streams: the exponent and
the top k mantissa bits (``DEFAULT_MANTISSA_BITS``: 2 for BF16, 3 for F16, 0 for
F32/F64) as rANS symbols, where weights carry their redundancy, and the
remaining bits (sign and low mantissa) bit-packed, stored raw or as one zstd
frame — whichever is smaller. ``stored`` keeps the little-endian bytes, raw or zstd. The encoder
tries the candidates and keeps the smallest; decoding is always bit-exact.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import zstandard

from aligncodec.formats.constants import CODER_NAMES, FLOAT_FORMATS, MODE_FLOAT_SPLIT, MODE_STORED, STREAM_ALIGN
from aligncodec.formats.layout import TensorEntry, align
from aligncodec.formats.streams import RansStream, RawStream, ZstdStream, check_rans_stream, serialize_stream
from aligncodec.formats.errors import CorruptStreamError, StreamError, UnsupportedError

# numba and the rANS coder are imported when something is coded, not when an entry is checked
# (``aligncodec inspect`` validates every tensor without importing numba)

# mantissa bits moved into the symbol, per dtype (measured on MiniLM weights: for BF16 the joint
# (exponent, top-2 mantissa) entropy is 0.066 bit lower than the exponent's + 2 bits)
DEFAULT_MANTISSA_BITS = {"F16": 3, "BF16": 2, "F32": 0, "F64": 0}
ZSTD_LEVEL = 3
# below this many elements the rANS table outweighs what float-split saves
MIN_SPLIT_ELEMENTS = 256


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_content_size=True).compress(data)


def _best_bytes_stream(data: bytes) -> RawStream | ZstdStream:
    z = _zstd(data)
    return ZstdStream(z, len(data)) if len(z) < len(data) else RawStream(data)


def _streams_size(streams) -> int:
    return sum(align(len(serialize_stream(s)), STREAM_ALIGN) for s in streams)


def _pack_bits(v, width, out):
    acc = np.uint64(0)
    nacc = 0
    pos = 0
    mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    for i in range(v.shape[0]):
        x = v[i] & mask
        # append `width` bits LSB-first, flushing whole bytes
        left = width
        while left > 0:
            take = min(left, 56 - nacc) if nacc < 56 else 0
            if take == 0:
                while nacc >= 8:
                    out[pos] = np.uint8(acc & np.uint64(0xFF))
                    acc >>= np.uint64(8)
                    nacc -= 8
                    pos += 1
                continue
            part = x & np.uint64((1 << take) - 1)
            acc |= part << np.uint64(nacc)
            nacc += take
            x >>= np.uint64(take)
            left -= take
        while nacc >= 8:
            out[pos] = np.uint8(acc & np.uint64(0xFF))
            acc >>= np.uint64(8)
            nacc -= 8
            pos += 1
    if nacc > 0:
        out[pos] = np.uint8(acc & np.uint64(0xFF))


def _unpack_bits(raw, n, width, out):
    acc = np.uint64(0)
    nacc = 0
    pos = 0
    for i in range(n):
        x = np.uint64(0)
        got = 0
        while got < width:
            if nacc == 0:
                acc = np.uint64(raw[pos])
                pos += 1
                nacc = 8
            take = min(width - got, nacc)
            x |= (acc & np.uint64((1 << take) - 1)) << np.uint64(got)
            acc >>= np.uint64(take)
            nacc -= take
            got += take
        out[i] = x


@functools.cache
def _jit(fn):
    """``fn`` compiled by numba (imported on first use, compiled once, cached on disk)."""
    import numba

    return numba.njit(cache=True)(fn)


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Pack unsigned values of ``width`` bits LSB-first (spec §7.2): bit b of value i is
    bit (i*width + b) of the stream, stream bit j being bit j%8 of byte j//8; the
    unused high bits of the last byte are zero."""
    v = np.ascontiguousarray(values, dtype=np.uint64)
    if width % 8 == 0:
        return v.astype("<u8").view(np.uint8).reshape(-1, 8)[:, : width // 8].tobytes()
    out = np.zeros(packed_size(len(v), width), dtype=np.uint8)
    _jit(_pack_bits)(v, width, out)
    return out.tobytes()


def unpack_bits(data: bytes, n: int, width: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if width % 8 == 0:
        padded = np.zeros((n, 8), dtype=np.uint8)
        padded[:, : width // 8] = raw.reshape(n, width // 8)
        return padded.reshape(-1).view("<u8").astype(np.uint64)
    if n * width % 8 and raw[-1] >> (n * width % 8):
        raise CorruptStreamError("non-zero padding bits in a packed stream")
    out = np.empty(n, dtype=np.uint64)
    _jit(_unpack_bits)(raw, n, width, out)
    return out


def packed_size(n: int, width: int) -> int:
    return (n * width + 7) // 8


def split_float(bits: np.ndarray, dtype: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbols: exponent and top-k mantissa bits; rest: sign and the low bits, W-E-k bits each)."""
    width, e = FLOAT_FORMATS[dtype]
    low = width - 1 - e - k
    u = np.dtype(f"u{width // 8}").type
    b = bits.astype(u, copy=False)
    sym = ((b >> u(low)) & u((1 << (e + k)) - 1)).astype(np.uint16)
    rest = ((b >> u(width - 1)) << u(low)) | (b & u((1 << low) - 1))
    return sym, rest.astype(np.uint64)


def join_float(sym: np.ndarray, rest: np.ndarray, dtype: str, k: int) -> np.ndarray:
    width, e = FLOAT_FORMATS[dtype]
    low = width - 1 - e - k
    u = np.dtype(f"u{width // 8}").type
    r = rest.astype(u)
    return ((r >> u(low)) << u(width - 1)) | (sym.astype(u) << u(low)) | (r & u((1 << low) - 1))


def encode(data: bytes | np.ndarray, dtype: str, numel: int, *, mantissa_bits: int | None = None, mode: int | None = None) -> tuple[int, bytes, list]:
    """Choose the smallest lossless coding for a tensor's little-endian bytes
    (or use ``mode`` if given). Returns (mode, params, streams)."""
    raw = bytes(data) if not isinstance(data, np.ndarray) else data.tobytes()
    candidates: list[tuple[int, bytes, list]] = [(MODE_STORED, b"", [_best_bytes_stream(raw)])]
    if dtype in FLOAT_FORMATS and (numel >= MIN_SPLIT_ELEMENTS or mode == MODE_FLOAT_SPLIT):
        width, e = FLOAT_FORMATS[dtype]
        k = DEFAULT_MANTISSA_BITS[dtype] if mantissa_bits is None else mantissa_bits
        bits = np.frombuffer(raw, dtype=f"<u{width // 8}")
        sym, rest = split_float(bits, dtype, k)
        from aligncodec.codec.entropy import rans

        s0 = rans.encode(sym, alphabet_size=int(sym.max()) + 1)
        del sym, bits  # a large tensor's copies go as soon as they are coded (peak memory)
        packed = pack_bits(rest, width - e - k)
        del rest
        s1 = _best_bytes_stream(packed)
        del packed
        candidates.append((MODE_FLOAT_SPLIT, bytes([k]), [s0, s1]))
    if mode is not None:
        forced = [c for c in candidates if c[0] == mode]
        if not forced:
            raise ValueError(f"mode {mode} cannot code a {dtype} tensor")
        return forced[0]
    return min(candidates, key=lambda c: _streams_size(c[2]))


def _check_bytes_stream(stream, size: int, what: str) -> None:
    """A raw or zstd stream that holds exactly ``size`` bytes (checked before any decoding)."""
    if isinstance(stream, RawStream):
        if len(stream.data) != size:
            raise StreamError(f"{what}: {len(stream.data)} raw bytes, {size} expected")
    elif isinstance(stream, ZstdStream):
        if stream.size != size:
            raise StreamError(f"{what}: zstd stream declares {stream.size} bytes, {size} expected")
        try:  # the frame's own content size, where it states one, from its header alone
            fcs = zstandard.frame_content_size(bytes(stream.data[:18]))
        except zstandard.ZstdError as exc:
            raise CorruptStreamError(f"{what}: zstd frame invalid: {exc}") from None
        if fcs >= 0 and fcs != size:
            raise CorruptStreamError(f"{what}: zstd frame holds {fcs} bytes, {size} declared")
    else:
        raise StreamError(f"{what}: a {CODER_NAMES[stream.coder]} stream cannot hold bytes here")


def _bytes_from(stream, size: int, what: str) -> bytes:
    _check_bytes_stream(stream, size, what)
    if isinstance(stream, RawStream):
        return stream.data
    try:
        out = zstandard.ZstdDecompressor().decompress(stream.data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptStreamError(f"{what}: zstd frame invalid: {exc}") from None
    if len(out) != size:
        raise CorruptStreamError(f"{what}: zstd frame gave {len(out)} bytes, {size} expected")
    return out


def check_params(entry: TensorEntry, limits=None) -> None:
    """Validate a lossless entry's header fields (params, dtype, stream count) before any of
    its data is read; raises StreamError / UnsupportedError."""
    if entry.mode == MODE_STORED:
        if entry.params:
            raise StreamError(f"stored tensor {entry.name!r}: params must be empty")
        want = 1
    elif entry.mode == MODE_FLOAT_SPLIT:
        if entry.dtype not in FLOAT_FORMATS:
            raise StreamError(f"float-split used on {entry.dtype} tensor {entry.name!r}")
        width, e = FLOAT_FORMATS[entry.dtype]
        if len(entry.params) != 1 or not 0 <= entry.params[0] <= min(16 - e, width - 1 - e):
            raise StreamError(f"float-split tensor {entry.name!r}: bad parameters")
        want = 2
    else:
        raise UnsupportedError(f"tensor {entry.name!r}: coding mode {entry.mode} is not known to this decoder")
    if entry.stream_count != want:
        raise StreamError(f"tensor {entry.name!r}: {entry.stream_count} streams, mode {entry.mode_name} needs {want}")


def validate(entry: TensorEntry, streams: list) -> None:
    """Check a lossless tensor's params and streams (counts, coders, sizes, rANS table)
    without decoding anything; raises StreamError / UnsupportedError."""
    check_params(entry)
    if entry.mode == MODE_STORED:
        if len(streams) != 1:
            raise StreamError(f"stored tensor {entry.name!r} needs 1 stream, has {len(streams)}")
        _check_bytes_stream(streams[0], entry.nbytes, entry.name)
        return
    if entry.mode == MODE_FLOAT_SPLIT:  # dtype and params checked by check_params
        width, e = FLOAT_FORMATS[entry.dtype]
        k = entry.params[0]
        if len(streams) != 2:
            raise StreamError(f"float-split tensor {entry.name!r} needs 2 streams, has {len(streams)}")
        if not isinstance(streams[0], RansStream):
            raise StreamError(f"float-split tensor {entry.name!r}: symbols must be a rANS stream")
        check_rans_stream(streams[0], entry.numel, 1 << (e + k))
        _check_bytes_stream(streams[1], packed_size(entry.numel, width - e - k), entry.name)
        return
    raise UnsupportedError(f"tensor {entry.name!r}: coding mode {entry.mode} is not known to this decoder")


def plan_decode(entry: TensorEntry, streams: list, out: np.ndarray | None = None, *, threads: int | None = None):
    """Plan (:mod:`aligncodec.codec.parallel`) decoding a lossless tensor into ``out`` (uint8 of
    entry.nbytes; new if None) and returning it: a zstd frame in one task, then the rANS chunks of
    a float-split tensor in parallel, joined with the rest straight into the output bits.
    The entry and its streams are validated before the plan is returned."""
    validate(entry, streams)
    if out is None:
        out = np.empty(entry.nbytes, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.shape != (entry.nbytes,):
        raise ValueError(f"out must be a 1-d uint8 array of {entry.nbytes} bytes")
    if entry.mode == MODE_STORED:
        return _plan_stored(entry, streams[0], out)
    return _plan_float_split(entry, streams, out, threads)


def _plan_stored(entry, stream, out):
    yield [lambda: out.__setitem__(slice(None), np.frombuffer(_bytes_from(stream, entry.nbytes, entry.name), dtype=np.uint8))]
    return out


def _plan_float_split(entry, streams, out, threads):
    from aligncodec.codec.entropy import decode_cpu

    width, e = FLOAT_FORMATS[entry.dtype]
    k = entry.params[0]
    n = entry.numel
    rw = width - e - k
    box = {}
    if isinstance(streams[1], ZstdStream):  # decompress first (one task; zstd releases the GIL)
        yield [lambda: box.__setitem__("rest", _bytes_from(streams[1], packed_size(n, rw), entry.name))]
    rest = box["rest"] if box else _bytes_from(streams[1], packed_size(n, rw), entry.name)
    little = sys.byteorder == "little"
    u = np.dtype(f"u{width // 8}").type
    bits = out.view(u) if little else np.empty(n, u)  # the kernels write native order
    yield from decode_cpu.plan_float_split(streams[0], rest, entry.dtype, k, bits, threads=threads)
    if not little:  # pragma: no cover
        out[:] = bits.astype(f"<u{width // 8}").view(np.uint8)
    return out


def decode(entry: TensorEntry, streams: list, *, reference: bool = False, threads: int | None = None) -> np.ndarray:
    """Decode a lossless tensor to its little-endian bytes (uint8 array of entry.nbytes).

    Default: :func:`plan_decode` on the decode pool (``threads``); ``reference=True`` uses the
    plain reference rANS decoder (slow; tests)."""
    if not reference:
        from aligncodec.codec import parallel

        return parallel.run(plan_decode(entry, streams, threads=threads), threads)
    validate(entry, streams)
    if entry.mode == MODE_STORED:
        return np.frombuffer(_bytes_from(streams[0], entry.nbytes, entry.name), dtype=np.uint8)
    width, e = FLOAT_FORMATS[entry.dtype]
    k = entry.params[0]
    n = entry.numel
    s0 = streams[0]
    rw = width - e - k
    packed = _bytes_from(streams[1], packed_size(n, rw), entry.name)
    from aligncodec.codec.entropy import rans_reference

    sym = np.asarray(rans_reference.decode(s0), dtype=np.uint16)
    rest = unpack_bits(packed, n, rw)
    bits = join_float(sym, rest, entry.dtype, k)
    return bits.astype(f"<u{width // 8}").view(np.uint8)
