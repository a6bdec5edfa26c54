"""CPU decoding of mode 2 (``ecsq``, spec §7.4) with numba kernels: symbols, reconstruction
and the dtype cast in one pass per row, no numpy temporaries. Mode 4 (``tcq``, spec §7.6)
adds one stage between the two below: the trellis levels, column ranges in parallel, written
over the symbols (see :func:`_levels`).

The plan (:func:`plan_ecsq`, run by :mod:`aligncodec.codec.parallel`) has two stages:

1. every class stream's rANS chunks, decoded in parallel into one uint16 buffer
   (class c at its own offset);
2. row ranges in parallel: for each row, ``q`` from the symbols (class offsets, and the
   class map's row or column order), ``C = f32(q) · d``, the Sylvester butterflies, the
   m × m factor Q, ``· g``, ``· sign``, then the round-to-nearest-even cast to the
   tensor's dtype, written straight into the output bytes.

Every float operation is one IEEE binary32 operation in the order of spec §7.4
(numba does not contract ``a·b + c`` into a fused multiply-add without fastmath, and
none is used), so the result is bit-identical to :func:`lossy.reconstruct_from` +
:func:`lossy.round_to_dtype`; the golden lossy vectors and tests/test_codec_modes_lossy_cpu.py pin it.
A NaN (possible only from an absurd step in a hand-made archive) makes the tensor
fall back to that numpy path, which defines the NaN bits.
"""

from __future__ import annotations

import math
import threading

import numba as nb
import numpy as np

from aligncodec.codec import parallel
from aligncodec.codec.entropy import decode_cpu
from aligncodec.codec.modes import lossy
from aligncodec.formats.layout import TensorEntry

KIND_F32, KIND_F16, KIND_BF16 = 0, 1, 2
KINDS = {"F32": KIND_F32, "F16": KIND_F16, "BF16": KIND_BF16}
# rows per reconstruction task: at least this many weights
MIN_TASK_WEIGHTS = 1 << 16

_U32 = np.uint32


# ----------------------------------------------------------------- casts (bit patterns)


@nb.njit(nogil=True, cache=True, inline="always")
def _bf16_rne(b):
    """float32 bits -> bfloat16 bits, round to nearest even (not for NaN)."""
    return np.uint16((b + _U32(0x7FFF) + ((b >> _U32(16)) & _U32(1))) >> _U32(16))


@nb.njit(nogil=True, cache=True, inline="always")
def _f16_rne(b):
    """float32 bits -> binary16 bits, round to nearest even, overflow to infinity (not for NaN)."""
    sign = (b >> _U32(16)) & _U32(0x8000)
    a = b & _U32(0x7FFFFFFF)
    if a >= _U32(0x47800000):  # >= 65536 (and infinity): infinity
        return np.uint16(sign | _U32(0x7C00))
    if a >= _U32(0x38800000):  # normal binary16 (the rounding may carry into the exponent, or to infinity)
        r = a + _U32(0xFFF) + ((a >> _U32(13)) & _U32(1))
        return np.uint16(sign | ((r - _U32(0x38000000)) >> _U32(13)))
    if a < _U32(0x33000001):  # <= 2^-25: rounds to (signed) zero
        return np.uint16(sign)
    e = a >> _U32(23)
    m = (a & _U32(0x7FFFFF)) | _U32(0x800000)
    shift = _U32(126) - e  # 14..24
    r = m >> shift
    rem = m & ((_U32(1) << shift) - _U32(1))
    half = _U32(1) << (shift - _U32(1))
    if rem > half or (rem == half and (r & _U32(1)) != 0):
        r += _U32(1)
    return np.uint16(sign | r)


@nb.njit(nogil=True, cache=True)
def cast_bits(src, kind, out):
    """float32 bit patterns (uint32) -> the tensor dtype's bits (for tests; the kernel inlines it)."""
    for i in range(src.shape[0]):
        b = src[i]
        if kind == 1:
            out[i] = _f16_rne(b)
        else:
            out[i] = _bf16_rne(b)


