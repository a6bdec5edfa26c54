"""aligncodec: compression codec for LLM weights.

The public API: :func:`compress`, :func:`decompress`, :func:`inspect`, :func:`verify`
(:mod:`aligncodec.archive`) and :func:`load`, :func:`load_state_dict`,
:func:`load_hf_model` (:mod:`aligncodec.loader`), imported on first use.

The code lives in the repository folders ``formats/`` (bytes: the .acz container,
numpy only), ``codec/`` (maths: transforms, quantizers, entropy coders, coding modes)
and ``tools/`` (command line, evaluation, experiments, benchmarks); the package maps
them to ``aligncodec.formats``, ``aligncodec.codec`` and ``aligncodec.tools``.
"""

__version__ = "0.1.0"

_API = {"compress": "archive", "decompress": "archive", "inspect": "archive", "verify": "archive",
        "load": "loader", "load_state_dict": "loader", "load_hf_model": "loader"}


def __getattr__(name):  # lazy: importing aligncodec stays cheap (no torch, no numba)
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"aligncodec.{_API[name]}"), name)
    raise AttributeError(f"module 'aligncodec' has no attribute {name!r}")


__all__ = ["__version__", *_API]
