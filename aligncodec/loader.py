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
    on_header=None,
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
    ``on_header``: called with the parsed header (every entry's name, dtype and shape)
    before any tensor is read, e.g. to check the tensor list first.
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
        if on_header is not None:
            on_header(header)
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
    entries: dict[str, tuple[int, ...]] = {}

    def on_header(header):
        names = [e.name for e in header.tensors]
        if AUX_PREFIX + "config.json" not in names:
            raise LoadError("the archive carries no config.json (compress a model folder, not a single .safetensors file)")
        entries.update((e.name, tuple(e.shape)) for e in header.tensors if not e.name.startswith(AUX_PREFIX))

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
                        on_header=on_header):
        if is_aux(name):
            if name == AUX_PREFIX + "config.json" and model is None:
                model = build(t.numpy().tobytes())
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
