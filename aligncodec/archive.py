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
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from aligncodec import __version__
from aligncodec.auxfiles import AUX_MAX_BYTES, AUX_PREFIX, AUX_SUFFIXES, add_aux_file, aux_name_problem, file_name, find_aux_files, is_aux
from aligncodec.formats import errors as E
from aligncodec.formats import metadata as M
from aligncodec.formats.limits import Limits
from aligncodec.formats.atomic import atomic_dir, atomic_write
from aligncodec.formats.constants import DATA_ALIGN
from aligncodec.formats.layout import TensorEntry, align
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.writer import ArchiveWriter
from aligncodec.errors import InputError, OutputError  # noqa: F401 - re-exported: archive.InputError
from aligncodec.validation import check_entry, open_archive


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
    indexes: list[Path] = field(default_factory=list)  # shard indexes (*.safetensors.index.json): rebuilt, not stored
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, why) of folder entries not archived

    def metadata(self) -> tuple[dict[str, str], list[str]]:
        """The source's reserved metadata, ``acz.files`` and (a sharded folder) ``acz.index``,
        and notes for the user (files not archived, an index whose bytes will differ). Raises
        InputError on a file that is not safetensors, a tensor in two files, a reserved tensor
        name, an index that disagrees with the shards (ShardIndexError)."""
        from aligncodec.shard_index import index_metadata

        files = _file_metadata(self)
        names: dict[str, str] = {}
        for fname, info in files.items():
            for n in info["tensors"]:
                if n in names:
                    raise InputError(f"tensor {n!r} appears in both {names[n]} and {fname}")
                if n.startswith(AUX_PREFIX):
                    raise InputError(f"tensor name {n!r} uses the reserved prefix {AUX_PREFIX!r}")
                names[n] = fname
        meta = {M.KEY_FILES: json.dumps({f: {"metadata": i["metadata"], "tensors": i["tensors"]} for f, i in files.items()},
                                        sort_keys=True)}
        idx, notes = index_metadata(self.indexes, files)
        meta.update(idx)
        notes = [f"not archived: {printable(n)} ({why})" for n, why in self.skipped] + notes
        return meta, notes


def _why_skipped(f: Path) -> str | None:
    """Why a folder entry is not archived (None: it is a weight file, an index or an auxiliary file)."""
    if f.is_dir():
        return "a folder; only the files at the top of the model folder travel"
    if not f.is_file():
        return "not a regular file"
    if f.name.startswith("."):
        return "a hidden file"
    if f.suffix not in AUX_SUFFIXES:
        return "not a weight, index or auxiliary file type (" + ", ".join(f"*{s}" for s in AUX_SUFFIXES) + ")"
    if f.stat().st_size > AUX_MAX_BYTES:
        return f"an auxiliary file larger than {AUX_MAX_BYTES >> 20} MiB"
    return None


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
    from aligncodec.shard_index import find_indexes, is_index_name

    # the shard index of a sharded folder describes the shards, which travel as tensors (their
    # split is in acz.files): it is not an auxiliary file but rebuilt from acz.index (spec §3.1)
    indexes = find_indexes(p)
    aux = [f for f in find_aux_files(p) if not is_index_name(f.name)]
    for f in files + indexes + aux:
        _check_link(f, p, follow_symlinks)
    for f in aux:
        why = aux_name_problem(f.name)
        if why:
            raise InputError(f"auxiliary file {str(f)!r} cannot be archived: its name is {why} "
                             "(rename it, or remove it from the folder)")
    taken = {f.name for f in files + indexes + aux}
    skipped = [(f.name, why) for f in sorted(p.iterdir()) if f.name not in taken and (why := _why_skipped(f))]
    return Source(files, aux, p, indexes, skipped)


def _safetensors_error() -> type[BaseException]:
    from safetensors import SafetensorError

    return SafetensorError


def iter_checkpoint(src: Source) -> Iterator[tuple[str, str, str, tuple[int, ...], np.ndarray]]:
    """Yield (file name, tensor name, dtype, shape, little-endian bytes) one tensor at a time.
    A file that is not valid safetensors raises InputError."""
    from safetensors import safe_open

    from aligncodec.codec.torch_interop import tensor_bytes

    bad = _safetensors_error()
    for f in src.files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    dtype = sl.get_dtype()
                    shape = tuple(int(d) for d in sl.get_shape())
                    t = st.get_tensor(name)
                    yield f.name, name, dtype, shape, tensor_bytes(t)
        except (bad, RuntimeError, ValueError, TypeError) as exc:
            raise InputError(f"{str(f)!r} is not a valid safetensors file: {type(exc).__name__}: {exc}") from None


