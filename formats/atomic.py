"""All-or-nothing file output: the one helper every writer of the project uses
(archives, decoded safetensors, auxiliary files, calibration and result files). It lives
in ``formats/``, the lowest layer, so that the container writer can use it; it needs only
the standard library.

* :func:`atomic_path` / :func:`atomic_write` — a file: the body writes a temporary file
  ``.acz-tmp-<host>-<pid>-<random>.part<suffix>`` in the destination's folder (ending in
  the destination's suffix, so tools that infer the format from it still work); on success it is
  fsynced and renamed over the destination (then the folder is fsynced); on any error
  (Ctrl-C included) it is removed and nothing appears under the destination's name.
* :func:`atomic_dir` — a folder: the body fills a temporary folder
  ``.acz-tmp-<host>-<pid>-<random>.d`` beside the destination, which is then renamed
  into place (an absent or empty destination), or whose files are moved into it one
  by one (``merge=True``, an existing folder the caller was allowed to overwrite).

Outputs get mode ``0o666 & ~umask`` like any other program's files (``tempfile.mkstemp``
would make every output 0600, and safetensors writes 0600 too: the mode is set again
before the rename).

Every temporary that a live :func:`atomic_path` or :func:`atomic_dir` holds is listed in a
process-wide registry, so that a program ending at once (the command line's Ctrl-C handler
ends the process with ``os._exit(130)`` rather than unwinding through C++ callbacks)
can still remove them: :func:`remove_live_temporaries`.

The writer's host and process id are part of every temporary name, so a later write
to the same folder can remove the leftovers of a writer that died (``kill -9``, power
loss) without ever touching a live writer's file: :func:`clean_stale` removes an
``.acz-tmp-*`` entry only if it was made on this host by a process that no longer
exists, or if it is older than ``STALE_SECONDS`` (a day) whoever made it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

TMP_PREFIX = ".acz-tmp-"
STALE_SECONDS = 24 * 3600
_TMP_RE = re.compile(r"^\.acz-tmp-(?:(?P<host>[A-Za-z0-9_]{1,32})-(?P<pid>\d{1,10})-)?[A-Za-z0-9_]+\.(?:part(?:\.[A-Za-z0-9_]{1,16})?|d)$")
_SUFFIX_RE = re.compile(r"\.[A-Za-z0-9_]{1,16}")


# Temporaries of the live atomic writes of this process (insertion-ordered; plain dict
# operations only, so a signal handler in the main thread can read it without a lock).
_LIVE: dict[str, None] = {}


def remove_live_temporaries() -> list[str]:
    """Remove every temporary a live atomic write of this process holds (best effort, never
    raises); returns their paths. For a handler that ends the process without unwinding."""
    removed = []
    for p in list(_LIVE):
        try:
            _remove(p)
            removed.append(p)
        except OSError:
            pass
        _LIVE.pop(p, None)
    return removed


@contextlib.contextmanager
def tracked(path: str | os.PathLike) -> Iterator[None]:
    """List ``path`` (a scratch file or folder its owner removes when done) with the live
    temporaries for the duration of the body, so :func:`remove_live_temporaries` removes it
    too if the process ends at once."""
    p = os.path.abspath(os.fspath(path))
    _LIVE[p] = None
    try:
        yield
    finally:
        _LIVE.pop(p, None)


def _host_tag() -> str:
    h = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname() or "host")[:32]
    return h or "host"


def temp_name(suffix: str = ".part") -> str:
    """A fresh temporary name carrying this host and process id."""
    return f"{TMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never judge pid 0 / negative: treat as alive (safe)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def is_stale(path: str | os.PathLike, *, now: float | None = None) -> bool:
    """True if ``path`` is an aligncodec temporary whose writer is gone (see the module doc)."""
    p = Path(path)
    m = _TMP_RE.match(p.name)
    if not m:
        return False
    try:
        age = (time.time() if now is None else now) - p.lstat().st_mtime
    except OSError:
        return False
    if age >= STALE_SECONDS:
        return True
    host, pid = m.group("host"), m.group("pid")
    if host is None or host != _host_tag() or int(pid) == os.getpid():
        return False
    return not _pid_alive(int(pid))


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the stale aligncodec temporaries in ``folder``; returns what was removed.
    Never raises (cleaning is best effort)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(TMP_PREFIX) or not is_stale(e.path):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def file_mode() -> int:
    """The mode a new file gets under the current umask (``0o666 & ~umask``)."""
    um = os.umask(0o022)
    os.umask(um)
    return 0o666 & ~um


def _fix_mode(path: str) -> None:
    """Give a file written by a library that forces its own mode (safetensors writes 0600) the
    umask's mode, like any other output."""
    try:
        os.chmod(path, file_mode())
    except OSError:
        pass


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(p: str) -> None:
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (already created, empty, umask-respecting mode);
    the body writes it (by name: any library's ``save(path)`` works); on success it is fsynced
    and renamed to ``dest``; on error it is removed."""
    dest = os.path.abspath(os.fspath(dest))
    d = os.path.dirname(dest)
    clean_stale(d)
    suffix = os.path.splitext(dest)[1]
    tmp = os.path.join(d, temp_name(".part" + (suffix if _SUFFIX_RE.fullmatch(suffix) else "")))
    _LIVE[tmp] = None
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _fix_mode(tmp)
        os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _LIVE.pop(tmp, None)
    _fsync_dir(d)


def atomic_write(dest: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``dest`` all or nothing: ``write(tmp)`` writes a temporary file beside it, which
    is then fsynced and renamed over ``dest`` (see :func:`atomic_path`). Returns ``dest`` as a Path."""
    with atomic_path(dest) as tmp:
        write(tmp)
    return Path(dest)


def dir_is_empty(path: str | os.PathLike) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, merge: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``dest``; on success it becomes ``dest``.

    ``dest`` absent or an empty folder: the temporary folder is renamed to it (all or
    nothing). ``dest`` a non-empty folder: only with ``merge=True``, each file is then
    renamed into it (each rename atomic; files of ``dest`` not written are kept).
    Otherwise FileExistsError before anything is written."""
    dest = os.path.abspath(os.fspath(dest))
    parent = os.path.dirname(dest)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise FileExistsError(f"{dest} exists and is not a folder")
    if os.path.isdir(dest) and not merge and not dir_is_empty(dest):
        raise FileExistsError(f"{dest} exists and is not empty (use --force to overwrite)")
    os.makedirs(parent, exist_ok=True)
    clean_stale(parent)
    tmp = os.path.join(parent, temp_name(".d"))
    _LIVE[tmp] = None
    try:
        os.mkdir(tmp)
        yield tmp
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                _fix_mode(os.path.join(tmp, name))
        if os.path.isdir(dest) and not dir_is_empty(dest):
            if not merge:
                raise FileExistsError(f"{dest} is no longer empty")
            for name in sorted(os.listdir(tmp)):
                os.replace(os.path.join(tmp, name), os.path.join(dest, name))
            os.rmdir(tmp)
            _fsync_dir(dest)
        else:
            if os.path.isdir(dest):
                os.rmdir(dest)  # empty: replaced by the new folder
            os.rename(tmp, dest)
        _fsync_dir(parent)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _LIVE.pop(tmp, None)
