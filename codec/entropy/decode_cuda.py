"""GPU decoding of chunked rANS streams through numba.cuda, reconstruction on the device.

Same bitstream and the same packed slot table as :mod:`aligncodec.codec.entropy.decode_cpu`
(``freq | (slot - cum) << 32 | symbol << 48``), so all decoders agree bit for bit.

Host side: a handful of driver calls per tensor. Everything small a tensor needs on the
device (every stream's words, chunk tables and slot tables, the per-stream records, a mode's
own tables) is packed by :class:`Staging` into one host buffer and sent with ONE
host-to-device copy into a reusable device buffer of a per-thread :class:`Pool` (pinned
host memory, typed views of the whole device buffer made once per growth, so no
device-array slicing per call). Kernels take those base views plus integer offsets.
Scratch (symbols, row buffers, the status array) comes from the same pool; all streams
of a tensor decode in ONE launch (:func:`launch_symbols`); the status of every chunk comes
back with ONE copy (:func:`check_status`), which raises the CPU decoder's error for the
first corrupt chunk in stream order (the CPU's order too: every stream's layout is checked
before any is decoded, then the first failing stream reports its first failing chunk).

* :func:`rans_multi_kernel` - block b decodes chunks of one stream (a block table says
  which): one thread per chunk for chunked streams (coder 2; each thread holds its next
  word, loaded one renormalisation ahead), one warp per chunk for interleaved lanes (coder 3). The slot table is staged in shared memory when it fits
  (precision <= 12, 32 KiB), else read from global memory. A corrupt chunk is reported in
  ``status`` exactly as on the CPU (1 state < L, 2 ran out of words, 3 final state != L,
  4 words left over).
* Interleaved lanes (:func:`_lanes_chunk`): the warp keeps a window of the chunk's words in
  a ring of four registers (lane i holds words base+i, base+32+i, and two more 32-word blocks
  in flight); a renormalising lane takes its word from the window with ``shfl_sync`` at index
  ``p - base + rank`` (< 64), so no lane waits on a dependent global load; when the warp has
  consumed 32 words the ring advances and the consumed register loads the block 128 words on
  (the ring, not a shift of registers: copying a register whose load is in flight would wait
  for it).
  Reads are clamped to the stream's last word, as before (they never change a verdict:
  a read past the chunk always ends in code 2).
* :func:`join_kernel` - float-split reconstruction, one thread per element: the
  symbol (exponent and top mantissa bits) joined with its bit-packed rest.
* :func:`decode_float_split_tensor` - a float-split entry to a torch tensor in GPU
  memory (numba <-> torch through ``__cuda_array_interface__``, no host round trip
  for the decoded data); :func:`symbols_to_torch` gives any mode's symbols as a
  device tensor.

Without a GPU the kernels run under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba.cuda is first imported), which is
how CI checks them (tests/test_codec_entropy_decode_cuda.py).
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
from numba import cuda

from aligncodec.formats.constants import FLOAT_FORMATS, RANS_STATE_LOWER
from aligncodec.formats.layout import TensorEntry
from aligncodec.formats.streams import RansStream

from aligncodec.codec.entropy import cuda_compat  # noqa: F401  (the simulator's warp vote and shuffle)
from aligncodec.codec.entropy import decode_cpu

log = logging.getLogger(__name__)

SHARED_MAX_PRECISION = 12  # 2^12 uint64 slots = 32 KiB of shared memory per block
SHARED_SLOTS = 1 << SHARED_MAX_PRECISION
THREADS_PER_BLOCK = 128  # chunked streams: one thread per chunk
WARPS_PER_BLOCK = 4  # interleaved lanes: one warp per chunk
JOIN_THREADS_PER_BLOCK = 256
REC = 10  # int64 fields of a stream record (see plan_symbols)

_L = np.uint64(RANS_STATE_LOWER)
_FULL = np.uint32(0xFFFFFFFF)
_M32 = np.uint64(0xFFFFFFFF)
_M16 = np.uint64(0xFFFF)
_S16 = np.uint64(16)
_S32 = np.uint64(32)
_S48 = np.uint64(48)


# ----------------------------------------------------------------- kernels


@cuda.jit(device=True, inline=True)
def _imin(a, b):
    """min of two integers (the builtin min does not compile for the CUDA target of numba 0.68)."""
    return a if a < b else b


@cuda.jit(device=True)
def _decode_chunk(words, last, tab, toff, precision, w0, wend, m, out, o):
    """One chunk of a chunked stream (one rANS state) by one thread."""
    P = np.uint64(precision)
    mask = np.uint64((1 << precision) - 1)
    x = np.uint64(words[w0]) | (np.uint64(words[w0 + 1]) << _S16)
    if x < _L:
        return 1
    p = w0 + 2
    nxt = np.uint64(words[_imin(p, last)])  # always words[min(p, last)]: loaded a renormalisation ahead
    for k in range(m):
        e = tab[toff + np.int64(x & mask)]
        out[o + k] = e >> _S48
        x = np.uint64(np.uint32(e & _M32)) * np.uint64(np.uint32(x >> P)) + ((e >> _S32) & _M16)  # 32x32 -> 64: x < 2^32 (spec §6)
        if x < _L:
            x = (x << _S16) | nxt
            p += 1
            nxt = np.uint64(words[_imin(p, last)])
    if p > wend:
        return 2
    if x != _L:
        return 3
    if p != wend:
        return 4
    return 0


@cuda.jit(device=True)
def _lanes_chunk(words, last, tab, toff, precision, lanes, w0, wend, m, out, o, lane):
    """One chunk of interleaved lanes (spec §6.6) decoded by one warp: thread ``lane`` runs
    rANS lane ``lane`` (lanes <= 32). After each step of ``lanes`` symbols the lanes that
    renormalise take the next words of the shared stream in lane order: a warp vote and a
    popcount give each its rank, and the word comes from the warp's register window by a
    shuffle (module doc). Every thread of the warp makes the same votes; the status code
    (same values as the CPU decoder) is the same on all of them."""
    P = np.uint64(precision)
    mask = np.uint64((1 << precision) - 1)
    w = _imin(lanes, m)
    active = lane < w
    x = _L
    if active:
        x = np.uint64(words[w0 + 2 * lane]) | (np.uint64(words[w0 + 2 * lane + 1]) << _S16)
    if cuda.ballot_sync(_FULL, active and x < _L) != 0:
        return 1
    below = np.uint32((1 << lane) - 1)
    p = w0 + 2 * w
    base = p
    b0 = np.int32(words[_imin(base + lane, last)])
    b1 = np.int32(words[_imin(base + 32 + lane, last)])
    b2 = np.int32(words[_imin(base + 64 + lane, last)])
    b3 = np.int32(words[_imin(base + 96 + lane, last)])
    j = 0
    steps = (m + lanes - 1) // lanes
    for r in range(steps):
        t = r * lanes + lane
        need = False
        if lane < lanes and t < m:
            e = tab[toff + np.int64(x & mask)]
            out[o + t] = e >> _S48
            x = np.uint64(np.uint32(e & _M32)) * np.uint64(np.uint32(x >> P)) + ((e >> _S32) & _M16)  # 32x32 -> 64: x < 2^32 (spec §6)
            need = x < _L
        b = cuda.ballot_sync(_FULL, need)
        k = p - base + cuda.popc(b & below)  # < 64: p - base < 32 and the rank < 32
        src = np.int32(k & 31)
        # a ring of four registers: b_j holds words base.., b_(j+1 mod 4) the next 32; the two
        # others are loads in flight, read by no instruction (a copy would wait for them) until
        # the window reaches them
        if j == 0:
            v0 = cuda.shfl_sync(_FULL, b0, src)
            v1 = cuda.shfl_sync(_FULL, b1, src)
        elif j == 1:
            v0 = cuda.shfl_sync(_FULL, b1, src)
            v1 = cuda.shfl_sync(_FULL, b2, src)
        elif j == 2:
            v0 = cuda.shfl_sync(_FULL, b2, src)
            v1 = cuda.shfl_sync(_FULL, b3, src)
        else:
            v0 = cuda.shfl_sync(_FULL, b3, src)
            v1 = cuda.shfl_sync(_FULL, b0, src)
        if need:
            v = v0 if k < 32 else v1
            x = (x << _S16) | np.uint64(v)
        p += cuda.popc(b)
        if p - base >= 32:  # block base.. consumed: its register loads the block 128 words on
            q = _imin(base + 128 + lane, last)
            if j == 0:
                b0 = np.int32(words[q])
            elif j == 1:
                b1 = np.int32(words[q])
            elif j == 2:
                b2 = np.int32(words[q])
            elif j == 3:  # (not "else": two identical branches would be merged into one load and a select that waits for it)
                b3 = np.int32(words[q])
            base += 32
            j = (j + 1) & 3
    if p > wend:
        return 2
    if cuda.ballot_sync(_FULL, active and x != _L) != 0:
        return 3
    if p != wend:
        return 4
    return 0


@cuda.jit(cache=True)
def rans_multi_kernel(W, I, T, blocks, recs, out, status):
    """Every stream of a plan (:func:`plan_symbols`) in one launch. Block b decodes chunks
    c0 .. of stream s (``I[blocks + 2b] = s, I[blocks + 2b + 1] = c0``); the stream's record
    at ``I[recs + REC*s]``: chunk table offset (absolute word indices into W), chunks, chunk
    symbols, symbols, output offset, slot table offset into T, precision, lanes, last word,
    status offset."""
    sh = cuda.shared.array(SHARED_SLOTS, dtype=np.uint64)
    b = cuda.blockIdx.x
    s = I[blocks + 2 * b]
    c0 = I[blocks + 2 * b + 1]
    r = recs + REC * s
    ct = I[r]
    nch = I[r + 1]
    cs = I[r + 2]
    n = I[r + 3]
    o0 = I[r + 4]
    toff = I[r + 5]
    prec = I[r + 6]
    lanes = I[r + 7]
    last = I[r + 8]
    sb = I[r + 9]
    tid = cuda.threadIdx.x
    shared = prec <= SHARED_MAX_PRECISION
    if shared:  # the same for the whole block
        size = 1 << prec
        i = tid
        while i < size:
            sh[i] = T[toff + i]
            i += cuda.blockDim.x
        cuda.syncthreads()
    if lanes > 1:
        c = c0 + tid // 32
        lane = tid % 32
        if c < nch:
            a = c * cs
            m = _imin(cs, n - a)
            if shared:
                code = _lanes_chunk(W, last, sh, 0, prec, lanes, I[ct + c], I[ct + c + 1], m, out, o0 + a, lane)
            else:
                code = _lanes_chunk(W, last, T, toff, prec, lanes, I[ct + c], I[ct + c + 1], m, out, o0 + a, lane)
            if lane == 0:
                status[sb + c] = code
    else:
        c = c0 + tid
        if c < nch:
            a = c * cs
            m = _imin(cs, n - a)
            if shared:
                code = _decode_chunk(W, last, sh, 0, prec, I[ct + c], I[ct + c + 1], m, out, o0 + a)
            else:
                code = _decode_chunk(W, last, T, toff, prec, I[ct + c], I[ct + c + 1], m, out, o0 + a)
            status[sb + c] = code


@cuda.jit(device=True)
def _joined(s, rest, roff, i, rw, low, width):  # pragma: no cover - device code
    """Float bits from symbol ``s`` (uint64) and the rw-bit rest i (LSB-first at bit i*rw of rest[roff:])."""
    bit = i * rw
    pos = roff + (bit >> 3)
    sh = bit & 7
    nbytes = (sh + rw + 7) >> 3
    acc = np.uint64(0)
    for j in range(nbytes):
        acc |= np.uint64(rest[pos + j]) << np.uint64(8 * j)
    r = (acc >> np.uint64(sh)) & np.uint64((1 << rw) - 1)
    return ((r >> np.uint64(low)) << np.uint64(width - 1)) | (s << np.uint64(low)) | (r & np.uint64((1 << low) - 1))


@cuda.jit(cache=True)
def join_kernel(out, rest, roff, n, rw, low, width):
    """out[i] := float bits from symbol out[i] and the rw-bit rest i (LSB-first at bit i*rw of rest[roff:])."""
    i = cuda.grid(1)
    if i < n:
        out[i] = _joined(np.uint64(out[i]), rest, roff, i, rw, low, width)


@cuda.jit(cache=True)
def join_from_kernel(out, syms, soff, rest, roff, n, rw, low, width):
    """As :func:`join_kernel`, the symbols read from ``syms[soff:]`` (a batch's shared symbol
    buffer, :mod:`aligncodec.codec.modes.gpu_batch`) instead of ``out`` itself."""
    i = cuda.grid(1)
    if i < n:
        out[i] = _joined(np.uint64(syms[soff + i]), rest, roff, i, rw, low, width)


# ----------------------------------------------------------------- host side: errors, probe


class DeviceOutOfMemoryError(MemoryError):
    """The GPU has no room for a tensor being decoded (the message names the tensor)."""


class CudaUnavailableError(RuntimeError):
    """numba's CUDA target cannot compile or run a kernel here (e.g. numba-cuda 0.30.4 with
    numpy >= 2.5, whose first kernel compile fails on the removed ``np.row_stack``)."""


_probe_lock = threading.Lock()
_probe_result: list = []  # [None] when the probe kernel ran, [message] when it failed


@cuda.jit(cache=True)
def _probe_kernel(a):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = a[i] + 1


def _probe() -> str | None:
    """Compile and run a tiny kernel once per process: None if it works, else why not."""
    with _probe_lock:
        if not _probe_result:
            try:
                if not cuda.is_available():
                    _probe_result.append("no CUDA device (numba.cuda.is_available() is False)")
                else:
                    a = cuda.to_device(np.zeros(4, np.int32))
                    _probe_kernel[1, 32](a)
                    ok = int(a.copy_to_host().sum()) == 4
                    _probe_result.append(None if ok else "the probe kernel ran but computed a wrong result")
            except Exception as exc:  # a broken numba-cuda / driver / numpy combination
                _probe_result.append(f"numba could not compile or run a CUDA kernel: {type(exc).__name__}: {exc}")
                log.warning("CUDA decoding disabled, the CPU decoder is used instead: %s", _probe_result[0])
        return _probe_result[0]


def available() -> bool:
    """True when numba's CUDA target (or its simulator) can compile and run kernels (checked
    once per process by a probe kernel; a failure is logged and the loaders use the CPU)."""
    try:
        return _probe() is None
    except Exception:
        return False


def require() -> None:
    """Raise :class:`CudaUnavailableError` (with the cause) unless CUDA kernels can run."""
    why = _probe()
    if why is not None:
        raise CudaUnavailableError(why)


def _grid(n: int, block: int) -> int:
    return max(1, math.ceil(n / block))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    return getattr(exc, "code", None) == 2 or "OUT_OF_MEMORY" in str(exc) or "out of memory" in str(exc)


def _oom(name: str, nbytes: int, exc: BaseException) -> DeviceOutOfMemoryError:
    return DeviceOutOfMemoryError(f"out of GPU memory decoding tensor {name!r} ({nbytes / 2**20:.1f} MiB more needed): {exc}")


def _raw_device_array(n, dtype, stream_obj):
    return cuda.device_array(n, dtype=dtype, stream=stream_obj)


def _raw_to_device(a, stream_obj):
    return cuda.to_device(a, stream=stream_obj)


def device_alloc(n: int, dtype, name: str = "?", stream_obj=0):
    """A new device array; out of memory is a DeviceOutOfMemoryError naming the tensor."""
    try:
        return _raw_device_array(n, dtype, stream_obj)
    except Exception as exc:
        if _is_oom(exc):
            raise _oom(name, n * np.dtype(dtype).itemsize, exc) from None
        raise


def device_put(a: np.ndarray, name: str = "?", stream_obj=0):
    """A host array copied to the device; out of memory named as in :func:`device_alloc`."""
    try:
        return _raw_to_device(a, stream_obj)
    except Exception as exc:
        if _is_oom(exc):
            raise _oom(name, a.nbytes, exc) from None
        raise


def torch_empty(n: int, dtype, device, name: str = "?"):
    """torch.empty on a CUDA device; out of memory named as in :func:`device_alloc`."""
    import torch

    try:
        return torch.empty(n, dtype=dtype, device=device)
    except torch.cuda.OutOfMemoryError as exc:
        raise _oom(name, n * torch.tensor([], dtype=dtype).element_size(), exc) from None


# ----------------------------------------------------------------- host side: staging and pools

_VIEW_DTYPES = (np.uint8, np.uint16, np.int32, np.int64, np.uint64, np.float32)


class Staging:
    """Host arrays packed for one host-to-device copy: :meth:`add` returns the array's element
    offset in the device buffer's view of its dtype (every part 8-byte aligned)."""

    def __init__(self):
        self.parts: list = []
        self.nbytes = 0

    def add(self, a) -> int:
        a = np.ascontiguousarray(a)
        if a.dtype.type not in _VIEW_DTYPES:
            raise TypeError(f"no staging view for {a.dtype}")
        off = (self.nbytes + 7) & ~7
        self.parts.append((off, a))
        self.nbytes = off + a.nbytes
        return off // a.dtype.itemsize


