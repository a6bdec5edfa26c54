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
import math
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
from aligncodec.formats.constants import MODE_ECSQ, MODE_TCQ
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
        from aligncodec.tools.eval.calibrate import DEFAULT_CALIB_TOKENS, load_sigma

        return load_sigma(str(model), progress=True), f"calibration ({DEFAULT_CALIB_TOKENS} calib tokens)"
    except Exception as exc:  # noqa: BLE001 - re-raised as one named error, with the cause attached
        raise CalibrationUnavailableError(
            f"no calibration Σ for {model} ({type(exc).__name__}: {exc}); use --no-calibration to code with plain weight MSE"
        ) from exc


def build_jobs(src: Path, sigma: dict | None = None, *, lossy_embeddings: bool = False, type_weights: dict | None = None,
               names: list[str] | None = None, nonfinite: str = "error", follow_symlinks: bool = False,
               lossless: dict[str, str] | None = None) -> list[E.TensorJob]:
    """One job per lossy candidate tensor (:func:`is_lossy_candidate`), checked before any coding:
    a tensor with NaN/Inf is a NonFiniteError naming every such tensor (``nonfinite="error"``)
    or goes lossless (``nonfinite="lossless"``); an all-zero tensor or one beyond the lossy range
    goes lossless (:func:`encoder.lossless_reason`). Tensors sent to lossless are recorded in
    ``lossless`` (name -> reason). ``sigma`` may be attached later (:func:`attach_sigma`)."""
    if nonfinite not in ("error", "lossless"):
        raise ValueError(f"nonfinite must be 'error' or 'lossless', not {nonfinite!r}")
    lossless = {} if lossless is None else lossless
    jobs = []
    bad: dict[str, int] = {}
    source = archive.find_inputs(src, follow_symlinks=follow_symlinks)
    source.metadata()  # InputError (an index that disagrees with its shards, ...) before any coding, as the stream encoder
    for _f, name, dtype, shape, raw in archive.iter_checkpoint(source):
        if names is not None and name not in names:
            continue
        if not is_lossy_candidate(name, dtype, shape, lossy_embeddings):
            continue
        t = torch.frombuffer(bytearray(raw.tobytes()), dtype=torch_dtype(dtype))
        W = t.reshape(shape).to(torch.float32)
        n_bad = E.count_nonfinite(t)
        if n_bad:
            bad[name] = n_bad
            lossless[name] = f"{n_bad} NaN/Inf values"
            continue
        why = E.lossless_reason(W)
        if why:
            lossless[name] = why
            continue
        tw = (type_weights or {}).get(layer_type(name), 1.0)
        jobs.append(E.TensorJob(name, W, dtype, None, tw))
    if bad and nonfinite == "error":
        E.check_finite(bad)
    if sigma:
        attach_sigma(jobs, sigma)
    return jobs


def attach_sigma(jobs: list[E.TensorJob], sigma: dict) -> None:
    for j in jobs:
        S = sigma.get(j.name)
        if S is not None and S.shape != (j.W.shape[1], j.W.shape[1]):
            raise ValueError(f"Σ for {j.name} has shape {tuple(S.shape)}, the weight reads {j.W.shape[1]} inputs")
        j.sigma = S
        j.energy = None  # measured again with this Σ


