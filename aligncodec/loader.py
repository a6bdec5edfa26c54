"""Streaming load of .acz archives into torch: one tensor at a time, bounded memory.

    >>> import aligncodec
    >>> for name, t in aligncodec.load("model.acz", device="cpu"):   # doctest: +SKIP
    ...     print(name, t.shape, t.dtype)
    >>> sd = aligncodec.load_state_dict("model.acz", dtype=torch.bfloat16)     # doctest: +SKIP
    >>> model = aligncodec.load_hf_model("model.acz", device="cuda")          # doctest: +SKIP

The archive is read sequentially (:func:`aligncodec.formats.reader.iter_archive`),
so a pipe, ``sys.stdin.buffer`` or an HTTP response body works as well as a
path. A reader thread reads and checks (CRC) the next tensor's bytes while the
current one is decoded; at most ``1 + prefetch`` tensors' compressed bytes are
held at any time, and the loader keeps no reference to a tensor once it has
been yielded. Decoding runs on the numba CPU decoder (all threads, or
``threads=``), or on the GPU (:mod:`aligncodec.codec.entropy.decode_cuda`) when
``device`` is a CUDA device and numba's CUDA target works.

:func:`load_hf_model` builds the Transformers model from the ``config.json``
carried in the archive (auxiliary entry ``acz:file/config.json``) with its
parameters on the meta device and fills each parameter as it is decoded, so
peak memory stays near the decoded model plus one tensor in flight.
"""

from __future__ import annotations

import io
import json
import os
import queue
import tempfile
import threading
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from aligncodec.auxfiles import AUX_PREFIX, is_aux
from aligncodec.formats.layout import TensorEntry
from aligncodec.formats.limits import Limits, resolve as resolve_limits
from aligncodec.formats.reader import iter_archive


class LoadError(Exception):
    """The archive decodes, but does not fit the model it describes (missing or unexpected weights)."""


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


class _Prefetcher:
    """A reader thread running iter_archive, at most ``capacity`` tensors' bytes alive at once."""

    _END = object()

    def __init__(self, f: _ExactReader, capacity: int, stats: LoadStats, limits: Limits):
        self.f = f
        self.q: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(capacity)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done = False  # the reader has finished (or failed)
        self.stats = stats
        self.limits = limits
        self.thread = threading.Thread(target=self._run, name="acz-reader", daemon=True)
        self.thread.start()

    def _acquire(self) -> bool:
        with self.lock:
            got = self.slots.acquire(blocking=False)
            if not got:
                self.stats.reader_idle.set()
        if not got:
            self.slots.acquire()
        if self.stop.is_set():
            return False
        with self.lock:
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        return True

    def release(self) -> None:
        """The consumer is done with one tensor's compressed bytes."""
        with self.lock:
            self.stats.in_flight -= 1
            if not self.done:
                self.stats.reader_idle.clear()
            self.slots.release()

    def _run(self) -> None:
        try:
            it = iter_archive(self.f, self.limits)
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
                self.q.put(("tensor", (entry, streams)))
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

    def close(self) -> None:
        self.stop.set()
        self.slots.release()


def _open(source) -> tuple[BinaryIO, bool]:
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb"), True
    if not hasattr(source, "read"):
        raise TypeError(f"load() needs a path or a binary stream with read(), not {type(source).__name__}")
    return source, False


# ----------------------------------------------------------------- decoding one tensor


