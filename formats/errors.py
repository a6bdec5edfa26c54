"""Named errors of the .acz reader and writer (spec/FORMAT.md §9 lists them).

Every failure to read an archive raises a subclass of :class:`AczError`;
nothing else escapes the reader for bad input.
"""

from __future__ import annotations


class AczError(Exception):
    """Base class of every archive error."""


class FormatError(AczError):
    """The bytes do not form a valid archive."""


class BadMagicError(FormatError):
    """The file does not start with the .acz magic number."""


class TruncatedError(FormatError):
    """The archive ends before a structure it declares."""


class HeaderError(FormatError):
    """A preamble, section or tensor-entry field has an invalid value (reserved field not zero,
    unknown enumeration value where none may be skipped, count out of range, bad UTF-8/JSON)."""


class LayoutError(FormatError):
    """Offsets or sizes are inconsistent: out of the file, not canonical, overlapping, misaligned,
    non-zero padding or trailing bytes."""


class StreamError(FormatError):
    """A stream inside a tensor's data is malformed (frequency table, chunk table, declared sizes),
    or does not match what the tensor's coding mode needs."""


class CorruptStreamError(FormatError):
    """A coded stream failed its decode-time integrity checks (rANS final state, words left over or
    missing, zstd frame size)."""


class LimitError(FormatError):
    """A declared size exceeds a limit the reader enforces (header size, decoded tensor bytes)."""


class ChecksumError(FormatError):
    """A CRC-32 over the preamble, the header or a tensor's data does not match."""


class UnsupportedError(AczError):
    """A valid-looking archive needs something this reader does not implement: a format version
    it does not list, a section marked required of an unknown kind, an unknown dtype, coding mode
    or coder."""


class TensorNotFoundError(AczError, KeyError):
    """The archive has no tensor of the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it plain
        return str(self.args[0]) if self.args else ""
