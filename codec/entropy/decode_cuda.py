"""GPU decoding of chunked rANS streams through numba.cuda, reconstruction on the device.

Same bitstream and the same packed slot table as :mod:`aligncodec.codec.entropy.decode_cpu`
(``freq | (slot - cum) << 32 | symbol << 48``), so all decoders agree bit for bit.

* :func:`rans_kernel` - one thread per chunk (the format's chunks are independent
  streams with one state each); the slot table is staged in shared memory when it
  fits (precision <= 12, 32 KiB), else read from global memory. Renormalisation is
  branchless with the word index clamped inside the payload, and a corrupt chunk is
  reported in ``status`` exactly as on the CPU (1 state < L, 2 ran out of words,
  3 final state != L, 4 words left over).
* :func:`join_kernel` - float-split reconstruction, one thread per element: the
  symbol (exponent and top mantissa bits) joined with its bit-packed rest.
* :func:`decode_float_split_tensor` - a float-split entry to a torch tensor in GPU
  memory (numba <-> torch through ``__cuda_array_interface__``, no host round trip
  for the decoded data); :func:`symbols_to_torch` gives any mode's symbols as a
  device tensor, for a GPU reconstruction registered in :mod:`aligncodec.codec.modes`.

Without a GPU the kernels run under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba.cuda is first imported), which is
how CI checks them (tests/test_codec_entropy_decode_cuda.py).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from aligncodec.formats.constants import FLOAT_FORMATS, RANS_STATE_LOWER
from aligncodec.formats.layout import TensorEntry
from aligncodec.formats.streams import RansStream

from aligncodec.codec.entropy import cuda_compat  # noqa: F401  (the simulator's warp vote)
from aligncodec.codec.entropy import decode_cpu

SHARED_MAX_PRECISION = 12  # 2^12 uint64 slots = 32 KiB of shared memory per block
SHARED_SLOTS = 1 << SHARED_MAX_PRECISION
THREADS_PER_BLOCK = 128
JOIN_THREADS_PER_BLOCK = 256

_L = np.uint64(RANS_STATE_LOWER)


# ----------------------------------------------------------------- kernels


@cuda.jit(device=True, inline=True)
def _imin(a, b):
    """min of two integers (the builtin min does not compile for the CUDA target of numba 0.68)."""
    return a if a < b else b


@cuda.jit(device=True)
def _decode_chunk(words, last, tab, precision, w0, wend, m, out, o):
    P = np.uint64(precision)
    mask = np.uint64((1 << precision) - 1)
    x = np.uint64(words[w0]) | (np.uint64(words[w0 + 1]) << np.uint64(16))
    if x < _L:
        return 1
    p = w0 + 2
    for k in range(m):
        e = tab[x & mask]
        out[o + k] = e >> np.uint64(48)
        x = (e & np.uint64(0xFFFFFFFF)) * (x >> P) + ((e >> np.uint64(32)) & np.uint64(0xFFFF))
        y = (x << np.uint64(16)) | np.uint64(words[_imin(p, last)])
        c = x < _L
        x = y if c else x
        p += 1 if c else 0
    if p > wend:
        return 2
    if x != _L:
        return 3
    if p != wend:
        return 4
    return 0


@cuda.jit
def rans_kernel_global(words, chunk_w, cs, n, tab, precision, out, status):
    """One thread per chunk, slot table in global memory."""
    c = cuda.grid(1)
    n_chunks = chunk_w.shape[0] - 1
    if c < n_chunks:
        a = c * cs
        m = _imin(cs, n - a)
        status[c] = _decode_chunk(words, words.shape[0] - 1, tab, precision, chunk_w[c], chunk_w[c + 1], m, out, a)


@cuda.jit
def rans_kernel_shared(words, chunk_w, cs, n, tab, precision, out, status):
    """One thread per chunk, slot table (precision <= SHARED_MAX_PRECISION) staged in shared memory."""
    sh = cuda.shared.array(SHARED_SLOTS, dtype=np.uint64)
    size = 1 << precision
    i = cuda.threadIdx.x
    while i < size:
        sh[i] = tab[i]
        i += cuda.blockDim.x
    cuda.syncthreads()
    c = cuda.grid(1)
    n_chunks = chunk_w.shape[0] - 1
    if c < n_chunks:
        a = c * cs
        m = _imin(cs, n - a)
        status[c] = _decode_chunk(words, words.shape[0] - 1, sh, precision, chunk_w[c], chunk_w[c + 1], m, out, a)


WARPS_PER_BLOCK = 4  # interleaved-lanes kernel: one warp per chunk
_FULL = np.uint32(0xFFFFFFFF)


@cuda.jit(device=True)
def _decode_lanes_chunk(words, last, tab, precision, lanes, w0, wend, m, out, o, lane):
    """One chunk of interleaved lanes (spec §6.6) decoded by one warp: thread ``lane`` runs
    rANS lane ``lane`` (lanes <= 32). After each step of ``lanes`` symbols the lanes that
    renormalise take the next words of the shared stream in lane order: a warp vote and a
    popcount give each its word. Every thread of the warp makes the same votes; the status
    code (same values as the CPU decoder) is the same on all of them."""
    P = np.uint64(precision)
    mask = np.uint64((1 << precision) - 1)
    w = _imin(lanes, m)
    active = lane < w
    x = _L
    if active:
        x = np.uint64(words[w0 + 2 * lane]) | (np.uint64(words[w0 + 2 * lane + 1]) << np.uint64(16))
    if cuda.ballot_sync(_FULL, active and x < _L) != 0:
        return 1
    below = np.uint32((1 << lane) - 1)
    p = w0 + 2 * w
    steps = (m + lanes - 1) // lanes
    for r in range(steps):
        t = r * lanes + lane
        need = False
        if lane < lanes and t < m:
            e = tab[x & mask]
            out[o + t] = e >> np.uint64(48)
            x = (e & np.uint64(0xFFFFFFFF)) * (x >> P) + ((e >> np.uint64(32)) & np.uint64(0xFFFF))
            need = x < _L
        b = cuda.ballot_sync(_FULL, need)
        if need:
            x = (x << np.uint64(16)) | np.uint64(words[_imin(p + cuda.popc(b & below), last)])
        p += cuda.popc(b)
    if p > wend:
        return 2
    if cuda.ballot_sync(_FULL, active and x != _L) != 0:
        return 3
    if p != wend:
        return 4
    return 0


@cuda.jit
def rans_lanes_kernel_global(words, chunk_w, cs, n, tab, precision, lanes, out, status):
    """One warp per chunk of interleaved lanes, slot table in global memory."""
    g = cuda.grid(1)
    c = g // 32
    lane = cuda.threadIdx.x % 32
    if c < chunk_w.shape[0] - 1:
        a = c * cs
        code = _decode_lanes_chunk(words, words.shape[0] - 1, tab, precision, lanes, chunk_w[c], chunk_w[c + 1], _imin(cs, n - a), out, a, lane)
        if lane == 0:
            status[c] = code


@cuda.jit
def rans_lanes_kernel_shared(words, chunk_w, cs, n, tab, precision, lanes, out, status):
    """One warp per chunk of interleaved lanes, slot table staged in shared memory."""
    sh = cuda.shared.array(SHARED_SLOTS, dtype=np.uint64)
    size = 1 << precision
    i = cuda.threadIdx.x
    while i < size:
        sh[i] = tab[i]
        i += cuda.blockDim.x
    cuda.syncthreads()
    g = cuda.grid(1)
    c = g // 32
    lane = cuda.threadIdx.x % 32
    if c < chunk_w.shape[0] - 1:
        a = c * cs
        code = _decode_lanes_chunk(words, words.shape[0] - 1, sh, precision, lanes, chunk_w[c], chunk_w[c + 1], _imin(cs, n - a), out, a, lane)
        if lane == 0:
            status[c] = code


@cuda.jit
def join_kernel(out, rest, n, rw, low, width):
    """out[i] := float bits from symbol out[i] and the rw-bit rest i (LSB-first at bit i*rw of rest)."""
    i = cuda.grid(1)
    if i < n:
        bit = i * rw
        pos = bit >> 3
        sh = bit & 7
        nbytes = (sh + rw + 7) >> 3
        acc = np.uint64(0)
        for j in range(nbytes):
            acc |= np.uint64(rest[pos + j]) << np.uint64(8 * j)
        r = (acc >> np.uint64(sh)) & np.uint64((1 << rw) - 1)
        s = np.uint64(out[i])
        out[i] = ((r >> np.uint64(low)) << np.uint64(width - 1)) | (s << np.uint64(low)) | (r & np.uint64((1 << low) - 1))


# ----------------------------------------------------------------- host side (numba device arrays)


def available() -> bool:
    """True when numba's CUDA target (or its simulator) can run kernels."""
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def _grid(n: int, block: int) -> int:
    return max(1, math.ceil(n / block))


