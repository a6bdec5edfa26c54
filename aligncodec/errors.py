"""The public API's errors about its inputs and outputs (re-exported by :mod:`aligncodec.archive`).

A module of its own, importing nothing, so that every module of the public API can name them
without importing the archive functions (and without import circles)."""


class InputError(Exception):
    """The input checkpoint cannot be read (missing, not safetensors, corrupt safetensors,
    duplicate tensor names, an auxiliary file name outside the portable set, a symlink
    leaving the input folder)."""

    exit_code = 3  # the CLI's exit code (README)


class OutputError(OSError):
    """An output could not be written (disk full, permission, an existing destination)."""
