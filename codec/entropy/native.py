"""ctypes bindings of the native float-split kernels (``_fastrans.c``, built at ``pip install -e .``).

Same bytes as the numba kernels (:mod:`aligncodec.codec.entropy.rans`,
:mod:`aligncodec.codec.entropy.decode_cpu`); the tests hold them bit-exact. ctypes releases
the GIL around each call, so the kernels run in parallel on the decode pool's threads.
:data:`LIB` is None where the module was not built (or ``ACZ_NATIVE=0``): callers then use the
numba kernels.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

LIB = None


def _load():
    if os.environ.get("ACZ_NATIVE", "1").strip() == "0" or sys.byteorder != "little":
        return None
    try:
        from aligncodec.codec.entropy import _fastrans
    except ImportError:
        return None
    lib = ctypes.CDLL(_fastrans.__file__)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.acz_decode_lanes.argtypes = [p, p, i64, i64, p, p, i32, i32, p, i32, p, i64, i32, i32, i32, i64, i64, p]
    lib.acz_encode_lanes.argtypes = [p, i32, i64, i64, p, p, i32, i32, i64, p, p, p, p, p, i64, i64]
    lib.acz_encode_lanes32.argtypes = [p, i64, i64, p, p, p, i32, i64, p, p, p, p, i64, i64]
    lib.acz_pack.argtypes = [p, p, p, i64, i64, i32, i64, i64, p, p]
    lib.acz_split_float.argtypes = [p, i32, i32, i32, i64, i64, p, p, p, i64]
    for f in (lib.acz_decode_lanes, lib.acz_encode_lanes, lib.acz_encode_lanes32, lib.acz_pack, lib.acz_split_float, lib.acz_init, lib.acz_set_simd,
              lib.acz_has_avx2):
        f.restype = ctypes.c_int
    lib.acz_set_simd.argtypes = [i32]
    lib.acz_init()
    return lib


LIB = _load()


def available() -> bool:
    return LIB is not None


def simd() -> bool:
    """Whether the AVX2 decoder runs (the CPU has it and :func:`set_simd` did not turn it off)."""
    return LIB is not None and bool(LIB.acz_has_avx2())


def set_simd(on: bool) -> bool:
    """Tests: the portable path (False) or the AVX2 one where the CPU has it (True); returns which runs."""
    return bool(LIB.acz_set_simd(int(on)))


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


# ----------------------------------------------------------------- decoding


def decode_tables(tab: np.ndarray, symt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The compact tables (:func:`decode_cpu.compact_tables`) as the native decoder reads them:
    both uint32 (a 32-bit gather reads a whole entry), contiguous."""
    return np.ascontiguousarray(tab, dtype=np.uint32), np.ascontiguousarray(symt, dtype=np.uint32)


def decodes(lanes: int, out: np.ndarray, join: bool, rw: int, width: int) -> bool:
    """Whether :func:`decode_range` handles this layout (else the numba kernels do)."""
    if not simd() or not 1 <= lanes <= 32 or not out.flags.c_contiguous:  # (no AVX2: numba's is faster)
        return False
    if join:
        return rw <= 25 and width in (16, 32) and out.dtype.itemsize * 8 == width
    return out.dtype == np.uint16


def decode_range(words, chunk_w, cs, n, tab32, sym32, precision, lanes, out, join, rest, rw, low, width, c0, c1, status):
    """Chunks [c0, c1) into ``out`` (symbols, or with ``join`` the float-split bits); per-chunk status
    codes as :mod:`decode_cpu`'s."""
    rc = LIB.acz_decode_lanes(_ptr(words), _ptr(chunk_w), cs, n, _ptr(tab32), _ptr(sym32), precision, lanes, _ptr(out), int(join),
                              _ptr(rest), rest.size, rw, low, width, c0, c1, _ptr(status))
    if rc:
        raise ValueError("native rANS decoder: unsupported layout")


# ----------------------------------------------------------------- encoding

_SYM_KIND = {np.dtype(np.uint8): 1, np.dtype(np.int8): -1, np.dtype(np.uint16): 2, np.dtype(np.int16): -2}


def encodes(sym: np.ndarray, lanes: int, precision: int) -> bool:
    return LIB is not None and sym.dtype in _SYM_KIND and 1 <= lanes <= 32 and 1 <= precision <= 16


