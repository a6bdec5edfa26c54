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
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from aligncodec import __version__
from aligncodec.codec.modes import lossless
from aligncodec.formats import container as C
from aligncodec.formats import errors as E
from aligncodec.formats.atomic import atomic_dir, atomic_write

AUX_PREFIX = "acz:file/"
AUX_MAX_BYTES = 256 << 20  # auxiliary files above this size are refused
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".py", ".tiktoken", ".vocab")

TORCH_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8", "I16": "int16",
    "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class InputError(Exception):
    """The input checkpoint cannot be read (missing, not safetensors, corrupt safetensors,
    duplicate tensor names, an auxiliary file name outside the portable set, a symlink
    leaving the input folder)."""

    exit_code = 3  # the CLI's exit code (README)


class OutputError(OSError):
    """An output could not be written (disk full, permission, an existing destination)."""


# ----------------------------------------------------------------- names on disk (spec §7.3)

AUX_NAME_MAX_BYTES = 200
_AUX_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a portable file name (spec §7.3), or None: 1..200 bytes of ASCII
    letters, digits, ``.``, ``_``, ``-``, ``+``; not starting with ``.``, ``-`` or ``+``;
    not ending with ``.``; not a Windows device name (``con``, ``nul``, ``com1`` ...)."""
    if not isinstance(name, str) or not name:
        return "empty"
    if len(name.encode("utf-8", "surrogatepass")) > AUX_NAME_MAX_BYTES:
        return f"longer than {AUX_NAME_MAX_BYTES} bytes"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "a path, not a file name"
    if not _AUX_NAME_RE.fullmatch(name):
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "._+-"))), None)
        if bad is not None:
            return f"character {bad!r} outside the portable set [A-Za-z0-9._+-]"
        return "starts with '.', '-' or '+'"
    if name.endswith("."):
        return "ends with '.'"
    if name.split(".")[0].lower() in _WINDOWS_DEVICES:
        return "a reserved device name"
    return None


def aux_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an auxiliary file (spec §7.3), or None: a portable file name
    (:func:`file_name_problem`) that cannot be mistaken for the decoded weights: nothing ending
    in ``.safetensors`` or ``.safetensors.index.json`` (any case)."""
    why = file_name_problem(name)
    if why:
        return why
    low = name.lower()
    if low.endswith(".safetensors") or low.endswith(".safetensors.index.json"):
        return "collides with the decoded weight files (*.safetensors, *.safetensors.index.json)"
    return None


def check_aux_names(names: Iterable[str]) -> list[str]:
    """The auxiliary file names of an archive (``acz:file/`` stripped), checked: raises
    HeaderError on the first name outside the portable set or two names equal up to case."""
    seen: dict[str, str] = {}
    out = []
    for n in names:
        why = aux_name_problem(n)
        if why:
            raise E.HeaderError(f"auxiliary file name {n!r} is not allowed: {why}")
        if n.lower() in seen:
            raise E.HeaderError(f"auxiliary file names {seen[n.lower()]!r} and {n!r} differ only in case")
        seen[n.lower()] = n
        out.append(n)
    return out


def archive_aux_names(r: "C.ArchiveReader") -> list[str]:
    """The checked auxiliary file names of an open archive (see :func:`check_aux_names`)."""
    return check_aux_names(e.name[len(AUX_PREFIX):] for e in r.tensors if e.name.startswith(AUX_PREFIX))


def printable(s: str) -> str:
    """``s`` safe for a terminal: control, format (bidi) and other non-printable characters and
    the backslash are written as Python escapes; everything else is kept."""
    if s.isprintable() and "\\" not in s:
        return s
    out = []
    for c in s:
        if c == "\\":
            out.append("\\\\")
        elif c.isprintable() and unicodedata.category(c) not in ("Cf", "Zl", "Zp"):
            out.append(c)
        else:
            out.append(repr(c)[1:-1] if c not in "'\"" else c)
    return "".join(out)


@dataclass
class Source:
    files: list[Path]  # safetensors files
    aux: list[Path]  # other small files of a model folder
    root: Path


