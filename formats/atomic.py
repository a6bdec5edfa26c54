"""All-or-nothing file output: the one helper every writer of the project uses
(archives, decoded safetensors, auxiliary files, calibration and result files).

It lives in ``formats/``, the lowest layer, so that the container writer can use it;
it needs only the standard library.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def atomic_write(dest: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``dest`` all or nothing.

    ``write(tmp)`` writes a temporary file next to ``dest`` (same folder, a hidden name
    that ends in ``dest``'s suffix, so tools that infer the format from it still work);
    the file is then fsynced and renamed over ``dest``, and the rename made durable.
    On any error the temporary file is removed and ``dest`` is left as it was: no half
    file under the final name. Returns ``dest`` as a Path."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.part{dest.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return dest