def _reference_model_of(folder: Path, files: list[Path] | None = None) -> str | None:
    """The reference model name (tools/eval/models.py) whose weights the input is, if any: its
    cached folder itself, or (``files``: the input's safetensors files) one file with the size
    and the sha256 the cached model's manifest records for its weights, e.g. the model copied to
    a plain folder (hashed only when the sizes agree). ``eval`` takes it as the KLD reference."""
    from aligncodec.tools.eval import models

    for name in models.MODELS:
        d = models.model_dir(name)
        if d.is_dir() and d.resolve() == Path(folder).resolve():
            return name
    if not files or len(files) != 1:
        return None
    f = Path(files[0])
    try:
        size = f.stat().st_size
    except OSError:
        return None
    digest = None
    for name in models.MODELS:
        cached = models.model_dir(name) / models.WEIGHTS
        try:
            if not cached.is_file() or cached.stat().st_size != size:
                continue
            want = (models.read_manifest(name) or {}).get("files", {}).get(models.WEIGHTS)
        except (OSError, ValueError, AttributeError):  # an unreadable manifest: no match
            continue
        if isinstance(want, str):
            digest = digest or models.sha256_file(f)
            if digest == want:
                return name
    return None


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
    check: Callable[[Path], object] | None = None,
    threads: int | None = None,
) -> list[TensorEntry]:
    """Compress a safetensors file or model folder into ``out``.

    ``encode_tensor(name, dtype, shape, bytes) -> (mode, params, streams)``
    defaults to the lossless coder; then ``threads`` (None: every CPU, or ``ACZ_THREADS``) code
    the tensors: each tensor's chunks in parallel on the decode pool, and up to ``threads``
    tensors at once while the archive is written in order (reading, coding and writing overlap).
    The archive's bytes do not depend on ``threads``. ``check(path)``, if given, is called on the finished
    archive under a temporary name; only if it returns does the archive get the name ``out``
    (the lossy encoder's post-write verification). ``follow_symlinks``: see :func:`find_inputs`."""
    from tqdm import tqdm

    from aligncodec.codec.modes import lossless

    src = find_inputs(inp, follow_symlinks=follow_symlinks)
    src_meta, notes = src.metadata()
    meta = {"acz.tool": f"aligncodec {__version__}", **src_meta}
    if progress:
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
    src_model = _reference_model_of(src.root, src.files)
    if src_model:
        meta["acz.source_model"] = src_model
    meta.update(metadata or {})
    enc = encode_tensor or (lambda name, dtype, shape, b: lossless.encode(b, dtype, int(np.prod(shape, dtype=np.int64))))
    total = sum(os.path.getsize(f) for f in src.files)
    entries: list[TensorEntry] = []

    from aligncodec.codec import parallel

    n_threads = parallel.resolve_threads(threads)

    def coded():
        """(name, dtype, shape, nbytes, (mode, params, streams)) in the checkpoint's order; the default
        coder runs on up to n_threads tensors at once (at most n_threads + 1 read ahead)."""
        items = iter_checkpoint(src)
        if encode_tensor is not None or n_threads == 1:
            for _fname, name, dtype, shape, raw in items:
                with parallel.threads_override(n_threads):
                    yield name, dtype, shape, raw.nbytes, enc(name, dtype, shape, raw)
            return
        import collections
        from concurrent.futures import ThreadPoolExecutor

        def job(name, dtype, shape, raw):
            with parallel.threads_override(n_threads):
                return enc(name, dtype, shape, raw)

        pending: collections.deque = collections.deque()
        with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="acz-encode") as ex:
            try:
                for _fname, name, dtype, shape, raw in items:
                    pending.append((name, dtype, shape, raw.nbytes, ex.submit(job, name, dtype, shape, raw)))
                    while len(pending) > n_threads:
                        name_, dtype_, shape_, nb_, fut = pending.popleft()
                        yield name_, dtype_, shape_, nb_, fut.result()
                while pending:
                    name_, dtype_, shape_, nb_, fut = pending.popleft()
                    yield name_, dtype_, shape_, nb_, fut.result()
            finally:
                for *_, fut in pending:
                    fut.cancel()

    def write(path: Path) -> None:
        with ArchiveWriter(path, meta) as w, tqdm(total=total, unit="B", unit_scale=True, desc="compress", disable=None if progress else True, leave=False) as bar:
            for name, dtype, shape, nbytes, (mode, params, streams) in coded():
                w.add(name, dtype, shape, mode, streams, params)
                bar.update(nbytes)
            for a in src.aux:
                add_aux_file(w, a)
            entries.extend(w.close())
        if check is not None:
            check(path)

    atomic_write(out, write)
    return entries


