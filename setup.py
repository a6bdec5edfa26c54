"""The native kernels (codec/entropy/_fastrans.c), built by setuptools with the system C compiler at
``pip install -e .``; everything else is in pyproject.toml. If the compiler is missing the build
fails loudly; the package's numba kernels remain the fallback where the module is absent."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "aligncodec.codec.entropy._fastrans",
            sources=["codec/entropy/_fastrans.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"],
        )
    ]
)
