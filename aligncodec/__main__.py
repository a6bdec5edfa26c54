"""The ``aligncodec`` command (the console script) and ``python -m aligncodec``.

Ctrl-C: this module's first act is to install a SIGINT handler that ends the process at
once with status 130 (``aligncodec: interrupted`` on stderr). Before :func:`run` has
imported anything, nothing needs cleaning up; once the command runs,
``aligncodec.tools.cli.main`` installs the handler that also removes the temporaries of
the writes in progress. Ending the process from the handler, instead of raising
KeyboardInterrupt, is what makes a Ctrl-C safe at any moment: an exception raised while
the main thread is inside a C++ callback (``import torch`` runs pybind11 callbacks) cannot
unwind and aborts the process. Uncovered: only the interpreter's own start-up and
``aligncodec/__init__.py`` (which imports nothing), tens of milliseconds, where Python's
default handler applies.
"""

import os
import signal


def _interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    os.write(2, b"aligncodec: interrupted\n")
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted)


def run() -> None:
    """The console script's entry point."""
    import sys

    from aligncodec.tools.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