def _save_safetensors(sd: dict, path: str, metadata: dict | None) -> None:
    """safetensors' save_file, with its I/O failures (disk full, ...) raised as OutputError."""
    from safetensors.torch import save_file

    try:
        save_file(sd, path, metadata=metadata)
    except _safetensors_error() as exc:
        raise OutputError(f"cannot write {path}: {exc}") from None


def decompress(archive: str | os.PathLike, outdir: str | os.PathLike, *, progress: bool = True,
               limits: Limits | None = None, force: bool = False) -> list[Path]:
    """Write the archive's tensors back as safetensors files (the original file
    split and per-file metadata), the shard index of a sharded folder (its weight map
    derived from that split, spec §3.1) and the auxiliary files. Returns the paths written.
    ``limits``: the reader's limits (formats/limits.py).

    Everything is written into a temporary folder beside ``outdir`` and renamed into
    place at the end, so a failure leaves nothing under ``outdir``. An existing non-empty
    ``outdir`` is refused (OutputError) unless ``force``; then the decoded files replace
    their namesakes in it, one atomic rename each."""
    from tqdm import tqdm

    from aligncodec.codec.modes import decode_entry
    from aligncodec.codec.torch_interop import bytes_to_tensor
    from aligncodec.shard_index import index_bytes

    outdir = Path(outdir)
    if outdir.is_dir() and not force and any(outdir.iterdir()):
        raise OutputError(f"{outdir} exists and is not empty (use --force to write into it)")
    written: list[Path] = []
    with open_archive(archive, limits) as r:  # aux names (spec §7.3) and acz.files checked on open
        files = M.parse_files(r.metadata.get(M.KEY_FILES, "{}"))
        listed = {f: dict(info) for f, info in files.items()}  # as written by the encoder, before orphans are added
        tensors = [t for t in r.tensors if not is_aux(t.name)]
        assigned = {n for info in files.values() for n in info.get("tensors", [])}
        orphans = [t.name for t in tensors if t.name not in assigned]
        if orphans:
            stem, i = ("model" if not files else "extra"), 0
            fname = f"{stem}.safetensors"
            while fname in files:  # never replace a listed file's tensors
                i += 1
                fname = f"{stem}-{i}.safetensors"
            files[fname] = {"metadata": {}, "tensors": orphans}
        by_name = {t.name: t for t in tensors}
        bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="decompress", disable=None if progress else True, leave=False)
        with atomic_dir(outdir, merge=force) as tmpdir:
            for fname, info in sorted(files.items()):
                if os.path.basename(fname) != fname or not fname.endswith(".safetensors"):
                    raise E.HeaderError(f"metadata names an unsafe output file {fname!r}")
                sd = {}
                for n in info.get("tensors", []):
                    e = by_name.get(n)
                    if e is None:
                        raise E.HeaderError(f"metadata lists tensor {n!r} that the archive lacks")
                    sd[n] = bytes_to_tensor(e, decode_entry(e, r.read_streams(e)))
                    bar.update(e.nbytes)
                _save_safetensors(sd, os.path.join(tmpdir, fname), info.get("metadata") or None)
                written.append(outdir / fname)
                del sd
            # shard indexes: their weight maps derived from the file split (acz.index, spec §3.1)
            for iname, spec in sorted(M.parse_index(r.metadata.get(M.KEY_INDEX, "{}"), listed).items()):
                data = index_bytes(spec, listed)
                Path(tmpdir, iname).write_bytes(data)
                written.append(outdir / iname)
            for e in r.tensors:
                if is_aux(e.name):
                    fname = e.name[len(AUX_PREFIX):]
                    Path(tmpdir, fname).write_bytes(decode_entry(e, r.read_streams(e)).tobytes())
                    written.append(outdir / fname)
            for p in Path(tmpdir).iterdir():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        bar.close()
    return written


