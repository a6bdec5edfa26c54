"""Quantise every linear layer of a model with a baseline method (``aligncodec baseline``).

What is quantised: every ``nn.Linear`` weight of the model except the output
head when it is tied to the input embedding (SmolLM2 and Gemma-3 tie them);
embeddings, norms and biases stay in float32, untouched, and are *not* counted
in the bits per weight, which is over the quantised linear weights only
(``bpw = all-in bits / linear weights``, see ``aligncodec.codec.baselines``).

Linears that read the same input (q/k/v of a layer, gate/up) form one *site*:
they share Σ (from ``aligncodec.tools.eval.calibrate.load_sigma``) and one rotation
seed (``tensor_seed(seed, first name of the site)``); bits are still counted per
tensor. Σ is loaded for every method (cached after the first capture) so the
activation-weighted error tr(ΔW Σ ΔWᵀ)/tr(W Σ Wᵀ) is reported for all.

Entropy-coded methods take a target all-in bpw and search the one global step
multiplier that meets it (``find_multiplier``; every evaluation of the rate
quantises the whole model, so GPTQ-based ones take several GPTQ passes).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from aligncodec.codec import baselines as B
from aligncodec.codec.baselines import quantize as BQ
from aligncodec.codec.transforms import hadamard as Hd
from aligncodec.codec import metrics as Mx

RATE_TOL = 0.005  # bpw tolerance of the rate search


def linear_weights(model) -> dict[str, torch.nn.Linear]:
    """{weight name: module} of the linears to quantise (a tied output head is skipped)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_w = emb.weight if emb is not None else None
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if emb_w is not None and mod.weight is emb_w:
                continue  # tied output head = the embedding, left untouched
            out[f"{name}.weight"] = mod
    if not out:
        raise ValueError("model has no linear layer to quantise")
    return out


def sites(names: list[str], sigma: dict[str, torch.Tensor]) -> list[list[str]]:
    """Group weight names that share their input (the same Σ tensor object), in model order."""
    groups: dict[int, list[str]] = {}
    for n in names:
        if n not in sigma:
            raise KeyError(f"no calibration Σ for {n}")
        groups.setdefault(id(sigma[n]), []).append(n)
    return list(groups.values())


def quantize_model_weights(weights: dict[str, torch.Tensor], sigma: dict[str, torch.Tensor], method,
                           *, bits=None, mult=None, seed=0, step_rule="shared", act_order=False, sym=None,
                           progress=False, desc="quantise", threads: int = 1) -> list[BQ.TensorResult]:
    """Run ``quantize_site`` over every site; results in site order. ``threads`` > 1: that many
    sites at once, each on one torch thread (small matrices gain more from whole sites side by
    side than from torch's intra-op threads; the results are then those of one torch thread)."""
    from tqdm import tqdm

    groups = sites(list(weights), sigma)

    def one(g):
        return BQ.quantize_site({n: weights[n] for n in g}, method, bits=bits, mult=mult, sigma=sigma[g[0]],
                                seed=Hd.tensor_seed(seed, g[0]), step_rule=step_rule, act_order=act_order, sym=sym)

    def bar(it):
        return tqdm(it, total=len(groups), desc=desc, unit="site", disable=not progress, dynamic_ncols=True, leave=False)

    if threads <= 1:
        return [t for g in bar(groups) for t in one(g)]
    from concurrent.futures import ThreadPoolExecutor

    from aligncodec.encode.blocks import thread_limits

    with thread_limits(1), ThreadPoolExecutor(max_workers=threads) as pool:
        return [t for res in bar(pool.map(one, groups)) for t in res]


def initial_multiplier(method, weights: dict[str, torch.Tensor], target: float, step_rule: str) -> float:
    """High-rate Gaussian guess: Δ ≈ σ·√(2πe)·2^(−R)."""
    k = math.sqrt(2 * math.pi * math.e) * 2.0 ** (-target)
    if method.name.startswith("rtn-g128") or step_rule == "rms":
        return k
    tot = sum(float(w.double().pow(2).sum()) for w in weights.values())
    n = sum(w.numel() for w in weights.values())
    return k * math.sqrt(tot / n)


def transform_inputs(model_name: str, tokenizer) -> dict:
    """What the whole-model transforms (codec.baselines.MODEL_TRANSFORMS) get from the harness:
    ``calib_windows(n_tokens, window)``, the calibration text as token windows, and ``cache_dir``,
    where learned rotations of this model are cached."""
    from aligncodec.tools.eval import evaluate as Ev
    from aligncodec.tools.eval import models as Mo

    ident = Mo.model_identity(model_name)
    cache_dir = Mo.cache_root() / "rotations" / f"{ident['name'].split('/')[-1]}-{ident['weights_sha256'][:16]}"

    def calib_windows(n_tokens: int, window: int) -> list:
        return list(Ev.make_windows(tokenizer, n_tokens, "calib", window=window).windows)

    return {"calib_windows": calib_windows, "cache_dir": cache_dir}


