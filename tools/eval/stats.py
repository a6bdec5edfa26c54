"""Per-tensor diagnostics of a model (``aligncodec stats``), docs/baselines.md.

For every 2-D weight tensor W (out × in) four representations are measured:

* ``as_is``     — W itself (coordinates: its entries; input basis: identity);
* ``rotated``   — W·H, H the seeded randomized Hadamard on the input dimension
                  (:mod:`aligncodec.codec.transforms.hadamard`; seed ``tensor_seed(seed, name)``);
* ``aligned``   — W·V, V the right singular vectors of W completed to an
                  orthonormal basis of the input space, i.e. the coefficients
                  U·S padded with zero columns when in > out;
* ``aligned_act`` — W̃·Ṽ with W̃ = W Σ^½ (Σ from calibration; linear layers
                  only), the activation-aware alignment (KLT of W̃).

Metrics per representation C (``aligncodec.codec.metrics``): kurtosis and
crest factor of the entries of C; effective rank (basis independent, so equal
for the first three); top-k energy ratio of the input-space coordinate energies
(column energies of C, k = 1 % and 10 % of the input dimension); empirical
entropy of round(C / Δ) with Δ = ``step`` · rms(C) — one common relative step
for every tensor and basis, so a basis change (orthogonal, rms-preserving)
is compared at the same step — and the SQNR that step gives (for
``aligned_act`` it is the activation-weighted SQNR).

The layer-type summary is the plain mean over the tensors of each type.
Types: q, k, v, o, gate, up, down, embedding (the input embedding, or a tied
``lm_head``), lm_head (untied), other.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from aligncodec.codec.transforms import hadamard as Hd
from aligncodec.codec import metrics as M
from aligncodec.codec.naming import LAYER_TYPES, layer_type

BASES = ("as_is", "rotated", "aligned", "aligned_act")
METRICS = ("kurtosis", "crest", "eff_rank", "top1", "top10", "entropy_bits", "sqnr_db")
DEFAULT_STEP = 0.5  # Δ = 0.5·rms: about 3 bits/weight for a Gaussian
BIG = 50_000_000  # tensors with more entries are measured in float32


def _sqrtm_psd(sigma: torch.Tensor) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(sigma.to(torch.float64))
    return (Q * lam.clamp_min(0).sqrt()) @ Q.T


def _right_basis(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients C·V padded to in columns, singular values) for C (out × in)."""
    m, n = C.shape
    if m > 8 * n and m > 4096:  # tall: eigenvectors of the small Gram matrix
        lam, V = torch.linalg.eigh((C.T @ C).to(torch.float64))
        V = V.flip(1).to(C.dtype)
        s = lam.flip(0).clamp_min(0).sqrt()
        return C @ V, s
    U, s, _ = torch.linalg.svd(C, full_matrices=False)
    coef = U * s
    if n > coef.shape[1]:
        coef = torch.cat([coef, coef.new_zeros(m, n - coef.shape[1])], 1)
    return coef, s.to(torch.float64)


def _measure(C: torch.Tensor, s: torch.Tensor, step: float, energies: torch.Tensor) -> dict:
    rms = float(C.double().pow(2).mean().sqrt())
    delta = step * rms
    Cq = torch.round(C / delta) * delta
    return {
        "kurtosis": M.kurtosis(C),
        "crest": M.crest_factor(C),
        "eff_rank": M.effective_rank(s=s),
        "top1": M.topk_energy_ratio(energies, 0.01),
        "top10": M.topk_energy_ratio(energies, 0.10),
        "entropy_bits": M.empirical_entropy(C, delta),
        "sqnr_db": M.sqnr_db(C, Cq),
    }


def tensor_stats(W: torch.Tensor, sigma: torch.Tensor | None = None, *, seed: int = 0,
                 step: float = DEFAULT_STEP) -> dict[str, dict]:
    """Metrics of one weight in each representation (``aligned_act`` only if Σ is given)."""
    if W.ndim != 2:
        raise ValueError(f"tensor_stats: expected a 2-D weight, got shape {tuple(W.shape)}")
    dt = torch.float32 if W.numel() > BIG else torch.float64
    W = W.to(dt)
    out = {}
    coef, s = _right_basis(W)
    out["as_is"] = _measure(W, s, step, M.coordinate_energies(W))
    Wr = Hd.fold_weight(W, Hd.RandomizedHadamard(W.shape[1], seed))
    out["rotated"] = _measure(Wr, s, step, M.coordinate_energies(Wr))
    del Wr
    out["aligned"] = _measure(coef, s, step, M.coordinate_energies(W, "singular", s=s))
    del coef
    if sigma is not None:
        if sigma.shape != (W.shape[1], W.shape[1]):
            raise ValueError(f"tensor_stats: Σ has shape {tuple(sigma.shape)}, expected {(W.shape[1],) * 2}")
        Wt = (W.to(torch.float64) @ _sqrtm_psd(sigma)).to(dt)
        coef_t, s_t = _right_basis(Wt)
        out["aligned_act"] = _measure(coef_t, s_t, step, M.coordinate_energies(Wt, "singular", s=s_t))
    return out


