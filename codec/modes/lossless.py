"""Lossless coding modes (spec/FORMAT.md §7): ``stored``, ``float-split`` and ``bytegroup``.

``float-split`` codes a float tensor's bits in two streams: the exponent and
the top k mantissa bits (``DEFAULT_MANTISSA_BITS``: 2 for BF16, 3 for F16, 0 for
F32/F64) as rANS symbols, where weights carry their redundancy, and the
remaining bits (sign and low mantissa) bit-packed, stored raw or as one zstd
frame — whichever is smaller. ``bytegroup`` rotates each float's sign to its lowest bit and
splits the elements into byte planes (the exponent byte, the mantissa bytes), each plane of
each slice of the tensor one zstd frame (Huffman-coded literals, decoded at GB/s) or raw.
``stored`` keeps the little-endian bytes, raw or zstd. The encoder tries the candidates its
*policy* allows (:data:`POLICIES`; by default float-split for BF16, bytegroup unless float-split is more than 2 % smaller
for the other float dtypes); decoding is always bit-exact.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading

import numpy as np
import zstandard

from aligncodec.formats.constants import CODER_NAMES, FLOAT_FORMATS, MAX_STREAMS, MODE_BYTEGROUP, MODE_FLOAT_SPLIT, MODE_STORED, STREAM_ALIGN
from aligncodec.formats.layout import TensorEntry, align
from aligncodec.formats.streams import RansStream, RawStream, ZstdStream, check_rans_stream, serialize_stream, serialized_size
from aligncodec.formats.errors import CorruptStreamError, StreamError, UnsupportedError

# numba and the rANS coder are imported when something is coded, not when an entry is checked
# (``aligncodec inspect`` validates every tensor without importing numba)

# mantissa bits moved into the symbol, per dtype (measured on MiniLM weights: for BF16 the joint
# (exponent, top-2 mantissa) entropy is 0.066 bit lower than the exponent's + 2 bits)
DEFAULT_MANTISSA_BITS = {"F16": 3, "BF16": 2, "F32": 0, "F64": 0}
ZSTD_LEVEL = 3
# below this many elements the rANS table outweighs what float-split saves
MIN_SPLIT_ELEMENTS = 256

# bytegroup (spec §7.5): zstd level of the planes (level 1 gave the smallest planes on SmolLM2's
# weights: its Huffman literals are what pays, longer match searches only slow the decoder), and
# the smallest slice the encoder makes (elements): fewer, larger frames below it cost more
# headers than the parallelism is worth
BYTEGROUP_ZSTD_LEVEL = 1
BYTEGROUP_MIN_SLICE = 1 << 18

# which lossless modes the encoder may choose among (``stored`` is always a candidate):
# "auto" (the default): per dtype (docs/results/2026-12-07-lossless-speed.md):
#     BF16: stored or float-split, the smaller (bytegroup is 4.4 % larger on bf16, and with the
#         native kernels (codec/entropy/_fastrans.c) float-split decodes about as fast: no
#         bytegroup candidate coded for nothing), every mode below AUTO_ALL_BELOW elements
#         (biases, norms: there bytegroup is often the smallest, and cheap);
#     F16, F32, F64: stored or bytegroup, the smaller, unless float-split is more than
#         AUTO_TOLERANCE smaller (measured on SmolLM2: fp16 bytegroup is 0.13 % larger than
#         float-split and still decodes faster, fp32 0.11 % smaller);
# "bytegroup": stored or bytegroup, the smaller (the fastest decoding);
# "float-split": stored or float-split, the smaller (the encoder before bytegroup, byte for byte);
# "smallest": every lossless mode, the fewest bytes.
POLICIES = ("auto", "bytegroup", "float-split", "smallest")
DEFAULT_POLICY = "auto"
AUTO_TOLERANCE = 0.02
AUTO_ALL_BELOW = 1 << 16
_policy: list[str] = []  # the stack of use_policy blocks (process-wide: encoder threads see it too)


@contextlib.contextmanager
def use_policy(policy: str | None):
    """Inside this block, :func:`encode` without ``policy`` uses ``policy`` (None: no change),
    in every thread: the CLI's ``--lossless-mode``, around a whole compress call."""
    if policy is None:
        yield
        return
    check_policy(policy)
    _policy.append(policy)
    try:
        yield
    finally:
        _policy.pop()


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"lossless mode must be one of {', '.join(POLICIES)}, not {policy!r}")
    return policy


