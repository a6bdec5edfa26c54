"""Streaming load of .acz archives into torch: one tensor at a time, bounded memory.

    >>> import aligncodec
    >>> for name, t in aligncodec.load("model.acz", device="cpu"):   # doctest: +SKIP
    ...     print(name, t.shape, t.dtype)
    >>> sd = aligncodec.load_state_dict("model.acz", dtype=torch.bfloat16)     # doctest: +SKIP
    >>> model = aligncodec.load_hf_model("model.acz", device="cuda")          # doctest: +SKIP

The archive is read sequentially, so a pipe, ``sys.stdin.buffer`` or an HTTP
response body works as well as a path (:func:`aligncodec.formats.reader.iter_archive`);
a path is memory-mapped instead of copied, each tensor's pages dropped from the
process once it has been decoded (as with any memory map, e.g. safetensors', a file
truncated in place by another process while it loads can end the process with
SIGBUS; aligncodec itself replaces archives atomically, never in place). A reader thread reads and checks (CRC) the next
tensors' bytes and starts decoding each as soon as it is read; at most
``1 + prefetch`` tensors are in flight (read, being decoded or waiting to be
yielded) at any time, and the loader keeps no reference to a tensor once it has
been yielded.

CPU decoding runs on a pool of worker threads (:mod:`aligncodec.codec.parallel`;
``threads=``, default all CPUs or ``ACZ_THREADS``): numba ``nogil`` kernels
parallel over rANS chunks and rows, and over the tensors in flight, so reading,
CRC, zstd and decoding overlap. On a CUDA device the GPU decoder is used for the
modes it supports (float-split, ecsq, tcq), when numba's CUDA target works, in
batches of consecutive tensors (:mod:`aligncodec.codec.modes.gpu_batch`: one
staging copy, one rANS launch, one status copy and one wait per batch, the next
batch queued before the current one is waited for; the reader then holds up to two
batches, bounded by their compressed bytes); the others (``stored``, and
``bytegroup``, which has no GPU decoder: its registry entry has none) are decoded
on the CPU pool as soon as they are read, while the GPU works, and copied.

:func:`load_hf_model` builds the Transformers model from the ``config.json``
carried in the archive (auxiliary entry ``acz:file/config.json``) with its
parameters on the meta device and fills each parameter as it is decoded, so
peak memory stays near the decoded model plus the tensors in flight.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import queue
import tempfile
import threading
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np

from aligncodec.auxfiles import AUX_PREFIX, is_aux
from aligncodec.formats import errors as E
from aligncodec.formats.constants import MODE_BYTEGROUP, MODE_ECSQ, MODE_FLOAT_SPLIT, MODE_STORED, MODE_TCQ
from aligncodec.formats.layout import TensorEntry, crc32
from aligncodec.formats.limits import Limits, resolve as resolve_limits
from aligncodec.formats.reader import iter_archive, parse_header
from aligncodec.formats.streams import RansStream, RawStream, ZstdStream, parse_streams


class LoadError(Exception):
    """The archive decodes, but does not fit the model it describes (missing or unexpected
    weights, an unusable config.json, an architecture that is not a causal LM)."""

    exit_code = 4  # the CLI's exit code (README): the archive is not what it claims


# ----------------------------------------------------------------- sequential reading with prefetch


class _ExactReader(io.RawIOBase):
    """read(n) returns n bytes unless the source ends (pipes and sockets may return fewer)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data = self._f.read()
            self.bytes_read += len(data)
            return data
        parts = []
        left = n
        while left > 0:
            b = self._f.read(left)
            if not b:
                break
            parts.append(b)
            left -= len(b)
        data = b"".join(parts)
        self.bytes_read += len(data)
        return data


@dataclass
class LoadStats:
    """What the loader held and read; for tests and benchmarks."""

    in_flight: int = 0  # tensors whose compressed bytes are held now
    max_in_flight: int = 0
    tensors: int = 0
    compressed_bytes: int = 0
    decoded_bytes: int = 0
    reader_idle: threading.Event = field(default_factory=threading.Event)  # reader waits for a slot or is done
    source: _ExactReader | None = None

    @property
    def bytes_read(self) -> int:
        return self.source.bytes_read if self.source is not None else 0