def _h2d(dst, src, nbytes: int, stream_obj) -> None:
    from numba.cuda.cudadrv import driver

    if nbytes:
        driver.host_to_device(dst, src, nbytes, stream=stream_obj)


def _d2h(dst, src, nbytes: int, stream_obj) -> None:
    from numba.cuda.cudadrv import driver

    if nbytes:
        driver.device_to_host(dst, src, nbytes, stream=stream_obj)


def _sync(stream_obj) -> None:
    if stream_obj != 0:
        stream_obj.synchronize()
    else:
        cuda.synchronize()


KEEP_BYTES = 64 << 20  # a pool keeps buffers up to this size; larger ones live for one call


def _staging_buffers(cap: int, name: str, stream_obj, pinned: bool = True):
    """A pinned host staging buffer and its device twin with typed views; ``pinned=False``
    (one-off large calls) gives no host buffer: the parts are copied straight from their own
    memory. Page-locking, or merely first-touching, a fresh buffer of ~100 MiB per call costs
    more than the copy it serves: on an H200 either made an 8192² tensor's load 5x slower."""
    d = device_alloc(cap, np.uint8, name, stream_obj)
    if not pinned:
        return None, d, {np.dtype(t).str[1:]: d.view(t) for t in _VIEW_DTYPES}
    try:
        h = cuda.pinned_array(cap, dtype=np.uint8)
    except Exception as exc:
        if _is_oom(exc):
            raise DeviceOutOfMemoryError(f"out of pinned host memory staging tensor {name!r} ({cap / 2**20:.1f} MiB): {exc}") from None
        raise
    return h, d, {np.dtype(t).str[1:]: d.view(t) for t in _VIEW_DTYPES}  # "u1", "u2", "i4", "i8", "u8", "f4"