def current_policy() -> str:
    return _policy[-1] if _policy else DEFAULT_POLICY


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_content_size=True).compress(data)


# bytes streams longer than SAMPLE_MIN are first tried on a sample of SAMPLE_BYTES: if zstd saves
# less than SAMPLE_GAIN there, the whole is not tried (a float-split rest, the sign and low mantissa
# bits, is incompressible noise: coding it for nothing cost as much time as the rANS coder)
SAMPLE_MIN = 1 << 17
SAMPLE_BYTES = 1 << 16
SAMPLE_GAIN = 0.02
STORED_MARGIN = 0.03


SAMPLE_PARTS = 8


def _zstd_sample_ratio(data) -> float:
    """zstd's size / the size of a SAMPLE_BYTES sample of ``data``: SAMPLE_PARTS pieces spread evenly
    over it (a tensor's first rows alone can mislead: SmolLM2's embedding starts with rows that
    compress, its rest does not), each coded as its own frame; 0.0 when data is short (try it whole)."""
    if len(data) <= SAMPLE_MIN:
        return 0.0
    mv = memoryview(data).cast("B")
    part = SAMPLE_BYTES // SAMPLE_PARTS
    step = (len(mv) - part) // (SAMPLE_PARTS - 1)
    pieces = [bytes(mv[i * step:i * step + part]) for i in range(SAMPLE_PARTS)]
    return sum(len(_zstd(b)) for b in pieces) / (part * SAMPLE_PARTS)


def _best_bytes_stream(data: bytes) -> RawStream | ZstdStream:
    if _zstd_sample_ratio(data) > 1 - SAMPLE_GAIN:
        return RawStream(data)
    z = _zstd(data)
    return ZstdStream(z, len(data)) if len(z) < len(data) else RawStream(data)


