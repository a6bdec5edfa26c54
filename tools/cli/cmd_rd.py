"""rd sub-command: the rate–distortion study."""

from __future__ import annotations

import argparse
import json
import sys

from aligncodec.tools.cli import (EXIT_DEPENDENCY, CLIError, add_command, add_eval_arguments, add_model_argument,
                                  add_quantizer_arguments, add_run_options, trellis_arg)


def cmd_rd(args: argparse.Namespace) -> int:
    from aligncodec.tools.experiments import rd

    try:
        rates = [float(x) for x in args.bpw.split(",") if x]
    except ValueError:
        raise CLIError(f"--bpw must be a comma-separated list of numbers, got {args.bpw!r}", 2) from None
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in rd.METHODS]
    if bad:
        raise CLIError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(rd.METHODS)}", 2)
    if args.merge:
        if not args.output:
            raise CLIError("--merge needs -o/--output, the folder for the merged rd.json, rd.md and rd.png", 2)
        try:
            res, notes = rd.merge_results(args.merge)
        except rd.MergeError as exc:
            raise CLIError(str(exc), 2) from None
        for n in notes:
            print(f"replaced: {n}", file=sys.stderr)
        rd.save_result(args.output, res)
        if args.json:
            json.dump(res, sys.stdout, indent=1)
            print()
        else:
            print(rd.format_table(res))
        return 0
    trellis = trellis_arg(args)
    if args.weight_domain:
        methods = [m for m in args.wd_methods.split(",") if m]
        bad = [m for m in methods if m not in rd.WEIGHT_DOMAIN_METHODS]
        if bad:
            raise CLIError(f"unknown --wd-methods {', '.join(bad)}; choose from {', '.join(rd.WEIGHT_DOMAIN_METHODS)}", 2)
        res = rd.weight_domain_curve(args.model, rates, {m: rd.WEIGHT_DOMAIN_METHODS[m] for m in methods},
                                     progress=not args.quiet, trellis=trellis)
        json.dump(res, sys.stdout, indent=1)
        print()
        if args.output:
            from pathlib import Path

            Path(args.output).mkdir(parents=True, exist_ok=True)
            (Path(args.output) / "weight_domain.json").write_text(json.dumps(res, indent=1))
        return 0
    try:
        res = rd.run_rd(args.model, rates, methods, n_tokens=args.tokens, threads=args.threads, kld_topk=args.kld_topk,
                        progress=not args.quiet, evaluate=not args.no_eval, outdir=args.output,
                        log=(lambda m: print(m, file=sys.stderr)), trellis=trellis)
    except ImportError as exc:
        raise CLIError(f"missing dependency: {exc}", EXIT_DEPENDENCY) from None
    if args.json:
        json.dump({k: v for k, v in res.items()}, sys.stdout, indent=1, default=str)
        print()
    else:
        print(rd.format_table(res))
    return 0


def add_parser(sub) -> None:
    p = add_command(sub, "rd")
    add_model_argument(p, "cached model name or model folder")
    p.add_argument("--bpw", default="2.5,3,3.5", help="comma-separated target all-in bits per weight (default 2.5,3,3.5)")
    p.add_argument("--methods", default="align,hadamard",
                   help="comma-separated: align, hadamard, identity (the lossy encoder) and rtn, gptq, hadamard-gptq "
                        "(entropy-coded baselines); default align,hadamard")
    add_eval_arguments(p, kld_topk=256)
    add_run_options(p, progress=None)
    p.add_argument("--no-eval", action="store_true", help="rates and activation-weighted SQNR only, no perplexity")
    p.add_argument("--weight-domain", action="store_true",
                   help="weight-domain curve instead: SQNR vs bpw with Σ = I (use with the fp32 model minilm)")
    p.add_argument("--wd-methods", default="ecsq,hadamard,best-of",
                   help="--weight-domain: comma-separated candidate sets (ecsq = identity, hadamard, best-of = both); "
                        "with --quantizer tcq each is coded as tcq (default all three)")
    add_quantizer_arguments(p)
    p.add_argument("-o", "--output", help="folder for rd.json, rd.md and rd.png (written as rows complete)")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="no new runs: merge the rd.json of earlier runs (same model, tokens and reference) into "
                        "one table and plot in -o; a method/rate present twice is taken from the later DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_rd)