def _check_link(f: Path, root: Path, follow_symlinks: bool) -> None:
    """Refuse a symlink in the input folder that resolves outside it (unless ``follow_symlinks``)."""
    if follow_symlinks or not f.is_symlink():
        return
    target = f.resolve()
    if not target.is_relative_to(root.resolve()):
        raise InputError(f"{str(f)!r} is a symlink to {str(target)!r}, outside the input folder "
                         "(use --follow-symlinks to read it anyway)")


def find_inputs(path: str | os.PathLike, *, follow_symlinks: bool = False) -> Source:
    """The safetensors files and auxiliary files of an input (file, folder or reference model name).

    In a folder, a symlink that resolves outside the folder is refused (InputError) unless
    ``follow_symlinks``; an auxiliary file whose name is outside the portable set (spec §7.3)
    is refused too."""
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
    for f in files + aux:
        _check_link(f, p, follow_symlinks)
    for f in aux:
        why = aux_name_problem(f.name)
        if why:
            raise InputError(f"auxiliary file {str(f)!r} cannot be archived: its name is {why} "
                             "(rename it, or remove it from the folder)")
    return Source(files, aux, p)


def _torch_bytes(t) -> np.ndarray:
    import torch

    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def _safetensors_error() -> type[BaseException]:
    from safetensors import SafetensorError

    return SafetensorError


def iter_checkpoint(src: Source) -> Iterator[tuple[str, str, str, tuple[int, ...], np.ndarray]]:
    """Yield (file name, tensor name, dtype, shape, little-endian bytes) one tensor at a time.
    A file that is not valid safetensors raises InputError."""
    from safetensors import safe_open

    bad = _safetensors_error()
    for f in src.files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    dtype = sl.get_dtype()
                    shape = tuple(int(d) for d in sl.get_shape())
                    t = st.get_tensor(name)
                    yield f.name, name, dtype, shape, _torch_bytes(t)
        except (bad, RuntimeError, ValueError, TypeError) as exc:
            raise InputError(f"{str(f)!r} is not a valid safetensors file: {type(exc).__name__}: {exc}") from None


def _reference_model_of(folder: Path) -> str | None:
    """The reference model name (tools/models.py) whose cached folder this is, if any."""
    from aligncodec.tools.eval import models

    for name in models.MODELS:
        d = models.model_dir(name)
        if d.is_dir() and d.resolve() == Path(folder).resolve():
            return name
    return None


def extract_aux_files(archive_path: str | os.PathLike, outdir: str | os.PathLike) -> list[Path]:
    """Write the archive's auxiliary files (config, tokenizer, ...) into ``outdir``.
    Every name is checked first (:func:`check_aux_names`): nothing is written for an
    archive with one bad name."""
    outdir = Path(outdir)
    written = []
    with C.ArchiveReader(archive_path) as r:
        archive_aux_names(r)
        for e in r.tensors:
            if e.name.startswith(AUX_PREFIX):
                data = decode_entry(e, r.read_streams(e)).tobytes()
                dest = outdir / e.name[len(AUX_PREFIX):]
                atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
                written.append(dest)
    return written


def _file_metadata(src: Source) -> dict[str, dict]:
    from safetensors import safe_open

    bad = _safetensors_error()
    out = {}
    for f in src.files:
        try:
            with safe_open(str(f), framework="pt") as st:
                out[f.name] = {"metadata": st.metadata() or {}, "tensors": list(st.keys())}
        except (bad, RuntimeError, ValueError, TypeError) as exc:
            raise InputError(f"{str(f)!r} is not a valid safetensors file: {type(exc).__name__}: {exc}") from None
    return out


