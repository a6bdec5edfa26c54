"""Chunked rANS over integer frequency tables (spec/FORMAT.md §6).

32-bit state in [L, 2^32) with L = 2^16, 16-bit renormalisation words,
precision P <= 16 bits (frequencies sum to 2^P), every chunk an independent
stream: a u32 final encoder state followed by the u16 words the decoder reads
in order. Encoder and decoder are numba kernels, parallel over chunks (the
decoder lives in :mod:`aligncodec.codec.entropy.decode_cpu`);
:mod:`aligncodec.codec.entropy.rans_reference` is the plain decoder laid out like the
spec, and the tests hold the two bit-exact.

Why not constriction: its Python API builds models from floats at a fixed
24-bit precision, so it can neither use the archive's stored integer tables
nor a table small enough for lookup decoding on a GPU. It stays in the
benchmarks as the speed reference.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import threading

import numba as nb
import numpy as np

from aligncodec.formats.constants import MAX_LANES, MAX_PRECISION, RANS_STATE_LOWER
from aligncodec.formats.streams import RansStream

# held around every parallel numba kernel the encoders launch (codec/quant/gptq.py's gptq_ecsq too)
KERNEL_LOCK = threading.RLock()


def serial_twin(kernel):
    """A ``nogil``, serial copy of the ``parallel=True`` numba kernel ``kernel`` (its ``prange``
    loops run as plain loops, in order): the same results wherever the parallel loop's
    iterations are independent (no reductions across them), which holds for every kernel
    given a twin. Called with one numba thread (:func:`launch`), it releases the GIL and
    needs no KERNEL_LOCK, so that encoder threads (aligncodec/encode/) run such
    kernels side by side. Its own qualified name keeps numba's on-disk cache apart from the
    parallel kernel's (the cache index does not tell the compile flags apart)."""
    import types

    py = kernel.py_func
    f = types.FunctionType(py.__code__, py.__globals__, py.__name__ + "_serial", py.__defaults__, py.__closure__)
    f.__qualname__ = py.__qualname__ + "_serial"
    f.__module__ = py.__module__
    f.__doc__ = py.__doc__
    return nb.njit(nogil=True, cache=True)(f)


def launch(kernel, twin, *args):
    """Run ``kernel(*args)`` (a parallel numba kernel) under KERNEL_LOCK, or, when the calling
    thread's numba thread count is 1, its :func:`serial_twin` ``twin`` without the lock and
    without the GIL (the same results)."""
    if nb.get_num_threads() == 1:
        return twin(*args)
    with KERNEL_LOCK:
        return kernel(*args)

DEFAULT_CHUNK_SYMBOLS = 1 << 14  # chunked layout (coder 2): symbols per chunk
# The layout the encoder writes when a caller names none (chunk_symbols=None, lanes=None).
# Chosen by measurement (tools/bench/layout_rate.py; README "Stream layout").
DEFAULT_LAYOUT = (1 << 17, 32)  # 131072 symbols in 32 interleaved lanes per chunk (coder 3):
# +0.0032 bpw on SmolLM2 fp16, +0.0053 bpw on its 3-bpw lossy archive, 4.3-5.5x the parallel
# rANS states of (16384, 1) (docs/results/2026-11-30-stream-layout.md). Streams shorter than
# LANES_MIN_SYMBOLS keep the chunked layout: 32 lanes' states would cost a small stream up to
# ~0.1 KB for no parallelism worth having.
LANES_MIN_SYMBOLS = 1 << 17
_SMALL_LAYOUT = (DEFAULT_CHUNK_SYMBOLS, 1)
# precisions the encoder picks from (the format allows 1..16, spec §6.2). Capped at 12: a 2^12-slot
# table (6 B/slot on the CPU, 24 KiB) stays in L1 / GPU shared memory, where larger ones cost a
# cache miss on every symbol; measured: +0.0014 bpw on the SmolLM2 3-bpw archive, lossy CPU decode
# 0.47 → 0.58 GB of bf16 per CPU-second (docs/results/2026-11-30-load-v2.md). An alphabet of more
# than 2^12 symbols takes the smallest precision that holds it (PRECISION_FALLBACK).
PRECISION_CHOICES = (10, 11, 12)
PRECISION_FALLBACK = (13, 14, 15, 16)

