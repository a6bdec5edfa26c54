"""Rate–distortion study (``aligncodec rd``): methods × rates → all-in bits per weight,
perplexity, KLD, activation-weighted SQNR; JSON, a markdown table and a PNG.

Methods:

* ``align``      the lossy encoder (aligncodec/encode/, at ``--bpw-scope linear``) with the
                 alignment candidates (per-tensor choice by J = D + λR);
* ``hadamard``   the same encoder, GPTQ and coder, but the randomized Hadamard basis
                 for every tensor (QuaRot's rotation + GPTQ + ECSQ) — the rotation
                 baseline through the very same entropy coder and counting;
* ``identity``   the same encoder, no transform (GPTQ + ECSQ);
* ``rtn``, ``gptq``, ``hadamard-gptq``: the entropy-coded baselines of
  :mod:`aligncodec.codec.baselines` (``<name>-ec``: ECSQ symbols coded with the
  project's rANS, per-tensor tables, rate searched to the same target). GPTQ runs
  with act order, as in the encoder: without it plain GPTQ is far weaker on these
  models (SmolLM2, 3.0 bpw, 8,192 tokens: perplexity 55.9 → 42.0), and a weakened
  baseline would flatter the encoder.

Rates count every bit a decoder needs for the lossy tensors (the linear layers):
symbols, tables, chunk tables, stream headers, params, header entries (for the
encoder's methods: its ``bpw_lossy_all_in``, the bytes of the lossy entries of the archive it
writes). Embeddings and norms are untouched and not counted. The encoder's methods write a
real archive (in a temporary folder) and evaluate the weights the decoder reads back from it.
Before 2026-12-08 they ran the whole-model encoder (removed); docs/results/README.md says
how to reproduce the pages of that time.

Weight-domain curve (``weight_domain_curve``): SQNR against all-in bits per weight on
the fp32 MiniLM linear weights (Σ = I, no quantisation grid underneath).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch


from aligncodec.codec.quant import registry as Q
from aligncodec.formats.atomic import atomic_write

ENCODER_METHODS = {
    "align": ("hadamard", "colscale"),
    "hadamard": ("hadamard",),
    "identity": ("identity",),
}
BASELINE_METHODS = ("rtn", "gptq", "hadamard-gptq",
                    "smoothquant-rtn", "smoothquant-gptq", "kurtail-gptq", "spinquant-gptq")  # last 4: folding baselines
METHODS = tuple(ENCODER_METHODS) + BASELINE_METHODS


def _act_sqnr(mean_rel_err: float) -> float:
    return -10 * math.log10(mean_rel_err) if mean_rel_err > 0 else math.inf


def method_label(method: str, trellis: int = 0) -> str:
    """The row label of an encoder method: the method, plus ``+tcqS`` when coded with the
    S-state trellis (mode 4); ecsq rows keep the plain method name."""
    return method if not trellis else f"{method}+{Q.label(trellis)}"


def encode_linear(model_name: str, candidates: tuple[str, ...], bpw: float, out, *, calibration: str = "float",
                  trellis: int = 0, progress: bool = True, threads: int | None = None) -> tuple[dict, dict]:
    """The model's block linears coded by the one encoder at ``bpw`` all-in over them
    (``--bpw-scope linear``; embeddings and norms lossless) into the archive ``out``.
    Returns (the encoder's summary, the archive's per-tensor results)."""
    from aligncodec import archive
    from aligncodec import encode as S

    opts = S.EncodeOptions(bpw=bpw, scope="linear", candidates=tuple(candidates), calibration=calibration,
                           trellis=trellis, threads=threads)
    summ = S.encode(model_name, out, opts, progress=progress)
    per = json.loads(archive.inspect(out)["metadata"]["acz.lossy"])
    return summ, per


def decoded_lossy(acz) -> dict[str, torch.Tensor]:
    """The lossy tensors of an archive as the decoder reads them (float32)."""
    from aligncodec import archive
    from aligncodec.loader import load_state_dict

    names = set(json.loads(archive.inspect(acz)["metadata"]["acz.lossy"]))
    sd = load_state_dict(acz)
    return {n: sd[n].to(torch.float32) for n in names}


def run_encoder_method(model_name: str, method: str, bpw: float, *, model=None, tok=None, ref=None,
                       n_tokens: int = 8192, threads: int = 2, progress: bool = True, evaluate: bool = True,
                       sigma="auto", trellis: int = 0) -> dict:
    """Encode the model's linear layers with the one encoder into a temporary archive, put the
    weights the decoder reads back into ``model`` (restored afterwards) and evaluate.
    ``trellis``: 0 ecsq, else tcq's machine id; ``sigma="none"``: no calibration (weight MSE)."""
    import tempfile

    from aligncodec.tools.eval import evaluate as Ev

    with tempfile.TemporaryDirectory(prefix="acz-rd-") as d:
        acz = Path(d) / "rd.acz"
        summ, per = encode_linear(model_name, ENCODER_METHODS[method], bpw, acz, trellis=trellis, progress=progress,
                                  calibration="none" if sigma == "none" else "float")
        decoded = decoded_lossy(acz) if evaluate and model is not None else {}
    modes: dict[str, dict[str, int]] = {}
    for r in per.values():
        modes.setdefault(r["type"], {}).setdefault(r["kind"], 0)
        modes[r["type"]][r["kind"]] += 1
    rel = [r["act_rel_err"] for r in per.values()]
    out = {"method": method_label(method, trellis), "target_bpw": bpw, "bpw": summ["bpw_lossy_all_in"], "step": summ["step"],
           "mean_act_rel_err": float(np.mean(rel)), "act_sqnr_db": _act_sqnr(float(np.mean(rel))),
           "mean_sqnr_db": float(np.mean([r["sqnr_db"] for r in per.values()])),
           "modes_by_type": modes, "encode_seconds": summ["seconds_total"], "encode_info": summ,
           "search": summ["steps"]}
    if decoded:
        params = dict(model.named_parameters())
        saved = {}
        with torch.no_grad():
            for n, W in decoded.items():
                p = params[n]
                saved[n] = p.detach().clone()
                p.copy_(W)
        try:
            ev = Ev.evaluate(model, tok, n_tokens=n_tokens, ref_model=ref, threads=threads, progress=progress,
                             label=f"{method}@{bpw}")
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)
        out.update({"perplexity": ev["perplexity"], "kld": ev["kld_mean"], "bits_per_byte": ev["bits_per_byte"],
                    "eval": ev})
    return out


