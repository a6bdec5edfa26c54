"""``aligncodec stats``: per-tensor diagnostics as is / rotated / aligned (see tools/eval/stats.py).

For every 2-D weight tensor: kurtosis, crest factor (max|w|/std), effective rank, top-k energy
ratio (k = 1 % and 10 % of the input coordinates) and the empirical entropy of uniformly quantised
symbols at a common relative step, measured as is, after a randomized Hadamard rotation of the input
dimension, in the SVD basis of W (aligned) and in the SVD basis of W Σ^½ (aligned_act, Σ from
calibration). Prints the summary by layer type.
"""

from __future__ import annotations

import json
from pathlib import Path

from aligncodec.tools.cli import add_command, add_model_argument, add_run_options


def add_parser(sub) -> None:
    p = add_command(sub, "stats", description=__doc__)
    add_model_argument(p)
    p.add_argument("--json", metavar="OUT", help="write the full per-tensor result as JSON to OUT")
    p.add_argument("--png", metavar="OUT", help="write a figure of the layer-type summary to OUT (PNG)")
    p.add_argument("--markdown", action="store_true", help="print the summary as a markdown table")
    p.add_argument("--step", type=float, default=0.5, metavar="R",
                   help="quantiser step for the entropy, relative to each representation's rms (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="global seed of the Hadamard rotations (default 0)")
    p.add_argument("--no-sigma", action="store_true",
                   help="skip the activation-aware basis (no calibration needed)")
    p.add_argument("--only", metavar="REGEX", help="measure only the tensors whose name matches REGEX")
    add_run_options(p, threads=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from aligncodec.tools.eval import stats as S
    from aligncodec.tools.cli import EXIT_USAGE, CLIError

    if not args.step > 0:
        raise CLIError("--step must be positive", EXIT_USAGE)
    res = S.model_stats(args.model, use_sigma=not args.no_sigma, seed=args.seed, step=args.step,
                        progress=not args.no_progress, only=args.only)
    if not res["tensors"]:
        raise CLIError("no 2-D weight tensor matched", EXIT_USAGE)
    print(S.format_table(res, markdown=args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    if args.png:
        S.plot(res, args.png)
        print(f"wrote {args.png}")
    return 0
