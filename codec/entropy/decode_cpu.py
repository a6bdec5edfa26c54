"""Fast CPU decoder of chunked rANS streams (spec/FORMAT.md §6), in numba.

Same bitstream as :mod:`aligncodec.codec.entropy.rans` and the reference decoder
:mod:`aligncodec.codec.entropy.rans_reference`; the tests hold all three bit-exact.
What makes it fast, without changing the format:

* **two independent table loads per symbol** (:func:`compact_tables`): a ``uint32``
  slot table ``freq | (slot - cum) << 16`` and the slot's ``uint16`` symbol, so the
  state update ``x = freq * (x >> P) + (slot - cum)`` needs one load and a P = 16
  table takes 6 bytes a slot (384 KB) instead of :func:`slot_table`'s packed 8
  (512 KB; still the CUDA decoder's layout);
* **four chunks interleaved per thread**: chunks are independent streams, so one
  thread steps four of them in lock step; their dependency chains overlap and
  the core is no longer bound by the latency of a single state;
* **branchless renormalisation**: the next word is always loaded (its index
  clamped inside the payload) and selected, so no mispredicted branches; a
  corrupt chunk is still caught by the final checks (state == L, every word
  consumed, none read past the chunk's end);
* **parallel over chunk ranges** on a pool of plain threads running ``nogil`` kernels
  (:mod:`aligncodec.codec.parallel`; ``threads=``), not numba's OpenMP team: a task
  is picked up by whichever worker is free, so a descheduled thread on a busy
  machine delays only its own range, and chunks of different tensors overlap in the
  loader (:func:`plan_decode` is the plan form);
* **fused float-split reconstruction**: each task, right after decoding its
  chunks, joins their symbols with the bit-packed rest of the float while they
  are still in cache, writing the final bit patterns into the output array.

Reconstruction of other (lossy) modes is a separate step after
:func:`decode_symbols` (the coding modes' registry, :mod:`aligncodec.codec.modes`;
the lossy one in :mod:`aligncodec.codec.modes.lossy_cpu`).
"""

from __future__ import annotations

import contextlib
import sys

import numba as nb
import numpy as np

from aligncodec.formats.constants import FLOAT_FORMATS, RANS_STATE_LOWER
from aligncodec.formats.streams import RansStream, lane_counts
from aligncodec.formats.errors import CorruptStreamError, StreamError

# chunks decoded together by one thread
GROUP = 4

_U64 = np.uint64
_U32 = np.uint32
_L = _U64(RANS_STATE_LOWER)

UINT_OF_WIDTH = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}  # unsigned numpy dtype of a bit width

ERROR_TEXT = {
    1: "initial state below L",
    2: "chunk ran out of words",
    3: "final state is not L",
    4: "words left over in chunk",
}


# ----------------------------------------------------------------- tables


def _checked_freqs(freqs: np.ndarray, precision: int) -> np.ndarray:
    """The frequencies as int64, checked: at most 2^16 symbols, none negative, summing to 2^precision."""
    f = np.ascontiguousarray(freqs, dtype=np.int64)
    if len(f) > 1 << 16:
        raise StreamError("rANS alphabet larger than 2^16")
    if f.size and f.min() < 0:
        raise StreamError("negative rANS frequency")
    if int(f.sum()) != 1 << precision:
        raise StreamError(f"frequencies sum to {int(f.sum())}, not 2^{precision}")
    return f


def slot_table(freqs: np.ndarray, precision: int) -> np.ndarray:
    """Packed decode table of 2**precision uint64 entries:
    ``freq[s] | (slot - cum[s]) << 32 | s << 48`` for the symbol s owning the slot."""
    f = _checked_freqs(freqs, precision)
    tab = np.empty(1 << precision, dtype=np.uint64)
    _fill_table(f, tab)
    return tab


