"""The one validation path of every reader command (issue 15): ``verify``, ``inspect``,
``decompress``, the auxiliary-file readers and the streaming loader all open an archive
through here, so they accept and reject the same archives.

* :func:`check_header`: everything the header alone decides beyond the container's own
  checks (formats/reader.py already did layout, metadata and its reserved keys, spans and
  the expansion limit): each entry's coding mode, params and stream count, the reader's
  limits, and the auxiliary-file rules of spec §7.3;
* :func:`check_entry`: a tensor's parsed streams against its mode, shape and dtype,
  decoding nothing (what ``inspect`` and ``verify --no-decode`` run on every tensor);
* :func:`open_archive`: a random-access reader whose header passed :func:`check_header`.
"""

from __future__ import annotations

import os

from aligncodec.auxfiles import AUX_PREFIX, check_aux_names, file_name, is_aux
from aligncodec.formats import errors as E
from aligncodec.formats.constants import MODE_STORED
from aligncodec.formats.layout import Header, TensorEntry
from aligncodec.formats.limits import Limits
from aligncodec.formats.reader import ArchiveReader


def check_entry_header(entry: TensorEntry, limits: Limits | None = None) -> None:
    """What one header entry says about its coding, checked before its data is read."""
    from aligncodec.codec.modes import check_entry_params

    if is_aux(entry.name):
        file_name(entry.name)  # HeaderError on a name that is not a plain file name
        if entry.dtype != "U8" or len(entry.shape) != 1 or entry.mode != MODE_STORED:
            raise E.HeaderError(f"auxiliary file {entry.name!r} must be a 1-D U8 tensor in mode stored")
    check_entry_params(entry, limits)


def check_header(header: Header, limits: Limits | None = None) -> None:
    for e in header.tensors:
        check_entry_header(e, limits)
    check_aux_names(e.name[len(AUX_PREFIX):] for e in header.tensors if is_aux(e.name))  # e.g. equal up to case


def check_entry(entry: TensorEntry, streams: list, limits: Limits | None = None) -> None:
    """A tensor's header entry and parsed streams, validated without decoding."""
    from aligncodec.codec.modes import validate_entry

    check_entry_header(entry, limits)
    validate_entry(entry, streams)


class _CheckedReader(ArchiveReader):
    def __init__(self, path, limits: Limits | None = None):
        super().__init__(path, limits)
        try:
            check_header(self.header, self.limits)
        except BaseException:
            self.close()
            raise


def open_archive(path: str | os.PathLike, limits: Limits | None = None) -> ArchiveReader:
    """Open an archive for random access, its header fully validated (the way every command opens one)."""
    return _CheckedReader(path, limits)
