"""SmoothQuant-style scale migration, weight-only (methods ``smoothquant-rtn``, ``smoothquant-gptq``
and their ``-ec`` variants; Xiao et al., 2023).

Per input channel j of a site (the linears that read one input):

    s_j = max|X_j|^α / max|W_j|^(1−α),   x' = x / s,   W' = W diag(s)

folded exactly into the preceding operation, so the model computes the same function
(nothing is sent: the changed RMSNorm gains and weights are the model):

* q/k/v: input_layernorm gain g → g / s;  gate/up: post_attention_layernorm gain g → g / s;
* o_proj: the rows of v_proj are divided per KV channel (attention is linear in V); with
  grouped-query attention several heads read one KV head, so their scales are tied: the
  scale of KV channel c is the geometric mean of s over the heads that read it;
* down_proj: the rows of up_proj are divided by s (down's input is act(gate) ⊙ up).

max|X_j| is **approximated by the calibration RMS √Σ_jj** (Σ = E[x xᵀ] from
``tools/eval/calibrate.load_sigma``; no extra capture pass). max|W_j| is over every weight of the site.
s is normalised to geometric mean 1 (only its shape matters for per-row grids).

α is searched per site over ``ALPHAS`` (0, 0.1, …, 1), plus s ≡ 1 (no smoothing): the candidate
with the lowest activation-weighted error tr(ΔW Σ ΔWᵀ)/tr(W Σ Wᵀ) of RTN on the method's grid
(B-bit fixed grid, no clip search; for ``-ec`` methods B = round(target bpw), a proxy) wins. For
o/down the error is that of o/down only: per-row grids are invariant to the row scaling this
puts on v/up, so the choice is exact for fixed-length grids (an approximation for ECSQ with one
shared step). Then the method's quantiser (RTN or GPTQ with Σ' = diag(1/s) Σ diag(1/s)) runs on W'.
"""

from __future__ import annotations

import math
import time

import torch

from aligncodec.codec.transforms import folding as F
from aligncodec.codec.quant.grids import FixedGrid, rtn

__all__ = ["ALPHAS", "smoothing_scales", "choose_scales", "smooth_model", "transform_model"]

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x^α / w^(1−α), floored away from 0, normalised to geometric mean 1 (float64)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    x = x_absmax.double().clamp_min(1e-8)
    w = w_absmax.double().clamp_min(1e-8)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = s.clamp(min=1e-5 * float(s.max()))
    return s / torch.exp(torch.log(s).mean())


def _rel_err(W: torch.Tensor, W_hat: torch.Tensor, S: torch.Tensor) -> float:
    # float32 products, float64 sums: the α ranking needs ~3 digits, not 15 (and fp64 GEMMs dominated)
    S32 = S.float()
    D = W_hat.float() - W.float()
    num = float(((D @ S32) * D).sum(dtype=torch.float64))
    den = float(((W.float() @ S32) * W.float()).sum(dtype=torch.float64))
    return num / den if den > 0 else math.inf


def choose_scales(W: torch.Tensor, S: torch.Tensor, grid, group_size: int, alphas=ALPHAS,
                  tie=None) -> tuple[torch.Tensor, float | None, float]:
    """The (s, α, error) with the lowest activation-weighted RTN error for the site weight W (stacked)
    with input second moment S. α = None means s ≡ 1. ``tie`` maps a scale vector to the one actually
    applicable (e.g. GQA tying for o_proj)."""
    W = W.double()
    xmax = torch.diagonal(S.double()).clamp_min(0).sqrt()
    S = S.float()  # the error products run in float32 (see _rel_err)
    wmax = W.abs().amax(0)
    best = None
    for a in (None, *alphas):
        s = torch.ones(W.shape[1], dtype=torch.float64) if a is None else smoothing_scales(xmax, wmax, a)
        if tie is not None and a is not None:
            s = tie(s)
        Ws = (W * s[None, :]).float()
        W_hat = rtn(Ws, grid, group_size).W_hat
        err = _rel_err(Ws, W_hat, F.scale_sigma(S, s))
        if best is None or err < best[2]:
            best = (s, a, err)
    return best


