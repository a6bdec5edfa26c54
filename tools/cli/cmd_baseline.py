"""``aligncodec baseline``: quantise a model's linear layers with a baseline method (see tools/experiments/baseline.py).

Quantise every linear weight of a model with a baseline method and write the reconstructed model
as a float32 safetensors folder (config and tokenizer copied). Embeddings (incl. a tied lm_head),
norms and biases are left untouched and not counted. Prints the all-in bits per weight over the
linear layers (symbols + fp16 scales + zero-points + rotation seeds + entropy-coder tables).
Methods: rtn (per channel), rtn-g128, hadamard-rtn (per channel), gptq (g128), hadamard-gptq (per
channel), the folding baselines (smoothquant, kurtail, spinquant), each with an -ec variant
(ECSQ + rANS).
"""

from __future__ import annotations

import json
import sys

from aligncodec.tools.cli import add_command, add_eval_arguments, add_model_argument, add_run_options


def add_parser(sub) -> None:
    from aligncodec.codec.baselines import METHODS, STEP_RULES

    p = add_command(sub, "baseline", description=__doc__)
    p.add_argument("method", choices=list(METHODS), metavar="METHOD", help=f"one of: {', '.join(METHODS)}")
    add_model_argument(p)
    p.add_argument("--bits", type=float, required=True, metavar="B",
                   help="fixed-length methods: the code length in bits (integer); -ec methods: the target "
                        "all-in bits per weight over the linear layers")
    p.add_argument("-o", "--outdir", metavar="OUTDIR",
                   help="write the reconstructed model (model.safetensors, config, tokenizer, baseline.json) here")
    p.add_argument("--group", type=int, default=None, metavar="G",
                   help="override the method's group size (0 = one scale per output row; default: the method's)")
    p.add_argument("--step-rule", choices=STEP_RULES, default="shared",
                   help="-ec methods: 'shared' = one absolute step for every tensor (default), 'rms' = step "
                        "proportional to each tensor's rms (equal SQNR); rtn-g128-ec always scales per group")
    p.add_argument("--grid", choices=("auto", "asym", "sym"), default="auto",
                   help="fixed-length methods: asymmetric grid with a B-bit zero-point per group, symmetric "
                        "mid-rise grid, or auto (default: symmetric at 2 bits, asymmetric from 3 bits, the "
                        "stronger one measured on SmolLM2)")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: process columns by decreasing Hessian diagonal (groups stay static)")
    p.add_argument("--seed", type=int, default=0, help="global seed of the Hadamard rotations (default 0)")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the result: perplexity, bits/byte and KLD against the unmodified model")
    add_eval_arguments(p)
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT")
    add_run_options(p, progress="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from aligncodec.tools.experiments import baseline as BL
    from aligncodec.tools.cli import EXIT_USAGE, CLIError

    if args.tokens < 1:
        raise CLIError("--tokens must be positive", EXIT_USAGE)
    try:
        res = BL.run_baseline(args.model, args.method, args.bits, group=args.group, step_rule=args.step_rule,
                              act_order=args.act_order, seed=args.seed, outdir=args.outdir,
                              sym={'auto': None, 'asym': False, 'sym': True}[args.grid],
                              evaluate=args.eval, n_tokens=args.tokens, kld_topk=args.kld_topk,
                              threads=args.threads, progress=not args.no_progress,
                              log=lambda s: print(s, file=sys.stderr))
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from exc
    print(BL.format_summary(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
