"""Per-tensor diagnostics: the numbers the thesis talks about (docs/baselines.md).

Pure functions on torch tensors (numpy arrays are accepted and converted);
every statistic is computed in float64 unless stated. No file I/O.

Definitions (precise, so numbers from different tools agree):

* ``kurtosis(x)``: Pearson kurtosis E[(x-μ)^4] / Var(x)^2 over all entries;
  a Gaussian has 3, a Laplacian 6.
* ``crest_factor(x)``: max|x| / std(x) (population std, mean subtracted).
* ``effective_rank(W)``: exp of the Shannon entropy (nats) of the normalised
  singular values p_i = s_i / Σ s_j (Roy & Vetterli 2007). A rank-r matrix with
  r equal singular values has exactly r.
* ``topk_energy_ratio(energies, frac)``: the fraction of total energy held by
  the k = ceil(frac · len(energies)) largest coordinate energies.
  For a matrix W (out × in) expressed in an orthonormal basis B of its *input*
  space the coordinates are the basis directions b_j and their energies are
  ||W b_j||²: column energies for the identity basis, column energies of W·H
  after a rotation H, and s_j² (padded with zeros up to ``in``) in the aligned
  basis of right singular vectors. ``coordinate_energies`` builds these.
  The energies always sum to ||W||_F², so the ratio is comparable across bases.
* ``empirical_entropy(x, step)``: order-0 entropy, in bits per symbol, of the
  integer symbols round(x / step) (uniform mid-tread quantiser, no clipping).
* ``sqnr_db(W, W_hat)``: 10·log10(||W||² / ||W - W_hat||²).
* ``act_weighted_rel_error(W, W_hat, sigma)``: tr(ΔW Σ ΔWᵀ) / tr(W Σ Wᵀ),
  the relative expected output error of y = W x when Σ = E[x xᵀ].
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "as_tensor",
    "kurtosis",
    "crest_factor",
    "singular_values",
    "effective_rank",
    "coordinate_energies",
    "topk_energy_ratio",
    "empirical_entropy",
    "sqnr_db",
    "act_weighted_rel_error",
]


def as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    """Return ``x`` as a torch tensor of ``dtype`` (numpy arrays are converted)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch tensor or numpy array, got {type(x).__name__}")
    return x.to(dtype)


