"""GPU reconstruction of lossy mode 2 ``ecsq`` (spec/FORMAT.md §7.4) and mode 4 ``tcq``
(§7.6: :func:`levels_kernel`, one thread per column, turns the symbols into levels in place
first) with numba.cuda.

Bit-exact with the CPU decoder (:func:`aligncodec.codec.modes.lossy.decode`): the same
validation (:func:`lossy.parse`, so the same named errors), the symbols decoded on the
device (:mod:`aligncodec.codec.entropy.decode_cuda`), then

    q = symbol + class offset  ->  C = f32(q) · d_j  ->  Sylvester butterflies  ->
    Y = X · Qᵀ (k ascending)   ->  Z = Y · g        ->  W = Z · (±1)  ->  dtype cast

with every float operation one binary32 round-to-nearest-even operation through
:mod:`aligncodec.codec.entropy.cuda_compat` (``fmul_rn``/``fadd_rn``/``fsub_rn``, which NVVM
never contracts into an FMA), written straight into the output's device memory (a numba
device array, or a torch CUDA tensor through ``__cuda_array_interface__``).

Kernels:

* :func:`identity_kernel`: transform 0, one thread per element (grid-stride).
* :func:`segment_kernel`: transform 1, one block per segment of ``B·m`` consecutive
  elements of a row (``B`` a power of two, the segment in dynamic shared memory): the
  coefficients, the butterflies with h < B, and, when the segment is the whole row
  (``B = p``, rows of up to :data:`SHARED_FLOATS` floats), the Q factor, g, signs and cast.
  Longer rows are finished through a float32 buffer in global memory (rows in batches of
  at most :data:`BUFFER_BYTES`): :func:`stage_kernel` does one butterfly stage h ≥ B
  per launch and :func:`finish_kernel` the rest.

The cast is integer arithmetic on the float32 bits (:func:`bf16_bits`, :func:`f16_bits`),
round-to-nearest-even like the CPU path (:func:`lossy.round_to_dtype`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from aligncodec.codec.entropy import cuda_compat as cc
from aligncodec.codec.entropy import decode_cuda
from aligncodec.codec.modes import lossy

SHARED_FLOATS = 8192  # segment capacity: 32 KiB of dynamic shared memory per block
THREADS_PER_BLOCK = 256
BUFFER_BYTES = 256 << 20  # float32 row buffer for rows longer than SHARED_FLOATS
KIND = {"F32": 0, "F16": 1, "BF16": 2}
OUT_DTYPE = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}


# ----------------------------------------------------------------- casts (integer ops on the f32 bits)


def bf16_bits(u):
    """float32 bits -> bfloat16 bits, round to nearest even; NaN -> 0xFFFF (as lossy.round_to_dtype)."""
    v = np.int64(u)
    if (v & 0x7FFFFFFF) > 0x7F800000:
        return np.int64(0xFFFF)
    return (v + 0x7FFF + ((v >> 16) & 1)) >> 16


def f16_bits(u):
    """float32 bits -> float16 bits, round to nearest even (subnormals, overflow to inf), as
    numpy's cast in lossy.round_to_dtype. A NaN stays a NaN with its sign and top payload bits
    (an ecsq reconstruction is never NaN: spec §7.4's finiteness bound)."""
    v = np.int64(u)
    sign = (v >> 16) & 0x8000
    a = v & 0x7FFFFFFF
    if a > 0x7F800000:
        t = (a & 0x7FFFFF) >> 13
        return sign | 0x7C00 | (t if t != 0 else 1)
    if a >= 0x477FF000:  # rounds to 65536 or more (or is inf)
        return sign | 0x7C00
    if a >= 0x38800000:  # normal half
        r = a + 0xFFF + ((a >> 13) & 1)
        return sign | ((r >> 13) - 0x1C000)
    if a <= 0x33000000:  # at most 2^-25: rounds to zero
        return sign
    e = a >> 23
    mant = (a & 0x7FFFFF) | 0x800000
    shift = 126 - e
    q = mant >> shift
    rem = mant & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


_bf16_dev = cuda.jit(device=True)(bf16_bits)
_f16_dev = cuda.jit(device=True)(f16_bits)


@cuda.jit(device=True)
def _cast(w, kind):
    u = cc.f32_bits(w)
    if kind == 2:
        return _bf16_dev(u)
    if kind == 1:
        return _f16_dev(u)
    return np.int64(u)


# ----------------------------------------------------------------- kernels
#
# Tables live in two base arrays of the staging buffer (decode_cuda.Staging): I (int64) and
# F (float32); a kernel gets the element offsets of its tables: oRT/oCB/oCS (rowterm, colbase,
# colstride: where symbol (i, j) lives), oOR/oOC (offrow, offcol: its class offset), oD (the
# column steps d), oQ (the m×m factor, row-major), oS (the signs).


@cuda.jit(device=True)
def _coef(syms, I, F, oRT, oCB, oCS, oOR, oOC, oD, i, j):
    """C[i, j] = f32(q[i, j]) · d[j], q = symbol + its class offset."""
    idx = I[oRT + i] + I[oCB + j] + i * I[oCS + j]
    q = np.int64(syms[idx]) + I[oOR + i] + I[oOC + j]
    return cc.fmul_rn(np.float32(q), F[oD + j])


@cuda.jit(device=True)
def _finish_one(X, base, e, m, F, oQ, g, sgn):
    """W for element e of a row whose butterflies are done (X[base + ...] holds the row or segment)."""
    if m > 1:
        a = e // m
        c = e - a * m
        row = base + a * m
        acc = np.float32(0.0)
        for k in range(m):
            acc = cc.fadd_rn(acc, cc.fmul_rn(X[row + k], F[oQ + c * m + k]))
    else:
        acc = X[base + e]
    return cc.fmul_rn(cc.fmul_rn(acc, g), sgn)


@cuda.jit(cache=True)
def identity_kernel(syms, I, F, oRT, oCB, oCS, oOR, oOC, oD, rows, n, out, kind):
    t = cuda.grid(1)
    step = cuda.gridsize(1)
    total = rows * n
    while t < total:
        i = t // n
        j = t - i * n
        out[t] = _cast(_coef(syms, I, F, oRT, oCB, oCS, oOR, oOC, oD, i, j), kind)
        t += step


@cuda.jit(cache=True)
def segment_kernel(syms, I, F, oRT, oCB, oCS, oOR, oOC, oD, r0, n, m, B, oQ, g, oS, out, kind, buf, full):
    """Block b: row r0 + b // (p/B), segment b mod (p/B) of B·m elements (see module doc)."""
    X = cuda.shared.array(0, dtype=float32)
    seg_len = B * m
    segs = n // seg_len
    b = cuda.blockIdx.x
    il = b // segs  # row within the batch
    s = b - il * segs
    i = r0 + il
    j0 = s * seg_len
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    e = tid
    while e < seg_len:
        X[e] = _coef(syms, I, F, oRT, oCB, oCS, oOR, oOC, oD, i, j0 + e)
        e += bd
    cuda.syncthreads()
    half = (B // 2) * m
    h = 1
    while h < B:
        t = tid
        while t < half:
            pi = t // m
            c = t - pi * m
            hi = pi // h
            a = hi * 2 * h + (pi - hi * h)
            u = a * m + c
            v = u + h * m
            x = X[u]
            y = X[v]
            X[u] = cc.fadd_rn(x, y)
            X[v] = cc.fsub_rn(x, y)
            t += bd
        cuda.syncthreads()
        h *= 2
    if full:
        e = tid
        while e < seg_len:
            out[i * n + e] = _cast(_finish_one(X, 0, e, m, F, oQ, g, F[oS + e]), kind)
            e += bd
    else:
        e = tid
        while e < seg_len:
            buf[il * n + j0 + e] = X[e]
            e += bd


@cuda.jit(cache=True)
def load_kernel(syms, I, F, oRT, oCB, oCS, oOR, oOC, oD, r0, nrows, n, buf):
    """Coefficients of rows r0 .. r0+nrows-1 into the buffer (rows whose m exceeds the shared segment)."""
    t = cuda.grid(1)
    step = cuda.gridsize(1)
    total = nrows * n
    while t < total:
        il = t // n
        j = t - il * n
        buf[t] = _coef(syms, I, F, oRT, oCB, oCS, oOR, oOC, oD, r0 + il, j)
        t += step


@cuda.jit(cache=True)
def stage_kernel(buf, nrows, n, m, h):
    """One butterfly stage (pairs a, a+h of m-blocks) on every buffered row."""
    t = cuda.grid(1)
    step = cuda.gridsize(1)
    pairs = n // 2
    total = nrows * pairs
    while t < total:
        il = t // pairs
        r = t - il * pairs
        pi = r // m
        c = r - pi * m
        hi = pi // h
        a = hi * 2 * h + (pi - hi * h)
        u = il * n + a * m + c
        v = u + h * m
        x = buf[u]
        y = buf[v]
        buf[u] = cc.fadd_rn(x, y)
        buf[v] = cc.fsub_rn(x, y)
        t += step


@cuda.jit(cache=True)
def finish_kernel(buf, r0, nrows, n, m, F, oQ, g, oS, out, kind):
    t = cuda.grid(1)
    step = cuda.gridsize(1)
    total = nrows * n
    while t < total:
        il = t // n
        j = t - il * n
        out[(r0 + il) * n + j] = _cast(_finish_one(buf, il * n, j, m, F, oQ, g, F[oS + j]), kind)
        t += step


# ----------------------------------------------------------------- trellis levels (mode 4, spec §7.6)

LEVEL_BIAS = 32767  # as lossy_cpu: the symbols are overwritten by L + 32767 (|L| ≤ 32767), offset −32767


@cuda.jit(device=True)
def _level_column(syms, I, oRT, oCB, oCS, oOR, oOC, rows, j, bits, taps, base):
    """Walk column j's rows from state 0 and write L[i, j] + LEVEL_BIAS over symbol (i, j) at
    ``syms[base + index]`` (spec §7.6)."""
    top = bits - 1
    s = np.int64(0)
    for i in range(rows):
        idx = base + I[oRT + i] + I[oCB + j] + i * I[oCS + j]
        q = np.int64(syms[idx]) + I[oOR + i] + I[oOC + j]
        lv = 2 * q
        if (s >> top) & 1:
            if q > 0:
                lv -= 1
            elif q < 0:
                lv += 1
        syms[idx] = np.uint16(lv + LEVEL_BIAS)
        f = s & taps  # parity of the tapped bits (S ≤ 256: at most 8 bits)
        f ^= f >> 4
        f ^= f >> 2
        f ^= f >> 1
        s = (s >> 1) | (((q ^ f) & 1) << top)


@cuda.jit(cache=True)
def levels_kernel(syms, I, oRT, oCB, oCS, oOR, oOC, rows, n, bits, taps):
    """One thread per column j (grid-stride): walk its rows from state 0 and write
    L[i, j] + LEVEL_BIAS over symbol (i, j) (spec §7.6). Columns are independent; adjacent
    threads touch adjacent symbols (a row's symbols are contiguous within its class stream)."""
    j = cuda.grid(1)
    step = cuda.gridsize(1)
    while j < n:
        _level_column(syms, I, oRT, oCB, oCS, oOR, oOC, rows, j, bits, taps, 0)
        j += step


LREC = 10  # int64 fields of a levels record (levels_multi_kernel)


@cuda.jit(cache=True)
def levels_multi_kernel(syms, I, recs, blocks):
    """The level pass of every tcq tensor of a batch in one launch: block b walks columns
    c0 .. c0 + blockDim - 1 of tensor t (``I[blocks + 2b] = t, I[blocks + 2b + 1] = c0``); the
    tensor's record at ``I[recs + LREC*t]``: its five table offsets, rows, columns, state bits,
    taps and the start of its symbols in the batch's symbol buffer."""
    b = cuda.blockIdx.x
    t = I[blocks + 2 * b]
    j = I[blocks + 2 * b + 1] + cuda.threadIdx.x
    r = recs + LREC * t
    if j < I[r + 6]:
        _level_column(syms, I, I[r], I[r + 1], I[r + 2], I[r + 3], I[r + 4], I[r + 5], j, I[r + 7], I[r + 8], I[r + 9])


# ----------------------------------------------------------------- host side


def gather_tables(entry, params, cm):
    """Where symbol (i, j) lives in the concatenated class streams and its offset:
    index = rowterm[i] + colbase[j] + i·colstride[j], offset = offrow[i] + offcol[j].
    Returns those five arrays and the start of every class stream."""
    rows, n = entry.shape
    rowterm = np.zeros(rows, np.int64)
    colbase = np.arange(n, dtype=np.int64)
    colstride = np.zeros(n, np.int64)
    offrow = np.zeros(rows, np.int32)
    offcol = np.zeros(n, np.int32)
    if cm is None:
        rowterm[:] = np.arange(rows, dtype=np.int64) * n
        offrow[:] = params.offset
        return rowterm, colbase, colstride, offrow, offcol, [0]
    ids = cm.ids.astype(np.int64)
    k = cm.k
    cnt = np.bincount(ids, minlength=k).astype(np.int64)
    order = np.argsort(ids, kind="stable")  # by class, file order within a class
    first = np.concatenate([[0], np.cumsum(cnt)[:-1]]).astype(np.int64)
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids), dtype=np.int64) - first[ids[order]]  # position within its class
    off = np.asarray(cm.offsets, np.int32)
    other = n if params.class_axis == 0 else rows
    base = np.concatenate([[0], np.cumsum(cnt * other)[:-1]]).astype(np.int64)
    if params.class_axis == 0:
        rowterm[:] = base[ids] + rank * n
        offrow[:] = off[ids]
    else:
        colbase[:] = base[ids] + rank
        colstride[:] = cnt[ids]
        offcol[:] = off[ids]
    return rowterm, colbase, colstride, offrow, offcol, [int(b) for b in base]


