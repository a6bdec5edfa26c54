"""Checkpoint <-> archive: compress safetensors files or Hugging Face folders into
one .acz, decode it back, inspect it, verify it.

Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped),
so memory stays bounded by the largest tensor. Small non-tensor files of a
model folder (config, tokenizer, ...) travel in the archive as auxiliary
entries named ``acz:file/<name>`` (spec §7.3), so an archive alone rebuilds
the model folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from aligncodec import __version__
from aligncodec.codec.modes import lossless
from aligncodec.formats import container as C
from aligncodec.formats import errors as E
from aligncodec.formats import metadata as M
from aligncodec.formats.limits import Limits

AUX_PREFIX = "acz:file/"
AUX_MAX_BYTES = 256 << 20  # auxiliary files above this size are refused
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".py", ".tiktoken", ".vocab")

TORCH_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "I16": "int16",
    "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class InputError(Exception):
    """The input checkpoint cannot be read (missing, not safetensors, duplicate tensor names)."""


@dataclass
class Source:
    files: list[Path]  # safetensors files
    aux: list[Path]  # other small files of a model folder
    root: Path


def find_inputs(path: str | os.PathLike) -> Source:
    p = Path(path)
    if not p.exists():
        from aligncodec.tools.eval import models

        if str(path) in models.MODELS:  # a reference model name: its cached folder
            p = models.resolve_model(str(path))
        else:
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise InputError(f"{str(p)!r} is not a .safetensors file")
        return Source([p], [], p.parent)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise InputError(f"folder {str(p)!r} holds no .safetensors file")
    aux = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in AUX_SUFFIXES and f.stat().st_size <= AUX_MAX_BYTES)
    return Source(files, aux, p)


def _torch_bytes(t) -> np.ndarray:
    import torch

    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def iter_checkpoint(src: Source) -> Iterator[tuple[str, str, str, tuple[int, ...], np.ndarray]]:
    """Yield (file name, tensor name, dtype, shape, little-endian bytes) one tensor at a time."""
    from safetensors import safe_open

    for f in src.files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                dtype = sl.get_dtype()
                shape = tuple(int(d) for d in sl.get_shape())
                yield f.name, name, dtype, shape, _torch_bytes(st.get_tensor(name))


def _reference_model_of(folder: Path) -> str | None:
    """The reference model name (tools/models.py) whose cached folder this is, if any."""
    from aligncodec.tools.eval import models

    for name in models.MODELS:
        d = models.model_dir(name)
        if d.is_dir() and d.resolve() == Path(folder).resolve():
            return name
    return None


def extract_aux_files(archive_path: str | os.PathLike, outdir: str | os.PathLike, *, limits: Limits | None = None) -> list[Path]:
    """Write the archive's auxiliary files (config, tokenizer, ...) into ``outdir``."""
    outdir = Path(outdir)
    written = []
    with open_archive(archive_path, limits) as r:
        for e in r.tensors:
            if e.name.startswith(AUX_PREFIX):
                fname = e.name[len(AUX_PREFIX) :]
                if not fname or os.path.basename(fname) != fname or fname in (".", ".."):
                    raise E.HeaderError(f"auxiliary file has an unsafe name {fname!r}")
                data = decode_entry(e, r.read_streams(e)).tobytes()
                dest = outdir / fname
                _atomic(dest, lambda tmp: Path(tmp).write_bytes(data))
                written.append(dest)
    return written


def _file_metadata(src: Source) -> dict[str, dict]:
    from safetensors import safe_open

    out = {}
    for f in src.files:
        with safe_open(str(f), framework="pt") as st:
            out[f.name] = {"metadata": st.metadata() or {}, "tensors": list(st.keys())}
    return out


