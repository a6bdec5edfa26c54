"""Lazy references for the declared registries (coding modes, baseline transforms): a
registry names ``module.function`` and imports it only when it is first called, so that
reading a registry imports neither torch nor numba."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy(module: str, attr: str) -> Callable:
    """A callable that runs ``module.attr``, importing ``module`` on the first call."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__name__ = attr
    call.__qualname__ = f"{module}.{attr}"
    return call
