"""The ``aligncodec`` command line.

Each sub-command lives in its own module ``aligncodec.tools.cmd_<name>`` that
defines ``add_parser(subparsers)``; the parser it adds sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Errors are reported as one line on stderr with a distinct exit code
(see ``EXIT_CODES`` and the README).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aligncodec import __version__

# Sub-command modules, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "cmd_demo",  # the README's main job on the default model
    "cmd_archive",  # compress, decompress, inspect, verify
    "cmd_models",  # fetch / list reference models
    "cmd_eval",  # perplexity, bits/byte, KLD
    "cmd_calibrate",  # per-linear input second moments
    "cmd_stats",  # per-tensor diagnostics
    "cmd_baseline",  # RTN / Hadamard / GPTQ baselines
    "cmd_rd",  # rate–distortion study of the lossy encoder against the baselines
    "cmd_bench",  # decode throughput, load time and peak RSS
]

# Exit codes: one per kind of failure, documented in the README.
EXIT_OK = 0
EXIT_ERROR = 1  # unexpected internal error
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_IO = 3  # input missing or unreadable, output not writable
EXIT_FORMAT = 4  # archive malformed, truncated or failing validation
EXIT_CHECKSUM = 5  # checksum mismatch
EXIT_UNSUPPORTED = 6  # unsupported format version or required feature
EXIT_DEPENDENCY = 7  # optional dependency or reference model not available
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error to report as one line, with a given exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    """Map an exception to the documented exit code."""
    from aligncodec.formats import errors as ferr

    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, ferr.ChecksumError):
        return EXIT_CHECKSUM
    if isinstance(exc, ferr.UnsupportedError):
        return EXIT_UNSUPPORTED
    if isinstance(exc, ferr.FormatError):
        return EXIT_FORMAT
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError, OSError)):
        return EXIT_IO
    if isinstance(exc, ImportError):
        return EXIT_DEPENDENCY
    return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligncodec",
        description="Compress LLM checkpoints into .acz archives, decode them, and measure bits per weight.",
    )
    parser.add_argument("--version", action="version", version=f"aligncodec {__version__}")
    parser.add_argument("--traceback", action="store_true", help="on error, print the full Python traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        importlib.import_module(f"aligncodec.tools.cli.{mod_name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("aligncodec: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line per error, distinct exit codes
        if args.traceback:
            raise
        name = type(exc).__name__
        print(f"aligncodec: error: {name}: {exc}", file=sys.stderr)
        return exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())
