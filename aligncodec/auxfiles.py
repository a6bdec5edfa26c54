"""Auxiliary files of a model folder (config, tokenizer, ...) inside an archive (spec §7.3):
U8 tensors named ``acz:file/<file name>``, so that an archive alone rebuilds the folder.

The one home for choosing, naming, adding and reading them back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from aligncodec.formats.atomic import atomic_write
from aligncodec.formats.constants import AUX_PREFIX
from aligncodec.formats.errors import HeaderError
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.writer import ArchiveWriter

AUX_MAX_BYTES = 256 << 20  # auxiliary files above this size are refused
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".py", ".tiktoken", ".vocab")

__all__ = ["AUX_PREFIX", "AUX_MAX_BYTES", "AUX_SUFFIXES", "is_aux", "find_aux_files", "add_aux_file",
           "iter_aux_files", "read_aux_files", "extract_aux_files"]


def is_aux(name: str) -> bool:
    """True for the tensor name of an auxiliary file."""
    return name.startswith(AUX_PREFIX)


def file_name(tensor_name: str) -> str:
    """The file name an auxiliary tensor carries; HeaderError when it is not a plain file name."""
    fname = tensor_name[len(AUX_PREFIX):]
    if (not fname or os.path.basename(fname) != fname or fname in (".", "..") or "\\" in fname
            or any(ord(c) < 32 or ord(c) == 127 for c in fname)):
        raise HeaderError(f"auxiliary file has an unsafe name {fname!r}")
    return fname


def find_aux_files(folder: Path) -> list[Path]:
    """The small non-tensor files of a model folder that travel in the archive."""
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix in AUX_SUFFIXES and f.stat().st_size <= AUX_MAX_BYTES)


def add_aux_file(writer: ArchiveWriter, path: Path) -> None:
    """Add one file to an archive being written (lossless, dtype U8)."""
    from aligncodec.codec.modes import lossless

    data = Path(path).read_bytes()
    mode, params, streams = lossless.encode(data, "U8", len(data))
    writer.add(AUX_PREFIX + Path(path).name, "U8", (len(data),), mode, streams, params)


def iter_aux_files(archive: str | os.PathLike, limits=None) -> Iterator[tuple[str, bytes]]:
    """``(file name, bytes)`` of each auxiliary file of an archive on disk, by random access."""
    from aligncodec.codec.modes import decode_entry
    from aligncodec.validation import open_archive

    with open_archive(archive, limits) as r:
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