class Pool:
    """Reusable memory of one thread on one device: a pinned host staging buffer and its device
    twin (with typed views of the whole buffer, made once per growth), an int32 status array
    (device + pinned host), and named scratch arrays. Buffers grow (doubling) and are kept up
    to :data:`KEEP_BYTES` (a larger one serves one call and is freed with its job); a call that
    uses the pool synchronises its stream before it returns, so reuse is safe."""

    def __init__(self):
        self.cap = 0
        self.h = None
        self.d = None
        self.views: dict = {}
        self.scap = 0
        self.d_status = None
        self.h_status = None
        self.scratch: dict = {}

    def upload(self, st: Staging, name: str, stream_obj) -> dict:
        """Copy the staged arrays to the device with one copy; returns the typed views."""
        need = max(8, (st.nbytes + 7) & ~7)
        if need > KEEP_BYTES:
            h, d, views = _staging_buffers(need, name, stream_obj, pinned=False)
            for off, a in st.parts:  # a few large parts: one pageable copy each, no staging copy
                _h2d(d[off : off + a.nbytes], a.reshape(-1).view(np.uint8), a.nbytes, stream_obj)
            return dict(views, _host=st.parts)
        else:
            if need > self.cap:
                cap = min(KEEP_BYTES, (max(need, 2 * self.cap, 1 << 16) + 7) & ~7)
                self.h = self.d = None
                self.views = {}
                self.cap = 0
                self.h, self.d, self.views = _staging_buffers(cap, name, stream_obj)
                self.cap = cap
            h, d, views = self.h, self.d, self.views
        for off, a in st.parts:
            h[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
        _h2d(d, h, st.nbytes, stream_obj)
        return dict(views, _host=h)  # the pinned buffer stays referenced while the views are

    def status(self, n: int, name: str, stream_obj):
        if n > self.scap:
            cap = max(n, 2 * self.scap, 1024)
            self.d_status = self.h_status = None
            self.scap = 0
            self.d_status = device_alloc(cap, np.int32, name, stream_obj)
            self.h_status = cuda.pinned_array(cap, dtype=np.int32)
            self.scap = cap
        return self.d_status

    def array(self, key: str, n: int, dtype, name: str, stream_obj):
        """A scratch device array of at least n elements (its first n are the caller's)."""
        item = np.dtype(dtype).itemsize
        if n * item > KEEP_BYTES:
            return device_alloc(n, dtype, name, stream_obj)
        a = self.scratch.get(key)
        if a is None or a.shape[0] < n or a.dtype != np.dtype(dtype):
            self.scratch.pop(key, None)
            size = min(max(n, 2 * (a.shape[0] if a is not None else 0), 1024), KEEP_BYTES // item)
            a = self.scratch[key] = device_alloc(size, dtype, name, stream_obj)
        return a


_local = threading.local()


def pool(key=0) -> Pool:
    """This thread's :class:`Pool` for device ``key`` (e.g. the torch device index)."""
    pools = getattr(_local, "pools", None)
    if pools is None:
        pools = _local.pools = {}
    p = pools.get(key)
    if p is None:
        p = pools[key] = Pool()
    return p


def release_pools() -> None:
    """Drop this thread's pools (their device and pinned memory is freed with them)."""
    _local.pools = {}


# ----------------------------------------------------------------- host side: rANS plans


class SymbolsPlan:
    """Streams staged for :func:`launch_symbols` (see :func:`plan_symbols`)."""

    def __init__(self):
        self.n_chunks = 0
        self.n_blocks = 0
        self.block = THREADS_PER_BLOCK
        self.blocks_off = 0
        self.recs_off = 0
        self.spans: list = []  # (status offset, chunks) per decoded stream, in stream order


def plan_symbols(streams: list, bases: list, st: Staging) -> SymbolsPlan:
    """Check every stream (in order, as the CPU decoder does: chunk layout, slot table) and stage
    its words, chunk table, slot table and record; stream i's symbols go to ``out[bases[i]:]``."""
    return plan_prepared(prepare_streams(streams, bases), st)


def prepare_streams(streams: list, bases: list) -> list:
    """Check every stream in order (chunk layout, slot table: the CPU decoder's errors) and
    return what :func:`plan_prepared` stages; stream i's symbols go to ``out[bases[i]:]``."""
    prepared = []
    for s, b in zip(streams, bases):
        if s.n_symbols > 0:
            words, chunk_w = decode_cpu._words(s)
            tab = decode_cpu.slot_table(s.freqs, s.precision)
            prepared.append((s, b, words, chunk_w, tab))
    return prepared


def plan_prepared(prepared: list, st: Staging) -> SymbolsPlan:
    """Stage the words, chunk tables, slot tables and records of prepared streams (of one or
    of many tensors: one launch decodes them all)."""
    plan = SymbolsPlan()
    if not prepared:
        return plan
    any_lanes = any(s.lanes > 1 for s, *_ in prepared)
    plan.block = 32 * WARPS_PER_BLOCK if any_lanes else THREADS_PER_BLOCK
    recs = []
    blocks = []
    woffs = []
    for s, b, words, chunk_w, tab in prepared:
        woffs.append(st.add(words))
    for i, (s, b, words, chunk_w, tab) in enumerate(prepared):
        ct = st.add(chunk_w + woffs[i])
        toff = st.add(tab)
        nch = len(chunk_w) - 1
        last = woffs[i] + max(len(words) - 1, 0)
        recs.append((ct, nch, s.chunk_symbols, s.n_symbols, b, toff, s.precision, s.lanes, last, plan.n_chunks))
        plan.spans.append((plan.n_chunks, nch))
        per = plan.block // 32 if s.lanes > 1 else plan.block
        for c0 in range(0, nch, per):
            blocks.append((i, c0))
        plan.n_chunks += nch
    plan.recs_off = st.add(np.asarray(recs, dtype=np.int64).reshape(-1))
    plan.blocks_off = st.add(np.asarray(blocks, dtype=np.int64).reshape(-1))
    plan.n_blocks = len(blocks)
    return plan


def launch_symbols(plan: SymbolsPlan, views: dict, out, d_status, stream_obj=0) -> None:
    """Decode every stream of the plan into ``out`` with one kernel launch."""
    if plan.n_blocks:
        rans_multi_kernel[plan.n_blocks, plan.block, stream_obj](
            views["u2"], views["i8"], views["u8"], plan.blocks_off, plan.recs_off, out, d_status)


def check_status(plan: SymbolsPlan, p: Pool, stream_obj=0) -> None:
    """One copy of every chunk's status back to the host (a synchronisation); raises the CPU
    decoder's CorruptStreamError for the first corrupt chunk of the first corrupt stream."""
    if plan.n_chunks:
        _d2h(p.h_status, p.d_status, 4 * plan.n_chunks, stream_obj)
    _sync(stream_obj)
    if plan.n_chunks:
        h = p.h_status
        if h[: plan.n_chunks].any():
            for sb, nch in plan.spans:
                decode_cpu._raise_status(h[sb : sb + nch])


# ----------------------------------------------------------------- numba device arrays


def decode_symbols_device(stream: RansStream, out=None, *, stream_obj=0, name: str = "?", pool_key=0):
    """Decode a rANS stream on the device into ``out`` (a numba device array of any
    unsigned/signed integer type wide enough; default a new uint16 device array).
    Raises CorruptStreamError like the CPU decoder. Returns ``out``."""
    require()
    n = stream.n_symbols
    if out is None:
        out = device_alloc(n, np.uint16, name, stream_obj)
    if out.shape != (n,):
        raise ValueError(f"out must hold {n} symbols")
    st = Staging()
    plan = plan_symbols([stream], [0], st)
    if plan.n_chunks == 0:
        return out
    p = pool(pool_key)
    views = p.upload(st, name, stream_obj)
    d_status = p.status(plan.n_chunks, name, stream_obj)
    launch_symbols(plan, views, out, d_status, stream_obj)
    check_status(plan, p, stream_obj)
    return out


class FloatSplitJob:
    """A float-split tensor staged on the device: :meth:`launch` runs the kernels (decode, join)
    into ``out``, :meth:`check` copies the status back and raises on a corrupt chunk."""

    def __init__(self, stream: RansStream, rest, dtype: str, k: int, *, stream_obj=0, name: str = "?", pool_key=0):
        require()
        width, rw, low, raw = decode_cpu.float_split_layout(stream, rest, dtype, k)
        self.width, self.rw, self.low = width, rw, low
        self.n = stream.n_symbols
        self.stream_obj, self.name = stream_obj, name
        st = Staging()
        self.plan = plan_symbols([stream], [0], st)
        self.roff = st.add(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)) if self.n else 0  # no copy of the rest
        self.pool = pool(pool_key)
        self.views = self.pool.upload(st, name, stream_obj)
        self.d_status = self.pool.status(self.plan.n_chunks, name, stream_obj)

    def launch(self, out) -> None:
        launch_symbols(self.plan, self.views, out, self.d_status, self.stream_obj)
        if self.n:
            join_kernel[_grid(self.n, JOIN_THREADS_PER_BLOCK), JOIN_THREADS_PER_BLOCK, self.stream_obj](
                out, self.views["u1"], self.roff, self.n, self.rw, self.low, self.width)

    def check(self) -> None:
        check_status(self.plan, self.pool, self.stream_obj)


def decode_float_split_device(stream: RansStream, rest, dtype: str, k: int, out=None, *, stream_obj=0, name: str = "?", pool_key=0):
    """Float-split tensor decoded on the device: a uint{W} device array of its bit patterns
    (symbols decoded into ``out``, then joined with the rest by :func:`join_kernel`)."""
    job = FloatSplitJob(stream, rest, dtype, k, stream_obj=stream_obj, name=name, pool_key=pool_key)
    if out is None:
        out = device_alloc(job.n, decode_cpu.UINT_OF_WIDTH[job.width], name, stream_obj)
    if out.shape != (job.n,):
        raise ValueError(f"out must hold {job.n} elements")
    job.launch(out)
    job.check()
    return out


# ----------------------------------------------------------------- torch tensors on the device

_INT_OF_WIDTH = {16: "int16", 32: "int32", 64: "int64"}


def _as_numba(t, view_dtype=None):
    try:
        a = cuda.as_cuda_array(t, sync=False)  # same stream as ours: no synchronisation needed
    except TypeError:
        a = cuda.as_cuda_array(t)
    return a.view(view_dtype) if view_dtype is not None else a


_streams: dict = {}


def _numba_stream(dev):
    """numba's handle on torch's current stream of ``dev`` (cached per stream)."""
    import torch

    ptr = torch.cuda.current_stream(dev).cuda_stream
    s = _streams.get(ptr)
    if s is None:
        s = _streams[ptr] = cuda.external_stream(ptr)
    return s


def symbols_to_torch(stream: RansStream, device="cuda"):
    """A rANS stream's symbols decoded on the device into a new int32 torch tensor (for the
    GPU reconstruction of a coding mode; numba and torch share the memory, no host copy)."""
    import torch

    dev = torch.device(device)
    sym = torch.empty(stream.n_symbols, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        decode_symbols_device(stream, _as_numba(sym), stream_obj=_numba_stream(dev), pool_key=dev.index)
    return sym


def decode_float_split_tensor(entry: TensorEntry, streams: list, device="cuda"):
    """A float-split tensor (spec §7.2) decoded into a torch tensor on a CUDA device
    (the GPU path of mode 1 in the registry of :mod:`aligncodec.codec.modes`)."""
    import torch

    from aligncodec.codec.modes import lossless
    from aligncodec.codec.torch_interop import torch_dtype

    dev = torch.device(device)
    lossless.validate(entry, streams)
    width, e = FLOAT_FORMATS[entry.dtype]
    k = entry.params[0]
    rest = lossless._bytes_from(streams[1], lossless.packed_size(entry.numel, width - e - k), entry.name)
    with torch.cuda.device(dev):
        t = torch_empty(entry.numel, getattr(torch, _INT_OF_WIDTH[width]), dev, entry.name)
        decode_float_split_device(streams[0], rest, entry.dtype, k, out=_as_numba(t, decode_cpu.UINT_OF_WIDTH[width]),
                                  stream_obj=_numba_stream(dev), name=entry.name, pool_key=dev.index)
    return t.view(torch_dtype(entry.dtype)).reshape(entry.shape)