def run_baseline(model_name: str, method_name: str, bits: float, *, group: int | None = None,
                 step_rule: str = "shared", act_order: bool = False, seed: int = 0, outdir=None, sym=None,
                 evaluate: bool = False, n_tokens: int = 8192, kld_topk: int = 0, threads: int = 2,
                 progress: bool = True, log=print) -> dict:
    """Quantise, optionally write the model folder and evaluate; returns a JSON-able dict."""
    from aligncodec.tools.eval import models as Mo
    from aligncodec.tools.eval.calibrate import load_sigma

    torch.set_num_threads(threads)
    method = B.get_method(method_name, group)
    if not method.entropy_coded and (bits != int(bits) or not 1 <= bits <= 16):
        raise ValueError(f"{method.name}: --bits is the code length, an integer in 1..16 (got {bits})")
    if method.entropy_coded and not bits > 0:
        raise ValueError(f"{method.name}: --bits is the target all-in bits per weight, must be positive")
    t0 = time.time()
    model, tok = Mo.load_causal_lm(model_name)
    mods = linear_weights(model)
    weights = {n: m.weight.detach().clone() for n, m in mods.items()}
    sigma = load_sigma(model_name, progress=progress)
    xf = B.MODEL_TRANSFORMS.get(method.name)  # SmoothQuant / KurTail / SpinQuant: function-preserving transform
    if xf is not None:
        xf = xf(model, sigma, method=method, bits=bits, seed=seed, log=log, **transform_inputs(model_name, tok))
        sigma = xf.sigma
        weights = {n: xf.coded(n, m.weight.detach().clone()) for n, m in mods.items()}
    extra = xf.side_bits if xf is not None else 0  # unfolded side information (a learned rotation), once
    numel = sum(w.numel() for w in weights.values())
    kw = dict(seed=seed, step_rule=step_rule, act_order=act_order, progress=progress)
    search = None
    if method.entropy_coded:
        cache: dict[float, list] = {}

        def rate(c):
            cache.clear()
            cache[c] = quantize_model_weights(weights, sigma, method, mult=c, desc=f"c={c:.3g}", **kw)
            r = (sum(t.bits for t in cache[c]) + extra) / numel
            log(f"  step multiplier {c:.5g}: {r:.4f} bpw")
            return r

        c0 = initial_multiplier(method, weights, bits, step_rule)
        if method.algo == "gptq":  # start from the cheap RTN-rounding solution: GPTQ's rate is close
            pre = B.Method(method.name + "(rtn pre-search)", method.rotate, "rtn", method.group_size, True)

            def pre_rate(c):
                return (sum(t.bits for t in quantize_model_weights(weights, sigma, pre, mult=c, **kw)) + extra) / numel

            c0, _, _ = BQ.find_multiplier(pre_rate, float(bits), c0, tol=0.02)
            log(f"  RTN-rounding pre-search: start GPTQ search at multiplier {c0:.5g}")
        c, r, hist = BQ.find_multiplier(rate, float(bits), c0, tol=RATE_TOL)
        results = cache[c] if c in cache else quantize_model_weights(weights, sigma, method, mult=c, **kw)
        search = {"multiplier": c, "history": hist, "tolerance_bpw": RATE_TOL}
    else:
        results = quantize_model_weights(weights, sigma, method, bits=int(bits), sym=sym, **kw)
    if extra:
        results[0].side_bits += extra
    qsecs = time.time() - t0
    per_tensor = []
    with torch.no_grad():
        for tr in results:
            W = weights[tr.name]
            per_tensor.append({
                "name": tr.name, "shape": list(W.shape), "bits": tr.bits, "symbol_bits": tr.symbol_bits,
                "side_bits": tr.side_bits, "bpw": tr.bpw, "coder": tr.coder,
                "sqnr_db": Mx.sqnr_db(W, tr.W_hat),
                "act_rel_err": Mx.act_weighted_rel_error(W, tr.W_hat, sigma[tr.name]),
            })
            mods[tr.name].weight.copy_(xf.install(tr.name, tr.W_hat) if xf is not None else tr.W_hat)
    total_bits = sum(t.bits for t in results)
    res = {
        "model": model_name, "method": method.name, "bits_arg": bits,
        "bits_arg_meaning": "target all-in bpw" if method.entropy_coded else "code length",
        "group_size": method.group_size, "rotate": method.rotate, "algo": method.algo,
        "entropy_coded": method.entropy_coded, "coder": sorted({t.coder for t in results}),
        "step_rule": step_rule if method.entropy_coded else None, "act_order": act_order, "seed": seed,
        "grid": None if method.entropy_coded else ("sym" if (B.auto_sym(bits) if sym is None else sym) else "asym"),
        "n_linear": len(results), "linear_weights": numel, "total_bits": total_bits,
        "bpw": total_bits / numel,
        "symbol_bpw": sum(t.symbol_bits for t in results) / numel,
        "side_bpw": sum(t.side_bits for t in results) / numel,
        "mean_act_rel_err": sum(p["act_rel_err"] for p in per_tensor) / len(per_tensor),
        "mean_sqnr_db": sum(p["sqnr_db"] for p in per_tensor) / len(per_tensor),
        "untouched": "embeddings (incl. a tied lm_head), norms, biases: float32, not counted",
        "rate_search": search, "transform": xf.info if xf is not None else None, "quantise_seconds": qsecs, "tensors": per_tensor,
    }
    if outdir is not None:
        res["outdir"] = str(save_model_folder(model, model_name, outdir, res))
    if evaluate:
        from aligncodec.tools.eval import evaluate as E

        ref = (E.reference_stats(model_name, n_tokens, topk=kld_topk, threads=threads, progress=progress)
               if kld_topk > 0 else Mo.load_causal_lm(model_name)[0])
        res["eval"] = E.evaluate(model, tok, n_tokens=n_tokens, ref_model=ref, threads=threads,
                                 progress=progress, label=f"{model_name}:{method.name}@{bits}")
    if outdir is not None:
        (Path(outdir) / "baseline.json").write_text(json.dumps(res, indent=1))
    return res


