"""Lossy compression of a checkpoint (``aligncodec compress MODEL --bpw B``): choose the
lossy tensors, get their calibration Σ, run the encoder (codec/encoder.py), and write
the archive with every other tensor lossless.

Lossy by default: 2-D floating-point ``*.weight`` tensors of at least 4096 entries with
both sides ≥ 16 that are not embeddings (token/position embeddings and ``lm_head``);
``lossy_embeddings=True`` adds the embeddings (coded with Σ = I, i.e. weight MSE).
Everything else (norms, biases, small tensors, integer tensors) goes through the
lossless coder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossless, lossy
from aligncodec.codec.naming import is_embedding, layer_type
from aligncodec.codec.torch_interop import torch_dtype
from aligncodec.formats.constants import MODE_ECSQ
from aligncodec.formats.layout import TensorEntry

from aligncodec import archive

MIN_NUMEL = 4096


def is_lossy_candidate(name: str, dtype: str, shape: tuple[int, ...], lossy_embeddings: bool = False) -> bool:
    if dtype not in lossy.LOSSY_DTYPES or len(shape) != 2 or not name.endswith(".weight"):
        return False
    if min(shape) < 16 or shape[0] * shape[1] < MIN_NUMEL:
        return False
    if is_embedding(name) and not lossy_embeddings:
        return False
    return True


def modes_by_type(pairs) -> dict[str, dict[str, int]]:
    """{layer type: {coding transform: tensor count}} from (layer type, transform) pairs."""
    out: dict[str, dict[str, int]] = {}
    for t, kind in pairs:
        out.setdefault(t, {}).setdefault(kind, 0)
        out[t][kind] += 1
    return out


def resolve_input(model: str | os.PathLike) -> Path:
    p = Path(model)
    if p.exists():
        return p
    from aligncodec.tools.eval.models import resolve_model

    return resolve_model(str(model))


class CalibrationUnavailableError(RuntimeError):
    """The calibration Σ of a model could not be had (not a known causal LM, calibration failed);
    pass ``sigma="none"`` (``--no-calibration``) to code with plain weight MSE instead."""


def get_sigma(model: str, sigma) -> tuple[dict[str, torch.Tensor], str]:
    """Σ by weight name: a dict given by the caller, 'none' (Σ = I, only when asked for), or
    'auto' (calibration cache of a known causal LM). A failure to calibrate is raised as
    :class:`CalibrationUnavailableError`, never silently replaced by Σ = I."""
    if isinstance(sigma, dict):
        return sigma, "given"
    if sigma in (None, "none"):
        return {}, "none (weight MSE)"
    try:
        from aligncodec.tools.eval.calibrate import load_sigma

        return load_sigma(str(model), progress=True), "calibration (16384 calib tokens)"
    except Exception as exc:  # noqa: BLE001 - re-raised as one named error, with the cause attached
        raise CalibrationUnavailableError(
            f"no calibration Σ for {model} ({type(exc).__name__}: {exc}); use --no-calibration to code with plain weight MSE"
        ) from exc


def build_jobs(src: Path, sigma: dict, *, lossy_embeddings: bool = False, type_weights: dict | None = None,
               names: list[str] | None = None) -> list[E.TensorJob]:
    jobs = []
    for _f, name, dtype, shape, raw in archive.iter_checkpoint(archive.find_inputs(src)):
        if names is not None and name not in names:
            continue
        if not is_lossy_candidate(name, dtype, shape, lossy_embeddings):
            continue
        t = torch.frombuffer(bytearray(raw.tobytes()), dtype=torch_dtype(dtype))
        W = t.reshape(shape).to(torch.float32)
        S = sigma.get(name)
        if S is not None and S.shape != (shape[1], shape[1]):
            raise ValueError(f"Σ for {name} has shape {tuple(S.shape)}, the weight reads {shape[1]} inputs")
        tw = (type_weights or {}).get(layer_type(name), 1.0)
        jobs.append(E.TensorJob(name, W, dtype, S, tw))
    return jobs


def encode_model(model: str | os.PathLike, *, bpw: float | None = None, distortion: float | None = None,
                 candidates=E.DEFAULT_CANDIDATES, lossy_embeddings: bool = False, sigma="auto",
                 alpha: float = 0.25, seed: int = 0, type_weights: dict | None = None, tol: float = 0.009,
                 names: list[str] | None = None, progress: bool = True,
                 step0: float | None = None) -> tuple[E.EncodeResult, list[E.TensorJob], dict]:
    """Run the encoder over a model's lossy tensors. Returns (result, jobs, info)."""
    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    t0 = time.perf_counter()
    c0 = time.process_time()
    src = resolve_input(model)
    sig, sig_src = get_sigma(str(model), sigma)
    t_cal = time.perf_counter() - t0
    jobs = build_jobs(src, sig, lossy_embeddings=lossy_embeddings, type_weights=type_weights, names=names)
    if not jobs:
        raise ValueError(f"{model}: no tensor qualifies for lossy coding")
    cache: dict = {}
    from tqdm import tqdm

    for j in tqdm(jobs, desc="prepare", disable=not progress, leave=False):
        E.build_candidates(j, candidates, alpha=alpha, seed=seed, cache=cache)
    cache.clear()
    t_prep = time.perf_counter() - t0 - t_cal
    res = E.encode_jobs(jobs, bpw=bpw, distortion=distortion, tol=tol, progress=log, step0=step0)
    info = {"sigma": sig_src, "seconds_calibration": t_cal, "seconds_prepare": t_prep,
            "seconds_search": res.seconds, "seconds_total": time.perf_counter() - t0,
            "cpu_seconds_total": time.process_time() - c0,
            "candidates": list(candidates), "alpha": alpha}
    return res, jobs, info


