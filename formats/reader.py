"""Reader of the .acz container, version 1 (spec/FORMAT.md).

Validates every length, count and offset before it trusts it and raises the named
errors of :mod:`aligncodec.formats.errors`. Random access (:class:`ArchiveReader`)
or one pass over a stream (:func:`iter_archive`, pipes work).

Layout (all integers little-endian)::

    Preamble (64 B) | Header (sections) | zero pad to 64 | tensor data ... (each 64-aligned)
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterator

from aligncodec.formats import errors as E
from aligncodec.formats import metadata as M
from aligncodec.formats.limits import Limits, resolve as resolve_limits
from aligncodec.formats.constants import (
    DATA_ALIGN, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_TENSOR_BYTES, DTYPES, FIRST_EXTENSION_KIND, MAGIC, MAX_NAME_BYTES,
    MAX_NDIM, MAX_STREAMS, PREAMBLE_SIZE, SECTION_ALIGN, SECTION_FLAG_REQUIRED, SECTION_METADATA, SECTION_TENSOR,
    SUPPORTED_VERSIONS,
)
from aligncodec.formats.layout import PREAMBLE, SECTION, STREAM, TENSOR_FIXED, Header, TensorEntry, align, crc32
from aligncodec.formats.streams import Stream, parse_streams


def _parse_entry(p: memoryview, max_tensor_bytes: int) -> TensorEntry:
    if len(p) < TENSOR_FIXED.size:
        raise E.HeaderError("tensor entry too short")
    name_len, dtype, ndim, mode, nstreams, offset, size, crc, params_len = TENSOR_FIXED.unpack_from(p, 0)
    if ndim > MAX_NDIM:
        raise E.HeaderError(f"tensor has {ndim} dimensions (max {MAX_NDIM})")
    if name_len == 0 or name_len > MAX_NAME_BYTES:
        raise E.HeaderError(f"tensor name length {name_len} outside 1..{MAX_NAME_BYTES}")
    if not 1 <= nstreams <= MAX_STREAMS:
        raise E.HeaderError(f"stream count {nstreams} outside 1..{MAX_STREAMS}")
    need = TENSOR_FIXED.size + 8 * ndim + name_len + params_len
    if len(p) != need:
        raise E.HeaderError(f"tensor entry is {len(p)} bytes, fields say {need}")
    if dtype not in DTYPES:
        raise E.UnsupportedError(f"unknown dtype code {dtype}")
    shape = struct.unpack_from(f"<{ndim}Q", p, TENSOR_FIXED.size)
    pos = TENSOR_FIXED.size + 8 * ndim
    try:
        name = bytes(p[pos : pos + name_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise E.HeaderError("tensor name is not valid UTF-8") from None
    params = bytes(p[pos + name_len : pos + name_len + params_len])
    # checked multiplication, stopping as soon as the limit is passed; zero dimensions count as 1,
    # so a zero-size tensor cannot carry a dimension no array library can represent (0 × 2^64−1)
    span = DTYPES[dtype][1]
    for d in shape:
        span *= max(d, 1)
        if span > max_tensor_bytes:
            raise E.LimitError(f"tensor {name!r} has shape {tuple(shape)}: more than {max_tensor_bytes} bytes")
    return TensorEntry(name, DTYPES[dtype][0], tuple(int(d) for d in shape), int(mode), int(nstreams), int(offset), int(size), int(crc), params)


READ_BLOCK = 16 << 20


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    """Read exactly n bytes. Large reads go in blocks, so a declared size that the
    stream does not back (a hostile header on a pipe) never allocates more than
    the bytes that actually arrive plus one block."""
    if n <= READ_BLOCK:
        buf = f.read(n)
        if buf is None or len(buf) != n:
            raise E.TruncatedError(f"archive truncated in {what}")
        return buf
    parts = []
    left = n
    while left:
        b = f.read(min(left, READ_BLOCK))
        if not b:
            raise E.TruncatedError(f"archive truncated in {what}")
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def parse_preamble(b: bytes) -> tuple[int, int, int, int, int, int, int]:
    if len(b) < 8 or b[:8] != MAGIC:
        raise E.BadMagicError("not an .acz archive (bad magic number)")
    if len(b) < PREAMBLE_SIZE:
        raise E.TruncatedError("archive truncated in the preamble")
    magic, version, flags, header_size, data_offset, data_size, n_tensors, n_sections, header_crc, reserved, pcrc = PREAMBLE.unpack(b[:PREAMBLE_SIZE])
    if crc32(b[: PREAMBLE_SIZE - 4]) != pcrc:
        raise E.ChecksumError("preamble checksum mismatch")
    if version not in SUPPORTED_VERSIONS:
        raise E.UnsupportedError(f"format version {version} not supported (this reader knows {list(SUPPORTED_VERSIONS)})")
    if flags or any(reserved):
        raise E.HeaderError("preamble reserved field not zero")
    return version, header_size, data_offset, data_size, n_tensors, n_sections, header_crc


def parse_header(f: BinaryIO, limits: Limits | None = None, *, max_header_bytes: int | None = None, max_tensor_bytes: int | None = None) -> Header:
    """Read and validate preamble and header from the current position of ``f``
    (sequential reads only; works on pipes). Leaves ``f`` at the end of the header.

    Checks everything the header alone decides (spec §3-4, §11.1): layout, the metadata
    and its reserved keys, every tensor's span against the limits, and the expansion
    limit (formats/limits.py)."""
    lim = resolve_limits(limits, max_header_bytes=max_header_bytes, max_tensor_bytes=max_tensor_bytes)
    max_header_bytes, max_tensor_bytes = lim.max_header_bytes, lim.max_tensor_bytes
    version, header_size, data_offset, data_size, n_tensors, n_sections, header_crc = parse_preamble(f.read(PREAMBLE_SIZE) or b"")
    if header_size > max_header_bytes:
        raise E.LimitError(f"header of {header_size} bytes exceeds the limit of {max_header_bytes}")
    if data_offset != align(PREAMBLE_SIZE + header_size, DATA_ALIGN):
        raise E.LayoutError(f"data offset {data_offset} is not the aligned end of the header")
    # each section takes >= 8 bytes, each tensor entry >= 40: bound counts before allocating
    if n_sections * SECTION.size > header_size or n_tensors * (SECTION.size + TENSOR_FIXED.size) > header_size:
        raise E.HeaderError(f"{n_sections} sections / {n_tensors} tensors cannot fit in {header_size} header bytes")
    raw = _read_exact(f, header_size, "the header")
    if crc32(raw) != header_crc:
        raise E.ChecksumError("header checksum mismatch")
    metadata: dict[str, str] | None = None
    tensors: list[TensorEntry] = []
    extensions: list[tuple[int, int, bytes]] = []
    mv = memoryview(raw)
    pos = 0
    for si in range(n_sections):
        if header_size - pos < SECTION.size:
            raise E.TruncatedError(f"section {si} header truncated")
        kind, flags, length = SECTION.unpack_from(mv, pos)
        pos += SECTION.size
        if length > header_size - pos:
            raise E.TruncatedError(f"section {si} extends past the header")
        payload = mv[pos : pos + length]
        end = align(pos + length, SECTION_ALIGN)
        if end > header_size:
            raise E.TruncatedError(f"section {si} padding extends past the header")
        if any(mv[pos + length : end]):
            raise E.LayoutError(f"section {si}: non-zero padding")
        pos = end
        if flags & ~SECTION_FLAG_REQUIRED:
            raise E.HeaderError(f"section {si}: reserved flag bits set")
        if kind == SECTION_METADATA:
            if si != 0:
                raise E.HeaderError("the metadata section must be the first section")
            if length > lim.max_metadata_bytes:
                raise E.LimitError(f"metadata of {length} bytes exceeds the limit of {lim.max_metadata_bytes}")
            metadata = M.parse_metadata(payload)
        elif kind == SECTION_TENSOR:
            if len(tensors) >= n_tensors:
                raise E.HeaderError(f"more tensor sections than the {n_tensors} declared")
            tensors.append(_parse_entry(payload, max_tensor_bytes))
        elif kind >= FIRST_EXTENSION_KIND:
            if flags & SECTION_FLAG_REQUIRED:
                raise E.UnsupportedError(f"required extension section of kind 0x{kind:04x} is not supported")
            extensions.append((kind, flags, bytes(payload)))
        else:
            raise E.HeaderError(f"section {si}: invalid kind {kind}")
    if pos != header_size:
        raise E.LayoutError(f"header has {header_size - pos} bytes after its last section")
    if metadata is None:
        raise E.HeaderError("no metadata section")
    if len(tensors) != n_tensors:
        raise E.HeaderError(f"{len(tensors)} tensor sections, {n_tensors} declared")
    _check_tensor_layout(tensors, data_size)
    M.check_reserved(metadata, {t.name for t in tensors})
    check_expansion(tensors, data_offset, lim)
    pad = _read_exact(f, data_offset - PREAMBLE_SIZE - header_size, "the header padding")
    if any(pad):
        raise E.LayoutError("non-zero padding after the header")
    return Header(version, metadata, tensors, data_offset, data_size, header_size, extensions)


def check_expansion(tensors: list[TensorEntry], data_offset: int, limits: Limits) -> None:
    """The expansion limit (formats/limits.py): the decoded bytes of the tensors up to each
    one may not exceed slack + ratio × the file bytes up to that tensor's end."""
    decoded = 0
    for t in tensors:
        decoded += t.nbytes
        present = data_offset + t.offset + t.size
        allowed = limits.ratio_slack_bytes + limits.max_ratio * present
        if decoded > allowed:
            raise E.LimitError(
                f"tensor {t.name!r}: tensors up to it decode to {decoded} bytes from {present} archive bytes, "
                f"above the expansion limit ({limits.max_ratio:g}x + {limits.ratio_slack_bytes} bytes; raise it with --max-ratio)"
            )