def _streams_size(streams) -> int:
    return sum(align(serialized_size(s), STREAM_ALIGN) for s in streams)


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
    v = np.ascontiguousarray(values)
    if v.dtype.kind != "u":
        v = v.astype(np.uint64)  # (unsigned values are packed in their own width: no uint64 copy)
    if width % 8 == 0:
        size = v.dtype.itemsize if width // 8 <= v.dtype.itemsize else 8
        return v.astype(f"<u{size}", copy=False).view(np.uint8).reshape(-1, size)[:, : width // 8].tobytes()
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
    """(symbols: exponent and top-k mantissa bits, uint16; rest: sign and the low bits, W-E-k bits
    each, as W-bit unsigned integers)."""
    width, e = FLOAT_FORMATS[dtype]
    low = width - 1 - e - k
    u = np.dtype(f"u{width // 8}").type
    b = bits.astype(u, copy=False)
    sym = ((b >> u(low)) & u((1 << (e + k)) - 1)).astype(np.uint16)
    rest = ((b >> u(width - 1)) << u(low)) | (b & u((1 << low) - 1))
    return sym, rest  # in the format's own width (a large F32 tensor: no uint64 copy)


def join_float(sym: np.ndarray, rest: np.ndarray, dtype: str, k: int) -> np.ndarray:
    width, e = FLOAT_FORMATS[dtype]
    low = width - 1 - e - k
    u = np.dtype(f"u{width // 8}").type
    r = rest.astype(u)
    return ((r >> u(low)) << u(width - 1)) | (sym.astype(u) << u(low)) | (r & u((1 << low) - 1))


def rotl1(bits: np.ndarray, width: int) -> np.ndarray:
    """The W-bit patterns rotated left by one bit: the sign moves to bit 0 (spec §7.5)."""
    u = np.dtype(f"u{width // 8}").type
    b = bits.astype(u, copy=False)
    return (b << u(1)) | (b >> u(width - 1))


def rotr1(bits: np.ndarray, width: int) -> np.ndarray:
    u = np.dtype(f"u{width // 8}").type
    b = bits.astype(u, copy=False)
    return (b >> u(1)) | (b << u(width - 1))


def bytegroup_slice(numel: int, width: int) -> int:
    """The encoder's slice length S (elements): at least BYTEGROUP_MIN_SLICE, and few enough
    slices that their W/8 planes fit the stream limit (MAX_STREAMS)."""
    per = MAX_STREAMS // (width // 8)
    return max(1, min(max(numel, 1), max(BYTEGROUP_MIN_SLICE, -(-numel // per))))


def bytegroup_planes(bits: np.ndarray, width: int) -> np.ndarray:
    """(W/8, n) uint8: plane p is byte p (little-endian) of each element's rotated pattern."""
    r = rotl1(np.ascontiguousarray(bits), width).astype(f"<u{width // 8}", copy=False)
    return np.ascontiguousarray(r.view(np.uint8).reshape(-1, width // 8).T)


def encode_bytegroup(bits: np.ndarray, dtype: str, *, slice_elems: int | None = None, level: int = BYTEGROUP_ZSTD_LEVEL) -> tuple[bytes, list]:
    """(params, streams) of a float tensor's W-bit patterns in mode ``bytegroup`` (spec §7.5):
    per slice of S elements, per plane, one zstd frame (with its content size) or the raw bytes,
    whichever is smaller."""
    width, _ = FLOAT_FORMATS[dtype]
    n = int(bits.size)
    if n < 1:
        raise ValueError("bytegroup codes at least one element")
    S = bytegroup_slice(n, width) if slice_elems is None else int(slice_elems)
    if not 1 <= S <= 0xFFFFFFFF or -(-n // S) * (width // 8) > MAX_STREAMS:
        raise ValueError(f"bytegroup slice {S} for {n} elements: out of range or too many streams")
    planes = bytegroup_planes(bits, width)
    zc = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    streams: list = []
    for a in range(0, n, S):
        for p in range(width // 8):
            data = planes[p, a:a + S].tobytes()
            z = zc.compress(data)
            streams.append(ZstdStream(z, len(data)) if len(z) < len(data) else RawStream(data))
    return S.to_bytes(4, "little"), streams


def encode(data: bytes | np.ndarray, dtype: str, numel: int, *, mantissa_bits: int | None = None, mode: int | None = None,
           policy: str | None = None) -> tuple[int, bytes, list]:
    """Choose the smallest lossless coding for a tensor's little-endian bytes among ``stored``
    and the modes ``policy`` allows (:data:`POLICIES`; None: :func:`current_policy`), or use
    ``mode`` if given. Returns (mode, params, streams)."""
    policy = check_policy(policy or current_policy())
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1 and data.flags.c_contiguous:
        raw = data  # no copy: a stored candidate's bytes are copied only if it is chosen
    else:
        raw = np.frombuffer(bytes(data) if not isinstance(data, np.ndarray) else data.tobytes(), dtype=np.uint8)
    candidates: list[tuple[int, bytes, list]] = []
    big = numel >= MIN_SPLIT_ELEMENTS
    if dtype in FLOAT_FORMATS:
        width, e = FLOAT_FORMATS[dtype]
        bits = raw.view(f"<u{width // 8}")
        auto_fs, auto_bg = True, dtype != "BF16" or numel < AUTO_ALL_BELOW
        if (big and (policy in ("float-split", "smallest") or (policy == "auto" and auto_fs))) or mode == MODE_FLOAT_SPLIT:
            k = DEFAULT_MANTISSA_BITS[dtype] if mantissa_bits is None else mantissa_bits
            from aligncodec.codec.entropy import native, rans

            if native.available() and width in (16, 32) and width - e - k <= 25:
                # one native pass: the symbols, their counts and the packed rest (the same values)
                sym, counts, packed = native.split_float(bits, width, e, k)
                top = int(np.flatnonzero(counts)[-1]) + 1
                s0 = rans.encode(sym, alphabet_size=top, counts=counts[:top])
                del sym
            else:
                sym, rest = split_float(bits, dtype, k)
                s0 = rans.encode(sym, alphabet_size=int(sym.max()) + 1)
                del sym  # a large tensor's copies go as soon as they are coded (peak memory)
                packed = pack_bits(rest, width - e - k)
                del rest
            s1 = _best_bytes_stream(packed if isinstance(packed, bytes) else packed.tobytes())
            del packed
            candidates.append((MODE_FLOAT_SPLIT, bytes([k]), [s0, s1]))
        if numel >= 1 and ((big and (policy in ("bytegroup", "smallest") or (policy == "auto" and auto_bg)))
                           or mode == MODE_BYTEGROUP):
            params, streams = encode_bytegroup(bits, dtype)
            candidates.append((MODE_BYTEGROUP, params, streams))
    if mode in (None, MODE_STORED):  # (a forced mode needs no stored candidate)
        candidates.insert(0, (MODE_STORED, b"", [_stored_stream(raw, [_streams_size(c[2]) for c in candidates], mode)]))
    if mode is not None:
        forced = [c for c in candidates if c[0] == mode]
        if not forced:
            raise ValueError(f"mode {mode} cannot code a {dtype} tensor")
        return _own(forced[0])
    sizes = [_streams_size(c[2]) for c in candidates]
    best = min(range(len(candidates)), key=sizes.__getitem__)
    if policy == "auto" and dtype != "BF16":  # the smaller of stored, bytegroup unless float-split saves more than AUTO_TOLERANCE
        fast = min((i for i, c in enumerate(candidates) if c[0] != MODE_FLOAT_SPLIT), key=sizes.__getitem__)
        if sizes[fast] <= (1 + AUTO_TOLERANCE) * sizes[best]:
            return _own(candidates[fast])
    return _own(candidates[best])


def _stored_stream(raw, others: list[int], mode: int | None) -> RawStream | ZstdStream:
    """The ``stored`` candidate: zstd or raw, the smaller; a long tensor whose first SAMPLE_BYTES
    zstd shrinks to a size that, scaled to the whole, is not within STORED_MARGIN of the other
    candidates' smallest stays raw untried (zstd of a whole bf16 tensor cost as much time as its
    float-split; fp16 weights: zstd's ~14.7 bits per weight against float-split's ~13.6)."""
    if mode in (None, MODE_STORED) and others and len(raw) > SAMPLE_MIN:
        if _zstd_sample_ratio(raw) * len(raw) > (1 + STORED_MARGIN) * min(others):
            return RawStream(raw)
    return _best_bytes_stream(raw)


def _own(c: tuple[int, bytes, list]) -> tuple[int, bytes, list]:
    """A candidate whose raw streams own their bytes (a stored candidate may view the caller's array)."""
    return c[0], c[1], [RawStream(bytes(s.data)) if isinstance(s, RawStream) and not isinstance(s.data, bytes) else s for s in c[2]]


def _check_bytes_stream(stream, size: int, what: str, *, content_size: bool = False) -> None:
    """A raw or zstd stream that holds exactly ``size`` bytes (checked before any decoding);
    ``content_size``: a zstd frame must declare its content size (spec §7.5)."""
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
        if content_size and fcs < 0:
            raise StreamError(f"{what}: zstd frame does not declare its content size")
    else:
        raise StreamError(f"{what}: a {CODER_NAMES[stream.coder]} stream cannot hold bytes here")


_dctx = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompression context (one per thread: a context is not thread-safe,
    and making one per frame costs more than a small frame's decoding)."""
    d = getattr(_dctx, "d", None)
    if d is None:
        d = _dctx.d = zstandard.ZstdDecompressor()
    return d


def _decompress_one_frame(data, size: int) -> bytes:
    """One zstd frame, at most ``size`` bytes out; bytes after the frame are a ZstdError (spec §5:
    the payload is exactly one frame), where this zstandard can tell (``allow_extra_data``, 0.23+)."""
    try:
        return _decompressor().decompress(data, max_output_size=size, allow_extra_data=False)
    except TypeError:  # pragma: no cover - an older zstandard without the argument
        return _decompressor().decompress(data, max_output_size=size)


def _bytes_from(stream, size: int, what: str, *, content_size: bool = False, checked: bool = False) -> bytes:
    """The ``size`` bytes a raw or zstd stream holds; ``checked``: :func:`validate` has already
    checked this stream (its kind, size and zstd frame header), so that is not repeated."""
    if not checked:
        _check_bytes_stream(stream, size, what, content_size=content_size)
    if isinstance(stream, RawStream):
        return stream.data
    try:
        out = _decompress_one_frame(stream.data, size)
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
    elif entry.mode == MODE_BYTEGROUP:
        if entry.dtype not in FLOAT_FORMATS:
            raise StreamError(f"bytegroup used on {entry.dtype} tensor {entry.name!r}")
        if len(entry.params) != 4 or int.from_bytes(entry.params, "little") == 0:
            raise StreamError(f"bytegroup tensor {entry.name!r}: bad parameters")
        if entry.numel < 1:
            raise StreamError(f"bytegroup tensor {entry.name!r}: no elements")
        want = _bytegroup_streams(entry)
    else:
        raise UnsupportedError(f"tensor {entry.name!r}: coding mode {entry.mode} is not known to this decoder")
    if entry.stream_count != want:
        raise StreamError(f"tensor {entry.name!r}: {entry.stream_count} streams, mode {entry.mode_name} needs {want}")


def _bytegroup_streams(entry: TensorEntry) -> int:
    """⌈numel / S⌉ slices × W/8 planes (params checked)."""
    S = int.from_bytes(entry.params, "little")
    return -(-entry.numel // S) * (FLOAT_FORMATS[entry.dtype][0] // 8)


def _bytegroup_slices(entry: TensorEntry):
    """(slice index, first element, elements) of each slice of a bytegroup tensor."""
    S = int.from_bytes(entry.params, "little")
    n = entry.numel
    return [(g, a, min(S, n - a)) for g, a in enumerate(range(0, n, S))]


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
    if entry.mode == MODE_BYTEGROUP:  # dtype, params and the stream count checked by check_params
        B = FLOAT_FORMATS[entry.dtype][0] // 8
        if len(streams) != entry.stream_count:
            raise StreamError(f"bytegroup tensor {entry.name!r} needs {entry.stream_count} streams, has {len(streams)}")
        for g, _, m in _bytegroup_slices(entry):
            for p in range(B):
                _check_bytes_stream(streams[g * B + p], m, f"{entry.name} (slice {g}, plane {p})", content_size=True)
        return
    raise UnsupportedError(f"tensor {entry.name!r}: coding mode {entry.mode} is not known to this decoder")


def plan_decode(entry: TensorEntry, streams: list, out: np.ndarray | None = None, *, threads: int | None = None,
                validated: bool = False):
    """Plan (:mod:`aligncodec.codec.parallel`) decoding a lossless tensor into ``out`` (uint8 of
    entry.nbytes; new if None) and returning it: a zstd frame in one task, then the rANS chunks of
    a float-split tensor in parallel, joined with the rest straight into the output bits.
    The entry and its streams are validated before the plan is returned, unless the caller
    says it already ran :func:`validate` on them (``validated``; the loader's
    :func:`~aligncodec.validation.check_entry` does)."""
    if not validated:
        validate(entry, streams)
    if out is None:
        out = np.empty(entry.nbytes, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.shape != (entry.nbytes,):
        raise ValueError(f"out must be a 1-d uint8 array of {entry.nbytes} bytes")
    if entry.mode == MODE_STORED:
        return _plan_stored(entry, streams[0], out)
    if entry.mode == MODE_BYTEGROUP:
        return _plan_bytegroup(entry, streams, out)
    return _plan_float_split(entry, streams, out, threads)


def _plan_stored(entry, stream, out):
    yield [lambda: out.__setitem__(slice(None), np.frombuffer(_bytes_from(stream, entry.nbytes, entry.name, checked=True),
                                                              dtype=np.uint8))]
    return out


def _plan_float_split(entry, streams, out, threads):
    from aligncodec.codec.entropy import decode_cpu

    width, e = FLOAT_FORMATS[entry.dtype]
    k = entry.params[0]
    n = entry.numel
    rw = width - e - k
    box = {}
    if isinstance(streams[1], ZstdStream):  # decompress first (one task; zstd releases the GIL)
        yield [lambda: box.__setitem__("rest", _bytes_from(streams[1], packed_size(n, rw), entry.name, checked=True))]
    rest = box["rest"] if box else _bytes_from(streams[1], packed_size(n, rw), entry.name, checked=True)
    little = sys.byteorder == "little"
    u = np.dtype(f"u{width // 8}").type
    bits = out.view(u) if little else np.empty(n, u)  # the kernels write native order
    yield from decode_cpu.plan_float_split(streams[0], rest, entry.dtype, k, bits, threads=threads)
    if not little:  # pragma: no cover
        out[:] = bits.astype(f"<u{width // 8}").view(np.uint8)
    return out


_scratch = threading.local()


def join_planes(planes: list, out: np.ndarray) -> None:
    """``out`` (uint{W}, the planes' length) = the elements whose rotated patterns have these byte
    planes (spec §7.5), rotated back. numpy ufuncs on the whole slice (they release the GIL, run
    at several GB/s, and need no numba: a bytegroup archive loads without numba's start-up);
    one scratch buffer per thread."""
    w = out.dtype.itemsize * 8
    u = out.dtype.type
    np.copyto(out, planes[-1])
    for p in reversed(planes[:-1]):
        np.left_shift(out, u(8), out=out)
        np.bitwise_or(out, p, out=out, casting="unsafe")
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.nbytes < out.nbytes:
        buf = _scratch.buf = np.empty(max(out.nbytes, 1 << 21), dtype=np.uint8)
    tmp = buf[: out.nbytes].view(out.dtype)
    np.right_shift(out, u(1), out=tmp)
    np.left_shift(out, u(w - 1), out=out)
    np.bitwise_or(out, tmp, out=out)


def _plan_bytegroup(entry, streams, out):
    """One stage, one task per slice: its planes (zstd frames decoded with an output limit of
    the slice, or raw views) joined straight into the output's bits (:func:`join_planes`)."""
    width, _ = FLOAT_FORMATS[entry.dtype]
    B = width // 8
    little = sys.byteorder == "little"
    u = np.dtype(f"u{B}").type
    n = entry.numel
    bits = out.view(u) if little else np.empty(n, u)

    def task(g, a, m):
        planes = [np.frombuffer(_bytes_from(streams[g * B + p], m, entry.name, content_size=True, checked=True),
                                dtype=np.uint8) for p in range(B)]
        join_planes(planes, bits[a:a + m])

    yield [lambda g=g, a=a, m=m: task(g, a, m) for g, a, m in _bytegroup_slices(entry)]
    if not little:  # pragma: no cover
        out[:] = bits.astype(f"<u{B}").view(np.uint8)
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
    if entry.mode == MODE_BYTEGROUP:  # spec §7.5 in numpy: planes stacked, bytes regrouped, rotated right
        width, _ = FLOAT_FORMATS[entry.dtype]
        B = width // 8
        planes = np.empty((B, entry.numel), dtype=np.uint8)
        for g, a, m in _bytegroup_slices(entry):
            for p in range(B):
                planes[p, a:a + m] = np.frombuffer(_bytes_from(streams[g * B + p], m, entry.name, content_size=True), np.uint8)
        rotated = np.ascontiguousarray(planes.T).reshape(-1).view(f"<u{B}")
        return rotr1(rotated, width).astype(f"<u{B}").view(np.uint8)
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