def encode_model(model: str | os.PathLike, *, bpw: float | None = None, distortion: float | None = None,
                 candidates=E.DEFAULT_CANDIDATES, lossy_embeddings: bool = False, sigma="auto",
                 alpha: float = 0.25, seed: int = 0, type_weights: dict | None = None, tol: float = 0.009,
                 names: list[str] | None = None, progress: bool = True,
                 step0: float | None = None, nonfinite: str = "error",
                 follow_symlinks: bool = False, trellis: int = 0) -> tuple[E.EncodeResult, list[E.TensorJob], dict]:
    """Run the encoder over a model's lossy tensors. Returns (result, jobs, info).

    Checked before any work: the target (TargetError), every lossy tensor's values
    (NonFiniteError, see :func:`build_jobs`). Tensors lossy coding cannot serve go lossless:
    all-zero or out-of-range tensors, every tensor when ``bpw`` ≥ ``LOSSY_MAX_BPW``, and any
    tensor whose code at the chosen step would clamp symbols or underflow the step
    (:func:`encoder.unfit_reason`); ``info["lossless"]`` lists them with the reason. The
    result's ``codes`` hold only the tensors written lossy (possibly none). ``trellis``: 0 codes
    mode 2 ``ecsq``, else mode 4 ``tcq`` with that state machine (:func:`encoder.trellis_id`)."""
    E.check_target(bpw, distortion)
    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    t0 = time.perf_counter()
    c0 = time.process_time()
    src = resolve_input(model)
    lossless_why: dict[str, str] = {}
    jobs = build_jobs(src, None, lossy_embeddings=lossy_embeddings, type_weights=type_weights, names=names,
                      nonfinite=nonfinite, follow_symlinks=follow_symlinks, lossless=lossless_why)
    if not jobs and not lossless_why:
        raise ValueError(f"{model}: no tensor qualifies for lossy coding")
    if trellis:
        lossy.trellis_machine(trellis)  # an unknown id is an error before any work
    for j in jobs:
        j.trellis = trellis
    if bpw is not None and bpw >= E.LOSSY_MAX_BPW:
        for j in jobs:
            lossless_why[j.name] = f"target {bpw:g} bpw is beyond what lossy coding delivers (< {E.LOSSY_MAX_BPW:g} bpw)"
        jobs = []
    t_cal = 0.0
    sig_src = "not needed"
    if jobs:
        sig, sig_src = get_sigma(str(model), sigma)
        attach_sigma(jobs, sig)
        t_cal = time.perf_counter() - t0
    cache: dict = {}
    from tqdm import tqdm

    for j in tqdm(jobs, desc="prepare", disable=not progress, leave=False):
        E.build_candidates(j, candidates, alpha=alpha, seed=seed, cache=cache)
    cache.clear()
    t_prep = time.perf_counter() - t0 - t_cal
    res = E.EncodeResult({}, math.nan, 0.0, 0, [], 0.0)
    for _ in range(3):  # tensors the chosen step cannot serve go lossless; the others are searched again
        if not jobs:
            break
        res = E.encode_jobs(jobs, bpw=bpw, distortion=distortion, tol=tol, progress=log, step0=step0)
        unfit = {j.name: E.unfit_reason(res.codes[j.name], j) for j in jobs}
        unfit = {n: w for n, w in unfit.items() if w}
        if not unfit:
            break
        lossless_why.update(unfit)
        jobs = [j for j in jobs if j.name not in unfit]
        res = E.EncodeResult({n: c for n, c in res.codes.items() if n not in unfit}, res.step, 0.0,
                             sum(j.numel for j in jobs), res.history, res.seconds)
        res.bpw = E.total_rate(res.codes, res.n_weights) if jobs else 0.0
    if lossless_why:
        log(f"note: {len(lossless_why)} tensor(s) coded lossless instead of lossy: "
            + "; ".join(f"{n}: {w}" for n, w in list(lossless_why.items())[:3]) + (" ..." if len(lossless_why) > 3 else ""))
    info = {"sigma": sig_src, "seconds_calibration": t_cal, "seconds_prepare": t_prep,
            "seconds_search": res.seconds, "seconds_total": time.perf_counter() - t0,
            "cpu_seconds_total": time.process_time() - c0,
            "candidates": list(candidates), "alpha": alpha, "lossless": lossless_why,
            "quantizer": "ecsq" if not trellis else f"tcq{lossy.TRELLIS_MACHINES[trellis][0]}"}
    return res, jobs, info


def lossy_metadata(res: E.EncodeResult, jobs: list[E.TensorJob], info: dict, target: dict) -> dict[str, str]:
    per = {}
    for j in jobs:
        c = res.codes[j.name]
        per[j.name] = {"kind": c.kind, "bpw": round(8 * c.bytes_all_in / j.numel, 5), "act_rel_err": float(f"{c.rel_err:.6g}"),
                       "sqnr_db": round(c.sqnr_db, 3), "type": layer_type(j.name)}
    summ = {"target": target, "step": res.step if math.isfinite(res.step) else None, "bpw_lossy_all_in": res.bpw,
            "n_lossy_weights": res.n_weights, "modes": res.summary()["modes"], **info}
    return {"acz.lossy": json.dumps(per, sort_keys=True), "acz.lossy.summary": json.dumps(summ, sort_keys=True)}


def verify_lossy(path: str | os.PathLike, expected: dict[str, float], original, *, rtol: float = 1e-3) -> dict[str, float]:
    """Decode every tensor of ``expected`` from the archive at ``path`` and check its error.

    ``expected``: name -> the weight-domain error ‖W − Ŵ‖² the encoder measured;
    ``original(name)``: the original weight (torch float32 or anything ``torch.as_tensor`` takes).
    Raises EncodeVerifyError if a tensor is missing, not lossy-coded, decodes to non-finite
    values, or its error differs from the measured one by more than ``rtol`` (relative), so
    an archive that does not decode to what was measured never gets its final name.
    Returns name -> decoded error. One tensor decoded at a time."""
    out = {}
    from aligncodec.codec.modes import decode_entry
    from aligncodec.codec.torch_interop import bytes_to_tensor
    from aligncodec.formats.reader import ArchiveReader

    with ArchiveReader(path) as r:
        by_name = {e.name: e for e in r.tensors}
        for name, want in expected.items():
            e = by_name.get(name)
            if e is None or e.mode not in (MODE_ECSQ, MODE_TCQ):
                raise E.EncodeVerifyError(f"tensor {name!r} is not in the archive as a lossy tensor")
            W = torch.as_tensor(original(name)).to(torch.float32)
            What = bytes_to_tensor(e, decode_entry(e, r.read_streams(e))).to(torch.float32)
            if What.shape != W.shape or not bool(torch.isfinite(What).all()):
                raise E.EncodeVerifyError(f"tensor {name!r} decodes to a wrong shape or to non-finite values")
            got = float(((What - W).double() ** 2).sum())
            if not (math.isfinite(got) and abs(got - want) <= rtol * max(want, 0.0) + 1e-30):
                raise E.EncodeVerifyError(f"tensor {name!r} decodes with error {got:.6g}, the encoder measured {want:.6g}")
            out[name] = got
    return out