# ----------------------------------------------------------------- reconstruction kernels
#
# Hadamard tensors are reconstructed BLOCK rows at a time in a transposed scratch block
# X[(k·p + a)·BLOCK + r] (weight column j = a·m + k of row i0 + r): every butterfly pass and
# every step of the m × m product is then a long run of independent float32 operations on
# contiguous memory, which LLVM vectorizes (AVX2/AVX-512) without changing any rounding.
# Indices are cast to unsigned before subscripting: numba's negative-index wraparound on
# signed indices otherwise blocks vectorization. BLOCK = 8 (one AVX2 vector of float32) was
# 7-15 % faster than 16 or 32, and 4 no better, on 4096 = 4096 × 1, 576 = 64 × 9 and
# 1536 = 512 × 3 columns (docs/results/2026-11-30-load-v2.md). Any BLOCK gives the same bits:
# rows are independent and each weight's operations are the same in the same order.

BLOCK = 8
_U64 = np.uint64


@nb.njit(nogil=True, cache=True, inline="always")
def _store(b, kind, out, o):
    """Write float32 bits ``b`` as the tensor's dtype at out[o]; returns 1 for a NaN."""
    if kind == 0:
        out[o] = b
    elif kind == 1:
        out[o] = _f16_rne(b)
    else:
        out[o] = _bf16_rne(b)
    return 1 if (b & _U32(0x7FFFFFFF)) > _U32(0x7F800000) else 0


@nb.njit(nogil=True, cache=True)
def _rows_identity(U, rowbase, rowoff, colbase, colstride, coloff, gather, d, kind, out, r0, r1):
    """Rows [r0, r1) of an identity-transform tensor: W = f32(q) · d. Returns 1 on a NaN."""
    n = d.shape[0]
    X = np.empty(n, dtype=np.float32)
    Xb = X.view(np.uint32)
    nan = 0
    for i in range(r0, r1):
        rb = rowbase[i]
        ro = rowoff[i]
        for j in range(n):
            if gather:
                q = np.int32(U[_U64(rb + colbase[j] + i * colstride[j])]) + ro + coloff[j]
            else:
                q = np.int32(U[_U64(rb + j)]) + ro
            X[_U64(j)] = np.float32(q) * d[_U64(j)]
        o = i * n
        for j in range(n):
            nan |= _store(Xb[_U64(j)], kind, out, _U64(o + j))
    return nan


@nb.njit(nogil=True, cache=True)
def _load_block(U, rowbase, rowoff, colbase_t, colstride_t, coloff_t, gather, dt, X, i0, nr, p, m):
    """X[(k·p + a)·BLOCK + r] = f32(q[i0 + r, a·m + k]) · d[a·m + k]  (dt, colbase_t, ... in [k][a] order)."""
    for r in range(nr):
        i = i0 + r
        rb = rowbase[i]
        ro = rowoff[i]
        for k in range(m):
            kp = k * p
            for a in range(p):
                t = kp + a
                if gather:
                    q = np.int32(U[_U64(rb + colbase_t[t] + i * colstride_t[t])]) + ro + coloff_t[t]
                else:
                    q = np.int32(U[_U64(rb + a * m + k)]) + ro
                X[_U64(t * BLOCK + r)] = np.float32(q) * dt[_U64(t)]


@nb.njit(nogil=True, cache=True)
def _butterflies(X, p, m):
    """Sylvester butterflies h = 1, 2, ..., p/2 on each of the m planes of p·BLOCK values."""
    PR = p * BLOCK
    for k in range(m):
        o = k * PR
        hm = BLOCK
        while hm < PR:
            for base in range(o, o + PR, 2 * hm):
                for t in range(base, base + hm):
                    tu = _U64(t)
                    tv = _U64(t + hm)
                    u = X[tu]
                    v = X[tv]
                    X[tu] = u + v
                    X[tv] = u - v
            hm *= 2


@nb.njit(nogil=True, cache=True)
def _mix(X, T, Q, p, m):
    """T[c] = ((0 + X[0]·Q[c,0]) + X[1]·Q[c,1]) + ... per plane, in this order (spec §7.4)."""
    PR = p * BLOCK
    zero = np.float32(0.0)
    for c in range(m):
        o = c * PR
        for t in range(o, o + PR):
            T[_U64(t)] = zero
        for k in range(m):
            qv = Q[_U64(c * m + k)]
            s = k * PR - o
            for t in range(o, o + PR):
                T[_U64(t)] = T[_U64(t)] + X[_U64(t + s)] * qv


@nb.njit(nogil=True, cache=True)
def _scale(W, g, count):
    for t in range(count):
        W[_U64(t)] = W[_U64(t)] * g


