"""Writer of the .acz container, version 1 (spec/FORMAT.md): tensor by tensor with
bounded memory, canonical layout, atomic on disk."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from typing import Sequence

from aligncodec.formats.atomic import atomic_write
from aligncodec.formats.constants import (
    DATA_ALIGN, DTYPE_CODES, FORMAT_VERSION, MAGIC, MAX_NAME_BYTES, MAX_NDIM, MAX_STREAMS, PREAMBLE_SIZE, SECTION_ALIGN,
    SECTION_METADATA, SECTION_TENSOR, STREAM_ALIGN,
)
from aligncodec.formats.layout import PREAMBLE, SECTION, TENSOR_FIXED, TensorEntry, align, crc32
from aligncodec.formats.streams import Stream, serialize_stream


def serialize_entry(e: TensorEntry) -> bytes:
    name = e.name.encode("utf-8")
    fixed = TENSOR_FIXED.pack(
        len(name), DTYPE_CODES[e.dtype], len(e.shape), e.mode, e.stream_count, e.offset, e.size, e.crc, len(e.params)
    )
    return fixed + struct.pack(f"<{len(e.shape)}Q", *e.shape) + name + e.params


def serialize_streams(streams: Sequence[Stream]) -> bytes:
    """A tensor's data bytes: its streams, each but the last padded to STREAM_ALIGN (spec §5)."""
    parts = []
    for i, s in enumerate(streams):
        b = serialize_stream(s)
        if i + 1 < len(streams):
            b += bytes(align(len(b), STREAM_ALIGN) - len(b))
        parts.append(b)
    return b"".join(parts)


class ArchiveWriter:
    """Write an .acz archive tensor by tensor with bounded memory.

    Each :meth:`add` serialises the tensor's streams into a spool file next to
    the target; :meth:`close` orders the tensors by name (so the bytes do not
    depend on the order they were added), writes preamble, header and data to a
    temporary file and renames it over ``path`` (:func:`~aligncodec.formats.atomic.atomic_write`). On error nothing is
    left under ``path``."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise TypeError("metadata must map str to str")
        self.metadata = meta
        d = os.path.dirname(os.path.abspath(self.path))
        self._spool = tempfile.TemporaryFile(dir=d, prefix=".acz-spool-")
        self._entries: list[tuple[TensorEntry, int]] = []  # (entry, spool offset)
        self._names: set[str] = set()
        self._closed = False

    def add(self, name: str, dtype: str, shape: Sequence[int], mode: int, streams: Sequence[Stream], params: bytes = b"") -> TensorEntry:
        if self._closed:
            raise ValueError("writer is closed")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unknown dtype {dtype!r}")
        nb = len(name.encode("utf-8"))
        if not 1 <= nb <= MAX_NAME_BYTES:
            raise ValueError(f"tensor name must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
        if len(shape) > MAX_NDIM or not 1 <= len(streams) <= MAX_STREAMS:
            raise ValueError("too many dimensions or streams")
        data = serialize_streams(streams)
        off = self._spool.seek(0, io.SEEK_END)
        self._spool.write(data)
        entry = TensorEntry(name, dtype, tuple(int(d) for d in shape), int(mode), len(streams), 0, len(data), crc32(data), bytes(params))
        self._entries.append((entry, off))
        self._names.add(name)
        return entry

    def close(self) -> list[TensorEntry]:
        """Finish the archive; returns the entries in file order."""
        if self._closed:
            raise ValueError("writer is closed")
        self._closed = True
        try:
            entries = sorted(self._entries, key=lambda x: x[0].name.encode("utf-8"))
            pos = 0
            for e, _ in entries:
                e.offset = pos
                pos = align(pos + e.size, DATA_ALIGN)
            data_size = entries[-1][0].offset + entries[-1][0].size if entries else 0
            header = build_header(self.metadata, [e for e, _ in entries])
            data_offset = align(PREAMBLE_SIZE + len(header), DATA_ALIGN)
            pre = build_preamble(len(header), data_offset, data_size, len(entries), len(entries) + 1, crc32(header))
            def write(tmp) -> None:
                with open(tmp, "wb") as out:
                    out.write(pre)
                    out.write(header)
                    out.write(bytes(data_offset - PREAMBLE_SIZE - len(header)))
                    written = 0
                    for e, spool_off in entries:
                        out.write(bytes(e.offset - written))
                        self._spool.seek(spool_off)
                        left = e.size
                        while left:
                            buf = self._spool.read(min(left, 8 << 20))
                            out.write(buf)
                            left -= len(buf)
                        written = e.offset + e.size

            atomic_write(self.path, write)
            return [e for e, _ in entries]
        finally:
            self._spool.close()

    def read_back(self, entry: TensorEntry) -> bytes:
        """The data bytes of ``entry`` (returned by :meth:`add`) as the spool holds them: what
        :meth:`close` will copy into the archive (the encoder's check of what it wrote)."""
        if self._closed:
            raise ValueError("writer is closed")
        for e, off in reversed(self._entries):
            if e is entry:
                self._spool.seek(off)
                data = self._spool.read(e.size)
                self._spool.seek(0, io.SEEK_END)
                return data
        raise KeyError(entry.name)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._spool.close()

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()


def build_section(kind: int, flags: int, payload: bytes) -> bytes:
    b = SECTION.pack(kind, flags, len(payload)) + payload
    return b + bytes(align(len(b), SECTION_ALIGN) - len(b))


def build_header(metadata: dict[str, str], entries: Sequence[TensorEntry], extensions: Sequence[tuple[int, int, bytes]] = ()) -> bytes:
    meta = json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    parts = [build_section(SECTION_METADATA, 0, meta)]
    parts += [build_section(SECTION_TENSOR, 0, serialize_entry(e)) for e in entries]
    parts += [build_section(k, f, p) for k, f, p in extensions]
    return b"".join(parts)


def build_preamble(header_size: int, data_offset: int, data_size: int, n_tensors: int, n_sections: int, header_crc: int, version: int = FORMAT_VERSION) -> bytes:
    head = PREAMBLE.pack(MAGIC, version, 0, header_size, data_offset, data_size, n_tensors, n_sections, header_crc, bytes(16), 0)[:-4]
    return head + struct.pack("<I", crc32(head))
