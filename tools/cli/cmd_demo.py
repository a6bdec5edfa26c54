"""``aligncodec demo``: the newcomer's main job on the built-in default model.

Default (lossy): fetch SmolLM2, compress it with the alignment encoder at one rate
(``--bpw``, default 3.0, all-in over the linear layers), verify the archive, evaluate the
*decoded archive* (perplexity and KLD against the unmodified model), then run the rotation
baseline — randomized Hadamard + GPTQ + the same entropy coder, the same rate search and
the same bit counting — at the same rate and print both side by side.

``--lossless``: the bit-exact path instead (compress, per-tensor table, verify).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from aligncodec import archive
from aligncodec.tools.cli import add_command, add_quantizer_arguments, trellis_arg
from aligncodec.tools.cli.cmd_archive import _print_table
from aligncodec.tools.eval import models


def _lossless(args, src: Path, out_dir: Path) -> int:
    acz = out_dir / f"{args.model}-lossless.acz"
    print(f"[2/3] lossless compression -> {acz}")
    t0 = time.perf_counter()
    archive.compress(src, acz, progress=True)
    dt = time.perf_counter() - t0
    info = archive.inspect(acz)
    _print_table(info)
    st_bytes = sum(os.path.getsize(f) for f in archive.find_inputs(src).files)
    print(f"      {info['raw_bytes'] / 1e6:.1f} MB of tensors -> {(info['file_bytes'] - info['aux_bytes']) / 1e6:.1f} MB "
          f"in {dt:.1f} s; safetensors input {st_bytes / 1e6:.1f} MB")
    print("[3/3] verify: every checksum, every stream decoded")
    t0 = time.perf_counter()
    archive.verify(acz, progress=True)
    print(f"      OK in {time.perf_counter() - t0:.1f} s")
    return 0


def _modes_line(modes_by_type: dict) -> str:
    return "; ".join(f"{t}: " + ", ".join(f"{k} {n}" for k, n in sorted(m.items())) for t, m in sorted(modes_by_type.items()))


def _lossy(args, src: Path, out_dir: Path) -> int:
    import torch

    from aligncodec import lossy_compress as enc
    from aligncodec.tools.eval import evaluate as Ev
    from aligncodec.tools.experiments import rd

    bpw = args.bpw
    trellis = trellis_arg(args)
    coder = rd.method_label("align", trellis).replace("align", "").lstrip("+") or "ecsq"
    acz = out_dir / f"{args.model}-align-{coder}-{bpw:g}bpw.acz"
    print(f"[2/5] align encoder ({coder}) at {bpw:g} bits per weight (all-in over the linear layers) -> {acz}")
    print("      (first run: calibration Σ of every linear input from 16,384 calibration tokens, cached)")
    t0 = time.perf_counter()
    summ = enc.compress_lossy(args.model, acz, bpw=bpw, candidates=rd.ENCODER_METHODS["align"], progress=True,
                              trellis=trellis)
    t_align = time.perf_counter() - t0
    per = json.loads(archive.inspect(acz)["metadata"]["acz.lossy"])
    modes = enc.modes_by_type((v["type"], v["kind"]) for v in per.values())
    print(f"      {summ['n_lossy_weights']:,} lossy weights at {summ['bpw_lossy_in_archive']:.4f} bits/weight all-in; "
          f"file {summ['file_bytes'] / 1e6:.1f} MB (norms, embeddings, tokenizer lossless); {t_align:.0f} s")
    print(f"      modes by layer type: {_modes_line(modes)}")
    print("[3/5] verify: every checksum, every stream decoded")
    archive.verify(acz, progress=True)
    print(f"[4/5] evaluate the decoded archive: {args.tokens} tokens of the evaluation text, KLD vs the unmodified model")
    ref = Ev.reference_stats(args.model, args.tokens, topk=256, threads=args.threads, progress=True)
    ppl_ref = math.exp(-float(ref.target_logp[: args.tokens].double().mean()))
    model, tok = Ev.load_model_for_eval(str(acz))
    ev = Ev.evaluate(model, tok, n_tokens=args.tokens, ref_model=ref, threads=args.threads, progress=True,
                     label=acz.name)
    del model
    print(f"[5/5] rotation baseline at the same rate: randomized Hadamard + GPTQ, same coder ({coder}) and counting")
    model, tok = models.load_causal_lm(args.model)
    torch.set_num_threads(args.threads)
    had = rd.run_encoder_method(args.model, "hadamard", bpw, model=model, tok=tok, ref=ref, n_tokens=args.tokens,
                                threads=args.threads, progress=True, trellis=trellis)
    print()
    print(f"model {args.model}, {args.tokens} evaluation tokens, KLD against the top-256 reference log-probs")
    print(f"| method | all-in bpw (linear) | perplexity | KLD (nats) | encode s |")
    print(f"|---|---|---|---|---|")
    print(f"| unmodified (float32) | 32 | {ppl_ref:.3f} | 0 | - |")
    print(f"| align + {coder} (archive, decoded) | {summ['bpw_lossy_in_archive']:.4f} | {ev['perplexity']:.3f} | {ev['kld_mean']:.4f} | "
          f"{summ['seconds_total']:.0f} |")
    print(f"| hadamard + GPTQ + {coder} (rotation) | {had['bpw']:.4f} | {had['perplexity']:.3f} | {had['kld']:.4f} | "
          f"{had['encode_seconds']:.0f} |")
    d = had["kld"] - ev["kld_mean"]
    rel = d / max(had["kld"], 1e-12)
    verdict = ("a tie (difference under 2 % of the KLD)" if abs(rel) < 0.02
               else "align is better" if d > 0 else "the rotation baseline is better")
    print(f"KLD difference (hadamard − align): {d:+.4f} nats ({100 * rel:+.1f} %): {verdict} at this rate.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir or models.cache_root() / "demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[1/{3 if args.lossless else 5}] reference model {args.model!r} (fetched once into {models.model_dir(args.model)})")
    src = models.fetch(args.model, log=lambda *a: print("      ", *a))
    if args.lossless:
        return _lossless(args, src, out_dir)
    if not models.MODELS[args.model].causal_lm:
        from aligncodec.tools.cli import CLIError

        raise CLIError(f"{args.model} is not a causal LM: the lossy demo evaluates perplexity; use --lossless")
    return _lossy(args, src, out_dir)


def add_parser(sub) -> None:
    p = add_command(sub, "demo", description="Lossy (default): align-encode the model at --bpw, verify, evaluate the decoded archive, and "
                    "compare with randomized Hadamard + GPTQ through the same coder at the same rate. "
                    "--lossless: bit-exact compression, per-tensor table, verify.")
    p.add_argument("--model", default=models.DEFAULT_MODEL, choices=sorted(models.MODELS), help="reference model (default: %(default)s)")
    p.add_argument("--bpw", type=float, default=3.0, help="lossy: target bits per weight over the linear layers (default 3.0)")
    p.add_argument("--tokens", type=int, default=8192, help="lossy: evaluation tokens (default 8192)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--lossless", action="store_true", help="bit-exact compression instead (table + verify)")
    p.add_argument("--out-dir", help="where archives go (default: <cache>/demo)")
    add_quantizer_arguments(p)
    p.set_defaults(func=cmd_demo)