def compact_tables(freqs: np.ndarray, precision: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The CPU decoder's tables: ``(tab, sym, precision')`` with ``tab[slot] = freq | (slot - cum) << 16``
    (uint32) and ``sym[slot]`` (uint16), 6 bytes a slot instead of :func:`slot_table`'s 8, so more
    of a P = 16 table stays in cache. (A uint8 ``sym`` for alphabets up to 256 decoded about 5 %
    faster, but doubled the kernels' type specialisations: a load could then meet one not yet in
    numba's cache and compile it.) A symbol that owns every slot (freq = 2^P, which needs 17 bits) decodes as the
    identity x -> x at any precision, so it gets the one-slot table of precision 0 (freq 1, bias 0),
    whose update ``1 · (x >> 0) + 0`` is the same identity. Frequencies are checked as in
    :func:`slot_table`."""
    f = _checked_freqs(freqs, precision)
    symt = np.empty(1 << precision, dtype=np.uint16)
    full = np.flatnonzero(f == 1 << precision)
    if len(full) and precision > 0:
        precision = 0
        f = np.zeros(len(f), dtype=np.int64)
        f[full[0]] = 1
        symt = symt[:1]
    tab = np.empty(1 << precision, dtype=np.uint32)
    _fill_compact(f, tab, symt)
    return tab, symt, precision


@nb.njit(nogil=True, cache=True)
def _fill_compact(freqs, tab, symt):
    pos = 0
    for s in range(freqs.shape[0]):
        f = freqs[s]
        for j in range(f):
            tab[pos + j] = _U32(f) | (_U32(j) << _U32(16))
            symt[pos + j] = s
        pos += f


@nb.njit(nogil=True, cache=True)
def _fill_table(freqs, tab):
    pos = 0
    for s in range(freqs.shape[0]):
        f = freqs[s]
        base = _U64(f) | (_U64(s) << _U64(48))
        for j in range(f):
            tab[pos + j] = base | (_U64(j) << _U64(32))
        pos += f


# ----------------------------------------------------------------- kernels


@nb.njit(nogil=True, cache=True, inline="always")
def _state(words, w):
    return _U64(words[w]) | (_U64(words[w + 1]) << _U64(16))


@nb.njit(nogil=True, cache=True, inline="always")
def _finish(x, p, wend):
    if p > wend:
        return 2
    if x != _L:
        return 3
    if p != wend:
        return 4
    return 0


@nb.njit(nogil=True, cache=True, inline="always")
def _tail(words, lastu, tab, symt, P, mask, x, p, out, o, k0, k1):
    """One chain continued alone from symbol k0 to k1 (the steps of :func:`_decode_one`)."""
    M16 = _U64(0xFFFF)
    S16 = _U64(16)
    for k in range(k0, k1):
        i = x & mask
        e = _U64(tab[i])
        out[o + _U64(k)] = symt[i]
        x = (e & M16) * (x >> P) + (e >> S16)
        y = (x << S16) | _U64(words[min(p, lastu)])
        c = x < _L
        x = y if c else x
        p += _U64(1) if c else _U64(0)
    return x, p


@nb.njit(nogil=True, cache=True)
def _decode_one(words, last, tab, symt, precision, w0, wend, m, out, o):
    """Decode m symbols of the chunk occupying words[w0:wend] into out[o:o+m]. Returns an error code (0 = ok)."""
    P = _U64(precision)
    mask = _U64((1 << precision) - 1)
    lastu = _U64(last)
    x = _state(words, w0)
    if x < _L:
        return 1
    x, p = _tail(words, lastu, tab, symt, P, mask, x, _U64(w0 + 2), out, _U64(o), 0, m)
    return _finish(x, p, _U64(wend))


@nb.njit(nogil=True, cache=True)
def _decode_four(words, last, tab, symt, precision, wa, wb, wc, wd, ea, eb, ec, ed, ma, mb, mc, md, out, oa, ob, oc, od,
                 status, ca, cb, cc, cd):
    """Four chunks (ma..md symbols; ca..cd their indices in ``status``) stepped in lock step
    (independent dependency chains) up to the shortest, then each chain alone: the groups of four
    full chunks, and the two or three left at the end of a range (the stream's short last chunk
    among them), a chunk then given twice (decoded twice, to the same symbols and status).
    Every chain runs exactly :func:`_decode_one`'s steps, so symbols and verdicts are the same."""
    P = _U64(precision)
    mask = _U64((1 << precision) - 1)
    M16 = _U64(0xFFFF)
    S16 = _U64(16)
    lastu = _U64(last)
    xa = _state(words, wa)
    xb = _state(words, wb)
    xc = _state(words, wc)
    xd = _state(words, wd)
    if xa < _L or xb < _L or xc < _L or xd < _L:
        status[ca] = _decode_one(words, last, tab, symt, precision, wa, ea, ma, out, oa)
        status[cb] = _decode_one(words, last, tab, symt, precision, wb, eb, mb, out, ob)
        status[cc] = _decode_one(words, last, tab, symt, precision, wc, ec, mc, out, oc)
        status[cd] = _decode_one(words, last, tab, symt, precision, wd, ed, md, out, od)
        return
    pa = _U64(wa + 2)
    pb = _U64(wb + 2)
    pc = _U64(wc + 2)
    pd = _U64(wd + 2)
    oau = _U64(oa)
    obu = _U64(ob)
    ocu = _U64(oc)
    odu = _U64(od)
    mmin = min(ma, mb, mc, md)
    for k in range(mmin):
        ku = _U64(k)
        ia = xa & mask
        ib = xb & mask
        ic = xc & mask
        id_ = xd & mask
        e_a = _U64(tab[ia])
        e_b = _U64(tab[ib])
        e_c = _U64(tab[ic])
        e_d = _U64(tab[id_])
        out[oau + ku] = symt[ia]
        out[obu + ku] = symt[ib]
        out[ocu + ku] = symt[ic]
        out[odu + ku] = symt[id_]
        xa = (e_a & M16) * (xa >> P) + (e_a >> S16)
        xb = (e_b & M16) * (xb >> P) + (e_b >> S16)
        xc = (e_c & M16) * (xc >> P) + (e_c >> S16)
        xd = (e_d & M16) * (xd >> P) + (e_d >> S16)
        ya = (xa << S16) | _U64(words[min(pa, lastu)])
        yb = (xb << S16) | _U64(words[min(pb, lastu)])
        yc = (xc << S16) | _U64(words[min(pc, lastu)])
        yd = (xd << S16) | _U64(words[min(pd, lastu)])
        c_a = xa < _L
        c_b = xb < _L
        c_c = xc < _L
        c_d = xd < _L
        xa = ya if c_a else xa
        xb = yb if c_b else xb
        xc = yc if c_c else xc
        xd = yd if c_d else xd
        pa += _U64(1) if c_a else _U64(0)
        pb += _U64(1) if c_b else _U64(0)
        pc += _U64(1) if c_c else _U64(0)
        pd += _U64(1) if c_d else _U64(0)
    xa, pa = _tail(words, lastu, tab, symt, P, mask, xa, pa, out, oau, mmin, ma)
    xb, pb = _tail(words, lastu, tab, symt, P, mask, xb, pb, out, obu, mmin, mb)
    xc, pc = _tail(words, lastu, tab, symt, P, mask, xc, pc, out, ocu, mmin, mc)
    xd, pd = _tail(words, lastu, tab, symt, P, mask, xd, pd, out, odu, mmin, md)
    status[ca] = _finish(xa, pa, _U64(ea))
    status[cb] = _finish(xb, pb, _U64(eb))
    status[cc] = _finish(xc, pc, _U64(ec))
    status[cd] = _finish(xd, pd, _U64(ed))


@nb.njit(nogil=True, cache=True)
def _join_range(out, a, b, rest, rw, low, width):
    """out[i] (a symbol) := the float bit pattern of symbol out[i] and rest i (rw bits at bit i*rw of rest).

    Rests of up to 25 bits (every float-split layout but F64's) are read as one unaligned
    little-endian 32-bit window per element (branch-free, vectorizable; indices unsigned so
    that numba adds no wraparound); the last few elements, whose window would pass the end
    of ``rest``, and wider rests go through the bit accumulator."""
    if rw <= 25 and width <= 32:
        nbytes = rest.shape[0]
        fast_end = a
        if nbytes >= 4:
            fast_end = min(b, max(a, ((nbytes - 3) * 8 - 1) // rw + 1))
        rmask32 = _U32((1 << rw) - 1)
        lmask32 = _U32((1 << low) - 1)
        low32 = _U32(low)
        top32 = _U32(width - 1)
        for i in range(a, fast_end):
            bit = _U64(i) * _U64(rw)
            pos = bit >> _U64(3)
            w = (_U32(rest[pos]) | (_U32(rest[pos + _U64(1)]) << _U32(8)) | (_U32(rest[pos + _U64(2)]) << _U32(16))
                 | (_U32(rest[pos + _U64(3)]) << _U32(24)))
            r = (w >> _U32(bit & _U64(7))) & rmask32
            sy = _U32(out[_U64(i)])
            out[_U64(i)] = ((r >> low32) << top32) | (sy << low32) | (r & lmask32)
        a = fast_end
    bit = a * rw
    pos = bit >> 3
    sh = bit & 7
    acc = _U64(0)
    nacc = 0
    if b > a:
        acc = _U64(rest[pos]) >> _U64(sh)
        nacc = 8 - sh
        pos += 1
    rmask = _U64((1 << rw) - 1)
    lmask = _U64((1 << low) - 1)
    RW = _U64(rw)
    LOW = _U64(low)
    TOP = _U64(width - 1)
    for i in range(a, b):
        while nacc < rw:
            acc |= _U64(rest[pos]) << _U64(nacc)
            nacc += 8
            pos += 1
        r = acc & rmask
        acc >>= RW
        nacc -= rw
        s = _U64(out[i])
        out[i] = ((r >> LOW) << TOP) | (s << LOW) | (r & lmask)


@nb.njit(nogil=True, cache=True)
def _decode_range(words, chunk_w, cs, n, tab, symt, precision, out, rest, rw, low, width, join, c0, c1, status):
    """Chunks [c0, c1) of one stream (chunk_w[c]: the word where chunk c starts, chunk_w[-1] the end):
    full chunks four at a time, two or three left (the stream's short last chunk among them) in
    lock step too (:func:`_decode_four`), a single one alone; with ``join`` each group's symbols are
    joined with their float-split rest right after decoding, while still in cache."""
    last = words.shape[0] - 1
    c = c0
    while c + 4 <= c1 and (c + 4) * cs <= n:
        a = c * cs
        _decode_four(
            words, last, tab, symt, precision,
            chunk_w[c], chunk_w[c + 1], chunk_w[c + 2], chunk_w[c + 3],
            chunk_w[c + 1], chunk_w[c + 2], chunk_w[c + 3], chunk_w[c + 4],
            cs, cs, cs, cs, out, a, a + cs, a + 2 * cs, a + 3 * cs, status, c, c + 1, c + 2, c + 3,
        )
        if join:
            _join_range(out, a, a + 4 * cs, rest, rw, low, width)
        c += 4
    if c1 - c >= 2:  # two or three chunks left (the last maybe short): in lock step, the last repeated
        k0 = c
        k1 = min(c + 1, c1 - 1)
        k2 = min(c + 2, c1 - 1)
        k3 = min(c + 3, c1 - 1)
        _decode_four(
            words, last, tab, symt, precision,
            chunk_w[k0], chunk_w[k1], chunk_w[k2], chunk_w[k3],
            chunk_w[k0 + 1], chunk_w[k1 + 1], chunk_w[k2 + 1], chunk_w[k3 + 1],
            min(cs, n - k0 * cs), min(cs, n - k1 * cs), min(cs, n - k2 * cs), min(cs, n - k3 * cs),
            out, k0 * cs, k1 * cs, k2 * cs, k3 * cs, status, k0, k1, k2, k3,
        )
        if join:
            _join_range(out, c * cs, min(c1 * cs, n), rest, rw, low, width)
        c = c1
    while c < c1:
        a = c * cs
        b = min(a + cs, n)
        status[c] = _decode_one(words, last, tab, symt, precision, chunk_w[c], chunk_w[c + 1], b - a, out, a)
        if join:
            _join_range(out, a, b, rest, rw, low, width)
        c += 1


# symbols per task: at least this many (a task is then ~0.3 ms or more), and about TASKS_PER_THREAD
# tasks per worker so that a worker slowed down by other processes delays only a small share
MIN_TASK_SYMBOLS = 1 << 17
TASKS_PER_THREAD = 4


# The interleaved-lanes kernels, like the chunked ones above, use the compact tables
# (:func:`compact_tables`) and unsigned indices throughout (numba adds a negative-index
# wraparound to every signed subscript); the arithmetic is spec §6's, so the symbols are the
# reference decoder's.


@nb.njit(nogil=True, cache=True)
def _decode_lanes_one(words, last, tab, symt, precision, w0, wend, m, lanes, out, o, xs):
    """One chunk of interleaved lanes (spec §6.6) in words[w0:wend] -> out[o:o+m]; xs: lanes-long scratch.
    Consecutive symbols belong to different lanes, so their dependency chains overlap."""
    P = _U64(precision)
    mask = _U64((1 << precision) - 1)
    M16 = _U64(0xFFFF)
    S16 = _U64(16)
    lastu = _U64(last)
    w = min(lanes, m)
    for j in range(w):
        xs[j] = _state(words, w0 + 2 * j)
        if xs[j] < _L:
            return 1
    p = _U64(w0 + 2 * w)
    ou = _U64(o)
    t = 0
    while t < m:
        cnt = min(lanes, m - t)
        tu = _U64(t)
        for j in range(cnt):
            ju = _U64(j)
            x = xs[ju]
            i = x & mask
            e = _U64(tab[i])
            out[ou + tu + ju] = symt[i]
            x = (e & M16) * (x >> P) + (e >> S16)
            y = (x << S16) | _U64(words[min(p, lastu)])
            c = x < _L
            xs[ju] = y if c else x
            p += _U64(1) if c else _U64(0)
        t += cnt
    return _finish_lanes(xs, w, p, wend)


@nb.njit(nogil=True, cache=True, inline="always")
def _finish_lanes(xs, w, p, wend):
    if p > _U64(wend):
        return 2
    for j in range(w):
        if xs[j] != _L:
            return 3
    if p != _U64(wend):
        return 4
    return 0


@nb.njit(nogil=True, cache=True)
def _decode_lanes_two(words, last, tab, symt, precision, wa, wb, ea, eb, m, lanes, out, oa, ob, xa, xb, status, c0):
    """Two full chunks of interleaved lanes in lock step: within a chunk the lanes share one
    word pointer, so a second chunk's independent pointer doubles the work in flight."""
    P = _U64(precision)
    mask = _U64((1 << precision) - 1)
    M16 = _U64(0xFFFF)
    S16 = _U64(16)
    lastu = _U64(last)
    w = min(lanes, m)
    bad = False
    for j in range(w):
        xa[j] = _state(words, wa + 2 * j)
        xb[j] = _state(words, wb + 2 * j)
        bad = bad or xa[j] < _L or xb[j] < _L
    if bad:  # let the single-chunk path name the culprit
        status[c0] = _decode_lanes_one(words, last, tab, symt, precision, wa, ea, m, lanes, out, oa, xa)
        status[c0 + 1] = _decode_lanes_one(words, last, tab, symt, precision, wb, eb, m, lanes, out, ob, xb)
        return
    pa = _U64(wa + 2 * w)
    pb = _U64(wb + 2 * w)
    oau = _U64(oa)
    obu = _U64(ob)
    t = 0
    while t < m:
        cnt = min(lanes, m - t)
        tu = _U64(t)
        for j in range(cnt):
            ju = _U64(j)
            x = xa[ju]
            y = xb[ju]
            ix = x & mask
            iy = y & mask
            e = _U64(tab[ix])
            f = _U64(tab[iy])
            out[oau + tu + ju] = symt[ix]
            out[obu + tu + ju] = symt[iy]
            x = (e & M16) * (x >> P) + (e >> S16)
            y = (f & M16) * (y >> P) + (f >> S16)
            x2 = (x << S16) | _U64(words[min(pa, lastu)])
            y2 = (y << S16) | _U64(words[min(pb, lastu)])
            ca = x < _L
            cb = y < _L
            xa[ju] = x2 if ca else x
            xb[ju] = y2 if cb else y
            pa += _U64(1) if ca else _U64(0)
            pb += _U64(1) if cb else _U64(0)
        t += cnt
    status[c0] = _finish_lanes(xa, w, pa, ea)
    status[c0 + 1] = _finish_lanes(xb, w, pb, eb)


@nb.njit(nogil=True, cache=True)
def _decode_lanes_range(words, chunk_w, cs, n, tab, symt, precision, lanes, out, rest, rw, low, width, join, c0, c1, status):
    """Chunks [c0, c1) of an interleaved-lanes stream: full chunks two at a time, the rest one by one
    (joined with their float-split rest right after decoding, as :func:`_decode_range`)."""
    last = words.shape[0] - 1
    xa = np.empty(lanes, dtype=np.uint64)
    xb = np.empty(lanes, dtype=np.uint64)
    c = c0
    while c + 2 <= c1 and (c + 2) * cs <= n:
        a = c * cs
        _decode_lanes_two(words, last, tab, symt, precision, chunk_w[c], chunk_w[c + 1], chunk_w[c + 1], chunk_w[c + 2],
                          cs, lanes, out, a, a + cs, xa, xb, status, c)
        if join:
            _join_range(out, a, a + 2 * cs, rest, rw, low, width)
        c += 2
    while c < c1:
        a = c * cs
        b = min(a + cs, n)
        status[c] = _decode_lanes_one(words, last, tab, symt, precision, chunk_w[c], chunk_w[c + 1], b - a, lanes, out, a, xa)
        if join:
            _join_range(out, a, b, rest, rw, low, width)
        c += 1


# ----------------------------------------------------------------- public API


@contextlib.contextmanager
def num_threads(threads: int | None):
    """Decode with ``threads`` worker threads inside this block, in this thread (None: leave as is)."""
    from aligncodec.codec import parallel

    with parallel.threads_override(threads):
        yield


def _words(stream: RansStream) -> tuple[np.ndarray, np.ndarray]:
    payload = stream.payload
    if len(payload) % 2:
        raise StreamError("rANS payload has an odd number of bytes")
    lengths = np.asarray(stream.chunk_lengths, dtype=np.int64)
    if len(lengths) != -(-stream.n_symbols // stream.chunk_symbols):
        raise StreamError(f"rANS stream has {len(lengths)} chunks, {-(-stream.n_symbols // stream.chunk_symbols)} expected")
    if len(lengths) and (lengths.min() < 4 or np.any(lengths % 2)):
        raise StreamError("rANS chunk length below 4 or odd")
    if int(lengths.sum()) != len(payload):
        raise StreamError("rANS chunk lengths do not add up to the payload")
    lanes = getattr(stream, "lanes", 1)
    if lanes > 1 and len(lengths) and np.any(lengths < 4 * lane_counts(stream.n_symbols, stream.chunk_symbols, lanes)):
        raise StreamError("rANS chunk shorter than its lanes' states")
    words = np.frombuffer(payload, dtype="<u2")
    if sys.byteorder != "little":  # numba wants native byte order
        words = words.astype(np.uint16)
    chunk_w = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths // 2, out=chunk_w[1:])
    return words, chunk_w


def _raise_status(status: np.ndarray) -> None:
    bad = np.flatnonzero(status)
    if len(bad):
        c = int(bad[0])
        code = int(status[c])
        raise CorruptStreamError(f"rANS chunk {c} failed its integrity check: {ERROR_TEXT.get(code, code)} (code {code})")


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: the kernels then see one array type whatever the caller passed (one
    compiled and cached specialisation instead of two to load at first use)."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


_EMPTY_U8 = _readonly(np.zeros(1, dtype=np.uint8))


def _check_out(out, n: int, dtype=None) -> np.ndarray:
    if dtype is not None:
        if out is None:
            return np.empty(n, dtype=dtype)
        if out.shape != (n,) or out.dtype != dtype:
            raise ValueError(f"out must be a 1-d {np.dtype(dtype).name} array of {n} elements")
        return out
    if out is None:
        return np.empty(n, dtype=np.uint16)
    if out.shape != (n,) or out.dtype.kind != "u":
        raise ValueError(f"out must be a 1-d unsigned array of {n} elements")
    return out


def plan_decode(stream: RansStream, out: np.ndarray, *, threads: int | None = None, rest: np.ndarray | None = None,
                rw: int = 1, low: int = 0, width: int = 16):
    """Plan (see :mod:`aligncodec.codec.parallel`) decoding ``stream`` into ``out`` (checked by the
    caller), joined with a float-split ``rest`` when given; returns ``out``. The stream's table and
    chunk layout are checked when the plan starts; a corrupt chunk raises CorruptStreamError."""
    from aligncodec.codec import parallel

    n = stream.n_symbols
    if n == 0:
        return out
    words, chunk_w = _words(stream)
    words = _readonly(words)
    lanes = stream.lanes
    tab, symt, precision = compact_tables(stream.freqs, stream.precision)
    tab, symt = _readonly(tab), _readonly(symt)
    n_chunks = len(chunk_w) - 1
    status = np.zeros(n_chunks, dtype=np.int32)
    join = rest is not None
    rest_arr = _readonly(rest) if join else _EMPTY_U8
    parts = parallel.resolve_threads(threads) * TASKS_PER_THREAD
    cs = stream.chunk_symbols

    from aligncodec.codec.entropy import native

    if native.decodes(lanes, out, join, rw, width):  # the C kernels (AVX2 for 32 lanes): the same symbols
        tab32, sym32 = native.decode_tables(tab, symt)
        rest_c = np.ascontiguousarray(rest_arr)
        words_c = np.ascontiguousarray(words)

        def task(c0, c1):
            native.decode_range(words_c, chunk_w, cs, n, tab32, sym32, precision, lanes, out, join, rest_c, rw, low, width, c0,
                                c1, status)
    else:
        task = None

    def numba_task(c0, c1):
        if lanes > 1:
            _decode_lanes_range(words, chunk_w, cs, n, tab, symt, precision, lanes, out, rest_arr, rw, low, width, join, c0, c1,
                                status)
        else:
            _decode_range(words, chunk_w, cs, n, tab, symt, precision, out, rest_arr, rw, low, width, join, c0, c1, status)

    minimum = max(1, -(-MIN_TASK_SYMBOLS // cs))
    yield parallel.stage(task or numba_task, parallel.split_ranges(n_chunks, parts, multiple=GROUP, minimum=minimum))
    _raise_status(status)
    return out


def decode_symbols(stream: RansStream, *, out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """Decode a rANS stream into ``out`` (default a new uint16 array; any unsigned
    integer array of ``n_symbols`` elements works). Raises CorruptStreamError if any
    chunk fails its integrity checks."""
    from aligncodec.codec import parallel

    out = _check_out(out, stream.n_symbols)
    return parallel.run(plan_decode(stream, out, threads=threads), threads)


def float_split_layout(stream: RansStream, rest: bytes | np.ndarray, dtype: str, k: int) -> tuple[int, int, int, np.ndarray]:
    """Check a float-split tensor's parameters and rest stream before decoding.
    Returns (width W, rest bits W-E-k, low mantissa bits W-1-E-k, rest as uint8 array)."""
    if dtype not in FLOAT_FORMATS:
        raise StreamError(f"float-split needs a float dtype, not {dtype}")
    width, e = FLOAT_FORMATS[dtype]
    if not 0 <= k <= width - 1 - e or e + k > 16:
        raise StreamError(f"float-split: {k} mantissa bits impossible for {dtype}")
    n = stream.n_symbols
    rw = width - e - k
    raw = np.frombuffer(rest, dtype=np.uint8) if not isinstance(rest, np.ndarray) else rest.reshape(-1).view(np.uint8)
    need = (n * rw + 7) // 8
    if raw.size != need:
        raise StreamError(f"float-split rest stream has {raw.size} bytes, {need} expected")
    if n * rw % 8 and raw[-1] >> (n * rw % 8):
        raise CorruptStreamError("non-zero padding bits in a packed stream")
    if stream.alphabet_size > 1 << (e + k):
        raise StreamError(f"float-split symbols: alphabet {stream.alphabet_size} exceeds 2^{e + k}")
    return width, rw, rw - 1, raw


def plan_float_split(stream: RansStream, rest: bytes | np.ndarray, dtype: str, k: int, out: np.ndarray | None = None,
                     *, threads: int | None = None):
    """Plan form of :func:`decode_float_split` (parameters checked now, decoding when run)."""
    width, rw, low, raw = float_split_layout(stream, rest, dtype, k)
    out = _check_out(out, stream.n_symbols, UINT_OF_WIDTH[width])
    return plan_decode(stream, out, threads=threads, rest=raw, rw=rw, low=low, width=width)


def decode_float_split(stream: RansStream, rest: bytes | np.ndarray, dtype: str, k: int, *, out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """Decode a float-split tensor (spec §7.2) straight into its bit patterns.

    ``stream`` holds the E+k-bit symbols (exponent and top k mantissa bits),
    ``rest`` the bit-packed sign and low mantissa bits (W-E-k bits each, LSB first).
    Returns a uint{W} array of ``stream.n_symbols`` elements (``out`` if given)."""
    from aligncodec.codec import parallel

    return parallel.run(plan_float_split(stream, rest, dtype, k, out, threads=threads), threads)