def reciprocals(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per symbol, m = ceil(2^(32+l) / f) (uint64) and l = ceil(log2 f) (uint8), so that
    x // f == (x * m) >> (32 + l) for every 32-bit x (zero frequencies: any value, never used)."""
    f = np.maximum(np.asarray(freqs, dtype=np.uint64), np.uint64(1))
    sh = np.ceil(np.log2(f.astype(np.float64))).astype(np.uint8)  # exact: f < 2^17
    num = np.left_shift(np.uint64(1), (sh.astype(np.uint64) + np.uint64(32)))
    m = (num + f - np.uint64(1)) // f
    return np.ascontiguousarray(m, dtype=np.uint64), sh


def encode_chunks(sym: np.ndarray, chunk_symbols: int, freqs: np.ndarray, cum: np.ndarray, precision: int, lanes: int,
                  offset: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(payload bytes, chunk lengths uint32) of ``sym − offset`` in chunks of ``chunk_symbols`` and
    ``lanes`` interleaved lanes: exactly rans.py's numba encoder's bytes. Parallel over chunk ranges
    on the decode pool (:mod:`aligncodec.codec.parallel`)."""
    from aligncodec.codec import parallel

    sym = np.ascontiguousarray(sym)
    n = int(sym.size)
    n_chunks = -(-n // chunk_symbols)
    freqs = np.ascontiguousarray(freqs, dtype=np.uint32)
    cum = np.ascontiguousarray(cum, dtype=np.uint32)
    scratch = np.empty(n, dtype=np.uint16)
    states = np.empty(n_chunks * lanes, dtype=np.uint32)
    nwords = np.empty(n_chunks, dtype=np.int64)
    kind = _SYM_KIND[sym.dtype]
    rcp, rsh = reciprocals(freqs)

    vector = lanes == 32 and sym.dtype == np.uint16 and simd() and int(freqs.max()) < 1 << precision
    invf = 1.0 / np.maximum(freqs, 1).astype(np.float64)
    fcum = (freqs | (cum << np.uint32(16))).astype(np.uint32) if vector else freqs

    def enc(c0, c1):
        if vector:  # AVX2, 8 lanes at a time: the same bytes
            if LIB.acz_encode_lanes32(_ptr(sym), n, chunk_symbols, _ptr(freqs), _ptr(cum), _ptr(fcum), precision, offset, _ptr(invf), _ptr(scratch),
                                      _ptr(states), _ptr(nwords), c0, c1):
                raise ValueError("native rANS encoder: unsupported layout")
            return
        if LIB.acz_encode_lanes(_ptr(sym), kind, n, chunk_symbols, _ptr(freqs), _ptr(cum), precision, lanes, offset, _ptr(rcp), _ptr(rsh), _ptr(scratch),
                                _ptr(states), _ptr(nwords), c0, c1):
            raise ValueError("native rANS encoder: unsupported layout")

    parts = parallel.resolve_threads(threads) * 4
    ranges = parallel.split_ranges(n_chunks, parts, minimum=max(1, (1 << 17) // chunk_symbols))

    starts = np.arange(n_chunks, dtype=np.int64) * chunk_symbols
    w = np.minimum(lanes, np.minimum(starts + chunk_symbols, n) - starts)
    box = {}

    def plan():
        yield parallel.stage(enc, ranges)
        lengths = 4 * w + 2 * nwords
        offsets = np.zeros(n_chunks, dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        out = np.empty(int(lengths.sum()), dtype=np.uint8)
        box["r"] = out, lengths.astype(np.uint32)

        def pack(c0, c1):
            LIB.acz_pack(_ptr(states), _ptr(nwords), _ptr(scratch), chunk_symbols, n, lanes, c0, c1, _ptr(offsets), _ptr(out))

        yield parallel.stage(pack, ranges)

    parallel.run(plan(), threads)
    return box["r"]


def split_float(bits: np.ndarray, width: int, e: int, k: int, threads: int | None = None):
    """(symbols uint16, their counts int64 of 2^(e+k), packed rest uint8) of float bit patterns
    (uint16 / uint32): what lossless.split_float, a histogram and pack_bits give, in one pass."""
    from aligncodec.codec import parallel

    bits = np.ascontiguousarray(bits)
    n = int(bits.size)
    rw = width - e - k
    sym = np.empty(n, dtype=np.uint16)
    rest = np.zeros((n * rw + 7) // 8, dtype=np.uint8)
    step = 1 << 20  # a multiple of 8: every range starts on a byte of the rest
    ranges = [(a, min(a + step, n)) for a in range(0, n, step)]
    hists = np.zeros((max(1, len(ranges)), 1 << (e + k)), dtype=np.int64)

    def task(j, a, b):
        if LIB.acz_split_float(_ptr(bits), width, e, k, a, b, _ptr(sym), _ptr(hists[j]), _ptr(rest), rest.size):
            raise ValueError("native float split: unsupported layout")

    def plan():
        yield [lambda j=j, a=a, b=b: task(j, a, b) for j, (a, b) in enumerate(ranges)]

    parallel.run(plan(), threads)
    return sym, hists.sum(axis=0), rest