def lossy_metadata(res: E.EncodeResult, jobs: list[E.TensorJob], info: dict, target: dict) -> dict[str, str]:
    per = {}
    for j in jobs:
        c = res.codes[j.name]
        per[j.name] = {"kind": c.kind, "bpw": round(8 * c.bytes_all_in / j.numel, 5), "act_rel_err": float(f"{c.rel_err:.6g}"),
                       "sqnr_db": round(c.sqnr_db, 3), "type": layer_type(j.name)}
    summ = {"target": target, "step": res.step, "bpw_lossy_all_in": res.bpw, "n_lossy_weights": res.n_weights,
            "modes": res.summary()["modes"], **info}
    return {"acz.lossy": json.dumps(per, sort_keys=True), "acz.lossy.summary": json.dumps(summ, sort_keys=True)}


def write_archive(model: str | os.PathLike, out: str | os.PathLike, res: E.EncodeResult, metadata: dict[str, str],
                  progress: bool = True) -> list[TensorEntry]:
    codes = res.codes

    def enc(name, dtype, shape, raw):
        c = codes.get(name)
        if c is None:
            return lossless.encode(raw, dtype, int(np.prod(shape, dtype=np.int64)))
        return MODE_ECSQ, c.params.pack(), c.streams

    return archive.compress(resolve_input(model), out, encode_tensor=enc, metadata=metadata, progress=progress)


def compress_lossy(model: str | os.PathLike, out: str | os.PathLike, *, bpw: float | None = None,
                   distortion: float | None = None, progress: bool = True, **kw) -> dict:
    """Encode and write; returns a summary dict (also stored in the archive metadata)."""
    res, jobs, info = encode_model(model, bpw=bpw, distortion=distortion, progress=progress, **kw)
    target = {"bpw": bpw} if bpw is not None else {"distortion": distortion}
    meta = lossy_metadata(res, jobs, info, target)
    entries = write_archive(model, out, res, meta, progress)
    lossy_names = {j.name for j in jobs}
    lossy_bytes = sum(lossy.entry_bytes(e.name, len(e.shape), len(e.params), e.size) for e in entries if e.name in lossy_names)
    return {**json.loads(meta["acz.lossy.summary"]), "bpw_lossy_in_archive": 8 * lossy_bytes / res.n_weights,
            "file_bytes": os.path.getsize(out)}