def run_baseline_method(model_name: str, method: str, bpw: float, *, n_tokens: int = 8192, threads: int = 2,
                        kld_topk: int = 256, progress: bool = True, evaluate: bool = True) -> dict:
    from aligncodec.tools.experiments.baseline import run_baseline

    r = run_baseline(model_name, f"{method}-ec", bpw, evaluate=evaluate, n_tokens=n_tokens, kld_topk=kld_topk,
                     threads=threads, progress=progress, log=lambda m: None, act_order=True)
    out = {"method": method, "target_bpw": bpw, "bpw": r["bpw"], "mean_act_rel_err": r["mean_act_rel_err"],
           "act_sqnr_db": _act_sqnr(r["mean_act_rel_err"]), "mean_sqnr_db": r["mean_sqnr_db"],
           "encode_seconds": r["quantise_seconds"], "baseline": f"{method}-ec (codec/baselines/, act order)"}
    if evaluate:
        ev = r["eval"]
        out.update({"perplexity": ev["perplexity"], "kld": ev["kld_mean"], "bits_per_byte": ev["bits_per_byte"], "eval": ev})
    return out


def run_rd(model_name: str, rates: list[float], methods: list[str], *, n_tokens: int = 8192, threads: int = 2,
           kld_topk: int = 256, progress: bool = True, evaluate: bool = True, outdir=None, log=print,
           trellis: int = 0) -> dict:
    from aligncodec.tools.eval import evaluate as Ev
    from aligncodec.tools.eval.models import load_causal_lm

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(threads)
    model = tok = ref = None
    base = None
    if evaluate:
        model, tok = load_causal_lm(model_name)
        if kld_topk:
            ref = Ev.reference_stats(model_name, n_tokens, topk=kld_topk, threads=threads, progress=progress)
            base = {"perplexity": math.exp(-float(ref.target_logp[:n_tokens].double().mean()))}
        else:
            ref = load_causal_lm(model_name)[0]
            base = None
    rows = []
    res = {"model": model_name, "n_tokens": n_tokens, "kld": f"top-{kld_topk} reference" if kld_topk else "exact",
           "reference": base, "rows": rows}
    for r in rates:
        for m in methods:
            t0 = time.perf_counter()
            if m in ENCODER_METHODS:
                row = run_encoder_method(model_name, m, r, model=model, tok=tok, ref=ref, n_tokens=n_tokens,
                                         threads=threads, progress=progress, evaluate=evaluate, trellis=trellis)
            else:
                row = run_baseline_method(model_name, m, r, n_tokens=n_tokens, threads=threads, kld_topk=kld_topk,
                                          progress=progress, evaluate=evaluate)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            log(format_row(row))
            if outdir is not None:  # after every row: a long study keeps what it has measured
                save_result(outdir, res)
    if outdir is not None and not rows:
        save_result(outdir, res)
    return res


