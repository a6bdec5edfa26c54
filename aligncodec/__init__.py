"""aligncodec: compression codec for LLM weights.

The code lives in the repository folders ``codec/`` (maths: transforms,
quantizers, entropy coders), ``formats/`` (bytes: the .acz container, no torch)
and ``tools/`` (command line, evaluation, benchmarks); the package maps them to
``aligncodec.codec``, ``aligncodec.formats`` and ``aligncodec.tools``.
"""

__version__ = "0.1.0"
