"""Research measurement (issue 14, lever 2): a low-rank correction of the activation-weighted
quantisation error, coded after the quantiser (LQER / QERA order), as an RD candidate.

    python -m aligncodec.tools.experiments.lowrank [--model smollm2] [--layers 0,10,20,29]
           [--bpw 2.0,2.5,3.0,3.5] [--ranks 1,2,4,8,16,32] [--factor-bits 8,16]

For each lossy tensor of the chosen layers, coded by today's encoder (GPTQ + ECSQ, the
default candidates, the calibration Σ, one global step meeting ``--bpw`` over these tensors):

    E = W − Ŵ,  Σ = L Lᵀ (Cholesky),  E L = U S Vᵀ,  A Bᵀ = (U_r S_r)(V_rᵀ L⁻¹)

the rank-r correction that minimises tr((E − A Bᵀ) Σ (E − A Bᵀ)ᵀ). The factors are quantised
(``b`` = 8: symmetric, one float16 scale per factor column; ``b`` = 16: float16) and the
distortion D_r is measured with the quantised factors. Cost: b·r·(out + in) bits + scales.
Mode decision as the encoder's (``encoder.choose``): λ = 2 ln 2 · D / N per bit (the slope
of the tensor's own D(R), i.e. what the same bits buy as a finer step); the correction wins
when ΔJ = (D_r − D) + λ·bits < 0. Reported per layer type, rate and rank: how many tensors
win and the mean relative ΔJ (ΔJ / D). Factors are counted at their raw width: entropy
coding them would save at most ~25 % of their bits at b = 8, which the table also shows as
the break-even ("needs ≤ x bits per factor entry").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from aligncodec import lossy_compress as LC
from aligncodec.codec import encoder as E
from aligncodec.codec.naming import layer_type


def quant_factor(X: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Symmetric per-vector quantisation along ``axis`` (one float16 scale per vector), or float16."""
    if bits >= 16:
        return X.to(torch.float16).to(torch.float64)
    qmax = 2 ** (bits - 1) - 1
    amax = X.abs().amax(dim=axis, keepdim=True).clamp_min(1e-30)
    s = (amax / qmax).to(torch.float16).to(torch.float64).clamp_min(1e-30)
    return torch.round(X / s).clamp(-qmax, qmax) * s


def analyse(W: torch.Tensor, W_hat: torch.Tensor, S: torch.Tensor, ranks, factor_bits) -> dict:
    W64, E64 = W.double(), (W.double() - W_hat.double())
    n = S.shape[0]
    S64 = S.double() + 1e-8 * float(torch.diag(S).mean()) * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(S64)
    M = E64 @ L
    D = float((M * M).sum())
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    Linv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=torch.float64), upper=False)  # L⁻¹
    out = {"D": D, "N": W.numel(), "shape": list(W.shape),
           "top_sv2_share": [float(x) for x in (s[:32] ** 2 / D)],
           "flat_share": 1.0 / min(W.shape)}
    lam = 2 * math.log(2) * D / W.numel()
    rows = []
    for r in ranks:
        if r > min(W.shape):
            continue
        A = U[:, :r] * s[:r]
        Bt = Vh[:r] @ Linv
        for b in factor_bits:
            Aq = quant_factor(A, b, 0)
            Btq = quant_factor(Bt, b, 1)
            R = E64 - Aq @ Btq
            Dr = float(((R @ L) ** 2).sum())
            nbits = b * r * sum(W.shape) + (16 * 2 * r if b < 16 else 0)
            dJ = (Dr - D) + lam * nbits
            # bits per factor entry at which the correction would break even (ΔJ = 0)
            be = (D - Dr) / lam / (r * sum(W.shape))
            rows.append({"rank": r, "factor_bits": b, "D_r": Dr, "gain_rel": (D - Dr) / D, "bits": nbits,
                         "bpw_cost": nbits / W.numel(), "dJ_rel": dJ / D, "wins": dJ < 0, "breakeven_bits": be})
    out["rows"] = rows
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--bpw", default="2.0,2.5,3.0,3.5")
    ap.add_argument("--ranks", default="1,2,4,8,16,32")
    ap.add_argument("--factor-bits", default="8,16")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    layers = {int(x) for x in a.layers.split(",")}
    src = LC.resolve_input(a.model)
    names = None
    from aligncodec.archive import find_inputs, iter_checkpoint

    names = [n for _f, n, dt, sh, _r in iter_checkpoint(find_inputs(src))
             if LC.is_lossy_candidate(n, dt, sh) and any(f".layers.{i}." in n for i in layers)]
    jobs = LC.build_jobs(src, names=names)
    sig, _ = LC.get_sigma(a.model, "auto")
    LC.attach_sigma(jobs, sig)
    cache: dict = {}
    for j in jobs:
        E.build_candidates(j, E.DEFAULT_CANDIDATES, alpha=0.25, cache=cache)
    ranks = [int(x) for x in a.ranks.split(",")]
    fbits = [int(x) for x in a.factor_bits.split(",")]
    out = {"model": a.model, "layers": sorted(layers), "tensors": len(jobs), "by_rate": {}}
    for bpw in (float(x) for x in a.bpw.split(",")):
        res = E.encode_jobs(jobs, bpw=bpw)
        per = {}
        for j in jobs:
            c = res.codes[j.name]
            per[j.name] = analyse(j.W, torch.from_numpy(c.W_hat), j.sigma, ranks, fbits)
            per[j.name]["kind"] = c.kind
        # summary by layer type, rank, factor bits
        summ: dict = {}
        for nm, d in per.items():
            t = layer_type(nm)
            for row in d["rows"]:
                k = f"{t} r{row['rank']} b{row['factor_bits']}"
                s = summ.setdefault(k, {"n": 0, "wins": 0, "dJ_rel": [], "gain_rel": [], "bpw_cost": [], "breakeven_bits": []})
                s["n"] += 1
                s["wins"] += int(row["wins"])
                for f in ("dJ_rel", "gain_rel", "bpw_cost", "breakeven_bits"):
                    s[f].append(row[f])
        for s in summ.values():
            for f in ("dJ_rel", "gain_rel", "bpw_cost", "breakeven_bits"):
                s[f] = float(np.mean(s[f]))
        out["by_rate"][f"{bpw:g}"] = {"bpw": res.bpw, "step": res.step, "summary": summ,
                                      "top1_share_mean": float(np.mean([d["top_sv2_share"][0] for d in per.values()])),
                                      "flat_share_mean": float(np.mean([d["flat_share"] for d in per.values()])),
                                      "per_tensor": per}
        n_win = sum(s["wins"] for s in summ.values())
        print(f"{bpw:g} bpw (got {res.bpw:.4f}): {n_win} winning (tensor, rank, bits) of "
              f"{sum(s['n'] for s in summ.values())}; top-1 singular share of D {out['by_rate'][f'{bpw:g}']['top1_share_mean']:.4f} "
              f"(flat {out['by_rate'][f'{bpw:g}']['flat_share_mean']:.4f}); {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for k, s in sorted(summ.items()):
            print(f"   {k:28s} wins {s['wins']}/{s['n']}  gain {100 * s['gain_rel']:6.2f} %  cost {s['bpw_cost']:.4f} bpw  "
                  f"ΔJ/D {100 * s['dJ_rel']:+7.2f} %  break-even {s['breakeven_bits']:.2f} bits/entry", file=sys.stderr)
    out["seconds"] = time.perf_counter() - t0
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