def write_archive(model: str | os.PathLike, out: str | os.PathLike, res: E.EncodeResult, metadata: dict[str, str],
                  progress: bool = True, *, jobs: list[E.TensorJob] | None = None,
                  follow_symlinks: bool = False, replace: dict[str, torch.Tensor] | None = None) -> list[TensorEntry]:
    """Write the archive: ``res.codes`` lossy, everything else lossless. With ``jobs`` (the
    originals), the written archive is checked by :func:`verify_lossy` before it gets its name.
    ``replace``: name -> tensor (checkpoint dtype and shape) stored losslessly instead of the
    checkpoint's values (the tuned norms of ``--tune-norms``)."""
    from aligncodec.codec.torch_interop import tensor_bytes

    codes = res.codes
    replace = replace or {}

    def enc(name, dtype, shape, raw):
        c = codes.get(name)
        if c is None:
            t = replace.get(name)
            if t is not None:
                if t.dtype != torch_dtype(dtype) or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"replacement for {name!r} is {t.dtype} {tuple(t.shape)}, the checkpoint holds {dtype} {shape}")
                raw = tensor_bytes(t)
            return lossless.encode(raw, dtype, int(np.prod(shape, dtype=np.int64)))
        return c.params.mode, c.params.pack(), c.streams

    check = None
    if jobs is not None:
        W_of = {j.name: j.W for j in jobs}

        def check(path):
            verify_lossy(path, {n: c.noise for n, c in codes.items()}, W_of.__getitem__)

    return archive.compress(resolve_input(model), out, encode_tensor=enc, metadata=metadata, progress=progress,
                            follow_symlinks=follow_symlinks, check=check)


def checkpoint_dtypes(model: str | os.PathLike, follow_symlinks: bool = False) -> dict[str, torch.dtype]:
    """name -> torch dtype of every tensor of the checkpoint (headers only)."""
    from safetensors import safe_open

    out = {}
    for f in archive.find_inputs(resolve_input(model), follow_symlinks=follow_symlinks).files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                out[name] = torch_dtype(st.get_slice(name).get_dtype())
    return out


def tune_lossless_norms(model: str | os.PathLike, res: E.EncodeResult, opts, *, progress: bool = True,
                        follow_symlinks: bool = False, tokenizer=None) -> tuple[dict[str, torch.Tensor], dict]:
    """``--tune-norms``: the model's free 1-D parameters fitted with the lossy tensors frozen at
    their decoded values (aligncodec/tune_norms.py)."""
    from aligncodec import tune_norms as TN

    log = (lambda m: print(m, file=sys.stderr)) if progress else None
    decoded = {n: torch.from_numpy(c.W_hat) for n, c in res.codes.items()}
    return TN.tune_norms(resolve_input(model), decoded, checkpoint_dtypes(model, follow_symlinks), opts,
                         tokenizer=tokenizer, progress=log)


def compress_lossy(model: str | os.PathLike, out: str | os.PathLike, *, bpw: float | None = None,
                   distortion: float | None = None, progress: bool = True, follow_symlinks: bool = False,
                   tune_norms=None, tokenizer=None, **kw) -> dict:
    """Encode and write; returns a summary dict (also stored in the archive metadata).
    The archive is decoded and checked (:func:`verify_lossy`) before it gets the name ``out``.
    ``tune_norms``: a :class:`aligncodec.tune_norms.TuneOptions` to fit the norms (and biases)
    to the unmodified model after coding (``tokenizer``: for a folder without one)."""
    res, jobs, info = encode_model(model, bpw=bpw, distortion=distortion, progress=progress,
                                   follow_symlinks=follow_symlinks, **kw)
    tuned: dict[str, torch.Tensor] = {}
    if tune_norms is not None and res.codes:
        tuned, tinfo = tune_lossless_norms(model, res, tune_norms, progress=progress, follow_symlinks=follow_symlinks,
                                           tokenizer=tokenizer)
        info["tune_norms"] = tinfo
    target = {"bpw": bpw} if bpw is not None else {"distortion": distortion}
    meta = lossy_metadata(res, jobs, info, target)
    entries = write_archive(model, out, res, meta, progress, jobs=jobs, follow_symlinks=follow_symlinks, replace=tuned)
    lossy_names = {j.name for j in jobs}
    lossy_bytes = sum(lossy.entry_bytes(e.name, len(e.shape), len(e.params), e.size) for e in entries if e.name in lossy_names)
    return {**json.loads(meta["acz.lossy.summary"]),
            "bpw_lossy_in_archive": 8 * lossy_bytes / res.n_weights if res.n_weights else None,
            "file_bytes": os.path.getsize(out)}