def _check_tensor_layout(tensors: list[TensorEntry], data_size: int) -> None:
    """Canonical layout (spec §4): data in header order, each at the 64-aligned end of the previous,
    names unique, the last ending exactly at data_size."""
    expect = 0
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise E.HeaderError(f"duplicate tensor name {t.name!r}")
        seen.add(t.name)
        if t.offset != expect:
            raise E.LayoutError(f"tensor {t.name!r} at data offset {t.offset}, canonical layout puts it at {expect}")
        if t.size < STREAM.size * t.stream_count:
            raise E.LayoutError(f"tensor {t.name!r}: {t.size} bytes cannot hold {t.stream_count} streams")
        end = t.offset + t.size
        if end > data_size:
            raise E.LayoutError(f"tensor {t.name!r} ends at {end}, past the data section ({data_size})")
        expect = align(end, DATA_ALIGN)
    last_end = tensors[-1].offset + tensors[-1].size if tensors else 0
    if data_size != last_end:
        raise E.LayoutError(f"data section is {data_size} bytes, its last tensor ends at {last_end}")


class ArchiveReader:
    """Random-access reader of an .acz file.

    >>> with ArchiveReader("model.acz") as r:            # doctest: +SKIP
    ...     for t in r.tensors: print(t.name, t.shape)
    ...     streams = r.read_streams("lm_head.weight")

    The whole header is validated on open; each tensor's data is checked
    against its CRC-32 when read."""

    def __init__(self, path: str | os.PathLike, limits: Limits | None = None, *, max_header_bytes: int | None = None, max_tensor_bytes: int | None = None):
        self.path = os.fspath(path)
        self.limits = resolve_limits(limits, max_header_bytes=max_header_bytes, max_tensor_bytes=max_tensor_bytes)
        self._f = open(self.path, "rb")
        try:
            self.file_size = os.fstat(self._f.fileno()).st_size
            self.header = parse_header(self._f, self.limits)
            end = self.header.data_offset + self.header.data_size
            if self.file_size < end:
                raise E.TruncatedError(f"archive is {self.file_size} bytes, its header says {end}")
            if self.file_size > end:
                raise E.LayoutError(f"{self.file_size - end} trailing bytes after the data section")
            self.check_padding()  # as a streaming reader does: both accept the same files
        except BaseException:
            self._f.close()
            raise
        self._index = {t.name: t for t in self.header.tensors}

    # convenience views
    @property
    def tensors(self) -> list[TensorEntry]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def version(self) -> int:
        return self.header.version

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._index[name]
        except KeyError:
            raise E.TensorNotFoundError(f"no tensor named {name!r} in the archive") from None

    def read_data(self, name_or_entry: str | TensorEntry) -> bytes:
        """The tensor's data bytes, CRC-checked."""
        e = name_or_entry if isinstance(name_or_entry, TensorEntry) else self.entry(name_or_entry)
        self._f.seek(self.header.data_offset + e.offset)
        data = _read_exact(self._f, e.size, f"tensor {e.name!r}")
        if crc32(data) != e.crc:
            raise E.ChecksumError(f"tensor {e.name!r}: data checksum mismatch")
        return data

    def read_streams(self, name_or_entry: str | TensorEntry) -> list[Stream]:
        e = name_or_entry if isinstance(name_or_entry, TensorEntry) else self.entry(name_or_entry)
        return parse_streams(self.read_data(e), e.stream_count)

    def check_padding(self) -> None:
        """Check that every byte between tensors is zero (spec §4)."""
        ts = self.header.tensors
        for a, b in zip(ts, ts[1:]):
            gap = b.offset - (a.offset + a.size)
            if gap:
                self._f.seek(self.header.data_offset + a.offset + a.size)
                if any(_read_exact(self._f, gap, "padding")):
                    raise E.LayoutError(f"non-zero padding after tensor {a.name!r}")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ArchiveReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_archive(f: BinaryIO, limits: Limits | None = None, **legacy) -> Iterator[tuple[Header | None, TensorEntry | None, list[Stream] | None]]:
    """Read an archive sequentially from a stream (a pipe works): yields
    ``(header, None, None)`` first, then ``(None, entry, streams)`` per tensor in file order,
    holding one tensor's bytes at a time. Every checksum and padding byte is checked."""
    header = parse_header(f, limits, **legacy)
    yield header, None, None
    pos = 0
    for e in header.tensors:
        if e.offset > pos and any(_read_exact(f, e.offset - pos, "padding")):
            raise E.LayoutError(f"non-zero padding before tensor {e.name!r}")
        data = _read_exact(f, e.size, f"tensor {e.name!r}")
        if crc32(data) != e.crc:
            raise E.ChecksumError(f"tensor {e.name!r}: data checksum mismatch")
        pos = e.offset + e.size
        streams = parse_streams(data, e.stream_count)  # views into data: one copy in flight
        del data
        yield None, e, streams
    if f.read(1):
        raise E.LayoutError("trailing bytes after the data section")