class DeviceOutOfMemoryError(MemoryError):
    """The GPU has no room for a tensor being decoded (the message names the tensor)."""


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


def decode_symbols_device(stream: RansStream, out=None, *, stream_obj=0, name: str = "?"):
    """Decode a rANS stream on the device into ``out`` (a numba device array of any
    unsigned/signed integer type wide enough; default a new uint16 device array).
    Raises CorruptStreamError like the CPU decoder. Returns ``out``."""
    n = stream.n_symbols
    if out is None:
        out = device_alloc(n, np.uint16, name, stream_obj)
    if out.shape != (n,):
        raise ValueError(f"out must hold {n} symbols")
    if n == 0:
        return out
    words, chunk_w = decode_cpu._words(stream)
    tab = decode_cpu.slot_table(stream.freqs, stream.precision)
    d_words = device_put(np.ascontiguousarray(words), name, stream_obj)
    d_chunk_w = device_put(chunk_w, name, stream_obj)
    d_tab = device_put(tab, name, stream_obj)
    n_chunks = len(chunk_w) - 1
    d_status = device_alloc(n_chunks, np.int32, name, stream_obj)
    shared = stream.precision <= SHARED_MAX_PRECISION
    if stream.lanes > 1:
        kernel = rans_lanes_kernel_shared if shared else rans_lanes_kernel_global
        kernel[_grid(n_chunks, WARPS_PER_BLOCK), 32 * WARPS_PER_BLOCK, stream_obj](
            d_words, d_chunk_w, stream.chunk_symbols, n, d_tab, stream.precision, stream.lanes, out, d_status
        )
    else:
        kernel = rans_kernel_shared if shared else rans_kernel_global
        kernel[_grid(n_chunks, THREADS_PER_BLOCK), THREADS_PER_BLOCK, stream_obj](
            d_words, d_chunk_w, stream.chunk_symbols, n, d_tab, stream.precision, out, d_status
        )
    status = d_status.copy_to_host(stream=stream_obj)
    if stream_obj != 0:
        stream_obj.synchronize()
    decode_cpu._raise_status(status)
    return out