def smooth_model(model, sigma: dict[str, torch.Tensor], grid, group_size: int = 0, alphas=ALPHAS,
                 log=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Smooth every site of a Llama model in place (function-preserving); returns (Σ of the smoothed
    inputs by weight name, {site: chosen α}). Σ names that share an input keep sharing one tensor."""
    blocks = F.llama_blocks(model)
    chosen: dict[str, float | None] = {}
    scales: dict[str, torch.Tensor] = {}  # first weight name of a site -> s (on that site's input)
    for b in blocks:
        # q/k/v, input_layernorm
        n = b.name("q")
        Wqkv = torch.cat([b.q.weight, b.k.weight, b.v.weight]).detach()
        s, a, _ = choose_scales(Wqkv, sigma[n], grid, group_size, alphas)
        F.divide_norm(b.ln1, s)
        F.scale_inputs((b.q, b.k, b.v), s)
        chosen[n], scales[n] = a, s
        # o_proj, rows of v_proj (per KV channel, tied across the heads of a group)
        n = b.name("o")
        g = b.n_heads // b.n_kv

        def tie(s_full, b=b, g=g):
            t = torch.exp(torch.log(s_full).reshape(b.n_kv, g, b.head_dim).mean(1)).reshape(-1)
            return F.kv_expand(t, b)

        s, a, _ = choose_scales(b.o.weight.detach(), sigma[n], grid, group_size, alphas, tie=tie)
        t = s.reshape(b.n_kv, g, b.head_dim)[:, 0, :].reshape(-1)
        F.divide_rows(b.v, t)
        F.scale_inputs((b.o,), s)
        chosen[n], scales[n] = a, s
        # gate/up, post_attention_layernorm
        n = b.name("gate")
        s, a, _ = choose_scales(torch.cat([b.gate.weight, b.up.weight]).detach(), sigma[n], grid, group_size, alphas)
        F.divide_norm(b.ln2, s)
        F.scale_inputs((b.gate, b.up), s)
        chosen[n], scales[n] = a, s
        # down_proj, rows of up_proj
        n = b.name("down")
        s, a, _ = choose_scales(b.down.weight.detach(), sigma[n], grid, group_size, alphas)
        F.divide_rows(b.up, s)
        F.scale_inputs((b.down,), s)
        chosen[n], scales[n] = a, s
        if log:
            log(f"  smoothquant {b.prefix}: α = " + ", ".join(
                f"{k.split('.')[-2]} {'none' if chosen[k] is None else chosen[k]}"
                for k in (b.name('q'), b.name('o'), b.name('gate'), b.name('down'))))
    # Σ of the new inputs: a site's Σ object is shared by its names; look the scale up by any name
    site_of = {}
    for b in blocks:
        for p in ("q", "k", "v"):
            site_of[b.name(p)] = b.name("q")
        site_of[b.name("o")] = b.name("o")
        for p in ("gate", "up"):
            site_of[b.name(p)] = b.name("gate")
        site_of[b.name("down")] = b.name("down")

    def fn(name, S):
        key = site_of.get(name)
        return S if key is None else F.scale_sigma(S, scales[key])

    return F.map_sigma(sigma, fn), chosen


def transform_model(model, sigma, *, method, bits, log=None, **_) -> F.Prepared:
    """run_baseline hook: smooth the model in place, return the weights/Σ the quantiser sees."""
    from aligncodec.codec import baselines as B

    t0 = time.time()
    b = int(bits) if not method.entropy_coded else int(min(8, max(2, round(float(bits)))))
    grid = FixedGrid(b, sym=B.auto_sym(b), clip=False)
    new_sigma, chosen = smooth_model(model, sigma, grid, method.group_size, log=log)
    hist: dict[str, int] = {}
    for a in chosen.values():
        hist[str(a)] = hist.get(str(a), 0) + 1
    info = {"transform": "smoothquant", "x_absmax_proxy": "sqrt(diag Sigma) (calibration RMS)",
            "alpha_grid": list(ALPHAS) + ["none (s=1)"], "alpha_search": f"RTN {b}-bit, act-weighted error, per site",
            "alpha_counts": hist, "alphas": {k: v for k, v in chosen.items()}, "seconds": time.time() - t0,
            "side_bits": 0}
    return F.Prepared(new_sigma, side_bits=0, info=info)