def compress(
    inp: str | os.PathLike,
    out: str | os.PathLike,
    *,
    encode_tensor: Callable[[str, str, tuple[int, ...], np.ndarray], tuple[int, bytes, list]] | None = None,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
    follow_symlinks: bool = False,
    check: Callable[[str], object] | None = None,
) -> list[C.TensorEntry]:
    """Compress a safetensors file or model folder into ``out``.

    ``encode_tensor(name, dtype, shape, bytes) -> (mode, params, streams)``
    defaults to the lossless coder. ``check(path)``, if given, is called on the finished
    archive under a temporary name; only if it returns does the archive get the name ``out``
    (the lossy encoder's post-write verification). ``follow_symlinks``: see :func:`find_inputs`."""
    from tqdm import tqdm

    src = find_inputs(inp, follow_symlinks=follow_symlinks)
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
    entries: list[C.TensorEntry] = []

    def write(path: str) -> None:
        with C.ArchiveWriter(path, meta) as w, tqdm(total=total, unit="B", unit_scale=True, desc="compress", disable=None if progress else True, leave=False) as bar:
            for _fname, name, dtype, shape, raw in iter_checkpoint(src):
                mode, params, streams = enc(name, dtype, shape, raw)
                w.add(name, dtype, shape, mode, streams, params)
                bar.update(raw.nbytes)
            for a in src.aux:
                data = a.read_bytes()
                mode, params, streams = lossless.encode(data, "U8", len(data))
                w.add(AUX_PREFIX + a.name, "U8", (len(data),), mode, streams, params)
            entries.extend(w.close())
        if check is not None:
            check(path)

    atomic_write(out, write)
    return entries


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


def _save_safetensors(sd: dict, path: str, metadata: dict | None) -> None:
    """safetensors' save_file, with its I/O failures (disk full, ...) raised as OutputError."""
    from safetensors.torch import save_file

    try:
        save_file(sd, path, metadata=metadata)
    except _safetensors_error() as exc:
        raise OutputError(f"cannot write {path}: {exc}") from None


def _check_files_meta(files) -> dict[str, dict]:
    """``acz.files`` parsed into {safetensors file name: {"metadata": {str: str}, "tensors": [str]}},
    or HeaderError."""
    if not isinstance(files, dict):
        raise E.HeaderError("metadata acz.files is not a JSON object")
    out = {}
    for fname, info in files.items():
        if not isinstance(fname, str) or file_name_problem(fname) or not fname.endswith(".safetensors"):
            raise E.HeaderError(f"metadata names an unsafe output file {fname!r}")
        if not isinstance(info, dict):
            raise E.HeaderError(f"metadata acz.files[{fname!r}] is not a JSON object")
        tensors = info.get("tensors", [])
        meta = info.get("metadata") or {}
        if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
            raise E.HeaderError(f"metadata acz.files[{fname!r}].tensors is not a list of names")
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise E.HeaderError(f"metadata acz.files[{fname!r}].metadata is not a map of strings")
        out[fname] = {"metadata": meta, "tensors": tensors}
    return out


def check_names(r: C.ArchiveReader) -> tuple[dict[str, dict], list[str]]:
    """The output file map (``acz.files``) and auxiliary file names of an open archive,
    checked (HeaderError otherwise). inspect, verify and decompress all call it, so they
    agree on which archives are valid."""
    try:
        files = json.loads(r.metadata.get("acz.files", "{}"))
    except (ValueError, RecursionError):
        raise E.HeaderError("metadata acz.files is not JSON") from None
    return _check_files_meta(files), archive_aux_names(r)