def _nonempty(x: torch.Tensor, what: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{what}: empty tensor")


def kurtosis(x) -> float:
    """Pearson kurtosis of all entries (Gaussian ≈ 3). Constant input raises ValueError."""
    x = as_tensor(x).flatten()
    _nonempty(x, "kurtosis")
    c = x - x.mean()
    var = (c * c).mean()
    if var <= 0:
        raise ValueError("kurtosis: input has zero variance")
    return float((c**4).mean() / var**2)


def crest_factor(x) -> float:
    """max|x| / std(x), std with the mean removed (population). Constant input raises ValueError."""
    x = as_tensor(x).flatten()
    _nonempty(x, "crest_factor")
    std = x.std(unbiased=False)
    if std <= 0:
        raise ValueError("crest_factor: input has zero variance")
    return float(x.abs().max() / std)


def singular_values(W) -> torch.Tensor:
    """Singular values of a 2-D matrix, float64, descending.

    Tall or wide matrices with one side much larger than the other (an embedding
    of 262144 × 640) go through the small Gram matrix, which is exact enough for
    diagnostics and far cheaper than a full SVD.
    """
    W = as_tensor(W)
    if W.ndim != 2:
        raise ValueError(f"singular_values: expected a 2-D matrix, got shape {tuple(W.shape)}")
    _nonempty(W, "singular_values")
    m, n = W.shape
    if max(m, n) > 8 * min(m, n) and max(m, n) > 4096:
        G = W.T @ W if m > n else W @ W.T
        ev = torch.linalg.eigvalsh(G).clamp_min(0.0)
        return ev.sqrt().flip(0)
    return torch.linalg.svdvals(W)


def effective_rank(W=None, *, s=None) -> float:
    """exp(entropy of s / sum(s)); pass a matrix ``W`` or its singular values ``s``."""
    if s is None:
        s = singular_values(W)
    s = as_tensor(s).flatten()
    total = s.sum()
    if total <= 0:
        raise ValueError("effective_rank: matrix is zero")
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def coordinate_energies(W, basis: str = "identity", *, s=None) -> torch.Tensor:
    """Energy of each input-space coordinate of ``W`` (out × in), see the module doc.

    ``basis='identity'``: squared column norms of ``W`` (pass ``W @ H`` for a
    rotated basis). ``basis='singular'``: s_j² for the right singular vectors,
    zero-padded to ``in`` coordinates (``s`` may be given to avoid a second SVD).
    """
    W = as_tensor(W)
    if W.ndim != 2:
        raise ValueError(f"coordinate_energies: expected a 2-D matrix, got shape {tuple(W.shape)}")
    if basis == "identity":
        return (W * W).sum(0)
    if basis == "singular":
        if s is None:
            s = singular_values(W)
        e = torch.zeros(W.shape[1], dtype=torch.float64)
        s = as_tensor(s)
        e[: s.numel()] = s[: W.shape[1]] ** 2
        return e
    raise ValueError(f"coordinate_energies: unknown basis {basis!r} (identity or singular)")


def topk_energy_ratio(energies, frac: float) -> float:
    """Fraction of total energy in the ceil(frac·N) largest of the N coordinate energies."""
    e = as_tensor(energies).flatten()
    _nonempty(e, "topk_energy_ratio")
    if not 0 < frac <= 1:
        raise ValueError(f"topk_energy_ratio: frac must be in (0, 1], got {frac}")
    if (e < 0).any():
        raise ValueError("topk_energy_ratio: energies must be non-negative")
    total = e.sum()
    if total <= 0:
        raise ValueError("topk_energy_ratio: total energy is zero")
    k = max(1, math.ceil(frac * e.numel()))
    return float(torch.topk(e, k).values.sum() / total)


def empirical_entropy(x, step: float) -> float:
    """Order-0 entropy (bits/symbol) of round(x / step)."""
    if not step > 0:
        raise ValueError(f"empirical_entropy: step must be positive, got {step}")
    x = as_tensor(x).flatten()
    _nonempty(x, "empirical_entropy")
    q = torch.round(x / step).to(torch.int64)
    _, counts = torch.unique(q, return_counts=True)
    p = counts.to(torch.float64) / q.numel()
    return float(-(p * torch.log2(p)).sum())


def sqnr_db(W, W_hat) -> float:
    """Signal-to-quantisation-noise ratio in dB; +inf when W_hat == W."""
    W, W_hat = as_tensor(W), as_tensor(W_hat)
    if W.shape != W_hat.shape:
        raise ValueError(f"sqnr_db: shapes differ {tuple(W.shape)} vs {tuple(W_hat.shape)}")
    noise = ((W - W_hat) ** 2).sum()
    sig = (W * W).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(sig / noise))


def act_weighted_rel_error(W, W_hat, sigma) -> float:
    """tr(ΔW Σ ΔWᵀ) / tr(W Σ Wᵀ) with ΔW = W_hat - W and Σ (in × in) the input second moment."""
    W, W_hat, sigma = as_tensor(W), as_tensor(W_hat), as_tensor(sigma)
    if W.shape != W_hat.shape or W.ndim != 2:
        raise ValueError(f"act_weighted_rel_error: bad shapes {tuple(W.shape)} vs {tuple(W_hat.shape)}")
    if sigma.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"act_weighted_rel_error: Σ has shape {tuple(sigma.shape)}, expected {(W.shape[1],) * 2}")
    D = W_hat - W
    num = ((D @ sigma) * D).sum()
    den = ((W @ sigma) * W).sum()
    if den <= 0:
        raise ValueError("act_weighted_rel_error: tr(W Σ Wᵀ) is not positive")
    return float(num / den)