def compress(
    inp: str | os.PathLike,
    out: str | os.PathLike,
    *,
    encode_tensor: Callable[[str, str, tuple[int, ...], np.ndarray], tuple[int, bytes, list]] | None = None,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> list[C.TensorEntry]:
    """Compress a safetensors file or model folder into ``out``.

    ``encode_tensor(name, dtype, shape, bytes) -> (mode, params, streams)``
    defaults to the lossless coder."""
    from tqdm import tqdm

    src = find_inputs(inp)
    files = _file_metadata(src)
    names: dict[str, str] = {}
    for fname, info in files.items():
        for n in info["tensors"]:
            if n in names:
                raise InputError(f"tensor {n!r} appears in both {names[n]} and {fname}")
            if n.startswith(AUX_PREFIX):
                raise InputError(f"tensor name {n!r} uses the reserved prefix {AUX_PREFIX!r}")
            names[n] = fname
    meta = {
        "acz.tool": f"aligncodec {__version__}",
        "acz.files": json.dumps({f: {"metadata": i["metadata"], "tensors": i["tensors"]} for f, i in files.items()}, sort_keys=True),
    }
    src_model = _reference_model_of(src.root)
    if src_model:
        meta["acz.source_model"] = src_model
    meta.update(metadata or {})
    enc = encode_tensor or (lambda name, dtype, shape, b: lossless.encode(b, dtype, int(np.prod(shape, dtype=np.int64))))
    total = sum(os.path.getsize(f) for f in src.files)
    with C.ArchiveWriter(out, meta) as w, tqdm(total=total, unit="B", unit_scale=True, desc="compress", disable=None if progress else True, leave=False) as bar:
        for _fname, name, dtype, shape, raw in iter_checkpoint(src):
            mode, params, streams = enc(name, dtype, shape, raw)
            w.add(name, dtype, shape, mode, streams, params)
            bar.update(raw.nbytes)
        for a in src.aux:
            data = a.read_bytes()
            mode, params, streams = lossless.encode(data, "U8", len(data))
            w.add(AUX_PREFIX + a.name, "U8", (len(data),), mode, streams, params)
        entries = w.close()
    return entries


def check_entry_header(entry: C.TensorEntry, limits: Limits | None = None) -> None:
    """Validate what a tensor's header entry says about its coding (mode known, dtype, params,
    stream count, auxiliary-file rules of spec §7.3) before reading its data."""
    if entry.name.startswith(AUX_PREFIX):
        if entry.dtype != "U8" or len(entry.shape) != 1 or entry.mode != C.MODE_STORED:
            raise E.HeaderError(f"auxiliary file {entry.name!r} must be a 1-D U8 tensor in mode stored")
        # the minimum every reader path enforces; the portable-name rules of spec §7.3 build on it
        fname = entry.name[len(AUX_PREFIX):]
        if not fname or fname in (".", "..") or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in fname):
            raise E.HeaderError(f"auxiliary file has an unsafe name {fname!r}")
    if entry.mode in (C.MODE_STORED, C.MODE_FLOAT_SPLIT):
        lossless.check_params(entry)
        want = 1 if entry.mode == C.MODE_STORED else 2
        if entry.stream_count != want:
            raise E.StreamError(f"tensor {entry.name!r}: {entry.stream_count} streams, mode {entry.mode_name} needs {want}")
    elif entry.mode == C.MODE_ECSQ:
        from aligncodec.codec.modes import lossy

        lossy.check_params(entry, None if limits is None else limits.max_hadamard_m)
    else:
        raise E.UnsupportedError(f"tensor {entry.name!r}: coding mode {entry.mode} is not supported by this build")


def check_header(header: C.Header, limits: Limits | None = None) -> None:
    """Every check the header alone decides beyond the container's (formats/container.parse_header
    did those): each entry's coding. One path for every reader (verify, inspect, decompress, load)."""
    for e in header.tensors:
        check_entry_header(e, limits)


def check_entry(entry: C.TensorEntry, streams: list, limits: Limits | None = None) -> None:
    """Validate a tensor's parsed streams against its mode, shape and dtype without decoding."""
    check_entry_header(entry, limits)
    if entry.mode == C.MODE_ECSQ:
        from aligncodec.codec.modes import lossy

        lossy.parse(entry, streams)
    else:
        lossless.check_streams(entry, streams)


class _Reader(C.ArchiveReader):
    """An ArchiveReader whose header has also passed :func:`check_header`."""

    def __init__(self, path, limits: Limits | None = None):
        super().__init__(path, limits)
        try:
            check_header(self.header, self.limits)
        except BaseException:
            self.close()
            raise


def open_archive(path: str | os.PathLike, limits: Limits | None = None) -> C.ArchiveReader:
    """Open and validate an archive for random access: the one way every command opens one."""
    return _Reader(path, limits)


def decode_entry(entry: C.TensorEntry, streams: list, *, reference: bool = False) -> np.ndarray:
    """Decode one tensor to its little-endian bytes (uint8)."""
    if entry.mode in (C.MODE_STORED, C.MODE_FLOAT_SPLIT):
        return lossless.decode(entry, streams, reference=reference)
    if entry.mode == C.MODE_ECSQ:
        from aligncodec.codec.modes import lossy

        return lossy.decode(entry, streams, reference=reference)
    raise E.UnsupportedError(f"tensor {entry.name!r}: coding mode {entry.mode} is not supported by this build")


def to_torch(entry: C.TensorEntry, raw: np.ndarray):
    import torch

    dt = getattr(torch, TORCH_DTYPES[entry.dtype])
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if not raw.flags.writeable:  # e.g. a view of zstd output: torch needs memory it may own
        raw = raw.copy()
    t = torch.from_numpy(raw) if raw.size else torch.zeros(0, dtype=torch.uint8)
    return t.view(dt).reshape(entry.shape)