def decompress(archive: str | os.PathLike, outdir: str | os.PathLike, *, progress: bool = True,
               force: bool = False) -> list[Path]:
    """Write the archive's tensors back as safetensors files (the original file
    split and per-file metadata) plus its auxiliary files. Returns the paths written.

    Everything is written into a temporary folder beside ``outdir`` and renamed into
    place at the end, so a failure leaves nothing under ``outdir``. An existing non-empty
    ``outdir`` is refused (OutputError) unless ``force``; then the decoded files replace
    their namesakes in it, one atomic rename each."""
    from tqdm import tqdm

    outdir = Path(outdir)
    if outdir.is_dir() and not force and any(outdir.iterdir()):
        raise OutputError(f"{outdir} exists and is not empty (use --force to write into it)")
    written: list[Path] = []
    with C.ArchiveReader(archive) as r:
        files, _aux_names = check_names(r)
        tensors = [t for t in r.tensors if not t.name.startswith(AUX_PREFIX)]
        assigned: dict[str, str] = {}
        for fname, info in files.items():
            for n in info["tensors"]:
                if n in assigned:
                    raise E.HeaderError(f"metadata lists tensor {n!r} in both {assigned[n]!r} and {fname!r}")
                assigned[n] = fname
        orphans = [t.name for t in tensors if t.name not in assigned]
        if orphans:
            extra = "model.safetensors" if not files else "extra.safetensors"
            if extra in files:
                raise E.HeaderError(f"metadata acz.files does not list tensor {orphans[0]!r}")
            files[extra] = {"metadata": {}, "tensors": orphans}
        by_name = {t.name: t for t in tensors}
        bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="decompress", disable=None if progress else True, leave=False)
        with atomic_dir(outdir, merge=force) as tmpdir:
            for fname, info in sorted(files.items()):
                sd = {}
                for n in info["tensors"]:
                    e = by_name.get(n)
                    if e is None:
                        raise E.HeaderError(f"metadata lists tensor {n!r} that the archive lacks")
                    sd[n] = to_torch(e, decode_entry(e, r.read_streams(e)))
                    bar.update(e.nbytes)
                _save_safetensors(sd, os.path.join(tmpdir, fname), info["metadata"] or None)
                written.append(outdir / fname)
                del sd
            for e in r.tensors:
                if e.name.startswith(AUX_PREFIX):
                    fname = e.name[len(AUX_PREFIX):]
                    Path(tmpdir, fname).write_bytes(decode_entry(e, r.read_streams(e)).tobytes())
                    written.append(outdir / fname)
            for p in Path(tmpdir).iterdir():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        bar.close()
    return written


def inspect(archive: str | os.PathLike) -> dict:
    """Per-tensor and total sizes. bits per weight = archive bytes * 8 / weights,
    header, padding and side information included; auxiliary files are
    reported separately and excluded from the weights' total."""
    with C.ArchiveReader(archive) as r:
        check_names(r)
        rows = []
        aux_bytes = 0
        n_weights = 0
        try:  # per-tensor results of the lossy encoder, if any (aligncodec/lossy_compress.py)
            lossy_meta = json.loads(r.metadata.get("acz.lossy", "{}"))
        except (ValueError, RecursionError):
            lossy_meta = {}
        if not isinstance(lossy_meta, dict):
            lossy_meta = {}
        for e in r.tensors:
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
            lm = lossy_meta.get(e.name)
            if isinstance(lm, dict):  # informational: keep only values of the expected types
                kind, rank, err = lm.get("kind"), lm.get("rank", 0), lm.get("act_rel_err")
                rows[-1]["transform"] = kind if isinstance(kind, str) else None
                rows[-1]["rank"] = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
                rows[-1]["act_rel_err"] = float(err) if isinstance(err, (int, float)) and not isinstance(err, bool) else None
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


def verify(archive: str | os.PathLike, *, decode: bool = True, progress: bool = False) -> dict:
    """Check every checksum and padding byte, parse every stream and (``decode``)
    decode every tensor. Raises the first error; returns a summary."""
    from tqdm import tqdm

    with C.ArchiveReader(archive) as r:
        r.check_padding()
        check_names(r)
        for e in tqdm(r.tensors, desc="verify", disable=None if progress else True, leave=False):
            streams = r.read_streams(e)
            if decode:
                out = decode_entry(e, streams)
                if out.size != e.nbytes:
                    raise E.StreamError(f"tensor {e.name!r} decoded to {out.size} bytes, {e.nbytes} expected")
        return {"file": os.fspath(archive), "tensors": len(r.tensors), "ok": True}


def iter_entries(archive: str | os.PathLike) -> Iterable[C.TensorEntry]:
    with C.ArchiveReader(archive) as r:
        return list(r.tensors)