@nb.njit(nogil=True, cache=True)
def _store_block(W, sbit_t, kind, out, i0, nr, n, p, m):
    """out[i0 + r, a·m + c] = cast(W · sign): the sign (±1, an exact product) as a sign-bit flip."""
    Wb = W.view(np.uint32)
    nan = 0
    for r in range(nr):
        o = (i0 + r) * n
        for c in range(m):
            cp = c * p
            for a in range(p):
                t = cp + a
                b = Wb[_U64(t * BLOCK + r)] ^ sbit_t[_U64(t)]
                nan |= _store(b, kind, out, _U64(o + a * m + c))
    return nan


@nb.njit(nogil=True, cache=True)
def _rows_hadamard(U, rowbase, rowoff, colbase_t, colstride_t, coloff_t, gather, dt, p, m, Q, g, sbit_t, kind, out, r0, r1):
    """Rows [r0, r1) of a hadamard-transform tensor, BLOCK rows at a time. Returns 1 on a NaN."""
    n = p * m
    X = np.zeros(n * BLOCK, dtype=np.float32)
    T = np.zeros(n * BLOCK, dtype=np.float32) if m > 1 else X
    nan = 0
    for i0 in range(r0, r1, BLOCK):
        nr = min(BLOCK, r1 - i0)
        _load_block(U, rowbase, rowoff, colbase_t, colstride_t, coloff_t, gather, dt, X, i0, nr, p, m)
        _butterflies(X, p, m)
        W = X
        if m > 1:
            _mix(X, T, Q, p, m)
            W = T
        _scale(W, g, n * BLOCK)
        nan |= _store_block(W, sbit_t, kind, out, i0, nr, n, p, m)
    return nan


# ----------------------------------------------------------------- trellis levels (mode 4, spec §7.6)
#
# A tcq tensor's symbols are replaced, in place in the symbol buffer, by their levels L biased
# by LEVEL_BIAS (|L| ≤ 32767, so L + 32767 fits a uint16); the ecsq kernels above then run
# unchanged with the offset −LEVEL_BIAS and read q = L. Each task walks a range of columns down
# all the rows (one state per column, one contiguous run of symbols per row). One task per
# thread: the wider a task's run of each row, the better the pass streams through memory
# (4096 × 4096, 8-state machine, ns per weight, one thread CPU, load 12.6: full rows 0.42,
# 2048 columns 0.52, 1024 0.64, 512 0.68-0.84; docs/results/2026-11-30-load-v2.md).

LEVEL_BIAS = 32767
LEVEL_TASKS_PER_THREAD = 1


@nb.njit(nogil=True, cache=True)
def _levels(U, rowbase, rowoff, colbase, colstride, coloff, gather, smask, rtaps, rows, j0, j1):
    """Columns [j0, j1): U[idx(i, j)] ← L[i, j] + LEVEL_BIAS, walking i = 0 .. rows − 1 from state 0.

    Each column's state s is kept bit-reversed, r (see :func:`_reversed_machine`): the
    quantiser (the top bit of s) is bit 0 of r and the shift register moves the other way,
    ``r' = ((r << 1) | (parity(q) ^ parity(r & rtaps))) & smask``, so no shift depends on the
    machine; the sign of q is ``(q >> 63) − (−q >> 63)``. Same states, same levels as spec §7.6."""
    w = j1 - j0
    st = np.zeros(w, dtype=np.int64)
    for i in range(rows):
        rb = rowbase[i]
        ro = rowoff[i]
        for t in range(w):
            j = j0 + t
            if gather:
                idx = _U64(rb + colbase[j] + i * colstride[j])
                q = np.int64(U[idx]) + ro + coloff[j]
            else:
                idx = _U64(rb + j)
                q = np.int64(U[idx]) + ro
            tu = _U64(t)
            r = st[tu]
            sg = (q >> 63) - ((-q) >> 63)
            U[idx] = np.uint16(2 * q - ((-(r & 1)) & sg) + LEVEL_BIAS)
            f = r & rtaps  # parity of the tapped bits (S ≤ 256: at most 8 bits; reversed, the
            f ^= f >> 4    # taps of a 32- or 64-state machine sit in bits 3-5)
            f ^= f >> 2
            f ^= f >> 1
            st[tu] = ((r << 1) | ((q ^ f) & 1)) & smask