def inspect(archive: str | os.PathLike, *, limits: Limits | None = None) -> dict:
    """Per-tensor and total sizes. bits per weight = archive bytes * 8 / weights,
    header, padding and side information included; auxiliary files are
    reported separately and excluded from the weights' total.

    Validates the archive as ``verify(decode=False)`` does (every checksum, stream and
    declared size), so inspect, verify, decompress and load agree on what is valid; only
    decode-time integrity checks (rANS final states, zstd frame contents) are left to them."""
    with open_archive(archive, limits) as r:
        rows = []
        aux_bytes = 0
        n_weights = 0
        # per-tensor results of the lossy encoder, if any (aligncodec/lossy_compress.py; validated on open)
        lossy_meta = M.parse_lossy(r.metadata.get(M.KEY_LOSSY, "{}"))
        for e in r.tensors:
            check_entry(e, r.read_streams(e), r.limits)
            if is_aux(e.name):
                aux_bytes += align(e.size, DATA_ALIGN)
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
                rows[-1]["act_rel_err"] = lossy_meta[e.name].get("act_rel_err")
        file_bytes = r.file_size
        try:
            summ = json.loads(r.metadata.get("acz.lossy.summary", "{}"))
        except ValueError:
            summ = {}
        # the lossy encoder's own figure: all-in bits per weight of the decoder blocks' linear layers
        # (archives of the removed whole-model encoder: of the lossy tensors)
        bpw_linear = summ.get("bpw_linear_all_in", summ.get("bpw_lossy_all_in")) if isinstance(summ, dict) else None
        return {
            "file": os.fspath(archive),
            "format_version": r.version,
            "file_bytes": file_bytes,
            "aux_bytes": aux_bytes,
            "n_tensors": len(rows),
            "n_weights": n_weights,
            "raw_bytes": sum(x["raw_bytes"] for x in rows),
            "bpw": (file_bytes - aux_bytes) * 8 / n_weights if n_weights else None,
            "bpw_file": file_bytes * 8 / n_weights if n_weights else None,  # auxiliary files included
            "bpw_linear": bpw_linear,
            "metadata": {k: v for k, v in r.metadata.items() if k not in (M.KEY_FILES, M.KEY_INDEX)},
            "tensors": rows,
        }


def verify(archive: str | os.PathLike, *, decode: bool = True, progress: bool = False, limits: Limits | None = None) -> dict:
    """Check every checksum and padding byte, parse every stream, check it against the
    tensor's coding mode and (``decode``) decode every tensor. Raises the first error;
    returns a summary."""
    from tqdm import tqdm

    from aligncodec.codec.modes import decode_entry

    with open_archive(archive, limits) as r:  # padding, header, metadata: checked on open
        for e in tqdm(r.tensors, desc="verify", disable=None if progress else True, leave=False):
            streams = r.read_streams(e)
            check_entry(e, streams, r.limits)
            if decode:
                out = decode_entry(e, streams)
                if out.size != e.nbytes:
                    raise E.StreamError(f"tensor {e.name!r} decoded to {out.size} bytes, {e.nbytes} expected")
        return {"file": os.fspath(archive), "tensors": len(r.tensors), "ok": True}


# ----------------------------------------------------------------- auxiliary files


def iter_aux_files(archive: str | os.PathLike, limits=None) -> Iterator[tuple[str, bytes]]:
    """``(file name, bytes)`` of each auxiliary file of an archive on disk, by random access."""
    from aligncodec.codec.modes import decode_entry

    with open_archive(archive, limits) as r:  # every aux name checked on open (validation.check_header)
        for e in r.tensors:
            if is_aux(e.name):
                fname = file_name(e.name)
                yield fname, decode_entry(e, r.read_streams(e)).tobytes()


def read_aux_files(archive: str | os.PathLike, limits=None) -> dict[str, bytes]:
    """All auxiliary files of an archive on disk, by file name."""
    return dict(iter_aux_files(archive, limits))


def extract_aux_files(archive: str | os.PathLike, outdir: str | os.PathLike, limits=None) -> list[Path]:
    """Write the archive's auxiliary files into ``outdir`` (each atomically); returns their paths."""
    written = []
    for fname, data in iter_aux_files(archive, limits):
        written.append(atomic_write(Path(outdir) / fname, lambda tmp, data=data: tmp.write_bytes(data)))
    return written