def decompress(archive: str | os.PathLike, outdir: str | os.PathLike, *, progress: bool = True, limits: Limits | None = None) -> list[Path]:
    """Write the archive's tensors back as safetensors files (the original file
    split and per-file metadata) plus its auxiliary files. Returns the paths written."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    outdir = Path(outdir)
    with open_archive(archive, limits) as r:
        files = M.parse_files(r.metadata.get(M.KEY_FILES, "{}"))  # validated on open (formats/metadata.py)
        outdir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        tensors = [t for t in r.tensors if not t.name.startswith(AUX_PREFIX)]
        assigned = {n for info in files.values() for n in info.get("tensors", [])}
        orphans = [t.name for t in tensors if t.name not in assigned]
        if orphans:
            stem, i = ("model", 0) if not files else ("extra", 0)
            fname = f"{stem}.safetensors"
            while fname in files:  # never replace a listed file's tensors
                i += 1
                fname = f"{stem}-{i}.safetensors"
            files[fname] = {"metadata": {}, "tensors": orphans}
        by_name = {t.name: t for t in tensors}
        bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="decompress", disable=None if progress else True, leave=False)
        for fname, info in sorted(files.items()):
            if os.path.basename(fname) != fname or not fname.endswith(".safetensors"):
                raise E.HeaderError(f"metadata names an unsafe output file {fname!r}")
            sd = {}
            for n in info.get("tensors", []):
                e = by_name.get(n)
                if e is None:
                    raise E.HeaderError(f"metadata lists tensor {n!r} that the archive lacks")
                sd[n] = to_torch(e, decode_entry(e, r.read_streams(e)))
                bar.update(e.nbytes)
            dest = outdir / fname
            _atomic(dest, lambda tmp: save_file(sd, tmp, metadata=info.get("metadata") or None))
            written.append(dest)
            del sd
        bar.close()
    written += extract_aux_files(archive, outdir, limits=limits)
    return written


def _atomic(dest: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def inspect(archive: str | os.PathLike, *, limits: Limits | None = None) -> dict:
    """Per-tensor and total sizes. bits per weight = archive bytes * 8 / weights,
    header, padding and side information included; auxiliary files are
    reported separately and excluded from the weights' total.

    Validates the archive as ``verify(decode=False)`` does (every checksum, stream and
    declared size), so inspect, verify and decompress agree on what is valid; only the
    decode-time integrity checks (rANS final states, zstd frame contents) are left to them."""
    with open_archive(archive, limits) as r:
        rows = []
        aux_bytes = 0
        n_weights = 0
        # per-tensor results of the lossy encoder, if any (validated on open)
        lossy_meta = M.parse_lossy(r.metadata.get(M.KEY_LOSSY, "{}"))
        for e in r.tensors:
            check_entry(e, r.read_streams(e), r.limits)
            if e.name.startswith(AUX_PREFIX):
                aux_bytes += C.align(e.size, C.DATA_ALIGN)
                continue
            n_weights += e.numel
            rows.append(
                {
                    "name": e.name,
                    "shape": list(e.shape),
                    "dtype": e.dtype,
                    "mode": e.mode_name,
                    "streams": e.stream_count,
                    "bytes": e.size,
                    "raw_bytes": e.nbytes,
                    "bpw": e.size * 8 / e.numel if e.numel else None,
                }
            )
            if e.name in lossy_meta and isinstance(lossy_meta[e.name], dict):
                rows[-1]["transform"] = lossy_meta[e.name].get("kind")
                rows[-1]["rank"] = lossy_meta[e.name].get("rank", 0)
                rows[-1]["act_rel_err"] = lossy_meta[e.name].get("act_rel_err")
        file_bytes = r.file_size
        return {
            "file": os.fspath(archive),
            "format_version": r.version,
            "file_bytes": file_bytes,
            "aux_bytes": aux_bytes,
            "n_tensors": len(rows),
            "n_weights": n_weights,
            "raw_bytes": sum(x["raw_bytes"] for x in rows),
            "bpw": (file_bytes - aux_bytes) * 8 / n_weights if n_weights else None,
            "metadata": {k: v for k, v in r.metadata.items() if k != "acz.files"},
            "tensors": rows,
        }


def verify(archive: str | os.PathLike, *, decode: bool = True, progress: bool = False, limits: Limits | None = None) -> dict:
    """Check every checksum and padding byte, parse every stream and (``decode``)
    decode every tensor. Raises the first error; returns a summary."""
    from tqdm import tqdm

    with open_archive(archive, limits) as r:
        for e in tqdm(r.tensors, desc="verify", disable=None if progress else True, leave=False):
            streams = r.read_streams(e)
            check_entry(e, streams, r.limits)
            if decode:
                out = decode_entry(e, streams)
                if out.size != e.nbytes:
                    raise E.StreamError(f"tensor {e.name!r} decoded to {out.size} bytes, {e.nbytes} expected")
        return {"file": os.fspath(archive), "tensors": len(r.tensors), "ok": True}


def iter_entries(archive: str | os.PathLike, *, limits: Limits | None = None) -> Iterable[C.TensorEntry]:
    with open_archive(archive, limits) as r:
        return list(r.tensors)
