"""Many tensors decoded on a CUDA device per batch: the loader's GPU path (``load(device="cuda")``).

A batch is a run of consecutive GPU-decodable tensors of an archive (float-split, ecsq, tcq), up
to :data:`BATCH_TENSORS` tensors, :data:`BATCH_STAGE_BYTES` of compressed bytes and
:data:`BATCH_OUT_BYTES` of decoded bytes (a whole SmolLM2 decoder block fits; a large tensor
is a batch of its own). Per batch, not per tensor:

* ONE pinned staging buffer (this batch slot's :class:`decode_cuda.Pool`) holding every
  stream's words, chunk and slot tables and every tensor's reconstruction tables, sent with
  ONE asynchronous host-to-device copy (on a copy stream; the decode stream waits on an event);
* ONE rANS launch for every stream of every tensor of the batch, into one symbol buffer;
* ONE launch of the tcq level pass for every tcq tensor of the batch (spec §7.6);
* the reconstruction launches, one per tensor (rows longer than the shared-memory segment:
  a few more); they write straight into each tensor's own output (torch memory, one
  allocation per tensor, so no two yielded tensors share storage);
* ONE copy of every chunk's status back and ONE wait (an event), when the batch is finished.

Two batch slots alternate: the loader stages and submits batch N+1 before it waits for batch N,
so the GPU always has the next batch queued and the host packs one batch while the GPU decodes
the other. Errors keep file order: a tensor whose header, streams or chunks are bad raises the
CPU decoder's named error when its turn comes, after every earlier tensor was yielded.

Tensors in modes without a GPU decoder (``stored``, ``bytegroup``) are not batched: the loader
decodes them on the CPU worker pool as soon as they are read (so while the GPU works) and
copies each to the device when its turn comes. A mode with a GPU decoder but no batch
stager here (a future one) is decoded tensor by tensor through its registry ``decode_gpu``.

The device side (memory, streams, output tensors) comes from a backend: :class:`TorchBackend`
(torch tensors on a CUDA device) in the loader; the CUDA-simulator tests use numba arrays.
"""

from __future__ import annotations

import numpy as np

from aligncodec.codec.entropy import decode_cpu, decode_cuda
from aligncodec.formats.constants import FLOAT_FORMATS, MODE_ECSQ, MODE_FLOAT_SPLIT, MODE_TCQ

BATCH_TENSORS = 32  # tensors per batch at most
BATCH_STAGE_BYTES = 32 << 20  # compressed bytes per batch (the pinned staging buffer), unless one tensor is larger
BATCH_OUT_BYTES = 256 << 20  # decoded bytes per batch (GPU memory being written at once, plus its symbols), unless one tensor is larger
SLOTS = 2  # batches in flight: one decoding, the next staged and queued

_OUT_NP = {16: np.uint16, 32: np.uint32, 64: np.uint64}