def save_result(outdir, res: dict) -> None:
    """rd.json (rows without their per-window ``eval`` detail), rd.md and (when there are
    perplexities) rd.png in ``outdir``; each file is written to a temporary name and renamed, so
    an interrupted run never leaves half a file."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    def put(name: str, write) -> None:
        atomic_write(outdir / name, write)  # the temporary name keeps the suffix: matplotlib reads the format from it

    slim = {**res, "rows": [{k: v for k, v in r.items() if k != "eval"} for r in res["rows"]]}
    put("rd.json", lambda t: t.write_text(json.dumps(slim, indent=1)))
    put("rd.md", lambda t: t.write_text(format_table(res)))
    if any(r.get("perplexity") for r in res["rows"]):
        put("rd.png", lambda t: plot(res, t))


class MergeError(ValueError):
    """rd results that cannot be put in one table (missing, malformed or from different setups)."""


def merge_results(paths) -> tuple[dict, list[str]]:
    """One table from several ``rd`` runs (folders holding rd.json, or rd.json files) of the same
    model, evaluation length, KLD reference and reference perplexity. A (method, target) row that
    appears twice is taken from the later argument. Returns (result, notes on replaced rows)."""
    merged: dict | None = None
    rows: dict[tuple, dict] = {}
    notes = []
    for p in paths:
        p = Path(p)
        f = p / "rd.json" if p.is_dir() else p
        try:
            res = json.loads(f.read_text())
        except FileNotFoundError:
            raise MergeError(f"{f}: no such file (expected an rd output folder or its rd.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MergeError(f"{f}: not a readable rd.json ({exc})") from None
        if not isinstance(res, dict) or not isinstance(res.get("rows"), list) or "model" not in res:
            raise MergeError(f"{f}: not an rd result (needs 'model' and a list of 'rows')")
        for r in res["rows"]:
            if (not isinstance(r, dict) or not {"method", "target_bpw", "bpw", "act_sqnr_db"} <= set(r)
                    or not isinstance(r["target_bpw"], (int, float))):
                raise MergeError(f"{f}: malformed row {str(r)[:80]!r}")
        ref = res.get("reference")
        if ref is not None and not (isinstance(ref, dict) and isinstance(ref.get("perplexity"), (int, float))):
            raise MergeError(f"{f}: malformed reference {str(ref)[:80]!r}")
        if merged is None:
            merged = {k: res.get(k) for k in ("model", "n_tokens", "kld", "reference")}
        else:
            for k in ("model", "n_tokens", "kld"):
                if res.get(k) != merged[k]:
                    raise MergeError(f"{f}: {k} is {res.get(k)!r}, the first result has {merged[k]!r}; "
                                     f"only runs of one setup go in one table")
            ref0 = merged["reference"]
            if ref and ref0 and not math.isclose(ref["perplexity"], ref0["perplexity"], rel_tol=1e-9):
                raise MergeError(f"{f}: reference perplexity {ref['perplexity']} differs from {ref0['perplexity']}")
            merged["reference"] = ref0 or ref
        for r in res["rows"]:
            key = (r["method"], float(r["target_bpw"]))
            if key in rows:
                notes.append(f"{r['method']} at {r['target_bpw']} bpw: taken from {f}")
            rows[key] = r
    if merged is None:
        raise MergeError("nothing to merge")
    order = list(dict.fromkeys(m for m, _ in rows))
    merged["rows"] = [rows[k] for k in sorted(rows, key=lambda k: (k[1], order.index(k[0])))]
    return merged, notes


def format_row(r: dict) -> str:
    ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") else "-"
    kld = f"{r['kld']:.4f}" if r.get("kld") is not None else "-"
    return (f"{r['method']:<14} target {r['target_bpw']:<5} bpw {r['bpw']:.4f}  ppl {ppl:>8}  KLD {kld:>7}  "
            f"act-SQNR {r['act_sqnr_db']:.2f} dB  encode {r['encode_seconds']:.0f} s")


def format_table(res: dict) -> str:
    lines = [f"model {res['model']}, {res['n_tokens']} evaluation tokens, KLD vs {res['kld']}"]
    if res.get("reference"):
        lines.append(f"reference perplexity {res['reference']['perplexity']:.3f}")
    lines += ["", "| method | target | all-in bpw | perplexity | KLD | act-weighted SQNR (dB) | weight SQNR (dB) | encode s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") else "-"
        kld = f"{r['kld']:.4f}" if r.get("kld") is not None else "-"
        lines.append(f"| {r['method']} | {r['target_bpw']} | {r['bpw']:.4f} | {ppl} | {kld} | {r['act_sqnr_db']:.2f} | "
                     f"{r['mean_sqnr_db']:.2f} | {r['encode_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in dict.fromkeys(r["method"] for r in res["rows"]):
        pts = sorted((r["bpw"], r.get("perplexity"), r.get("kld")) for r in res["rows"] if r["method"] == m and r.get("perplexity"))
        if not pts:
            continue
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=m)
    if res.get("reference"):
        axes[0].axhline(res["reference"]["perplexity"], color="k", ls=":", label="reference")
    axes[0].set(xlabel="all-in bits per weight (linear layers)", ylabel="perplexity", yscale="log", title=res["model"])
    axes[1].set(xlabel="all-in bits per weight (linear layers)", ylabel="KLD (nats/token)", yscale="log")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- weight domain


WEIGHT_DOMAIN_METHODS = {"ecsq": ("identity",), "hadamard": ("hadamard",), "best-of": ("identity", "hadamard")}


def weight_domain_curve(model_name: str = "minilm", rates=(2.0, 2.5, 3.0, 3.5, 4.0),
                        candidates_by_method=None, progress: bool = False, trellis: int = 0) -> dict:
    """SQNR (dB, weight domain, Σ = I) against all-in bpw on a model's linear weights, and the
    bpw each method needs for 20 dB (interpolated). ``trellis``: every method coded as tcq with
    that state machine (labels ``tcqS`` for ``ecsq``'s identity candidate, else ``METHOD+tcqS``).
    Each point is an archive the one encoder writes without calibration at ``--bpw-scope linear``;
    the SQNR is measured on the weights the decoder reads back."""
    import tempfile

    from aligncodec import archive
    from aligncodec.encode.plan import resolve_input
    from safetensors import safe_open

    cands = candidates_by_method or WEIGHT_DOMAIN_METHODS
    out = {}
    for m0, cs in cands.items():
        m = m0 if not trellis else (Q.label(trellis) if m0 == "ecsq" else method_label(m0, trellis))
        pts = []
        for r in rates:
            with tempfile.TemporaryDirectory(prefix="acz-wd-") as d:
                acz = Path(d) / "wd.acz"
                summ, _per = encode_linear(model_name, cs, r, acz, calibration="none", trellis=trellis, progress=progress)
                dec = decoded_lossy(acz)
            sig = noise = 0.0
            for f in archive.find_inputs(resolve_input(model_name)).files:
                with safe_open(str(f), framework="pt") as st:
                    for n in st.keys():
                        if n in dec:
                            W = st.get_tensor(n).to(torch.float32)
                            sig += float((W.double() ** 2).sum())
                            noise += float(((dec[n] - W).double() ** 2).sum())
            pts.append({"bpw": summ["bpw_lossy_all_in"], "sqnr_db": 10 * math.log10(sig / noise), "seconds": summ["seconds_total"]})
        b = [p["bpw"] for p in pts]
        s = [p["sqnr_db"] for p in pts]
        out[m] = {"points": pts, "bpw_at_20db": float(np.interp(20.0, s, b)) if min(s) <= 20 <= max(s) else None}
    return out