# ----------------------------------------------------------------- frequency tables


def quantize_counts(counts: np.ndarray, precision: int) -> np.ndarray:
    """Integer frequencies summing to exactly 2**precision, every symbol with a
    non-zero count getting at least 1, chosen greedily to minimise the code
    length sum(c_s * log2(M / f_s)). Deterministic."""
    counts = np.asarray(counts, dtype=np.int64)
    M = 1 << precision
    used = np.flatnonzero(counts)
    if len(used) == 0:
        raise ValueError("no symbols to model")
    if len(used) > M:
        raise ValueError(f"{len(used)} distinct symbols do not fit precision {precision}")
    total = int(counts.sum())
    c = counts[used].astype(np.float64)
    f = np.maximum(1, np.floor(c * M / total)).astype(np.int64)
    diff = M - int(f.sum())
    if diff:
        # heap of the cost of one more (diff > 0: most negative = largest saving first) or one less
        # (diff < 0) unit per symbol; Python floats and ints, the same IEEE arithmetic as numpy's
        # scalars, without their per-call cost (the encoder builds three tables per tensor)
        log2 = math.log2
        cl = c.tolist()
        fl = f.tolist()
        if diff > 0:
            heap = [(-ci * log2((fi + 1) / fi), i) for i, (ci, fi) in enumerate(zip(cl, fl))]
        else:
            heap = [(ci * log2(fi / (fi - 1)) if fi > 1 else math.inf, i) for i, (ci, fi) in enumerate(zip(cl, fl))]
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        if diff > 0:
            for _ in range(diff):
                i = pop(heap)[1]
                fi = fl[i] = fl[i] + 1
                push(heap, (-cl[i] * log2((fi + 1) / fi), i))
        else:
            for _ in range(-diff):
                i = pop(heap)[1]
                fi = fl[i] = fl[i] - 1
                push(heap, (cl[i] * log2(fi / (fi - 1)) if fi > 1 else math.inf, i))
        f = np.asarray(fl, dtype=np.int64)
    out = np.zeros(len(counts), dtype=np.uint32)
    out[used] = f
    return out


def table_bytes(freqs: np.ndarray) -> int:
    """Bytes of the LEB128 frequency table (spec §6.2)."""
    f = np.asarray(freqs, dtype=np.int64)
    return int(len(f) + (f >= 128).sum() + (f >= 1 << 14).sum())


def cost_bits(counts: np.ndarray, freqs: np.ndarray, precision: int) -> float:
    """Ideal code length of symbols with these counts under this table, plus the table."""
    m = counts > 0
    return float(np.sum(counts[m] * (precision - np.log2(freqs[m].astype(np.float64))))) + 8 * table_bytes(freqs)


def choose_table(counts: np.ndarray, precisions=PRECISION_CHOICES) -> tuple[int, np.ndarray]:
    """The precision and table that minimise payload + table bits."""
    counts = np.asarray(counts, dtype=np.int64)
    n_used = int((counts > 0).sum())
    best = None
    for p in precisions:
        if (1 << p) < n_used:
            continue
        f = quantize_counts(counts, p)
        c = cost_bits(counts, f, p)
        if best is None or c < best[0]:
            best = (c, p, f)
    if best is None:
        fits = [p for p in PRECISION_FALLBACK if (1 << p) >= n_used and p > max(precisions)]
        if not fits:
            raise ValueError(f"{n_used} distinct symbols exceed 2^{max(precisions)}")
        return fits[0], quantize_counts(counts, fits[0])
    return best[1], best[2]