def _grid(total: int, block: int, cap: int = 65535 * 8) -> int:
    return max(1, min(cap, math.ceil(total / block)))


class EcsqJob:
    """An ecsq tensor staged on the device (checked by :func:`lossy.parse` first, so the CPU's
    named errors): every class stream's words and tables and the reconstruction's tables in
    ONE host-to-device copy (decode_cuda.Staging into this thread's decode_cuda.Pool).
    :meth:`launch` runs the kernels into ``out`` (one launch for all class streams, then the
    reconstruction: one launch for rows of up to SHARED_FLOATS); :meth:`check` copies the
    chunk status back (one copy, a synchronisation) and raises on a corrupt chunk."""

    def __init__(self, entry, streams, *, stream_obj=0, pool_key=0, st=None, sym_base=0):
        """``st`` given (a batch of tensors, :mod:`aligncodec.codec.modes.gpu_batch`): stage the
        streams (``self.prepared``, symbols at ``sym_base`` of the batch's symbol buffer) and the
        tables into it and stop there; the batch uploads, plans one rANS launch for all its
        tensors and sets ``views``, ``syms`` and ``buf`` before :meth:`reconstruct` (staging is host
        work: the batch checks the device when it submits)."""
        if st is None:
            decode_cuda.require()
        params, sstreams, scales, hd, cm = lossy.parse(entry, streams)
        self.entry, self.params, self.stream_obj, self.name = entry, params, stream_obj, entry.name
        rows, n = entry.shape
        self.rows, self.n, self.numel = rows, n, rows * n
        self.kind = KIND[entry.dtype]
        rowterm, colbase, colstride, offrow, offcol, bases = gather_tables(entry, params, cm)
        own = st is None
        if own:
            st = decode_cuda.Staging()
        self.sym_base = sym_base
        self.prepared = decode_cuda.prepare_streams(sstreams, [sym_base + b for b in bases])
        d = lossy.column_steps(params, scales)
        d = np.asarray(d, dtype=np.float32) if isinstance(d, np.ndarray) else np.full(n, d, dtype=np.float32)
        self.oI = tuple(st.add(a.astype(np.int64)) for a in (rowterm, colbase, colstride, offrow, offcol))
        self.oI_rec = self.oI  # the tables the reconstruction reads q through
        if params.trellis:  # tcq: the level pass overwrites the symbols with biased levels
            self.oI_rec = self.oI[:3] + (st.add(np.full(rows, -LEVEL_BIAS, np.int64)), st.add(np.zeros(n, np.int64)))
        self.oD = st.add(d)
        self.p, self.m = (n, 1) if params.transform == lossy.TRANSFORM_IDENTITY else lossy.split_pow2(n)
        self.oQ = self.oS = 0
        if params.transform != lossy.TRANSFORM_IDENTITY:
            self.oQ = st.add(hd.Q.astype(np.float32).reshape(-1))
            self.oS = st.add(hd.signs.astype(np.float32))
        self.batch = self.buf = None
        self.levels_done = False  # a batch ran the tcq level pass of all its tensors (levels_multi_kernel)
        if params.transform != lossy.TRANSFORM_IDENTITY and n > SHARED_FLOATS and self.numel:
            self.batch = max(1, min(rows, BUFFER_BYTES // (4 * n)))  # rows through the float32 buffer at a time
        if not own:
            return
        self.plan = decode_cuda.plan_prepared(self.prepared, st)
        self.pool = decode_cuda.pool(pool_key)
        self.views = self.pool.upload(st, self.name, stream_obj)
        self.d_status = self.pool.status(self.plan.n_chunks, self.name, stream_obj)
        self.syms = self.pool.array("syms", max(1, self.numel), np.uint16, self.name, stream_obj)
        if self.batch is not None:
            self.buf = self.pool.array("rowbuf", self.batch * n, np.float32, self.name, stream_obj)

    def launch(self, out) -> None:
        decode_cuda.launch_symbols(self.plan, self.views, self.syms, self.d_status, self.stream_obj)
        self.reconstruct(out)

    def reconstruct(self, out) -> None:
        """The kernels after the symbols: the tcq level pass, then the reconstruction into ``out``."""
        rows, n, m, p = self.rows, self.n, self.m, self.p
        so, kind = self.stream_obj, self.kind
        if self.numel == 0:
            return
        I, F = self.views["i8"], self.views["f4"]
        tpb = THREADS_PER_BLOCK
        if self.params.trellis and not self.levels_done:
            n_states, taps = lossy.TRELLIS_MACHINES[self.params.trellis]
            levels_kernel[_grid(n, tpb), tpb, so](self.syms, I, *self.oI, rows, n, n_states.bit_length() - 1, taps)
        tables = (self.syms, I, F) + self.oI_rec + (self.oD,)
        if self.params.transform == lossy.TRANSFORM_IDENTITY:
            identity_kernel[_grid(self.numel, tpb), tpb, so](*tables, rows, n, out, kind)
            return
        g = np.float32(1.0 / math.sqrt(p))
        if n <= SHARED_FLOATS:
            segment_kernel[rows, tpb, so, 4 * n](*tables, 0, n, m, p, self.oQ, g, self.oS, out, kind, F, True)
            return
        batch, buf = self.batch, self.buf
        B = 1
        while 2 * B <= p and 2 * B * m <= SHARED_FLOATS:
            B *= 2
        for r0 in range(0, rows, batch):
            nr = min(batch, rows - r0)
            if m <= SHARED_FLOATS:
                segment_kernel[nr * (p // B), tpb, so, 4 * B * m](*tables, r0, n, m, B, self.oQ, g, self.oS, out, kind, buf, False)
            else:
                load_kernel[_grid(nr * n, tpb), tpb, so](*tables, r0, nr, n, buf)
            h = B
            while h < p:
                stage_kernel[_grid(nr * n // 2, tpb), tpb, so](buf, nr, n, m, h)
                h *= 2
            finish_kernel[_grid(nr * n, tpb), tpb, so](buf, r0, nr, n, m, F, self.oQ, g, self.oS, out, kind)

    def check(self) -> None:
        decode_cuda.check_status(self.plan, self.pool, self.stream_obj)


def reconstruct_device(entry, streams, out=None, *, stream_obj=0, pool_key=0):
    """Decode an ecsq tensor on the device into ``out`` (a numba device array of ``numel``
    elements: uint32 holding float32 bits for F32, uint16 bits for F16/BF16; default a new
    one). Raises the CPU decoder's named errors on bad or corrupt input, and
    :class:`decode_cuda.DeviceOutOfMemoryError` naming the tensor when the device is full."""
    job = EcsqJob(entry, streams, stream_obj=stream_obj, pool_key=pool_key)
    if out is None:
        out = decode_cuda.device_alloc(job.numel, OUT_DTYPE[entry.dtype], entry.name, stream_obj)
    if out.shape != (job.numel,):
        raise ValueError(f"out must hold {job.numel} elements")
    job.launch(out)
    job.check()
    return out


def decode_gpu(entry, streams, device="cuda"):
    """An ecsq or tcq tensor as a torch tensor of its dtype on a CUDA device, reconstructed there."""
    import torch

    from aligncodec.codec.torch_interop import torch_dtype

    dev = torch.device(device)
    with torch.cuda.device(dev):
        nstream = decode_cuda._numba_stream(dev)
        t = decode_cuda.torch_empty(entry.numel, torch_dtype(entry.dtype), dev, entry.name)
        view = t.view(torch.int32 if entry.dtype == "F32" else torch.int16)
        reconstruct_device(entry, streams, decode_cuda._as_numba(view, OUT_DTYPE[entry.dtype]), stream_obj=nstream, pool_key=dev.index)
    return t.reshape(entry.shape)
