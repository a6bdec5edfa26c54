"""``aligncodec eval``: perplexity, bits per byte and KL divergence on the evaluation text.

Evaluate a causal LM on the evaluation half of the Wikipedia text: disjoint windows of 1024
positions (BOS, never scored, + 1023 tokens), float32, fixed thread count. Reports perplexity,
bits per byte (NLL / ln 2 / UTF-8 bytes of the scored tokens' text) and the mean per-token
KL(reference || model).
"""

from __future__ import annotations

import json
import sys

from aligncodec.tools.cli import MODEL_HELP, CLIError, add_command, add_eval_arguments, add_model_argument, add_run_options
from aligncodec.tools.cli.cmd_models import model_errors


def add_parser(sub) -> None:
    p = add_command(sub, "eval", description=__doc__)
    add_model_argument(p, MODEL_HELP + " or .acz archive", metavar="MODEL_OR_ARCHIVE")
    p.add_argument("--ref", default=None, metavar="MODEL_OR_DIR",
                   help="reference model for KLD: a cached model name or a model folder; 'none' to skip. Default: the "
                        "unmodified model this one derives from (an archive: the reference model its writer recorded, "
                        "metadata acz.source_model; a folder: safetensors metadata 'aligncodec.base_model' or a matching "
                        "config), none for a reference model itself; when none is found, one line on stderr says so")
    add_eval_arguments(p, tokens_help="evaluation tokens to score; 32768 for reported numbers")
    p.add_argument("--split", choices=("eval", "calib"), default="eval",
                   help="text half to score (default eval; calib only for diagnostics)")
    add_run_options(p, threads="torch threads (default 2; fixed for determinism)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from aligncodec.tools.eval import evaluate as E
    from aligncodec.tools.eval import models as M

    with model_errors():
        model, tok = E.load_model_for_eval(args.model)
        if args.ref is None:
            ref_name, why = E.find_reference(args.model)
            if ref_name is None and why:
                print(f"note: no KLD reference for {args.model}: {why}; --ref MODEL_OR_DIR names one", file=sys.stderr)
        else:
            ref_name = None if args.ref.lower() == "none" else args.ref
        ref = None
        if ref_name is not None:
            if args.kld_topk > 0:
                ref = E.reference_stats(ref_name, args.tokens, args.split, args.kld_topk,
                                        threads=args.threads, progress=not args.no_progress)
            else:
                ref, _ = M.load_causal_lm(ref_name)
        try:
            res = E.evaluate(model, tok, n_tokens=args.tokens, ref_model=ref, split=args.split,
                             threads=args.threads, progress=not args.no_progress, label=str(args.model))
        except E.EvalError as exc:
            raise CLIError(str(exc)) from exc
    res["ref"] = ref_name
    res["command"] = "aligncodec " + " ".join(sys.argv[1:])
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(E.format_table(res))
    return 0
