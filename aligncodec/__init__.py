"""aligncodec: compression codec for LLM weights.

The code lives in the repository folders ``codec/`` (maths: transforms,
quantizers, entropy coders), ``formats/`` (bytes: the .acz container, no torch)
and ``tools/`` (command line, evaluation, benchmarks); the package maps them to
``aligncodec.codec``, ``aligncodec.formats`` and ``aligncodec.tools``.
"""

__version__ = "0.1.0"

_LOADER_API = ("load", "load_state_dict", "load_hf_model")


def __getattr__(name):  # lazy: importing aligncodec stays cheap (no torch, no numba)
    if name in _LOADER_API:
        from aligncodec import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'aligncodec' has no attribute {name!r}")


__all__ = ["__version__", *_LOADER_API]