def _reversed_machine(mid: int) -> tuple[int, int]:
    """(smask, rtaps) of state machine ``mid`` for :func:`_levels`: the state mask S − 1 and the
    feedback taps with their bits reversed over the log2(S) state bits."""
    n_states, taps = lossy.TRELLIS_MACHINES[mid]
    bits = n_states.bit_length() - 1
    return n_states - 1, sum(1 << (bits - 1 - k) for k in range(bits) if taps >> k & 1)


def _level_stage(U, prm, rowbase, rowoff, colbase, colstride, coloff, gather, rows, n, threads):
    """The tasks of the level pass (column ranges), and the (rowoff, coloff) the kernels then use."""
    smask, rtaps = _reversed_machine(prm.trellis)

    def task(j0, j1):
        _levels(U, rowbase, rowoff, colbase, colstride, coloff, gather, smask, rtaps, rows, j0, j1)

    ranges = parallel.split_ranges(n, parallel.resolve_threads(threads) * LEVEL_TASKS_PER_THREAD, multiple=64,
                                   minimum=max(64, MIN_TASK_WEIGHTS // max(1, rows)))
    return parallel.stage(task, ranges), np.full(rows, -LEVEL_BIAS, np.int32), np.zeros_like(coloff)


# ----------------------------------------------------------------- symbol scratch
#
# The symbol buffer of a tensor (2 bytes a weight) is borrowed from a small pool instead of
# allocated per tensor: a fresh buffer of more than a few MB is a new anonymous mapping, and
# its first touch (page faults, zeroing by the kernel) cost 0.36-0.52 ns a weight on this
# machine, about a tenth of the whole lossy decode. The pool keeps at most SCRATCH_KEEP_BYTES
# of idle buffers; release_scratch() frees them (the loader calls it when a load ends).

SCRATCH_KEEP_BYTES = 256 << 20
_scratch_lock = threading.Lock()
_scratch: list[np.ndarray] = []


def _borrow(n: int) -> np.ndarray:
    """A uint16 buffer of at least ``n`` elements (contents undefined), from the pool if one fits."""
    with _scratch_lock:
        fits = [i for i, b in enumerate(_scratch) if b.size >= n]
        if fits:
            i = min(fits, key=lambda i: _scratch[i].size)
            return _scratch.pop(i)
    return np.empty(n, dtype=np.uint16)


def _give_back(buf: np.ndarray) -> None:
    """Return a borrowed buffer to the pool (the smallest idle ones make room; too big: dropped)."""
    if buf.nbytes > SCRATCH_KEEP_BYTES:
        return
    with _scratch_lock:
        _scratch.append(buf)
        _scratch.sort(key=lambda b: -b.nbytes)
        while sum(b.nbytes for b in _scratch) > SCRATCH_KEEP_BYTES:
            _scratch.pop()


def release_scratch() -> None:
    """Free the idle symbol buffers kept for the next tensors."""
    with _scratch_lock:
        _scratch.clear()


# ----------------------------------------------------------------- plan


def _index_maps(entry: TensorEntry, p: lossy.EcsqParams, cm, bases: list[int], counts: list[int]):
    """(rowbase, rowoff, colbase, colstride, coloff, gather) for the kernel's q lookup."""
    rows, n = entry.shape
    i64 = np.int64
    if cm is None:
        return (np.arange(rows, dtype=i64) * n, np.full(rows, p.offset, np.int32), np.zeros(1, i64), np.zeros(1, i64),
                np.zeros(1, np.int32), False)
    ids = cm.ids.astype(np.int64)
    offs = np.asarray(cm.offsets, dtype=np.int32)
    base = np.asarray(bases, dtype=i64)
    # rank of each row/column within its class (ascending index order)
    rank = np.empty(len(ids), dtype=i64)
    for c in range(cm.k):
        sel = np.flatnonzero(ids == c)
        rank[sel] = np.arange(len(sel), dtype=i64)
    if p.class_axis == 0:
        return (base[ids] + rank * n, offs[ids], np.zeros(1, i64), np.zeros(1, i64), np.zeros(1, np.int32), False)
    cnt = np.asarray([counts[c] // rows for c in range(cm.k)], dtype=i64)  # columns per class
    return (np.zeros(rows, i64), np.zeros(rows, np.int32), base[ids] + rank, cnt[ids], offs[ids], True)


def plan_ecsq(entry: TensorEntry, streams: list, out: np.ndarray | None = None, *, threads: int | None = None):
    """Plan decoding an ecsq tensor into ``out`` (uint8, entry.nbytes; new if None); returns ``out``.
    Everything is validated (:func:`lossy.parse`) before the plan is returned."""
    prm, sstreams, scales, hd, cm = lossy.parse(entry, streams)
    return _plan(entry, streams, prm, sstreams, scales, hd, cm, out, threads)


def _plan(entry, streams, prm, sstreams, scales, hd, cm, out, threads):
    rows, n = entry.shape
    if out is None:
        out = np.empty(entry.nbytes, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.shape != (entry.nbytes,):
        raise ValueError(f"out must be a 1-d uint8 array of {entry.nbytes} bytes")
    counts = [s.n_symbols for s in sstreams]
    bases = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])[:-1].tolist()
    total = int(sum(counts))
    buf = _borrow(total)
    try:
        return (yield from _plan_with(entry, streams, prm, sstreams, scales, hd, cm, out, threads, counts, bases, buf[:total]))
    finally:
        _give_back(buf)


def _plan_with(entry, streams, prm, sstreams, scales, hd, cm, out, threads, counts, bases, U):
    rows, n = entry.shape
    yield from parallel.together([decode_cpu.plan_decode(s, U[b:b + c], threads=threads) for s, b, c in zip(sstreams, bases, counts)])

    rowbase, rowoff, colbase, colstride, coloff, gather = _index_maps(entry, prm, cm, bases, counts)
    if prm.trellis:  # mode 4: symbols → biased levels in place, then the ecsq reconstruction as is
        tasks, rowoff, coloff = _level_stage(U, prm, rowbase, rowoff, colbase, colstride, coloff, gather, rows, n, threads)
        yield tasks
    d = lossy.column_steps(prm, scales)
    d = np.ascontiguousarray(np.broadcast_to(np.float32(d), (n,)) if not isinstance(d, np.ndarray) else d, dtype=np.float32)
    kind = KINDS[entry.dtype]
    dst = out.view(np.uint32) if kind == KIND_F32 else out.view(np.uint16)
    nan = np.zeros(rows, dtype=np.int32)
    if prm.transform == lossy.TRANSFORM_HADAMARD:
        pp, m = lossy.split_pow2(n)

        def kao(v):  # a per-column array in [k][a] order (column j = a·m + k)
            return np.ascontiguousarray(v.reshape(pp, m).T).reshape(-1) if v.size == n else v

        dt, colbase_t, colstride_t, coloff_t = kao(d), kao(colbase), kao(colstride), kao(coloff)
        sbit_t = kao(np.where(hd.signs < 0, np.uint32(0x80000000), np.uint32(0)).astype(np.uint32))
        Q = np.ascontiguousarray(hd.Q, dtype=np.float32).reshape(-1)
        g = np.float32(1.0 / math.sqrt(pp))

        def task(r0, r1):
            nan[r0] = _rows_hadamard(U, rowbase, rowoff, colbase_t, colstride_t, coloff_t, gather, dt, pp, m, Q, g, sbit_t,
                                     kind, dst, r0, r1)
    else:
        def task(r0, r1):
            nan[r0] = _rows_identity(U, rowbase, rowoff, colbase, colstride, coloff, gather, d, kind, dst, r0, r1)

    minimum = max(1, MIN_TASK_WEIGHTS // n)
    yield parallel.stage(task, parallel.split_ranges(rows, parallel.resolve_threads(threads) * 4, minimum=minimum))
    if nan.any():  # only from non-finite arithmetic: the numpy path defines the NaN bits (torch's cast)
        if prm.trellis:  # U holds levels now: the numpy path from the streams
            with np.errstate(all="ignore"):
                out[:] = lossy.decode_numpy(entry, streams)
            return out
        syms = [U[b:b + c] for b, c in zip(bases, counts)]
        k = len(sstreams)
        with np.errstate(all="ignore"):
            W = lossy.reconstruct(entry, syms + list(streams[k:]))
        out[:] = lossy.round_to_dtype(W, entry.dtype).reshape(-1).view(np.uint8)
    return out


def decode(entry: TensorEntry, streams: list, *, threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """An ecsq tensor's little-endian bytes (uint8), decoded with the numba kernels."""
    return parallel.run(plan_ecsq(entry, streams, out, threads=threads), threads)
