"""``aligncodec calibrate``: capture each linear layer's input second moment Σ = E[x xᵀ].

Run the model over N tokens of the calibration half of the text (windows of 1024 positions,
BOS + 1023 tokens) and store, for every nn.Linear, Σ = E[x xᵀ] of its input in float64, in a
safetensors file under $ALIGNCODEC_HOME/sigma/ keyed to the model's weights (spec/SIGMA.md gives
the layout). Reuses the cached file when it matches the model and text.
"""

from __future__ import annotations

import json

from aligncodec.tools.cli import add_command, add_model_argument, add_run_options
from aligncodec.tools.cli.cmd_models import model_errors
from aligncodec.tools.eval.text import DEFAULT_CALIB_TOKENS


def add_parser(sub) -> None:
    p = add_command(sub, "calibrate", description=__doc__)
    add_model_argument(p)
    p.add_argument("--tokens", type=int, default=DEFAULT_CALIB_TOKENS, metavar="N", help=f"calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    p.add_argument("--force", action="store_true", help="recompute even if a matching file is cached")
    p.add_argument("--json", action="store_true", help="print the file's path and metadata as JSON")
    add_run_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aligncodec.tools.eval import calibrate as C

    with model_errors():
        path = C.calibrate(args.model, args.tokens, threads=args.threads, progress=not args.no_progress,
                           force=args.force)
        sigma, meta = C.read_sigma_file(path)
    stored = len(sigma) - len(json.loads(meta["aliases"]))
    if args.json:
        meta = {k: v for k, v in meta.items() if k not in ("linears", "aliases")}
        print(json.dumps({"path": str(path), "linears": len(sigma), "stored": stored, **meta}, indent=2))
    else:
        print(path)
        print(f"{len(sigma)} linears ({stored} distinct inputs stored), {meta['n_tokens']} tokens, "
              f"{meta['n_positions']} positions, model {meta['model']}")
    return 0