def decode_float_split_device(stream: RansStream, rest, dtype: str, k: int, out=None, *, stream_obj=0):
    """Float-split tensor decoded on the device: a uint{W} device array of its bit patterns
    (symbols decoded into ``out``, then joined with the rest by :func:`join_kernel`)."""
    width, rw, low, raw = decode_cpu.float_split_layout(stream, rest, dtype, k)
    n = stream.n_symbols
    if out is None:
        out = cuda.device_array(n, dtype=decode_cpu.UINT_OF_WIDTH[width], stream=stream_obj)
    decode_symbols_device(stream, out, stream_obj=stream_obj)
    if n:
        d_rest = cuda.to_device(np.ascontiguousarray(raw), stream=stream_obj)
        join_kernel[_grid(n, JOIN_THREADS_PER_BLOCK), JOIN_THREADS_PER_BLOCK, stream_obj](out, d_rest, n, rw, low, width)
    return out


# ----------------------------------------------------------------- torch tensors on the device

_INT_OF_WIDTH = {16: "int16", 32: "int32", 64: "int64"}


def _as_numba(t, view_dtype=None):
    a = cuda.as_cuda_array(t)
    return a.view(view_dtype) if view_dtype is not None else a


def _numba_stream(dev):
    import torch

    return cuda.external_stream(torch.cuda.current_stream(dev).cuda_stream)


def symbols_to_torch(stream: RansStream, device="cuda"):
    """A rANS stream's symbols decoded on the device into a new int32 torch tensor (for the
    GPU reconstruction of a coding mode; numba and torch share the memory, no host copy)."""
    import torch

    dev = torch.device(device)
    sym = torch.empty(stream.n_symbols, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        decode_symbols_device(stream, _as_numba(sym), stream_obj=_numba_stream(dev))
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
    t = torch.empty(entry.numel, dtype=getattr(torch, _INT_OF_WIDTH[width]), device=dev)
    with torch.cuda.device(dev):
        decode_float_split_device(streams[0], rest, entry.dtype, k, out=_as_numba(t, decode_cpu.UINT_OF_WIDTH[width]), stream_obj=_numba_stream(dev))
    return t.view(torch_dtype(entry.dtype)).reshape(entry.shape)