def decode_tensor(entry: TensorEntry, streams: list, *, device="cpu", dtype=None, threads: int | None = None, limits: Limits | None = None):
    """Decode one archive entry into a torch tensor on ``device``.

    ``dtype`` (a torch dtype) converts floating-point tensors; others keep their dtype.
    On a CUDA device the GPU decoder is used for the modes it supports (others are
    decoded on the CPU and copied)."""
    import torch

    from aligncodec.codec.entropy.decode_cpu import num_threads
    from aligncodec.codec.modes import decode_entry, decode_entry_gpu, has_gpu_path
    from aligncodec.codec.torch_interop import bytes_to_tensor
    from aligncodec.validation import check_entry

    check_entry(entry, streams, limits)  # as verify does, before the GPU or the CPU decoder
    dev = torch.device(device)
    t = None
    if dev.type == "cuda" and has_gpu_path(entry):
        from aligncodec.codec.entropy import decode_cuda

        if decode_cuda.available():
            t = decode_entry_gpu(entry, streams, dev)
    if t is None:
        with num_threads(threads):
            raw = decode_entry(entry, streams)
        t = bytes_to_tensor(entry, raw)
        del raw
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(device=dev, dtype=dtype)
    return t.to(dev) if t.device != dev else t


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
    limits: Limits | None = None,
    max_header_bytes: int | None = None,
    max_tensor_bytes: int | None = None,
) -> Iterator[tuple[str, object]]:
    """Yield ``(name, tensor)`` for every tensor of an archive, in file order.

    ``source``: a path, or a binary stream read sequentially (pipe, socket, HTTP body).
    ``device``/``dtype``: where tensors are decoded and the floating-point dtype they get
    (None keeps the stored dtype). ``threads``: numba CPU threads (None: all).
    ``prefetch``: tensors read ahead while one is decoded (>= 0).
    ``include_aux``: also yield auxiliary files (``acz:file/<name>``) as uint8 tensors.
    ``limits``: the reader's limits (:class:`aligncodec.formats.limits.Limits`; the defaults
    bound memory and work by the bytes read). The archive is validated as ``verify`` does."""
    from aligncodec.validation import check_entry, check_header

    if prefetch < 0:
        raise ValueError("prefetch must be >= 0")
    lim = resolve_limits(limits, max_header_bytes=max_header_bytes, max_tensor_bytes=max_tensor_bytes)
    f, owned = _open(source)
    reader = _ExactReader(f)
    st = stats if stats is not None else LoadStats()
    st.source = reader
    pf = _Prefetcher(reader, 1 + prefetch, st, lim)
    try:
        kind, header = pf.get()
        check_header(header, lim)  # the same header checks as verify, inspect and decompress
        del header
        while True:
            kind, item = pf.get()
            if kind == "end":
                break
            entry, streams = item
            del item
            st.compressed_bytes += entry.size
            if is_aux(entry.name) and not include_aux:
                check_entry(entry, streams, lim)  # not decoded, but validated as verify does
                del streams
                pf.release()
                continue
            t = decode_tensor(entry, streams, device=device, dtype=None if is_aux(entry.name) else dtype, threads=threads, limits=lim)
            del streams
            pf.release()
            st.tensors += 1
            st.decoded_bytes += t.numel() * t.element_size()
            out = (entry.name, t)
            del t
            yield out
            del out
    finally:
        pf.close()
        if owned:
            f.close()


def load_state_dict(source, device="cpu", dtype=None, *, threads: int | None = None, prefetch: int = 1, limits: Limits | None = None) -> dict:
    """All tensors of an archive (auxiliary files excluded) as a dict name -> tensor."""
    return dict(load(source, device=device, dtype=dtype, threads=threads, prefetch=prefetch, limits=limits))


def _build_empty_model(config_json: bytes, model_class, trust_remote_code: bool):
    import accelerate
    import transformers

    cfg_dict = json.loads(config_json.decode("utf-8"))
    with tempfile.TemporaryDirectory(prefix="acz-config-") as d:
        with open(os.path.join(d, "config.json"), "wb") as fh:
            fh.write(config_json)
        config = transformers.AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code)
    if model_class is None:
        arch = (cfg_dict.get("architectures") or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            model_class = transformers.AutoModelForCausalLM if "causal" in str(arch).lower() or arch is None else transformers.AutoModel
    with accelerate.init_empty_weights(include_buffers=False):
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config, trust_remote_code=trust_remote_code) if model_class.__name__.startswith("Auto") else model_class(config)
        else:
            model = model_class(config)
    return model


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
):
    """Build the Hugging Face model described by the archive's ``config.json`` and fill it
    while decoding, tensor by tensor (parameters start on the meta device, so peak memory
    is about the decoded model plus one tensor in flight). Tied weights (e.g. lm_head and
    the embeddings) are tied after loading. Returns the model in eval mode.

    ``strict``: raise LoadError on archive tensors the model does not have."""
    import torch

    dev = torch.device(device)
    model = None
    pending: list[tuple[str, object]] = []  # tensors that came before config.json (unusual name order)
    loaded: set[str] = set()
    unexpected: list[str] = []

    def put(name, t):
        if _assign(model, name, t):
            loaded.add(name)
        else:
            unexpected.append(name)

    for name, t in load(source, device=dev, dtype=dtype, threads=threads, prefetch=prefetch, include_aux=True):
        if is_aux(name):
            if name == AUX_PREFIX + "config.json" and model is None:
                model = _build_empty_model(t.numpy().tobytes(), model_class, trust_remote_code)
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
