"""Finished blocks survive a kill: the resume spool (``--resume`` continues from it), and the
disk-space check before any work."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from aligncodec.encode import arch as A


class ResumeError(ValueError):
    """A resume does not fit the spool: different input or settings, or a damaged spool."""


class SpoolSpaceError(OSError):
    """Too little free disk for the spool and the archive."""


SPOOL_FORMAT = "aligncodec-stream-spool/1"


def spool_dir(out: str | os.PathLike) -> Path:
    o = Path(os.path.abspath(out))
    return o.parent / f".{o.name}.spool"


def input_fingerprint(ckpt: A.Checkpoint) -> dict:
    """Names, sizes and modification times of the shards plus a hash of their headers."""
    h = hashlib.sha256()
    files = []
    for f in ckpt.files:
        st = f.stat()
        files.append([f.name, st.st_size, st.st_mtime_ns])
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(n))
    return {"files": files, "headers_sha256": h.hexdigest()}


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


class Spool:
    """Finished blocks of an interrupted encode: ``manifest.json`` (input and settings
    fingerprints, the list of finished steps with each file's sha256), one ``step-N.pt`` per
    finished block (its coded tensors, the controller state and the activations for the next
    block). Every file is written to a temporary name, fsynced and renamed; the manifest last."""

    def __init__(self, path: Path, ident: dict):
        self.path = path
        self.ident = ident
        self.steps: list[dict] = []

    @classmethod
    def create(cls, path: Path, ident: dict) -> "Spool":
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        sp = cls(path, ident)
        sp._write_manifest()
        return sp

    @classmethod
    def open(cls, path: Path, ident: dict) -> "Spool":
        man = path / "manifest.json"
        if not man.is_file():
            raise ResumeError(f"no spool to resume from at {path}")
        try:
            m = json.loads(man.read_text())
        except ValueError:
            raise ResumeError(f"{man} is damaged (not JSON)") from None
        if m.get("format") != SPOOL_FORMAT:
            raise ResumeError(f"{man}: not an {SPOOL_FORMAT} spool")
        if m.get("input") != ident["input"]:
            raise ResumeError(f"the spool at {path} was written for a different input checkpoint")
        if m.get("options") != ident["options"]:
            diff = sorted(k for k in set(m.get("options", {})) | set(ident["options"])
                          if m.get("options", {}).get(k) != ident["options"].get(k))
            raise ResumeError(f"the spool at {path} was written with different settings ({', '.join(diff)})")
        sp = cls(path, ident)
        for st in m.get("steps", []):
            f = path / st["file"]
            if not f.is_file() or _sha256_file(f) != st["sha256"]:
                raise ResumeError(f"the spool at {path} is damaged ({st['file']} is missing or fails its checksum)")
            sp.steps.append(st)
        return sp

    def _write_manifest(self) -> None:
        m = {"format": SPOOL_FORMAT, **self.ident, "steps": self.steps}
        _atomic_write(self.path / "manifest.json", json.dumps(m, indent=1, sort_keys=True).encode())

    def save_step(self, key: str, payload: dict, acts=None) -> None:
        """Record a finished step; ``acts`` (the activations for the next block) are kept for the
        latest step only: written first, then the manifest that names them, then the old ones go."""
        fname = f"step-{len(self.steps):05d}.pt"
        data = _torch_bytes(payload)
        _atomic_write(self.path / fname, data)
        st = {"key": key, "file": fname, "sha256": hashlib.sha256(data).hexdigest()}
        old = self.steps[-1].get("acts") if self.steps else None
        if acts is not None:
            an = f"acts-{len(self.steps):05d}.pt"
            ad = _torch_bytes(acts)
            _atomic_write(self.path / an, ad)
            st["acts"], st["acts_sha256"] = an, hashlib.sha256(ad).hexdigest()
        for prev in self.steps:
            prev.pop("acts", None)
            prev.pop("acts_sha256", None)
        self.steps.append(st)
        self._write_manifest()
        if old:
            try:
                os.unlink(self.path / old)
            except FileNotFoundError:
                pass

    def load_step(self, i: int) -> dict:
        return torch.load(self.path / self.steps[i]["file"], weights_only=False)

    def load_acts(self):
        st = self.steps[-1]
        f = self.path / st["acts"]
        if not f.is_file() or _sha256_file(f) != st["acts_sha256"]:
            raise ResumeError(f"{f}: the activations of the last finished block are missing or damaged")
        return torch.load(f, weights_only=False)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_space(run, sp_path: Path) -> None:
    """SpoolSpaceError unless the disk holds about 3x the archive (archive, its spool, the
    resume spool) plus the calibration activations."""
    opts = run.opts
    need = (3 * min(opts.rate_for_checks(), 32.0) * run.n_params / 8
            + (2 * opts.calib_tokens * 4 * hidden_size(run.plan) if run.calibrate else 0) + (64 << 20))
    free = shutil.disk_usage(sp_path.parent).free
    if free < need:
        raise SpoolSpaceError(f"{sp_path.parent}: {free / 1e9:.2f} GB free, the encode needs about {need / 1e9:.2f} GB "
                              "(archive, its spool and the resume spool)")


def hidden_size(plan) -> int:
    cfg = plan.config if plan is not None else None
    return int(getattr(cfg, "hidden_size", 0) or getattr(getattr(cfg, "text_config", None), "hidden_size", 0) or 4096)
