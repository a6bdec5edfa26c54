"""``aligncodec demo``: the newcomer's main job on the built-in default model, in minutes.

Default (lossy), the CLI's own path and two rotation-only baselines at the same size:

1. fetch the model (once);
2. ``aligncodec compress MODEL --bpw B`` as the command line runs it (the lossy encoder,
   aligncodec/encode/, B = file bytes × 8 / every parameter), with ``--calib-tokens`` set to the demo's
   calibration size so that the whole demo fits in about five minutes on two cores;
3. decode the archive (every checksum, every stream) and evaluate the decoded model:
   perplexity and KL divergence against the unmodified model on held-out text;
4. the same coder with the randomized Hadamard rotation only (``--candidates hadamard``),
   same rate control, same file size: isolates the basis choice;
5. the fixed-rate QuaRot-style integer quantiser people deploy: randomized Hadamard + GPTQ,
   an integer grid with per-group scales (fp16 scale and zero-point per 128 weights), no
   entropy coding, the embedding/output head at 8 bits per row. A fixed-rate format cannot
   land on an arbitrary size: it takes the standard widths (3-bit linears by default,
   ``--fixed-bits``), its file is counted as its integer codes and scales plus the bytes our
   archive spends on everything else (norms, config, tokenizer), and its size is printed
   beside ours;
6. one table.

``--lossless``: the bit-exact path instead (compress, per-tensor table, verify).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from aligncodec import archive
from aligncodec.tools.cli import add_command, add_quantizer_arguments, trellis_arg
from aligncodec.tools.cli.cmd_archive import _print_table
from aligncodec.tools.eval import models

DEMO_CALIB_TOKENS = 2048  # calibration tokens of the demo's encodes (the CLI's default is text.DEFAULT_CALIB_TOKENS)
DEMO_EVAL_TOKENS = 4096  # evaluation tokens of the demo (the studies use 8,192 and 32,768)


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


def _encode(args, src: Path, acz: Path, candidates: tuple[str, ...]) -> dict:
    from aligncodec import encode as S

    opts = S.EncodeOptions(bpw=args.bpw, trellis=trellis_arg(args), calib_tokens=args.calib_tokens,
                           threads=args.threads or None, candidates=candidates)
    return S.encode(src, acz, opts, progress=True)


def _evaluate_archive(args, acz: Path, ref) -> dict:
    from aligncodec.tools.eval import evaluate as Ev

    # the load decodes every stream after checking its checksum, with the structural checks of
    # `aligncodec verify` (one decode: verify's own would be a second)
    model, tok = Ev.load_model_for_eval(str(acz))
    return Ev.evaluate(model, tok, n_tokens=args.tokens, ref_model=ref, threads=args.threads or None,
                       progress=True, label=acz.name)


def _lossy_bytes(acz: Path) -> int:
    from aligncodec.formats.constants import MODE_ECSQ, MODE_TCQ
    from aligncodec.formats.reader import ArchiveReader

    with ArchiveReader(acz) as r:
        return sum(e.size for e in r.tensors if e.mode in (MODE_ECSQ, MODE_TCQ))


def _fixed_rate(args, ref, rest_bytes: int) -> dict:
    """QuaRot-style fixed rate: Hadamard + GPTQ (act order) on an integer grid with per-group
    scales for every linear, the embedding (and a tied head) RTN at 8 bits per row."""
    import torch

    from aligncodec.codec import baselines as B
    from aligncodec.codec.baselines import quantize as BQ
    from aligncodec.tools.eval import evaluate as Ev
    from aligncodec.tools.eval.calibrate import load_sigma
    from aligncodec.tools.experiments.baseline import linear_weights, quantize_model_weights

    t0 = time.perf_counter()
    model, tok = models.load_causal_lm(args.model)
    mods = linear_weights(model)  # every linear; a head tied to the embedding is the embedding below
    weights = {n: m.weight.detach().clone() for n, m in mods.items()}
    sigma = load_sigma(args.model, n_tokens=args.calib_tokens, progress=True)
    from aligncodec.codec import parallel

    res = quantize_model_weights(weights, sigma, B.get_method("hadamard-gptq", args.fixed_group), bits=args.fixed_bits,
                                 act_order=True, progress=True, threads=args.threads or parallel.default_threads())
    emb = model.get_input_embeddings().weight
    er = BQ.quantize_site({"embedding": emb.detach()}, B.get_method("rtn", 0), bits=8)[0]
    with torch.no_grad():
        for t in res:
            mods[t.name].weight.copy_(t.W_hat)
        emb.copy_(er.W_hat)
    code_bits = sum(t.bits for t in res) + er.bits
    secs = time.perf_counter() - t0
    ev = Ev.evaluate(model, tok, n_tokens=args.tokens, ref_model=ref, threads=args.threads or None, progress=True,
                     label="hadamard-gptq fixed")
    return {"file_bytes": math.ceil(code_bits / 8) + rest_bytes, "seconds": secs, "eval": ev}


def _lossy(args, src: Path, out_dir: Path) -> int:
    from aligncodec.tools.eval import evaluate as Ev

    t_start = time.perf_counter()
    from aligncodec.codec.quant import registry as Q

    trellis = trellis_arg(args)
    coder = Q.label(trellis)
    print(f"      sizes: {args.calib_tokens:,} calibration tokens (calibration half of the text), {args.tokens:,} "
          f"evaluation tokens (held-out half), threads: {args.threads or 'all cores'}")
    acz = out_dir / f"{args.model}-{args.bpw:g}bpw.acz"
    print(f"[2/6] aligncodec compress {args.model} --bpw {args.bpw:g} --calib-tokens {args.calib_tokens} -o {acz}")
    from aligncodec.codec import encoder as E

    ours = _encode(args, src, acz, tuple(args.candidates.split(",")) if args.candidates else E.DEFAULT_CANDIDATES)
    print(f"      {ours['file_bytes'] / 1e6:.2f} MB, {ours['bpw_file']:.4f} bits per parameter (whole file), "
          f"{ours['seconds_total']:.0f} s")
    print("[3/6] decode the archive (every checksum, every stream) and evaluate it against the unmodified model")
    ref = Ev.reference_stats(args.model, args.tokens, topk=256, threads=args.threads or None, progress=True)
    ppl_ref = math.exp(-float(ref.target_logp[: args.tokens].double().mean()))
    ev = _evaluate_archive(args, acz, ref)
    had_acz = out_dir / f"{args.model}-{args.bpw:g}bpw-hadamard.acz"
    print(f"[4/6] the same coder, randomized Hadamard only (--candidates hadamard), same size -> {had_acz}")
    had = _encode(args, src, had_acz, ("hadamard",))
    had_ev = _evaluate_archive(args, had_acz, ref)
    print(f"[5/6] fixed-rate QuaRot-style: Hadamard + GPTQ, {args.fixed_bits}-bit integer grid, scales per "
          f"{args.fixed_group} weights, embedding 8-bit per row, no entropy coding")
    rest = ours["file_bytes"] - _lossy_bytes(acz)
    fx = _fixed_rate(args, ref, rest)
    n = ours["n_params"]
    print()
    print(f"[6/6] {args.model}, {n:,} parameters; {args.tokens:,} held-out tokens; KLD against the unmodified model's "
          f"top-256 log-probs; bpw = file bytes x 8 / every parameter")
    print("| method | file MB | bpw | perplexity | KLD (nats) | encode s |")
    print("|---|---|---|---|---|---|")
    print(f"| unmodified (float32) | {4 * n / 1e6:.1f} | 32 | {ppl_ref:.3f} | 0 | - |")
    rows = [(f"aligncodec --bpw {args.bpw:g} ({coder}, default path)", ours["file_bytes"], ev, ours["seconds_total"]),
            ("same coder, Hadamard only", had["file_bytes"], had_ev, had["seconds_total"]),
            (f"Hadamard + GPTQ int{args.fixed_bits} g{args.fixed_group}, fixed rate (QuaRot-style)", fx["file_bytes"],
             fx["eval"], fx["seconds"])]
    for label, fb, e, secs in rows:
        print(f"| {label} | {fb / 1e6:.2f} | {8 * fb / n:.3f} | {e['perplexity']:.3f} | {e['kld_mean']:.4f} | {secs:.0f} |")
    k, kh, kf = ev["kld_mean"], had_ev["kld_mean"], fx["eval"]["kld_mean"]
    print(f"basis choice: KLD {k:.4f} vs Hadamard only {kh:.4f} ({100 * (kh - k) / max(kh, 1e-12):+.1f} % of the "
          f"rotation's KLD) at the same file size")
    print(f"entropy coding + trellis vs fixed rate: KLD {k:.4f} vs {kf:.4f} ({kf / max(k, 1e-12):.2f}x) with "
          f"{100 * (fx['file_bytes'] / ours['file_bytes'] - 1):+.1f} % bytes for the fixed-rate file")
    print(f"demo wall time {time.perf_counter() - t_start:.0f} s (after the model fetch)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aligncodec.tools.cli import EXIT_USAGE, CLIError

    out_dir = Path(args.out_dir or models.cache_root() / "demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads < 0 or args.tokens < 1 or args.calib_tokens < 1:
        raise CLIError("--threads must be >= 0, --tokens and --calib-tokens >= 1", EXIT_USAGE)
    print(f"[1/{3 if args.lossless else 6}] reference model {args.model!r} (fetched once into {models.model_dir(args.model)})")
    src = models.fetch(args.model, log=lambda *a: print("      ", *a))
    if args.lossless:
        return _lossless(args, src, out_dir)
    if not models.MODELS[args.model].causal_lm:
        raise CLIError(f"{args.model} is not a causal LM: the lossy demo evaluates perplexity; use --lossless")
    return _lossy(args, src, out_dir)


def add_parser(sub) -> None:
    p = add_command(sub, "demo", description="Lossy (default): `aligncodec compress MODEL --bpw B` as the command line runs "
                    "it, decode and evaluate the archive, then the same coder with Hadamard only and the fixed-rate "
                    "QuaRot-style quantiser (Hadamard + GPTQ, integer grid, group scales), one table. "
                    "--lossless: bit-exact compression, per-tensor table, verify.")
    p.add_argument("--model", default=models.DEFAULT_MODEL, choices=sorted(models.MODELS), help="reference model (default: %(default)s)")
    p.add_argument("--bpw", type=float, default=3.0, help="lossy: bits per parameter over the whole file (default 3.0)")
    p.add_argument("--tokens", type=int, default=DEMO_EVAL_TOKENS, help=f"lossy: evaluation tokens (default {DEMO_EVAL_TOKENS})")
    p.add_argument("--calib-tokens", type=int, default=DEMO_CALIB_TOKENS,
                   help=f"lossy: calibration tokens of every arm (default {DEMO_CALIB_TOKENS})")
    p.add_argument("--candidates", help="lossy: transforms tried per tensor in the first arm (default: the encoder's)")
    p.add_argument("--fixed-bits", type=int, default=3, choices=(2, 3, 4, 8), help="fixed-rate arm: integer bits of the linears (default 3)")
    p.add_argument("--fixed-group", type=int, default=128, help="fixed-rate arm: weights per scale (default 128)")
    p.add_argument("--threads", type=int, default=0, help="threads (default 0: every core)")
    p.add_argument("--lossless", action="store_true", help="bit-exact compression instead (table + verify)")
    p.add_argument("--out-dir", help="where archives go (default: <cache>/demo)")
    add_quantizer_arguments(p)
    p.set_defaults(func=cmd_demo)
