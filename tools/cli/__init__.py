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
import os
import signal
import sys
import threading

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
EXIT_VERIFY = 8  # the lossy encoder's check of the archive it wrote failed (nothing kept; a bug)
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error to report as one line, with a given exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    """Map an exception to the documented exit code. An exception class may carry its own
    code as a class attribute ``exit_code`` (the encoder's and loader's named errors do)."""
    from aligncodec.formats import errors as ferr

    if isinstance(exc, CLIError):
        return exc.code
    code = getattr(type(exc), "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, ferr.ChecksumError):
        return EXIT_CHECKSUM
    if isinstance(exc, ferr.UnsupportedError):
        return EXIT_UNSUPPORTED
    if isinstance(exc, ferr.FormatError):
        return EXIT_FORMAT
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError, OSError)):
        return EXIT_IO
    if type(exc).__name__ == "SafetensorError":  # safetensors' own error: an unreadable input/output file
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


def _printable(s: str) -> str:
    """Control and other non-printable characters escaped (names in messages come from files)."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


class _Interrupts:
    """Ctrl-C handling for the whole run (imports, numba compilation, threads included).

    The first SIGINT raises KeyboardInterrupt in the main thread (Python delivers signals
    there only), so clean-up code runs and ``main`` returns 130; a second SIGINT while that
    clean-up runs ends the process at once with status 130 (``os._exit``). After ``main``
    has returned (interpreter shutdown: thread joins, atexit), a SIGINT also ends the
    process with 130, never with a traceback."""

    def __init__(self):
        self.count = 0
        self.previous = None

    def _handler(self, signum, frame):
        self.count += 1
        if self.count > 1:
            os._exit(EXIT_INTERRUPTED)
        raise KeyboardInterrupt

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        self.previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handler)
        return True

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)

    @staticmethod
    def exit_on_interrupt() -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda signum, frame: os._exit(EXIT_INTERRUPTED))


def _run(argv: list[str] | None, traceback_ref: list) -> int:
    if argv is None:
        argv = sys.argv[1:]
    traceback_ref[0] = "--traceback" in argv[: argv.index("--") if "--" in argv else len(argv)]
    parser = build_parser()
    args = parser.parse_args(argv)
    traceback_ref[0] = bool(args.traceback)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Every failure is one line ``aligncodec: error: <Name>: <message>``
    on stderr and a documented exit code (a traceback only with ``--traceback``); Ctrl-C is
    exit 130 (see :class:`_Interrupts`). Called without ``argv`` (the installed command),
    the SIGINT handling stays for the rest of the process; called with ``argv`` (tests,
    other programs), the previous handler is restored on return."""
    as_program = argv is None
    intr = _Interrupts()
    installed = intr.install()
    want_tb = [False]
    try:
        try:
            return _run(argv, want_tb)
        except KeyboardInterrupt:
            print("aligncodec: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:  # one line per error, distinct exit codes
            if want_tb[0]:
                raise
            msg = _printable(str(exc))
            print(f"aligncodec: error: {type(exc).__name__}" + (f": {msg}" if msg else ""), file=sys.stderr)
            return exit_code_for(exc)
    except KeyboardInterrupt:  # a Ctrl-C while an error was being reported
        return EXIT_INTERRUPTED
    finally:
        if installed:
            if as_program:
                intr.exit_on_interrupt()
            else:
                intr.restore()


if __name__ == "__main__":
    sys.exit(main())