class TorchBackend:
    """Output tensors and the stream of a torch CUDA device."""

    def __init__(self, device):
        import torch

        self.dev = torch.device(device)
        self.pool_key = self.dev.index
        self._copy = None

    def context(self):
        import torch

        return torch.cuda.device(self.dev)

    def stream(self):
        return decode_cuda._numba_stream(self.dev)  # torch's current stream: torch sees the outputs in order

    def copy_stream(self):
        from numba import cuda

        if self._copy is None:
            self._copy = cuda.stream()
        return self._copy

    def alloc(self, entry):
        """(numba view of the output's bit patterns, a function giving the tensor to yield)."""
        import torch

        from aligncodec.codec.torch_interop import torch_dtype

        dt = torch_dtype(entry.dtype)
        t = decode_cuda.torch_empty(entry.numel, dt, self.dev, entry.name)
        width = 8 * entry.itemsize
        iv = t.view({16: torch.int16, 32: torch.int32, 64: torch.int64}[width])
        return decode_cuda._as_numba(iv, _OUT_NP[width]), lambda: t.reshape(entry.shape)

    def scratch(self, n: int, dtype, name: str):
        """A device scratch array of n elements from torch's caching allocator (on this backend's
        stream, the one every kernel of a batch runs on): (numba view, the torch tensor to keep
        until the batch is finished)."""
        import torch

        tdt = {np.dtype(np.uint16): torch.int16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
        t = decode_cuda.torch_empty(n, tdt, self.dev, name)
        return decode_cuda._as_numba(t, dtype if tdt == torch.int16 else None), t

    def single(self, entry, streams):
        from aligncodec.codec.modes import decode_entry_gpu

        return decode_entry_gpu(entry, streams, self.dev)


def _event():
    from numba import cuda

    try:
        return cuda.event(timing=False)
    except TypeError:  # the simulator's Event takes no argument
        return cuda.event()


def batchable(entry) -> bool:
    """True for the modes staged into a batch here."""
    return entry.mode in (MODE_FLOAT_SPLIT, MODE_ECSQ, MODE_TCQ)


class _Item:
    __slots__ = ("entry", "streams", "kind", "job", "base", "p0", "p1", "error", "result", "extra")

    def __init__(self, entry, streams):
        self.entry, self.streams = entry, streams
        self.kind = self.job = self.error = self.result = self.extra = None
        self.base = self.p0 = self.p1 = 0


class Batch:
    """Tensors staged for one launch of the rANS kernel (module doc)."""

    def __init__(self, slot: int, check=None, check_header=None):
        self.slot = slot
        # the loader's verify checks before staging: check(entry, streams) in full (header entry and
        # streams), check_header(entry) the header entry alone, for the batched modes, whose staging
        # runs the same stream validation (lossy.parse, lossless.validate) once instead of twice
        self.check = check
        self.check_header = check_header
        self.st = decode_cuda.Staging()
        self.items: list[_Item] = []
        self.prepared: list = []
        self.nsym = 0
        self.in_bytes = 0
        self.out_bytes = 0
        self.levels: list = []  # (item index, job) of the tcq tensors: one level-pass launch for all
        self.submitted = self.finished = False
        self.plan = None
        self.views = None
        self.pool = None
        self.done = None
        self._keep: list = []

    def fits(self, entry) -> bool:
        if not self.items:
            return True
        return (len(self.items) < BATCH_TENSORS and self.st.nbytes + entry.size <= BATCH_STAGE_BYTES
                and self.out_bytes + entry.nbytes <= BATCH_OUT_BYTES)

    def add(self, entry, streams) -> int:
        """Stage one tensor (errors are kept and raised in its turn); returns its index."""
        it = _Item(entry, streams)
        self.items.append(it)
        self.in_bytes += entry.size
        self.out_bytes += entry.nbytes
        try:
            if batchable(entry) and self.check_header is not None:
                self.check_header(entry)
            elif self.check is not None:
                self.check(entry, streams)
            if entry.mode == MODE_FLOAT_SPLIT:
                self._stage_float_split(it)
            elif entry.mode in (MODE_ECSQ, MODE_TCQ):
                self._stage_lossy(it)
            else:
                it.kind = "single"
        except Exception as exc:  # noqa: BLE001 - raised in file order by finish()
            it.error = exc
        return len(self.items) - 1

    def _take(self, it, prepared) -> None:
        it.p0 = len(self.prepared)
        self.prepared.extend(prepared)
        it.p1 = len(self.prepared)

    def _stage_float_split(self, it) -> None:
        from aligncodec.codec.modes import lossless

        entry, streams = it.entry, it.streams
        lossless.validate(entry, streams)
        width, e = FLOAT_FORMATS[entry.dtype]
        k = entry.params[0]
        rest = lossless._bytes_from(streams[1], lossless.packed_size(entry.numel, width - e - k), entry.name)
        w, rw, low, raw = decode_cpu.float_split_layout(streams[0], rest, entry.dtype, k)
        it.base = self.nsym
        prepared = decode_cuda.prepare_streams([streams[0]], [it.base])
        roff = self.st.add(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)) if entry.numel else 0
        self._take(it, prepared)
        it.kind, it.extra = "float-split", (roff, rw, low, w)
        self.nsym += entry.numel

    def _stage_lossy(self, it) -> None:
        from aligncodec.codec.modes import lossy_cuda

        it.base = self.nsym
        job = lossy_cuda.EcsqJob(it.entry, it.streams, st=self.st, sym_base=it.base)
        self._take(it, job.prepared)
        it.kind, it.job = "lossy", job
        if job.params.trellis and job.numel:
            self.levels.append(job)
        self.nsym += it.entry.numel

    def submit(self, backend) -> None:
        """Upload the batch (one copy), launch its kernels; returns without waiting. A failure of
        the batch as a whole (no usable device, out of device or pinned memory for its buffers)
        is kept as the error of its first tensor not already failed, raised in that tensor's
        turn (so the tensors of earlier batches are still yielded first)."""
        try:
            self._submit(backend)
        except Exception as exc:  # noqa: BLE001
            try:
                decode_cuda._sync(backend.stream())  # nothing of this batch may still run on its slot's buffers
            except Exception:  # noqa: BLE001
                pass
            first = next((it for it in self.items if it.error is None), None)
            if first is not None:
                first.error, first.result = exc, None
            self.done = None
            self.plan = None
            self.submitted = True

    def _submit(self, backend) -> None:
        from aligncodec.codec.modes import lossy, lossy_cuda

        decode_cuda.require()
        so = backend.stream()
        name = self.items[0].entry.name if self.items else "?"
        good = next((k for k, it in enumerate(self.items) if it.error is not None), len(self.items))
        lv = [j for j in self.levels if any(it.job is j for it in self.items[:good])]  # tensors before a bad one
        tpb_l = lossy_cuda.THREADS_PER_BLOCK
        if lv:
            recs, blocks = [], []
            for t, j in enumerate(lv):
                n_states, taps = lossy.TRELLIS_MACHINES[j.params.trellis]
                recs.append(j.oI + (j.rows, j.n, n_states.bit_length() - 1, taps, j.sym_base))
                blocks.extend((t, c0) for c0 in range(0, j.n, tpb_l))
                j.levels_done = True
            o_recs = self.st.add(np.asarray(recs, np.int64).reshape(-1))
            o_blocks = self.st.add(np.asarray(blocks, np.int64).reshape(-1))
        self.plan = decode_cuda.plan_prepared(self.prepared, self.st)
        self.pool = p = decode_cuda.pool((backend.pool_key, self.slot))
        cs = backend.copy_stream()
        self.views = p.upload(self.st, name, cs if cs is not None else so)
        if cs is not None:
            ev = _event()
            ev.record(cs)
            ev.wait(so)
        self.st = None  # the host parts stay referenced by views["_host"] until the batch is finished
        d_status = p.status(max(1, self.plan.n_chunks), name, so)
        scratch = getattr(backend, "scratch", None)
        if scratch is not None:  # torch's caching allocator: no cudaMalloc/cudaFree (a device-wide wait) per batch
            syms, keep = scratch(max(1, self.nsym), np.uint16, name)
            self._keep.append(keep)
        else:
            syms = p.array("syms", max(1, self.nsym), np.uint16, name, so)
        need_buf = max((it.job.batch * it.job.n for it in self.items if it.kind == "lossy" and it.error is None
                        and it.job.batch is not None), default=0)
        buf = None
        if need_buf and scratch is not None:
            buf, keep = scratch(need_buf, np.float32, name)
            self._keep.append(keep)
        elif need_buf:
            buf = p.array("rowbuf", need_buf, np.float32, name, so)
        decode_cuda.launch_symbols(self.plan, self.views, syms, d_status, so)
        if lv:
            lossy_cuda.levels_multi_kernel[len(blocks), tpb_l, so](syms, self.views["i8"], o_recs, o_blocks)
        tpb = decode_cuda.JOIN_THREADS_PER_BLOCK
        for it in self.items:
            if it.error is not None:
                break  # nothing after a bad tensor is yielded
            if it.kind == "single":
                continue
            try:
                out, it.result = backend.alloc(it.entry)
                n = it.entry.numel
                if it.kind == "float-split":
                    if n:
                        roff, rw, low, width = it.extra
                        decode_cuda.join_from_kernel[decode_cuda._grid(n, tpb), tpb, so](
                            out, syms, it.base, self.views["u1"], roff, n, rw, low, width)
                else:
                    job = it.job
                    job.views, job.buf, job.stream_obj = self.views, buf, so
                    job.syms = syms[it.base : it.base + max(1, n)] if n else syms
                    job.reconstruct(out)
            except Exception as exc:  # noqa: BLE001 - e.g. out of GPU memory, raised in its turn
                it.error = exc
                break
        if self.plan.n_chunks:
            decode_cuda._d2h(p.h_status, p.d_status, 4 * self.plan.n_chunks, so)
        self.done = _event()
        self.done.record(so)
        self.submitted = True

    def finish(self, backend) -> None:
        """Wait for the batch (its event), check every chunk's status, keep each tensor's result
        or error (the first corrupt tensor's CPU error; nothing after it is kept)."""
        if self.finished:
            return
        if self.done is not None:
            self.done.synchronize()
        self.finished = True
        h = self.pool.h_status if self.plan is not None else None
        bad = self.plan is not None and self.plan.n_chunks and h[: self.plan.n_chunks].any()
        stop = False
        for it in self.items:
            if stop:
                it.result = None
                it.error = it.error or RuntimeError("not decoded: an earlier tensor of its batch failed")
                continue
            if it.error is not None:
                stop = True
                continue
            if bad:
                try:
                    for sb, nch in self.plan.spans[it.p0 : it.p1]:
                        decode_cpu._raise_status(h[sb : sb + nch])
                except Exception as exc:  # noqa: BLE001
                    it.error, it.result, stop = exc, None, True
                    continue
        self.views = None  # the staging buffer is this slot's again
        self.prepared = []
        self._keep = []  # the scratch tensors go back to torch's cache (stream-ordered: our stream)

    def take(self, i: int, backend):
        """Tensor i of the finished batch (or its error, raised)."""
        it = self.items[i]
        self.items[i] = None  # the loader keeps no reference once yielded
        if it.error is not None:
            raise it.error
        if it.kind == "single":
            return backend.single(it.entry, it.streams)
        return it.result()


def decode_all(pairs, backend, *, check=None, check_header=None) -> list:
    """Decode ``(entry, streams)`` pairs in batches (tests and benchmarks; the loader pipelines
    its own): a list of tensors in order, the first error raised in its turn."""
    out = []
    batches = []
    b = None
    for entry, streams in pairs:
        if b is None or not b.fits(entry):
            b = Batch(len(batches) % SLOTS, check, check_header)
            batches.append(b)
        b.add(entry, streams)
    with backend.context():
        for k, b in enumerate(batches):
            if not b.submitted:
                b.submit(backend)
            if k + 1 < len(batches):
                batches[k + 1].submit(backend)  # queued before batch k is waited for
            b.finish(backend)
            for i in range(len(b.items)):
                out.append(b.take(i, backend))
    return out