def summarize(per_tensor: list[dict]) -> dict:
    """{layer type: {basis: {metric: mean}}, 'n': count} over the tensors of each type."""
    summary: dict = {}
    for t in LAYER_TYPES:
        rows = [r for r in per_tensor if r["type"] == t]
        if not rows:
            continue
        entry = {"n": len(rows), "numel": sum(r["numel"] for r in rows)}
        for b in BASES:
            have = [r["stats"][b] for r in rows if b in r["stats"]]
            if have:
                entry[b] = {m: sum(h[m] for h in have) / len(have) for m in METRICS}
        summary[t] = entry
    return summary


def model_stats(model: str, *, use_sigma: bool = True, seed: int = 0, step: float = DEFAULT_STEP,
                progress: bool = True, only: str | None = None) -> dict:
    """Diagnostics for every 2-D weight of a cached/path model; a JSON-able dict."""
    from safetensors import safe_open
    from tqdm import tqdm

    from aligncodec.tools.eval import models as Mo

    path = Mo.resolve_model(model)
    wfile = Mo.weights_file(path)
    folder = path if path.is_dir() else path.parent
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    tied = bool(cfg.get("tie_word_embeddings", True))
    sigma = {}
    if use_sigma:
        from aligncodec.tools.eval.calibrate import load_sigma

        sigma = load_sigma(model, progress=progress)
    rows = []
    with safe_open(str(wfile), "pt") as f:
        names = [k for k in f.keys() if len(f.get_slice(k).get_shape()) == 2]
        if only:
            names = [k for k in names if re.search(only, k)]
        for name in tqdm(names, desc="stats", unit="tensor", disable=not progress, dynamic_ncols=True):
            W = f.get_tensor(name)
            st = tensor_stats(W, sigma.get(name), seed=Hd.tensor_seed(seed, name), step=step)
            rows.append({"name": name, "type": layer_type(name, tied), "shape": list(W.shape),
                         "numel": W.numel(), "stats": st})
    return {
        "model": str(model),
        "weights": str(wfile),
        "step_rel": step,
        "seed": seed,
        "sigma": bool(sigma),
        "definitions": __doc__,
        "summary": summarize(rows),
        "tensors": rows,
    }


_HEAD = {"kurtosis": "kurt", "crest": "crest", "eff_rank": "eff.rank", "top1": "top1%", "top10": "top10%",
         "entropy_bits": "H(bits)", "sqnr_db": "SQNR dB"}


def _fmt(m: str, v: float) -> str:
    if m in ("top1", "top10"):
        return f"{100 * v:.1f}%"
    if m == "eff_rank":
        return f"{v:.0f}"
    if m == "kurtosis" and v >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}"


def format_table(res: dict, markdown: bool = False) -> str:
    """Layer-type summary as a text (or markdown) table: one row per type and basis."""
    cols = ["type", "n", "basis"] + [_HEAD[m] for m in METRICS]
    lines = []
    for t, e in res["summary"].items():
        for b in BASES:
            if b in e:
                lines.append([t, str(e["n"]), b] + [_fmt(m, e[b][m]) for m in METRICS])
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(r) + " |" for r in lines]
        return "\n".join(out)
    w = [max(len(c), *(len(r[i]) for r in lines)) if lines else len(c) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(cols))]
    out += ["  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(r)) for r in lines]
    return "\n".join(out)


def plot(res: dict, out: str | Path) -> Path:
    """Grouped bars per metric by layer type and basis; PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res["summary"]
    types = list(summ)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    shown = ("kurtosis", "crest", "eff_rank", "top1", "top10", "entropy_bits")
    width = 0.8 / len(BASES)
    for ax, m in zip(axes.flat, shown):
        for j, b in enumerate(BASES):
            xs = [i + (j - (len(BASES) - 1) / 2) * width for i in range(len(types))]
            ys = [summ[t][b][m] if b in summ[t] else math.nan for t in types]
            ax.bar(xs, ys, width, label=b)
        ax.set_xticks(range(len(types)), types, rotation=30)
        ax.set_title(_HEAD[m] + (" (log)" if m in ("kurtosis", "crest") else ""))
        if m in ("kurtosis", "crest"):
            ax.set_yscale("log")
        if m == "kurtosis":
            ax.axhline(3.0, color="k", lw=0.8, ls="--")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{res['model']}: per-layer-type means (entropy at Δ = {res['step_rel']}·rms)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
