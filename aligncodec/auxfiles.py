"""Auxiliary files of a model folder (config, tokenizer, ...) inside an archive (spec §7.3):
U8 tensors named ``acz:file/<file name>``, so that an archive alone rebuilds the folder.

The one home for choosing, naming, adding and reading them back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from aligncodec.formats.constants import AUX_PREFIX
from aligncodec.formats.errors import HeaderError
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats.writer import ArchiveWriter

AUX_MAX_BYTES = 256 << 20  # auxiliary files above this size are refused
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".md", ".py", ".tiktoken", ".vocab")

__all__ = ["AUX_PREFIX", "AUX_MAX_BYTES", "AUX_SUFFIXES", "is_aux", "find_aux_files", "add_aux_file",
           "file_name_problem", "aux_name_problem",
           "check_aux_names", "archive_aux_names"]

# ----------------------------------------------------------------- portable names (spec §7.3)

AUX_NAME_MAX_BYTES = 200
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
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
    if not _NAME_RE.fullmatch(name):
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
    """Auxiliary file names (``acz:file/`` stripped), checked: HeaderError on the first name
    outside the portable set, or on two names equal up to case."""
    seen: dict[str, str] = {}
    out = []
    for n in names:
        why = aux_name_problem(n)
        if why:
            raise HeaderError(f"auxiliary file name {n!r} is not allowed: {why}")
        if n.lower() in seen:
            raise HeaderError(f"auxiliary file names {seen[n.lower()]!r} and {n!r} differ only in case")
        seen[n.lower()] = n
        out.append(n)
    return out


def archive_aux_names(r: ArchiveReader) -> list[str]:
    """The checked auxiliary file names of an open archive (see :func:`check_aux_names`)."""
    return check_aux_names(e.name[len(AUX_PREFIX):] for e in r.tensors if is_aux(e.name))


def is_aux(name: str) -> bool:
    """True for the tensor name of an auxiliary file."""
    return name.startswith(AUX_PREFIX)


def file_name(tensor_name: str) -> str:
    """The file name an auxiliary tensor carries; HeaderError when it is not a portable
    auxiliary name (:func:`aux_name_problem`)."""
    return check_aux_names([tensor_name[len(AUX_PREFIX):]])[0]


def find_aux_files(folder: Path) -> list[Path]:
    """The small non-tensor files of a model folder that travel in the archive."""
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix in AUX_SUFFIXES and f.stat().st_size <= AUX_MAX_BYTES)


def add_aux_file(writer: ArchiveWriter, path: Path) -> None:
    """Add one file to an archive being written (lossless, dtype U8)."""
    from aligncodec.codec.modes import lossless

    data = Path(path).read_bytes()
    mode, params, streams = lossless.encode(data, "U8", len(data))
    writer.add(AUX_PREFIX + Path(path).name, "U8", (len(data),), mode, streams, params)
