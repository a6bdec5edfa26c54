"""Calibration statistics: each linear layer's input second moment Σ = E[x xᵀ].

Capture: the first ``n_tokens`` tokens of the *calibration* half of the text, cut into
the evaluation protocol's windows (BOS + up to 1023 tokens, disjoint), run through the
float32 model; a forward pre-hook on every ``nn.Linear`` accumulates Xᵀ X in float64
over **every position the layer sees, BOS included** (the BOS position is part of the
protocol's input distribution: its keys and values are attended to by every token).
Σ = (Σ_positions x xᵀ) / n_positions, with n_positions = n_tokens + number of windows.

File layout (specified in spec/SIGMA.md; one safetensors file per model and token count)::

    $ALIGNCODEC_HOME/sigma/<model tag>-<weights sha256[:16]>/sigma-calib-n<N>-w<W>.safetensors

    tensors   key = the linear layer's weight name, e.g. "model.layers.0.self_attn.q_proj.weight"
              value = Σ, float64, [in_features, in_features], symmetric
              Linears that read the very same input tensor (q/k/v of a layer, gate/up) are
              stored once, under the first one's name; the others are listed in "aliases".
    metadata  (all strings; safetensors metadata is str -> str)
              format           "aligncodec-sigma/1"
              model            model name or path
              weights_sha256   sha256 of the model's weights file (the key of the cache)
              manifest_sha256  sha256 of the cache manifest.json ("" for a plain path)
              n_tokens         calibration text tokens (BOS excluded)
              n_positions      positions accumulated (BOS included) = the divisor of Σ
              n_windows, window
              include_bos      "1"
              split            "calib"
              text_sha256      sha256 of the calibration text
              aliases          JSON object {alias weight name: stored weight name}
              linears          JSON list of every linear weight name, in module order
              dtype            "float64"

``load_sigma(model)`` returns ``{weight name: Σ}`` for every linear (aliases resolved to
the same tensor), computing and caching the file if it is missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from aligncodec.formats.atomic import atomic_write
from aligncodec.tools.eval.text import DEFAULT_CALIB_TOKENS

SIGMA_FORMAT = "aligncodec-sigma/1"


class CalibrationError(Exception):
    """Σ cannot be captured or the cached file does not fit the model."""


def capture_sigma(model, tokenizer, n_tokens: int = DEFAULT_CALIB_TOKENS, split: str = "calib",
                  window: int = 1024, threads: int | None = 2, progress: bool = True,
                  text: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Σ for every ``nn.Linear`` of an in-memory model.

    Returns ``(sigma, info)``: ``sigma`` maps the weight name of each *stored* linear to
    its float64 Σ; ``info`` has ``aliases``, ``linears``, ``n_tokens``, ``n_positions``,
    ``n_windows``, ``text_sha256``.
    """
    from tqdm import tqdm

    from aligncodec.tools.eval.evaluate import make_windows

    if threads:
        torch.set_num_threads(threads)
    data = make_windows(tokenizer, n_tokens, split, window, text=text)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise CalibrationError("model has no nn.Linear layers")
    acc: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    last = {"x": None, "key": None}  # holds the previous input, so `is` cannot be fooled by reuse

    def hook_for(wname: str):
        def hook(_mod, args):
            x = args[0]
            if x is last["x"]:
                prev = aliases.get(last["key"], last["key"])
                if aliases.setdefault(wname, prev) != prev:
                    raise CalibrationError(f"{wname}: input sharing changed between windows")
                return
            if wname in aliases:
                raise CalibrationError(f"{wname}: input sharing changed between windows")
            last["x"], last["key"] = x, wname
            x2 = x.detach().reshape(-1, x.shape[-1]).double()
            if wname not in acc:
                acc[wname] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
            acc[wname].addmm_(x2.T, x2)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(f"{n}.weight")) for n, m in linears]
    model.eval()
    n_pos = 0
    try:
        with torch.no_grad(), tqdm(total=data.n_tokens, unit="tok", desc="calibrate",
                                   disable=not progress, dynamic_ncols=True) as bar:
            for w in data.windows:
                last["x"] = last["key"] = None
                model(input_ids=w[None], use_cache=False)
                n_pos += len(w)
                bar.update(len(w) - 1)
    finally:
        for h in handles:
            h.remove()
        last["x"] = None
    for k in acc:
        acc[k] /= n_pos
        acc[k] = (acc[k] + acc[k].T) / 2  # exact symmetry (addmm is symmetric up to rounding)
    names = [f"{n}.weight" for n, _ in linears]
    missing = [k for k in names if k not in acc and k not in aliases]
    if missing:
        raise CalibrationError(f"linears never called during the forward pass: {missing[:5]}")
    info = {"aliases": aliases, "linears": names, "n_tokens": data.n_tokens, "n_positions": n_pos,
            "n_windows": len(data.windows), "window": window, "text_sha256": data.text_sha256, "split": split}
    return acc, info