HISTOGRAM_CHUNK = 1 << 20  # symbols per bincount call (its int64 widening: 8 MB)


def histogram(v: np.ndarray, lo: int, hi: int, chunk: int = HISTOGRAM_CHUNK) -> np.ndarray:
    """Counts (int64, length hi − lo + 1) of the integer symbols ``v`` clipped to [lo, hi], a
    chunk at a time: bincount widens its input to int64, and a clip or a shift is a copy too,
    so one call on a large tensor's symbols (an embedding: 394 M for a 3B model) would hold
    temporaries of up to twice their size. The encoder's counters over whole tensors use it."""
    v = np.asarray(v).reshape(-1)
    m = hi - lo + 1
    cnt = np.zeros(m, dtype=np.int64)
    for a in range(0, v.size, chunk):
        c = v[a:a + chunk].astype(np.int64)
        if int(c.min()) < lo or int(c.max()) > hi:
            np.clip(c, lo, hi, out=c)
        cnt += np.bincount(c - lo, minlength=m)
    return cnt


# ----------------------------------------------------------------- numba kernels


@nb.njit(cache=True)
def _encode_chunk(sym, start, stop, freq, cum, precision, out_words, offset):
    """Encode sym[start:stop] − offset in reverse; returns (final state, number of words);
    words are written to out_words in the order the decoder reads them."""
    L = np.uint64(RANS_STATE_LOWER)
    x = L
    n = 0
    shift = np.uint64(32 - precision)
    cap = out_words.shape[0]
    for k in range(stop - 1, start - 1, -1):
        s = np.int64(sym[k]) - offset
        f = np.uint64(freq[s])
        x_max = f << shift
        if x >= x_max:
            out_words[cap - 1 - n] = np.uint16(x & np.uint64(0xFFFF))
            n += 1
            x >>= np.uint64(16)
        x = ((x // f) << np.uint64(precision)) + (x % f) + np.uint64(cum[s])
    return x, n


@nb.njit(parallel=True, cache=True)
def _encode_all(sym, chunk_symbols, freq, cum, precision, n_chunks, offset):
    n = sym.shape[0]
    states = np.empty(n_chunks, dtype=np.uint32)
    nwords = np.empty(n_chunks, dtype=np.int64)
    # worst case: one word per symbol
    scratch = np.empty(n, dtype=np.uint16)
    for c in nb.prange(n_chunks):
        a = c * chunk_symbols
        b = min(a + chunk_symbols, n)
        region = scratch[a:b]
        x, w = _encode_chunk(sym, a, b, freq, cum, precision, region, offset)
        states[c] = np.uint32(x)
        nwords[c] = w
    return states, nwords, scratch


_encode_all_serial = serial_twin(_encode_all)


@nb.njit(cache=True)
def _encode_chunk_lanes(sym, start, stop, freq, cum, precision, lanes, out_words, states, offset):
    """Interleaved lanes (spec §6.6): symbol k of the chunk goes to lane k mod lanes, all
    lanes share one word stream. Encodes in reverse; returns the number of words, written
    at the end of out_words in the order the decoder reads them; states[l] the final states."""
    L = np.uint64(RANS_STATE_LOWER)
    shift = np.uint64(32 - precision)
    for l in range(lanes):
        states[l] = L
    n = 0
    cap = out_words.shape[0]
    for k in range(stop - 1, start - 1, -1):
        l = (k - start) % lanes
        x = states[l]
        s = np.int64(sym[k]) - offset
        f = np.uint64(freq[s])
        if x >= f << shift:
            out_words[cap - 1 - n] = np.uint16(x & np.uint64(0xFFFF))
            n += 1
            x >>= np.uint64(16)
        states[l] = ((x // f) << np.uint64(precision)) + (x % f) + np.uint64(cum[s])
    return n


@nb.njit(parallel=True, cache=True)
def _encode_all_lanes(sym, chunk_symbols, freq, cum, precision, n_chunks, lanes, offset):
    n = sym.shape[0]
    states = np.empty((n_chunks, lanes), dtype=np.uint64)
    nwords = np.empty(n_chunks, dtype=np.int64)
    scratch = np.empty(n, dtype=np.uint16)
    for c in nb.prange(n_chunks):
        a = c * chunk_symbols
        b = min(a + chunk_symbols, n)
        nwords[c] = _encode_chunk_lanes(sym, a, b, freq, cum, precision, lanes, scratch[a:b], states[c], offset)
    return states, nwords, scratch


_encode_all_lanes_serial = serial_twin(_encode_all_lanes)


@nb.njit(cache=True)
def _pack(states, nwords, scratch, chunk_symbols, n, lanes):
    """Chunk bytes: each chunk's lane states (uint32 LE), then its words in decode order (one lane: §6.5)."""
    n_chunks = states.shape[0]
    lengths = np.empty(n_chunks, dtype=np.uint32)
    total = 0
    for c in range(n_chunks):
        a = c * chunk_symbols
        w = min(lanes, min(a + chunk_symbols, n) - a)
        lengths[c] = 4 * w + 2 * nwords[c]
        total += lengths[c]
    out = np.empty(total, dtype=np.uint8)
    pos = 0
    for c in range(n_chunks):
        a = c * chunk_symbols
        b = min(a + chunk_symbols, n)
        for l in range(min(lanes, b - a)):
            x = states[c, l]
            for j in range(4):
                out[pos + j] = np.uint8((x >> np.uint64(8 * j)) & np.uint64(0xFF))
            pos += 4
        w = nwords[c]
        for j in range(w):
            v = scratch[b - w + j]
            out[pos] = np.uint8(v & np.uint16(0xFF))
            out[pos + 1] = np.uint8(v >> np.uint16(8))
            pos += 2
    return out, lengths


# ----------------------------------------------------------------- public API


def cumulative(freqs: np.ndarray) -> np.ndarray:
    cum = np.zeros(len(freqs), dtype=np.uint32)
    np.cumsum(freqs[:-1], out=cum[1:])
    return cum


@contextlib.contextmanager
def default_layout(chunk_symbols: int, lanes: int):
    """Temporarily make (chunk_symbols, lanes) the layout of encode() calls that name none
    (the golden-vector generators pin the layout they were written with)."""
    global DEFAULT_LAYOUT, _SMALL_LAYOUT, TAIL_MERGE
    old = DEFAULT_LAYOUT, _SMALL_LAYOUT, TAIL_MERGE
    DEFAULT_LAYOUT = _SMALL_LAYOUT = (int(chunk_symbols), int(lanes))
    TAIL_MERGE = 0  # exactly that layout
    try:
        yield
    finally:
        DEFAULT_LAYOUT, _SMALL_LAYOUT, TAIL_MERGE = old


TAIL_MERGE = 4  # a last chunk shorter than chunk/TAIL_MERGE joins the one before it


def merged_tail_chunk(n: int, chunk_symbols: int) -> int:
    """The chunk size of the default layout for n symbols: ``chunk_symbols``, unless the last chunk
    would hold fewer than chunk_symbols / TAIL_MERGE symbols; then one chunk fewer, each holding
    ⌈n / chunks⌉ (≤ 1.25 × chunk_symbols). A short last chunk costs its own states (32 lanes: 128 B)
    and length for a few symbols: on MiniLM's 147,456-symbol streams 0.003 bpw
    (docs/results/2026-11-30-tcq.md, "Weight-domain tuning")."""
    chunks = -(-n // chunk_symbols)
    if not TAIL_MERGE or chunks < 2 or n - (chunks - 1) * chunk_symbols >= chunk_symbols // TAIL_MERGE:
        return chunk_symbols
    return -(-n // (chunks - 1))


ENCODE_GROUP_SYMBOLS = 1 << 23  # symbols coded per kernel call: the worst-case word scratch is 16 MB


def encode(symbols: np.ndarray, *, alphabet_size: int | None = None, precision: int | None = None, freqs: np.ndarray | None = None,
           chunk_symbols: int | None = None, lanes: int | None = None, offset: int = 0,
           counts: np.ndarray | None = None) -> RansStream:
    """Entropy-code integer symbols into a :class:`RansStream`: ``symbols − offset``, which must
    lie in [0, 2^16). ``offset`` lets a caller code signed symbols (int16, say) without a shifted
    copy of them; the stream holds the shifted values.

    The table is fitted to the symbols' own counts (precision chosen to
    minimise payload + table) unless ``freqs``/``precision`` are given.
    ``counts``: the symbols' counts (of ``symbols − offset``), if the caller has them (trusted).
    ``lanes`` > 1 writes interleaved lanes (coder 3, spec §6.6). Unnamed, both come from
    :data:`DEFAULT_LAYOUT` (streams of fewer than :data:`LANES_MIN_SYMBOLS` symbols: the chunked
    layout of 16384 symbols); a named chunk size alone means the chunked layout, lanes = 1.

    The chunks are coded a group of about :data:`ENCODE_GROUP_SYMBOLS` symbols at a time (each
    chunk is an independent stream, so the same bytes), so the coder's worst-case scratch of one
    word per symbol is bounded, not the size of the tensor (a 3B model's embedding: 0.8 GB)."""
    if chunk_symbols is None:
        chunk_symbols, default_lanes = DEFAULT_LAYOUT if np.size(symbols) >= LANES_MIN_SYMBOLS else _SMALL_LAYOUT
        chunk_symbols = merged_tail_chunk(int(np.size(symbols)), chunk_symbols)
        lanes = default_lanes if lanes is None else lanes
    elif lanes is None:
        lanes = 1
    if not 1 <= lanes <= MAX_LANES:
        raise ValueError(f"lanes must be 1..{MAX_LANES}")
    sym = np.ascontiguousarray(symbols).reshape(-1)
    if sym.dtype.kind not in "iu" and sym.size:
        raise ValueError("rANS symbols must be integers")
    offset = int(offset)
    n = int(sym.size)
    if counts is not None and n and sym.dtype.itemsize <= 2:  # the caller's counts say where the symbols lie (no pass over them)
        used = np.flatnonzero(np.asarray(counts))
        lo, top = (int(used[0]), int(used[-1])) if used.size else (-1, 0)
    else:
        lo, top = (int(sym.min()) - offset, int(sym.max()) - offset) if n else (0, 0)
    if lo < 0 or top >= 1 << 16:
        raise ValueError("rANS symbols must lie in [0, 65536)")
    if sym.dtype.itemsize > 2:  # the kernels take 8- and 16-bit integers as they are (no copy); wider: shifted
        wide, sym = sym, np.empty(n, dtype=np.uint16)  # to uint16 a chunk at a time (no int64 copy of them all)
        for a in range(0, n, HISTOGRAM_CHUNK):
            sym[a:a + HISTOGRAM_CHUNK] = wide[a:a + HISTOGRAM_CHUNK].astype(np.int64) - offset
        del wide
        offset = 0
    if alphabet_size is None:
        alphabet_size = top + 1
    if top >= alphabet_size:
        raise ValueError("symbol outside the alphabet")
    if counts is not None:  # the caller counted them already (lossless.encode's native split)
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (alphabet_size,) or int(counts.sum()) != n:
            raise ValueError("counts must have one entry per symbol of the alphabet and sum to the symbols")
    else:
        counts = histogram(sym, offset, offset + alphabet_size - 1) if n else np.eye(1, alphabet_size, dtype=np.int64)[0]
    if freqs is None:
        if precision is None:
            precision, freqs = choose_table(counts)
        else:
            freqs = quantize_counts(counts, precision)
    freqs = np.asarray(freqs, dtype=np.uint32)
    if precision is None or not 1 <= precision <= MAX_PRECISION or int(freqs.sum()) != 1 << precision:
        raise ValueError("frequencies must sum to 2**precision with precision in 1..16")
    if n and (len(freqs) < alphabet_size or np.any(freqs[:alphabet_size][counts > 0] == 0)):
        raise ValueError("a symbol has zero frequency")
    if n == 0:
        return RansStream(precision, chunk_symbols, 0, freqs, np.zeros(0, np.uint32), b"", lanes)
    cum = cumulative(freqs)
    from aligncodec.codec.entropy import native

    if native.encodes(sym, lanes, precision):  # the C encoder: the same bytes, parallel on the decode pool
        data, lengths = native.encode_chunks(sym, chunk_symbols, freqs, cum, precision, lanes, offset)
        return RansStream(precision, chunk_symbols, n, freqs, lengths, data.tobytes(), lanes)
    per_group = max(1, ENCODE_GROUP_SYMBOLS // chunk_symbols) * chunk_symbols
    payloads, lens = [], []
    for a in range(0, n, per_group):
        part = sym[a:a + per_group]
        m = int(part.size)
        n_chunks = -(-m // chunk_symbols)
        # numba's default (workqueue) threading layer must not be entered by two threads at once (launch)
        if lanes > 1:
            states, nwords, scratch = launch(_encode_all_lanes, _encode_all_lanes_serial, part, chunk_symbols, freqs, cum,
                                             precision, n_chunks, lanes, offset)
        else:
            states, nwords, scratch = launch(_encode_all, _encode_all_serial, part, chunk_symbols, freqs, cum, precision,
                                             n_chunks, offset)
            states = states.astype(np.uint64).reshape(-1, 1)  # one lane per chunk
        payload, lengths = _pack(states, nwords, scratch, chunk_symbols, m, lanes)
        del scratch
        payloads.append(payload)
        lens.append(lengths)
    lengths = lens[0] if len(lens) == 1 else np.concatenate(lens)
    if len(payloads) > 1:  # one array, each group's freed as it is copied: 2x the payload at most
        whole = np.empty(sum(p.size for p in payloads), np.uint8)
        pos = 0
        while payloads:
            p = payloads.pop(0)
            whole[pos:pos + p.size] = p
            pos += p.size
        payloads = [whole]
    data = payloads[0].tobytes()
    return RansStream(precision, chunk_symbols, n, freqs, lengths, data, lanes)


def decode(stream: RansStream, *, out: np.ndarray | None = None) -> np.ndarray:
    """Decode a :class:`RansStream` into uint16 symbols (numba, parallel over chunks;
    the fast decoder of :mod:`aligncodec.codec.entropy.decode_cpu`).

    Raises CorruptStreamError if any chunk fails its final-state / length checks."""
    from aligncodec.codec.entropy.decode_cpu import decode_symbols

    return decode_symbols(stream, out=out)


def coded_bits(symbols: np.ndarray, chunk_symbols: int | None = None) -> int:
    """Exact size in bits of the rANS stream for these symbols as stored in an
    archive (stream header, table, chunk table and payload; spec §5-6)."""
    from aligncodec.formats.streams import serialize_stream

    s = encode(symbols, chunk_symbols=chunk_symbols)
    return 8 * (len(serialize_stream(s)) - len(s.payload)) + 8 * len(s.payload)


def empirical_entropy_bits(symbols: np.ndarray) -> float:
    """n * H(empirical distribution), in bits."""
    sym = np.asarray(symbols).reshape(-1)
    if sym.size == 0:
        return 0.0
    c = np.bincount(sym.astype(np.int64)).astype(np.float64)
    c = c[c > 0]
    p = c / c.sum()
    return float(-(c * np.log2(p)).sum())
