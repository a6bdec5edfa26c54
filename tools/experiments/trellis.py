"""Settings study of the tcq encoder (issue 14, lever 1) inside GPTQ: for each tensor, the bits
tcq needs at ECSQ's activation-weighted distortion, for several rate models (λ = c·Δ², extra
passes with the previous pass's class tables, the encoder's own). Both arms are the product's own code
(``encoder.code_candidate`` with ``job.trellis`` 0 or the machine id; the search is
:mod:`aligncodec.codec.quant.trellis`), so bytes are real (rANS streams, tables, header entry).

    python -m aligncodec.tools.experiments.trellis --model smollm2 \\
        --names 'layers\\.10\\.(self_attn\\.q_proj|mlp\\.down_proj)' --states 8 --lam 0.25,0.4 --passes 0,1

(The research prototype that chose the machines and λ = 0.4 with per-quantiser tables lived here
until commit 80d3611; its results: docs/results/2026-11-30-encoder-quality.md "Lever 1".)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

import numpy as np

from aligncodec import lossy_compress as LC
from aligncodec.codec import encoder as E
from aligncodec.codec.quant import trellis as T


def bpw_at_equal_d(pts: list[tuple[float, float]], d: float) -> float:
    """bpw at distortion ``d`` interpolated (log D) over (bpw, D) points."""
    tb = sorted(pts, key=lambda p: p[1])
    return float(np.interp(math.log(d), [math.log(p[1]) for p in tb], [p[0] for p in tb]))


def compare(model: str, names_re: str, kind: str, states: int, lams, passes, sigma="auto") -> dict:
    from aligncodec.archive import find_inputs, iter_checkpoint

    src = LC.resolve_input(model)
    names = [n for _f, n, dt, sh, _r in iter_checkpoint(find_inputs(src))
             if LC.is_lossy_candidate(n, dt, sh) and re.search(names_re, n)]
    jobs = LC.build_jobs(src, names=names)
    sig, _ = LC.get_sigma(model, sigma)
    LC.attach_sigma(jobs, sig)
    mid = E.trellis_id("tcq", states)
    out = {}
    for j in jobs:
        E.build_candidates(j, (kind,))
        cand = j.cands[0]
        rms = float(cand.C.double().pow(2).mean().sqrt())
        st3 = rms * math.sqrt(2 * math.pi * math.e) * 2.0**-3.0  # ~3 bpw for a Gaussian
        t0 = time.perf_counter()
        e = [(8 * tc.bytes_all_in / j.numel, tc.dist) for tc in (E.code_candidate(j, cand, st3 * f) for f in (0.9, 1.0, 1.12))]
        t_e = (time.perf_counter() - t0) / 3
        row = {"ecsq_bpw": e[1][0], "ecsq_seconds_per_code": t_e, "tcq": {}}
        for c in lams:
            for p in passes:
                # the product's settings (λ factor, rate passes with the class tables)
                j.trellis, j.tcq_lambda, j.tcq_passes = mid, c, p
                t0 = time.perf_counter()
                pts = [(8 * tc.bytes_all_in / j.numel, tc.dist)
                       for tc in (E.code_candidate(j, cand, st3 * f) for f in (0.55, 0.62, 0.7))]
                t_t = (time.perf_counter() - t0) / 3
                j.trellis, j.tcq_lambda, j.tcq_passes = 0, None, None
                b = bpw_at_equal_d(pts, e[1][1])
                row["tcq"][f"c{c:g}-passes{p}"] = {"bpw_at_ecsq_d": b, "saving_bpw": e[1][0] - b, "seconds_per_code": t_t,
                                                    "points": pts}
                print(f"{j.name} tcq{states} c={c:g} passes={p}: {b:.4f} bpw at ECSQ's D ({e[1][0]:.4f}), "
                      f"saves {e[1][0] - b:+.4f}; {t_t:.2f} s/code (ecsq {t_e:.2f})", file=sys.stderr)
        out[j.name] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--names", default=r"layers\.10\.", help="regex: the tensors")
    ap.add_argument("--candidate", default="hadamard", help="the transform candidate of both arms")
    ap.add_argument("--states", type=int, default=8)
    ap.add_argument("--lam", default=f"{T.LAMBDA_C:g}", help="λ = c·Δ²: comma list of c")
    ap.add_argument("--passes", default="0", help="comma list of extra passes with the previous pass's table")
    ap.add_argument("--no-calibration", action="store_true", help="Σ = I (weight MSE)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = compare(a.model, a.names, a.candidate, a.states, [float(x) for x in a.lam.split(",")],
                  [int(x) for x in a.passes.split(",")], "none" if a.no_calibration else "auto")
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