def expand(sigma: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """Add every alias as a key pointing to its stored tensor."""
    out = dict(sigma)
    for a, k in aliases.items():
        out[a] = sigma[k]
    return out


def save_sigma(path: str | Path, sigma: dict[str, torch.Tensor], info: dict, model: str = "",
               weights_sha256: str = "", manifest_sha256: str = "") -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": SIGMA_FORMAT,
        "model": model,
        "weights_sha256": weights_sha256,
        "manifest_sha256": manifest_sha256,
        "n_tokens": str(info["n_tokens"]),
        "n_positions": str(info["n_positions"]),
        "n_windows": str(info["n_windows"]),
        "window": str(info["window"]),
        "include_bos": "1",
        "split": info.get("split", "calib"),
        "text_sha256": info["text_sha256"],
        "aliases": json.dumps(info["aliases"], sort_keys=True),
        "linears": json.dumps(info["linears"]),
        "dtype": "float64",
    }
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in sigma.items()}, str(tmp), metadata=meta))
    return path


def read_sigma_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(Σ by weight name, aliases expanded; metadata)`` of a Σ file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != SIGMA_FORMAT:
            raise CalibrationError(f"{path}: not an {SIGMA_FORMAT} file (format={meta.get('format')!r})")
        sigma = {k: f.get_tensor(k) for k in f.keys()}
    return expand(sigma, json.loads(meta["aliases"])), meta


def sigma_path(name_or_path: str, n_tokens: int = DEFAULT_CALIB_TOKENS, window: int = 1024) -> Path:
    from aligncodec.tools.eval.models import cache_root, model_identity

    ident = model_identity(name_or_path)
    tag = Path(ident["name"]).name
    return (cache_root() / "sigma" / f"{tag}-{ident['weights_sha256'][:16]}" /
            f"sigma-calib-n{n_tokens}-w{window}.safetensors")


def calibrate(name_or_path: str = "smollm2", n_tokens: int = DEFAULT_CALIB_TOKENS, window: int = 1024,
              threads: int | None = 2, progress: bool = True, force: bool = False) -> Path:
    """Capture Σ for a named/path model and cache it (see module docstring); returns the file."""
    from aligncodec.tools.eval import models as M
    from aligncodec.tools.eval.text import text_sha256

    path = sigma_path(name_or_path, n_tokens, window)
    ident = M.model_identity(name_or_path)
    if path.is_file() and not force:
        _, meta = read_sigma_file(path)
        if meta.get("weights_sha256") == ident["weights_sha256"] and meta.get("text_sha256") == text_sha256("calib"):
            return path
    model, tok = M.load_causal_lm(name_or_path)
    t0 = time.time()
    sigma, info = capture_sigma(model, tok, n_tokens, "calib", window, threads, progress)
    info["seconds"] = time.time() - t0
    man = Path(ident["path"]) / M.MANIFEST
    man_sha = hashlib.sha256(man.read_bytes()).hexdigest() if man.is_file() else ""
    return save_sigma(path, sigma, info, ident["name"], ident["weights_sha256"], man_sha)


def load_sigma(name_or_path: str = "smollm2", n_tokens: int = DEFAULT_CALIB_TOKENS,
               window: int = 1024, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{linear weight name: Σ (float64)}`` for a model, computed and cached if missing."""
    sigma, _ = read_sigma_file(calibrate(name_or_path, n_tokens, window, progress=progress))
    return sigma