class _MappedSource:
    """A regular file mapped read-only. ``bytes_read``: how far the reader has got (as for a stream)."""

    def __init__(self, f):
        self.f = f
        self.size = os.fstat(f.fileno()).st_size
        self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.mv = memoryview(self.mm)
        self.bytes_read = 0
        self._advise(getattr(mmap, "MADV_SEQUENTIAL", None), 0, self.size)

    def _advise(self, how, start: int, end: int) -> None:
        if how is None:
            return
        page = mmap.PAGESIZE
        a = start // page * page
        b = min(self.size, end)
        if b > a:
            try:
                self.mm.madvise(how, a, b - a)
            except (OSError, ValueError):
                pass

    def will_need(self, start: int, end: int) -> None:
        """Start reading a range from disk ahead of use (cold page cache)."""
        self._advise(getattr(mmap, "MADV_WILLNEED", None), start, end)

    def drop(self, start: int, end: int) -> None:
        """Unmap a range's pages from this process (they stay in the page cache; a later
        access faults them back in), so the archive does not add to the loader's RSS."""
        page = mmap.PAGESIZE
        a = -(-start // page) * page  # whole pages inside [start, end) only
        b = end // page * page if end < self.size else self.size
        if b > a:
            self._advise(getattr(mmap, "MADV_DONTNEED", None), a, b)

    def close(self) -> None:
        try:
            self.mv.release()
            self.mm.close()
        except BufferError:  # a decoded tensor still views the map: it closes when that view goes
            pass


# how far ahead of the tensor being checked a mapped archive is read from disk (MADV_WILLNEED):
# the page cache fills while the CPUs decode (cold SmolLM2 fp16: reads of 1-2 MB tensors, one
# ahead, left the reader thread waiting on the disk for most of the load)
READAHEAD = 32 << 20


def _iter_mapped(src: _MappedSource, limits: Limits):
    """iter_archive over a mapped file: the same checks and errors, tensor bytes as views of the map."""
    src.f.seek(0)
    header = parse_header(src.f, limits)
    end = header.data_offset + header.data_size
    if src.size < end:
        raise E.TruncatedError(f"archive is {src.size} bytes, its header says {end}")
    yield header, None, None
    base = header.data_offset
    pos = 0
    ahead = base  # the file is being read (MADV_WILLNEED) up to here
    ts = header.tensors
    for i, e in enumerate(ts):
        if e.offset > pos and any(src.mv[base + pos : base + e.offset]):
            raise E.LayoutError(f"non-zero padding before tensor {e.name!r}")
        # keep the disk READAHEAD bytes ahead of the tensor being checked (and at least the next
        # tensor), so that a cold file is read while the CPUs decode what came before
        need = base + (ts[i + 1] if i + 1 < len(ts) else e).offset + (ts[i + 1] if i + 1 < len(ts) else e).size
        want = min(end, max(base + e.offset + e.size + READAHEAD, need))
        if need > ahead or want - ahead >= READAHEAD // 2:
            src.will_need(ahead, want)
            ahead = want
        data = src.mv[base + e.offset : base + e.offset + e.size]
        if crc32(data) != e.crc:
            raise E.ChecksumError(f"tensor {e.name!r}: data checksum mismatch")
        pos = e.offset + e.size
        src.bytes_read = base + pos
        streams = parse_streams(data, e.stream_count)
        del data
        yield None, e, streams
    if src.size > end:
        raise E.LayoutError("trailing bytes after the data section")


class _Prefetcher:
    """A reader thread running the archive iterator, at most ``capacity`` tensors in flight at once.
    ``start(entry, streams)`` is called in the reader thread for every tensor as soon as it is read
    (it starts the tensor's decoding) and its result is handed to the consumer."""

    _END = object()

    def __init__(self, it, capacity: int, stats: LoadStats, start, max_bytes: int | None = None):
        self.it = it
        self.start = start
        self.q: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(capacity)
        self.lock = threading.Lock()
        # max_bytes (the GPU path's batches): the reader also waits while the tensors in flight
        # hold this many compressed bytes (one tensor may go over), released by the consumer
        self.max_bytes = max_bytes
        self.bytes = 0
        self.room = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.done = False  # the reader has finished (or failed)
        self.stats = stats
        self.thread = threading.Thread(target=self._run, name="acz-reader", daemon=True)
        self.thread.start()

    def _acquire(self) -> bool:
        with self.lock:
            got = self.slots.acquire(blocking=False)
            if not got:
                self.stats.reader_idle.set()
        if not got:
            self.slots.acquire()
        if self.max_bytes is not None:
            with self.room:
                while self.bytes >= self.max_bytes and not self.stop.is_set():
                    self.stats.reader_idle.set()
                    self.room.wait()
        if self.stop.is_set():
            return False
        with self.lock:
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        return True

    def release(self, nbytes: int = 0) -> None:
        """The consumer is done with one tensor (``nbytes``: its compressed size, with ``max_bytes``)."""
        with self.lock:
            if self.max_bytes is not None:
                self.bytes -= nbytes
                self.room.notify_all()
            self.stats.in_flight -= 1
            if not self.done:
                self.stats.reader_idle.clear()
            self.slots.release()

    def _run(self) -> None:
        try:
            it = self.it
            header, _, _ = next(it)
            self.q.put(("header", header))
            while True:
                if not self._acquire():
                    return
                try:
                    _, entry, streams = next(it)
                except StopIteration:
                    with self.lock:
                        self.stats.in_flight -= 1
                    break
                if self.max_bytes is not None:
                    with self.lock:
                        self.bytes += entry.size
                self.q.put(("tensor", (entry, self.start(entry, streams))))
                del entry, streams
            self.q.put(("end", None))
        except BaseException as exc:  # handed to the consumer
            self.q.put(("error", exc))
        finally:
            with self.lock:
                self.done = True
                self.stats.reader_idle.set()

    def get(self):
        kind, value = self.q.get()
        if kind == "error":
            raise value
        return kind, value

    def close(self, join: bool = False) -> None:
        self.stop.set()
        self.slots.release()
        with self.room:
            self.room.notify_all()
        if join and self.thread is not threading.current_thread():
            self.thread.join()


def _open(source) -> tuple[BinaryIO, bool]:
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb"), True
    if not hasattr(source, "read"):
        raise TypeError(f"load() needs a path or a binary stream with read(), not {type(source).__name__}")
    return source, False


# ----------------------------------------------------------------- decoding one tensor


_KNOWN_STREAMS = (RawStream, ZstdStream, RansStream)


def _plan_bytes(entry: TensorEntry, streams: list, out: np.ndarray, threads: int | None):
    """The plan that decodes a tensor's bytes into ``out`` (uint8, entry.nbytes); the entry and
    its streams have passed :func:`~aligncodec.validation.check_entry` (:func:`decode_tensor`)."""
    if all(isinstance(s, _KNOWN_STREAMS) for s in streams):
        if entry.mode in (MODE_STORED, MODE_FLOAT_SPLIT, MODE_BYTEGROUP):
            from aligncodec.codec.modes import lossless

            return lossless.plan_decode(entry, streams, out, threads=threads, validated=True)
        if entry.mode in (MODE_ECSQ, MODE_TCQ):  # tcq: ecsq's plan with a level pass (spec §7.6)
            from aligncodec.codec.modes import lossy_cpu

            return lossy_cpu.plan_ecsq(entry, streams, out, threads=threads)
    return _plan_whole(entry, streams, out)


def _plan_whole(entry, streams, out):
    """Any other mode or stream kind: the mode registry's CPU decoder, as one task."""
    from aligncodec.codec.modes import decode_entry

    def task():
        raw = np.asarray(decode_entry(entry, streams)).reshape(-1).view(np.uint8)
        if raw.size != entry.nbytes:
            raise E.StreamError(f"tensor {entry.name!r} decoded to {raw.size} bytes, {entry.nbytes} expected")
        out[:] = raw

    yield [task]
    return out


def _plan_tensor(entry: TensorEntry, streams: list, dtype, threads: int | None):
    """Plan: decode into a new torch tensor's memory (no copy), then convert to ``dtype``."""
    import torch

    from aligncodec.codec.torch_interop import torch_dtype

    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    yield from _plan_bytes(entry, streams, buf.numpy(), threads)
    t = buf.view(torch_dtype(entry.dtype)).reshape(entry.shape)
    del buf
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        box = [t]
        yield [lambda: box.__setitem__(0, box[0].to(dtype))]
        t = box[0]
    return t


def decode_tensor(entry: TensorEntry, streams: list, *, device="cpu", dtype=None, threads: int | None = None,
                  limits: Limits | None = None, asynchronous: bool = False):
    """Decode one archive entry into a torch tensor on ``device``.

    ``dtype`` (a torch dtype) converts floating-point tensors; others keep their dtype.
    On a CUDA device the GPU decoder is used for the modes it supports (others are
    decoded on the CPU and copied). ``asynchronous`` (CPU only): return a Future at once,
    the tensor decoding on the pool (the loader's path; validation errors still raise here)."""
    import torch

    from aligncodec.codec import parallel
    from aligncodec.codec.modes import decode_entry_gpu, has_gpu_path
    from aligncodec.validation import check_entry

    check_entry(entry, streams, limits)  # as verify does, before the GPU or the CPU decoder
    dev = torch.device(device)
    if asynchronous:
        if dev.type != "cpu":
            raise ValueError("asynchronous decoding is for the CPU")
        return parallel.submit(_plan_tensor(entry, streams, dtype, threads), threads)
    t = None
    if dev.type == "cuda" and has_gpu_path(entry):
        from aligncodec.codec.entropy import decode_cuda

        if decode_cuda.available():
            t = decode_entry_gpu(entry, streams, dev)
    if t is None:
        t = parallel.run(_plan_tensor(entry, streams, dtype if dev.type == "cpu" else None, threads), threads)
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(device=dev, dtype=dtype)
    return t.to(dev) if t.device != dev else t


class _GpuItem:
    """A tensor read for the GPU path: decoded in a batch by the consumer (:func:`_consume_gpu`)."""

    __slots__ = ("streams", "want")

    def __init__(self, streams, want):
        self.streams, self.want = streams, want


def _gpu_device_ok(dev) -> bool:
    """True when ``dev`` is a CUDA device and numba's CUDA kernels run (checked once per process)."""
    if dev.type != "cuda":
        return False
    from aligncodec.codec.entropy import decode_cuda

    return decode_cuda.available()


def _failed(exc: BaseException):
    from concurrent.futures import Future

    fut: Future = Future()
    fut.set_exception(exc)
    return fut


# ----------------------------------------------------------------- public API


def load(
    source,
    device="cpu",
    dtype=None,
    *,
    threads: int | None = None,
    prefetch: int = 1,
    include_aux: bool = False,
    stats: LoadStats | None = None,
    on_header=None,
    limits: Limits | None = None,
    _decode_gate: threading.Event | None = None,
    max_header_bytes: int | None = None,
    max_tensor_bytes: int | None = None,
) -> Iterator[tuple[str, object]]:
    """Yield ``(name, tensor)`` for every tensor of an archive, in file order.

    ``source``: a path (memory-mapped), or a binary stream read sequentially (pipe, socket, HTTP body).
    ``device``/``dtype``: where tensors are decoded and the floating-point dtype they get
    (None keeps the stored dtype). ``threads``: CPU decoding threads (None: all CPUs, or ``ACZ_THREADS``).
    ``prefetch``: tensors read (and decoded) ahead of the one being yielded (>= 0).
    ``include_aux``: also yield auxiliary files (``acz:file/<name>``) as uint8 tensors.
    ``on_header``: called with the parsed header (every entry's name, dtype and shape)
    before any tensor is read, e.g. to check the tensor list first (in the reader thread;
    what it raises is raised here).
    ``limits``: the reader's limits (:class:`aligncodec.formats.limits.Limits`; the defaults
    bound memory and work by the bytes read). The archive is validated as ``verify`` does.
    ``_decode_gate`` (internal, load_hf_model's): nothing but ``config.json`` is decoded before this event is set."""
    import torch

    from aligncodec.codec import parallel
    from aligncodec.validation import check_entry, check_header

    if prefetch < 0:
        raise ValueError("prefetch must be >= 0")
    threads = parallel.resolve_threads(threads)
    dev = torch.device(device)
    lim = resolve_limits(limits, max_header_bytes=max_header_bytes, max_tensor_bytes=max_tensor_bytes)
    f, owned = _open(source)
    mapped = None
    if owned:
        try:
            mapped = _MappedSource(f)
        except (OSError, ValueError):  # empty or unmappable file: read it as a stream
            mapped = None
    st = stats if stats is not None else LoadStats()
    if mapped is not None:
        st.source = mapped
        it = _iter_mapped(mapped, lim)
    else:
        reader = _ExactReader(f)
        st.source = reader
        it = iter_archive(reader, lim)
    from aligncodec.codec.modes import has_gpu_path

    gpu = _gpu_device_ok(dev)

    def checked(it):
        """The header as verify checks it (and ``on_header``), before any tensor is read or decoded."""
        header, _, _ = next(it)
        check_header(header, lim)  # the same header checks as verify, inspect and decompress
        if on_header is not None:
            on_header(header)
        yield header, None, None
        yield from it

    def start(entry, streams):
        """Runs in the reader thread: validate (as verify does) and start decoding the tensor
        as soon as it is read; a failure is reported by the consumer, in file order."""
        aux = is_aux(entry.name)
        if aux and not include_aux:
            try:
                check_entry(entry, streams, lim)  # not decoded, but validated as verify does
            except BaseException as exc:  # noqa: BLE001
                return _failed(exc)
            return None
        if _decode_gate is not None and entry.name != AUX_PREFIX + "config.json":  # the consumer decides first
            _decode_gate.wait()
            if pf_box and pf_box[0].stop.is_set():
                return None
        want = None if aux else dtype
        if gpu and has_gpu_path(entry):  # decoded in batches in the consumer's thread (_consume_gpu)
            return _GpuItem(streams, want)
        try:
            return decode_tensor(entry, streams, dtype=want, threads=threads, limits=lim, asynchronous=True)
        except BaseException as exc:  # noqa: BLE001 - reported in file order by the consumer
            return _failed(exc)

    pf_box: list = []
    capacity, max_bytes = 1 + prefetch, None
    if gpu:  # room for two batches in flight (codec.modes.gpu_batch), bounded by compressed bytes too
        from aligncodec.codec.modes import gpu_batch

        capacity += gpu_batch.SLOTS * gpu_batch.BATCH_TENSORS
        max_bytes = gpu_batch.SLOTS * gpu_batch.BATCH_STAGE_BYTES
    pf = _Prefetcher(checked(it), capacity, st, start, max_bytes)
    pf_box.append(pf)
    try:
        kind, header = pf.get()
        base = header.data_offset
        del header
        if gpu:
            yield from _consume_gpu(pf, dev, mapped, base, st, capacity, max_bytes, lim)
        while not gpu:
            kind, item = pf.get()
            if kind == "end":
                break
            entry, job = item
            del item
            st.compressed_bytes += entry.size
            if job is None:  # an auxiliary file not asked for, or the load is ending
                pf.release()
                if mapped is not None:
                    mapped.drop(base + entry.offset, base + entry.offset + entry.size)
                continue
            t = job.result()
            del job
            if mapped is not None:
                mapped.drop(base + entry.offset, base + entry.offset + entry.size)
            if t.device != dev:
                t = t.to(dev)
            pf.release()
            st.tensors += 1
            st.decoded_bytes += t.numel() * t.element_size()
            out = (entry.name, t)
            del t
            yield out
            del out
    finally:
        pf.stop.set()
        if _decode_gate is not None:
            _decode_gate.set()  # a reader waiting at the gate sees the stop and decodes nothing more
        pf.close(join=mapped is not None)  # a mapped file never blocks the reader: wait, then unmap
        if mapped is not None:
            mapped.close()
        if owned:
            f.close()
        from aligncodec.codec.modes import release_decoder_scratch

        release_decoder_scratch()  # the symbol buffers kept for the next lossy tensor


def _to_device(t, dev):
    """A CPU-decoded tensor (stored, bytegroup) copied to the load's device."""
    return t.to(dev) if t.device != dev else t


def _consume_gpu(pf, dev, mapped, base, st, capacity, max_bytes, lim):
    """The consumer side of :func:`load` on a CUDA device: runs of GPU-decodable tensors go into
    batches (:mod:`aligncodec.codec.modes.gpu_batch`: one staging copy, one rANS launch, one
    status copy and one wait per batch); the next batch is submitted before the one at the front
    is waited for; other tensors (decoded on the CPU pool as soon as read) are copied to the
    device in their turn. Tensors are yielded in file order; an error is raised in its turn."""
    from collections import deque

    from aligncodec.codec.modes import gpu_batch
    from aligncodec.validation import check_entry, check_entry_header

    backend = gpu_batch.TorchBackend(dev)
    pending: deque = deque()  # (entry, job, batch, index) in file order; batch None: a CPU job
    held = [0, 0]  # tensors and compressed bytes received and not yet released
    slots: list = [None] * gpu_batch.SLOTS  # the batch holding each slot's buffers
    live: list = []  # batches submitted and not yet finished
    state = {"open": None, "ended": False, "failure": None, "next": 0}

    def check(entry, streams):
        check_entry(entry, streams, lim)

    def check_header(entry):
        check_entry_header(entry, lim)

    def submit(b):
        k = state["next"] % gpu_batch.SLOTS
        state["next"] += 1
        owner = slots[k]
        if owner is not None and not owner.finished:
            owner.finish(backend)
            live.remove(owner)
        b.slot = k
        slots[k] = b
        b.submit(backend)
        live.append(b)

    def close_open():
        b = state["open"]
        if b is not None:
            state["open"] = None
            submit(b)

    def pull():
        try:
            kind, item = pf.get()
        except BaseException as exc:  # noqa: BLE001 - raised after the tensors before it
            state["ended"], state["failure"] = True, exc
            return
        if kind == "end":
            state["ended"] = True
            return
        entry, job = item
        st.compressed_bytes += entry.size
        if job is None:  # an auxiliary file not asked for
            pf.release(entry.size)
            if mapped is not None:
                mapped.drop(base + entry.offset, base + entry.offset + entry.size)
            return
        held[0] += 1
        held[1] += entry.size
        if isinstance(job, _GpuItem):
            b = state["open"]
            if b is None or not b.fits(entry):
                close_open()
                b = state["open"] = gpu_batch.Batch(0, check, check_header)
            pending.append((entry, job, b, b.add(entry, job.streams)))
        else:
            pending.append((entry, job, None, 0))

    def need_more() -> bool:
        if not pending:
            return True
        b = pending[0][2]
        if b is None:
            return False  # a CPU tensor at the front: yield it
        if not b.submitted:
            return True  # its batch is still filling
        return len(live) < 2  # read on until the next batch is queued behind it

    try:
        while True:
            with backend.context():  # the device made current for our work only, never across a yield
                while not state["ended"] and held[0] < capacity and held[1] < max_bytes and need_more():
                    pull()
                if not pending:
                    break
                entry, job, b, i = pending[0]
                if b is not None:
                    if not b.submitted:
                        close_open()
                    elif state["open"] is not None and len(live) < 2:
                        close_open()  # queue the next batch before waiting for this one
                    if not b.finished:
                        b.finish(backend)
                        live.remove(b)
                    t = b.take(i, backend)  # the tensor, or its error in file order
                    if job.want is not None and t.is_floating_point() and t.dtype != job.want:
                        t = t.to(job.want)
                else:
                    t = _to_device(job.result(), dev)
            pending.popleft()
            del job, b
            if mapped is not None:
                mapped.drop(base + entry.offset, base + entry.offset + entry.size)
            pf.release(entry.size)
            held[0] -= 1
            held[1] -= entry.size
            st.tensors += 1
            st.decoded_bytes += t.numel() * t.element_size()
            out = (entry.name, t)
            del t
            yield out
            del out
        if state["failure"] is not None:
            raise state["failure"]
    finally:
        for b in live:  # a load ended early: no kernel may still use the pools' buffers
            if b.done is not None:
                b.done.synchronize()


def load_state_dict(source, device="cpu", dtype=None, *, threads: int | None = None, prefetch: int = 1,
                    limits: Limits | None = None) -> dict:
    """All tensors of an archive (auxiliary files excluded) as a dict name -> tensor."""
    return dict(load(source, device=device, dtype=dtype, threads=threads, prefetch=prefetch, limits=limits))


def _parse_config(config_json: bytes) -> dict:
    try:
        cfg = json.loads(config_json.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoadError(f"the archive's config.json is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(cfg, dict):
        raise LoadError("the archive's config.json is not a JSON object")
    return cfg


def _make_config(config_json: bytes, trust_remote_code: bool):
    """A transformers config from the archive's config.json (LoadError if it is not one)."""
    import transformers

    _parse_config(config_json)
    with tempfile.TemporaryDirectory(prefix="acz-config-") as d:
        with open(os.path.join(d, "config.json"), "wb") as fh:
            fh.write(config_json)
        try:
            return transformers.AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad config
            raise LoadError(f"the archive's config.json is not a usable transformers config "
                            f"({type(exc).__name__}: {str(exc)[:300]})") from None


def _causal_lm_class_name(config) -> str:
    """The causal-LM class transformers' auto classes give this config's model type; the
    archive's ``architectures`` must name that class (or nothing). Nothing else in
    transformers is ever looked up by a name from the file."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = getattr(config, "model_type", None)
    want = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt) if isinstance(mt, str) else None
    if not isinstance(want, str):
        raise LoadError(f"model type {mt!r} has no causal-LM class in transformers (load_hf_model builds causal LMs; "
                        "pass model_class= for other models)")
    archs = getattr(config, "architectures", None)
    if archs:
        if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
            raise LoadError("config.json architectures is not a list of names")
        if archs[0] != want:
            raise LoadError(f"config.json names architecture {archs[0]!r}; for model type {mt!r} only the causal-LM "
                            f"class {want!r} is built (pass model_class= to choose another)")
    return want


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_INDEX_RE = None


def _check_layer_count(config, names: list[str]) -> None:
    """Before anything is built: a config that declares more layers than the archive's tensor
    names can hold (``…layers.<i>.…`` with i up to count − 1) is refused, so a tiny archive
    cannot make the loader build a huge model."""
    import re

    global _INDEX_RE
    if _INDEX_RE is None:
        _INDEX_RE = re.compile(r"\.(\d{1,9})\.")
    top = -1
    for n in names:
        for m in _INDEX_RE.finditer(n):
            top = max(top, int(m.group(1)))
    for key in _LAYER_COUNT_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 0 or v > top + 1:
                raise LoadError(f"config.json declares {key}={v}, but the archive's tensors hold {top + 1} numbered layers")
            return


def _build_empty_model(config, model_class, trust_remote_code: bool):
    """The model with its parameters on the meta device (buffers on the CPU)."""
    import accelerate
    import torch
    import transformers

    with accelerate.init_empty_weights(include_buffers=False):
        try:
            if model_class is None:
                model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            elif getattr(model_class, "__name__", "").startswith("Auto") and hasattr(model_class, "from_config"):
                model = model_class.from_config(config, trust_remote_code=trust_remote_code)
            else:
                model = model_class(config)
        except LoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a config transformers cannot build
            raise LoadError(f"cannot build the model from config.json ({type(exc).__name__}: {str(exc)[:300]})") from None
    if not isinstance(model, torch.nn.Module):
        raise LoadError(f"{type(model).__name__} is not a model")
    return model


def _check_tensor_list(model, entries: dict[str, tuple[int, ...]], strict: bool) -> None:
    """The archive's tensors against the (meta) model's parameters and buffers, before any
    weight is decoded: unexpected names (``strict``), wrong shapes, and model weights the
    archive lacks that are not tied to one it has."""
    expected: dict[str, tuple[int, ...]] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        expected[n] = tuple(t.shape)
    bad_shape = [n for n, shp in entries.items() if n in expected and tuple(expected[n]) != tuple(shp)]
    if bad_shape:
        n = bad_shape[0]
        raise LoadError(f"{n}: archive shape {tuple(entries[n])} != model shape {expected[n]}"
                        + (f" (and {len(bad_shape) - 1} more)" if len(bad_shape) > 1 else ""))
    unexpected = [n for n in entries if n not in expected]
    if unexpected and strict:
        raise LoadError(f"{len(unexpected)} archive tensors are not in the model, e.g. {unexpected[:3]}")
    groups: dict[int, list[str]] = {}
    try:
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    except Exception:  # noqa: BLE001 - tying on meta is best effort; the check after loading stays
        pass
    for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(p), []).append(n)
    missing = []
    for names in groups.values():
        if not any(n in entries for n in names) and any(n in expected for n in names):
            missing.extend(n for n in names if n in expected)
    if missing:
        raise LoadError(f"{len(missing)} model weights are not in the archive, e.g. {missing[:3]}")


def _assign(model, name: str, t) -> bool:
    import torch

    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    if attr in mod._parameters and mod._parameters[attr] is not None:
        old = mod._parameters[attr]
        if tuple(old.shape) != tuple(t.shape):
            raise LoadError(f"{name}: archive shape {tuple(t.shape)} != model shape {tuple(old.shape)}")
        mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        return True
    if attr in mod._buffers and mod._buffers[attr] is not None:
        old = mod._buffers[attr]
        if tuple(old.shape) != tuple(t.shape):
            raise LoadError(f"{name}: archive shape {tuple(t.shape)} != model shape {tuple(old.shape)}")
        mod._buffers[attr] = t
        return True
    return False


def load_hf_model(
    source,
    device="cpu",
    dtype=None,
    *,
    threads: int | None = None,
    prefetch: int = 1,
    model_class=None,
    strict: bool = True,
    trust_remote_code: bool = False,
    limits=None,
):
    """Build the Hugging Face model described by the archive's ``config.json`` and fill it
    while decoding, tensor by tensor (parameters start on the meta device, so peak memory
    is about the decoded model plus one tensor in flight). Tied weights (e.g. lm_head and
    the embeddings) are tied after loading. Returns the model in eval mode.

    ``strict``: raise LoadError on archive tensors the model does not have.
    ``limits``: the reader's resource limits (:class:`aligncodec.formats.limits.Limits`), as for :func:`load`."""
    import torch

    dev = torch.device(device)
    model = None
    pending: list[tuple[str, object]] = []  # tensors that came before config.json (unusual name order)
    loaded: set[str] = set()
    unexpected: list[str] = []
    entries: dict[str, tuple[int, ...]] = {}
    gate = threading.Event()  # no weight is decoded before the model is built and the tensor list checked

    def on_header(header):
        names = [e.name for e in header.tensors]
        if AUX_PREFIX + "config.json" not in names:
            raise LoadError("the archive carries no config.json (compress a model folder, not a single .safetensors file)")
        entries.update((e.name, tuple(e.shape)) for e in header.tensors if not e.name.startswith(AUX_PREFIX))
        first = names.index(AUX_PREFIX + "config.json")
        if first:  # tensors before config.json (unusual order): the consumer needs them, no gate
            gate.set()

    def build(config_json: bytes):
        config = _make_config(config_json, trust_remote_code)
        if model_class is None:
            _causal_lm_class_name(config)
        _check_layer_count(config, list(entries))
        m = _build_empty_model(config, model_class, trust_remote_code)
        _check_tensor_list(m, entries, strict)
        return m

    def put(name, t):
        if _assign(model, name, t):
            loaded.add(name)
        else:
            unexpected.append(name)

    for name, t in load(source, device=dev, dtype=dtype, threads=threads, prefetch=prefetch, include_aux=True,
                        on_header=on_header, _decode_gate=gate, limits=limits):
        if is_aux(name):
            if name == AUX_PREFIX + "config.json" and model is None:
                model = build(t.numpy().tobytes())
                gate.set()
                for n2, t2 in pending:
                    put(n2, t2)
                pending.clear()
            continue
        if model is None:
            pending.append((name, t))
        else:
            put(name, t)
        del t
    if model is None:
        raise LoadError("the archive carries no config.json (compress a model folder, not a single .safetensors file)")
    if unexpected and strict:
        raise LoadError(f"{len(unexpected)} archive tensors are not in the model, e.g. {unexpected[:3]}")
    expected = set(model.state_dict().keys())
    missing = expected - loaded
    if hasattr(model, "tie_weights"):
        try:
            model.tie_weights(missing_keys=set(missing))
        except TypeError:  # older transformers
            model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if still_meta:
        raise LoadError(f"{len(still_meta)} model weights are not in the archive, e.g. {still_meta[:3]}")
    # non-persistent buffers (rotary tables, ...) were built on the CPU
    for mod in model.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
                mod._buffers[k] = b.to(dev)
    return model.eval()