def save_model_folder(model, model_name: str, outdir, res: dict) -> Path:
    """model.safetensors (float32, reconstructed) + config/tokenizer files copied from the source."""
    from safetensors.torch import save_model

    from aligncodec.tools.eval import models as Mo

    src = Mo.resolve_model(model_name)
    src = src if src.is_dir() else src.parent
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != Mo.MANIFEST:
            shutil.copy2(f, out / f.name)
    meta = {"aligncodec.base_model": model_name, "aligncodec.method": res["method"],
            "aligncodec.bpw_linear": f"{res['bpw']:.6f}"}
    save_model(model, str(out / Mo.WEIGHTS), metadata=meta)
    return out


def format_summary(res: dict) -> str:
    rows = [
        ("model / method", f"{res['model']} / {res['method']} ({res['bits_arg_meaning']} {res['bits_arg']})"),
        ("linear layers", f"{res['n_linear']} tensors, {res['linear_weights']:,} weights"),
        ("all-in bits per weight", f"{res['bpw']:.4f} (symbols {res['symbol_bpw']:.4f} + side {res['side_bpw']:.4f})"),
        ("coder", ", ".join(res["coder"])),
        ("mean weight SQNR", f"{res['mean_sqnr_db']:.2f} dB"),
        ("mean act-weighted rel. err", f"{res['mean_act_rel_err']:.5f}"),
        ("untouched", res["untouched"]),
    ]
    if res.get("rate_search"):
        rows.append(("step multiplier", f"{res['rate_search']['multiplier']:.6g} "
                                        f"({len(res['rate_search']['history'])} rate evaluations)"))
    if res.get("outdir"):
        rows.append(("written", res["outdir"]))
    ev = res.get("eval")
    if ev:
        rows += [("perplexity", f"{ev['perplexity']:.4f} on {ev['n_tokens']} tokens"),
                 ("bits per byte", f"{ev['bits_per_byte']:.5f}")]
        if ev.get("kld_mean") is not None:
            rows += [(f"KLD mean ({ev['kld_method']})", f"{ev['kld_mean']:.5f} nats"),
                     ("reference perplexity", f"{ev['ref_perplexity']:.4f}")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def markdown_table(results: list[dict]) -> str:
    """Markdown table of baseline results (one row per run), sorted by method then bits."""
    head = ("| method | --bits | grid / step rule | all-in bpw (linear) | side bpw | mean act. rel. err | "
            "perplexity | bits/byte | KLD (nats) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        ev = r.get("eval") or {}
        kld = ev.get("kld_mean")
        mode = r.get("grid") or f"ECSQ, {r.get('step_rule')}"
        if r["method"].startswith("rtn-g128-ec"):
            mode = "ECSQ, step ∝ group rms"
        out.append(
            f"| {r['method']} | {r['bits_arg']:g} | {mode} | {r['bpw']:.3f} | {r['side_bpw']:.3f} | "
            f"{r['mean_act_rel_err']:.4f} | "
            + (f"{ev['perplexity']:.2f} | {ev['bits_per_byte']:.4f} | " if ev else "— | — | ")
            + (f"{kld:.4f} ({ev.get('kld_method')}) |" if kld is not None else "— |")
        )
    return "\n".join(out)
