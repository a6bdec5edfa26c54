"""compress, decompress, inspect and verify sub-commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from aligncodec import archive
from aligncodec.tools.eval.text import STREAM_CALIB_TOKENS
from aligncodec.tools.cli import EXIT_DEPENDENCY, EXIT_IO, EXIT_USAGE, CLIError, add_command, add_quantizer_arguments, trellis_arg


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def cmd_compress(args: argparse.Namespace) -> int:
    from aligncodec.codec.modes import lossless

    with lossless.use_policy(getattr(args, "lossless_mode", None)):  # every tensor coded bit-exactly
        return _compress(args)


# --tune-norms's options: (flag, argparse attribute, TuneOptions field)
TUNE_FLAGS = (("--tune-steps", "tune_steps", "steps"), ("--tune-tokens", "tune_tokens", "tokens"),
              ("--tune-minutes", "tune_minutes", "minutes"), ("--tune-val-tokens", "tune_val_tokens", "val_tokens"))


def _compress(args: argparse.Namespace) -> int:
    lossy_target = args.bpw is not None or args.distortion is not None
    if args.lossless == lossy_target:
        raise CLIError("give exactly one of --lossless, --bpw B or --distortion D", EXIT_USAGE)
    if os.path.exists(args.output) and not args.force:
        raise CLIError(f"{args.output} exists (use --force to overwrite)", EXIT_IO)
    tune_given = [flag for flag, attr, _ in TUNE_FLAGS if getattr(args, attr) is not None]
    if tune_given and not args.tune_norms:
        raise CLIError(f"{', '.join(tune_given)} need --tune-norms", EXIT_USAGE)
    if args.tune_norms and not lossy_target:
        raise CLIError("--tune-norms tunes a lossy archive: give --bpw or --distortion", EXIT_USAGE)
    if lossy_target:
        return _compress_lossy(args)
    if (args.threads or 0) < 0:
        raise CLIError("--threads must be >= 0", EXIT_USAGE)
    t0 = time.perf_counter()
    archive.compress(args.input, args.output, progress=not args.quiet, follow_symlinks=args.follow_symlinks,
                     threads=args.threads or None)
    dt = time.perf_counter() - t0
    info = archive.inspect(args.output)
    if not args.quiet:
        _print_table(info)
        print(f"wrote {args.output} in {dt:.1f} s ({info['raw_bytes'] / max(dt, 1e-9) / 1e6:.1f} MB/s)")
    return 0


def _compress_lossy(args: argparse.Namespace) -> int:
    """The lossy encoder (aligncodec/encode/)."""
    from aligncodec import encode as S
    from aligncodec.codec import encoder
    from aligncodec.encode import arch
    from aligncodec.encode.calibration import CalibrationError
    from aligncodec.encode.tune import TuneError, TuneOptions
    from aligncodec.tools.cli import EXIT_UNSUPPORTED

    if args.bpw is not None and args.distortion is not None:
        raise CLIError("give --bpw or --distortion, not both", EXIT_USAGE)
    encoder.check_target(args.bpw, args.distortion)  # TargetError (exit 2)
    if args.distortion is not None and args.bpw_scope is not None:
        raise CLIError("--bpw-scope is what --bpw counts; --distortion has no scope", EXIT_USAGE)
    if (args.threads or 0) < 0 or (args.workers or 0) < 0:
        raise CLIError("--threads and --workers must be >= 0", EXIT_USAGE)
    if args.calib_text and not os.path.isfile(args.calib_text):
        raise CLIError(f"--calib-text {args.calib_text}: no such file", EXIT_IO)
    # options not given on the command line keep EncodeOptions' own defaults
    given = {k: v for k, v in (("calibration", args.calibration), ("calib_tokens", args.calib_tokens),
                               ("workers", args.workers), ("threads", args.threads), ("head_step", args.head_step))
             if v is not None}
    if args.no_calibration:
        given["calibration"] = "none"
    try:
        if args.tune_norms:
            given["tune"] = TuneOptions(**{opt: getattr(args, attr) for _, attr, opt in TUNE_FLAGS if getattr(args, attr) is not None},
                                        calib_text=args.calib_text)
        opts = S.EncodeOptions(bpw=args.bpw, distortion=args.distortion, scope=args.bpw_scope or "all",
                               trellis=trellis_arg(args), candidates=tuple(args.candidates.split(",")), alpha=args.alpha,
                               seed=args.seed, calib_text=args.calib_text,
                               lossy_embeddings=True if args.lossy_embeddings else None, nonfinite=args.nonfinite, **given)
    except encoder.EncodeError:
        raise
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    try:
        summ = S.encode(args.input, args.output, opts, progress=not args.quiet, resume=bool(args.resume),
                        follow_symlinks=args.follow_symlinks)
    except encoder.EncodeError:
        raise  # NonFiniteError (3), EncodeVerifyError (8): named, exit code on the class
    except arch.UnsupportedArchitectureError as exc:
        raise CLIError(f"unsupported architecture: {exc}", EXIT_UNSUPPORTED) from None
    except archive.InputError:
        raise  # named (InputError, CheckpointError, ...), exit 3
    except (FileNotFoundError, CalibrationError) as exc:
        raise CLIError(f"{type(exc).__name__}: {exc}", EXIT_IO) from None
    except TuneError as exc:
        raise CLIError(f"--tune-norms: {exc}", EXIT_DEPENDENCY) from None
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    if not args.quiet:
        _print_table(archive.inspect(args.output))
        got = (f"mean activation-weighted relative error {summ['mean_act_rel_err']:.5g} (target {args.distortion:g}); "
               if args.distortion is not None and summ.get("mean_act_rel_err") is not None else "")
        print(f"{summ['file_bytes']:,} bytes: {summ['bpw_file']:.4f} bits per parameter over the whole file "
              f"({summ['n_params']:,} parameters), linear layers {summ['bpw_linear_all_in']:.4f} bits/weight all-in; {got}"
              f"calibration {summ['calibration']}, modes {summ['modes']}; encoded in {summ['seconds_total']:.1f} s")
        tn = summ.get("tune_norms")
        if tn:
            held = (f", held-out KL {tn['kl_val_before']:.5f} -> {tn['kl_val_after']:.5f} (values of step {tn['best_step']})"
                    if tn.get("kl_val_before") is not None else "")
            print(f"tune-norms: calibration KL {tn['kl_calib_before']:.5f} -> {tn['kl_calib_after']:.5f}{held} "
                  f"({'kept' if tn['kept'] else 'not lower: the original values were kept'}); {tn['steps']} steps on "
                  f"{tn['tokens']} tokens in {tn['seconds_total']:.1f} s")
        n_ll = len(summ.get("lossless") or {})
        if n_ll:
            print(f"{n_ll} tensor(s) chosen for lossy coding were coded lossless (reasons in the archive's acz.lossy.summary)")
    return 0


def _limits(args: argparse.Namespace):
    """The reader limits the command line asks for (formats/limits.py)."""
    from aligncodec.formats.limits import Limits

    if args.max_ratio is not None and not args.max_ratio > 0:
        raise CLIError("--max-ratio must be > 0 (inf: no limit)", 2)
    return Limits().with_(max_ratio=args.max_ratio)


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    from aligncodec.formats.limits import DEFAULT_MAX_RATIO, DEFAULT_RATIO_SLACK_BYTES

    p.add_argument("--max-ratio", type=float, default=None, metavar="R",
                   help=f"expansion limit: decoded bytes per archive byte, up to each tensor (default {DEFAULT_MAX_RATIO:g}, "
                        f"plus {DEFAULT_RATIO_SLACK_BYTES >> 20} MiB; 'inf' for none). Raise it only for archives you trust")


def _decode_threads(args: argparse.Namespace):
    """--threads T of decompress / verify: the decode pool's threads in this block (0 / none: every CPU)."""
    from aligncodec.codec import parallel

    if (args.threads or 0) < 0:
        raise CLIError("--threads must be >= 0", EXIT_USAGE)
    return parallel.threads_override(args.threads or None)


def cmd_decompress(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    with _decode_threads(args):
        paths = archive.decompress(args.archive, args.output, progress=not args.quiet, limits=_limits(args), force=args.force)
    if not args.quiet:
        for p in paths:
            print(archive.printable(str(p)))
        print(f"decoded in {time.perf_counter() - t0:.1f} s")
    return 0


def _print_table(info: dict) -> None:
    rows = [dict(r) for r in info["tensors"]]
    for r in rows:  # names come from the file: never raw escape sequences to the terminal
        r["name"] = archive.printable(r["name"])
        if isinstance(r.get("transform"), str):
            r["transform"] = archive.printable(r["transform"])
    w = max([len(r["name"]) for r in rows] + [6])
    lossy_cols = any("transform" in r for r in rows)
    extra = f" {'transform':<18} {'act err':>9}" if lossy_cols else ""
    print(f"{'tensor':<{w}}  {'shape':<16} {'dtype':<5} {'mode':<12} {'bytes':>11} {'bpw':>7}{extra}")
    for r in rows:
        bpw = f"{r['bpw']:.3f}" if r["bpw"] is not None else "-"
        ex = ""
        if lossy_cols:
            err = f"{r['act_rel_err']:.3e}" if r.get("act_rel_err") is not None else "-"
            ex = f" {r.get('transform') or '-':<18} {err:>9}"
        print(f"{r['name']:<{w}}  {'x'.join(map(str, r['shape'])) or '()':<16} {r['dtype']:<5} {r['mode']:<12} {r['bytes']:>11} {bpw:>7}{ex}")
    ratio = info["raw_bytes"] / max(1, info["file_bytes"] - info["aux_bytes"])
    bpw = f"{info['bpw']:.4f}" if info["bpw"] is not None else "-"
    print(
        f"total: {info['n_tensors']} tensors, {info['n_weights']:,} weights, {_size(info['file_bytes'])} archive "
        f"({_size(info['aux_bytes'])} auxiliary files), {bpw} bits/weight all-in, ratio {ratio:.3f}x vs raw"
    )
    if info.get("bpw_file") is not None and info.get("bpw_linear") is not None:
        print(f"bits per weight: {info['bpw_file']:.4f} over the whole file (auxiliary files included), "
              f"{info['bpw_linear']:.4f} over the lossy linear layers (all-in)")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = archive.inspect(args.archive, limits=_limits(args))
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print_table(info)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _decode_threads(args):
        res = archive.verify(args.archive, decode=not args.no_decode, progress=not args.quiet, limits=_limits(args))
    print(f"{args.archive}: OK ({res['tensors']} tensors, every checksum{'' if args.no_decode else ' and stream'} verified)")
    return 0


def add_parser(sub) -> None:
    p = add_command(sub, "compress")
    p.add_argument("input", help="a .safetensors file, or a folder of them (a Hugging Face model folder); with --bpw/--distortion also a cached model name (smollm2)")
    p.add_argument("-o", "--output", required=True, help="archive to write (.acz); written atomically")
    p.add_argument("--lossless", action="store_true", help="bit-exact coding of every tensor (bytegroup / float-split / zstd; see --lossless-mode)")
    p.add_argument("--lossless-mode", choices=("auto", "bytegroup", "float-split", "smallest"), default=None,
                   help="the modes of the tensors coded bit-exactly (all with --lossless, the unquantised ones otherwise): "
                        "auto (default) = float-split (or stored) for bf16; for fp16/fp32 bytegroup or stored, unless float-split is > 2%% smaller; "
                        "bytegroup = byte planes + zstd (ZipNN's idea; larger on bf16); float-split = exponent and top mantissa bits "
                        "rANS-coded (the smallest, decoded by native AVX2 kernels); "
                        "smallest = the fewest bytes")
    p.add_argument("--bpw", type=float, help="lossy: target bits per weight, met within 1%%: by default file bytes x 8 / every parameter "
                   "(--bpw-scope all, as llama.cpp quotes its formats); --bpw-scope linear: all-in over the lossy linear layers")
    p.add_argument("--bpw-scope", choices=("all", "linear"), default=None,
                   help="lossy: what --bpw counts: all (default: the whole file, every parameter) or linear (the lossy linear "
                        "layers all-in, embeddings lossless; the studies' definition)")
    p.add_argument("--encoder", choices=("stream",), default=None, help=argparse.SUPPRESS)  # the one encoder (before 2026-12-08 also "whole")
    p.add_argument("--calibration", choices=("quantized", "float"), default=None,
                   help="lossy: Σ of block L from the unmodified model's activations (float, default) or "
                        "from the outputs of the already encoded blocks (quantized; same KLD on SmolLM2, worse perplexity)")
    p.add_argument("--calib-text", metavar="FILE", help="lossy (and --tune-norms): calibration text (UTF-8) instead of the built-in calibration half")
    p.add_argument("--calib-tokens", type=int, default=None, help=f"lossy: calibration tokens (default {STREAM_CALIB_TOKENS})")
    p.add_argument("--workers", type=int, default=None, help="lossy: deprecated, the same as --threads")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="--lossless: coding threads (default, and 0: every CPU, or ACZ_THREADS; the archive's bytes do not "
                        "depend on it). lossy: threads of the encode (default, and 0: every core, or ACZ_THREADS); the archive "
                        "is the same bytes for every count. The work runs as whole tasks (a block's linears, the next "
                        "block's forward pass, the row chunks of a tall tensor), each library's own pool (torch, numba, "
                        "BLAS) at one thread. Pass --threads 1 where CPU seconds are compared")
    p.add_argument("--resume", action="store_true", help="lossy: continue an interrupted encode from its spool folder")
    p.add_argument("--head-step", type=float, default=None, metavar="M",
                   help="lossy: the output head's step (a tied embedding, or an untied lm_head) as a multiple "
                        "of the blocks' step; < 1 spends more of the budget on it (default: see docs/lossy-encoder.md)")
    p.add_argument("--distortion", type=float, metavar="D",
                   help="lossy: instead of --bpw, the target mean over the lossy tensors of the activation-weighted relative "
                        "error tr(dW S dW^T)/tr(W S W^T), in (0, 1); met within 10 %% (usually far closer: docs/lossy-encoder.md)")
    p.add_argument("--candidates", default="hadamard,colscale",
                   help="lossy: transforms tried per tensor, by J = D + λR (identity, hadamard, colscale, hadamard-colscale)")
    add_quantizer_arguments(p)
    p.add_argument("--alpha", type=float, default=0.25, help="lossy: column steps ∝ Σ_jj^-alpha for the colscale transforms (default 0.25)")
    p.add_argument("--lossy-embeddings", action="store_true", help="lossy: code the embeddings lossy too (default with --bpw-scope all)")
    p.add_argument("--no-calibration", action="store_true",
                   help="lossy: no calibration Σ (plain weight MSE); without it a model that cannot be calibrated is an error")
    p.add_argument("--seed", type=int, default=0, help="lossy: seed of the randomized Hadamard transforms")
    p.add_argument("--nonfinite", choices=("error", "lossless"), default="error",
                   help="lossy: a tensor holding NaN or Inf is an error (default) or is coded lossless")
    p.add_argument("--tune-norms", action="store_true",
                   help="lossy: after coding, fit the norm gains and biases (stored losslessly) to the unmodified model's "
                        "outputs on calibration text, lossy weights frozen at their decoded values (docs/lossy-encoder.md)")
    p.add_argument("--tune-steps", type=int, default=None, help="--tune-norms: optimiser steps, one window each (default 32)")
    p.add_argument("--tune-tokens", type=int, default=None, help="--tune-norms: calibration tokens (default 4096)")
    p.add_argument("--tune-minutes", type=float, default=None, help="--tune-norms: time budget of the optimisation loop (default: none)")
    p.add_argument("--tune-val-tokens", type=int, default=None,
                   help="--tune-norms: held-out calibration tokens after the training ones; the values of the best held-out "
                        "check are kept, and only if they lower the held-out KL (default 1024; 0: no hold-out)")
    p.add_argument("--follow-symlinks", action="store_true", help="read symlinks in the input folder that point outside it")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=cmd_compress)

    p = add_command(sub, "decompress")
    p.add_argument("archive")
    p.add_argument("--threads", type=int, default=None, metavar="T", help="decoding threads (default / 0: every CPU, or ACZ_THREADS)")
    p.add_argument("-o", "--output", required=True, help="output folder (created; written in a temporary folder beside it, then renamed)")
    p.add_argument("-f", "--force", action="store_true", help="write into an existing non-empty output folder (replacing the files it decodes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or file list")
    _add_limit_args(p)
    p.set_defaults(func=cmd_decompress)

    p = add_command(sub, "inspect")
    p.add_argument("archive")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_limit_args(p)
    p.set_defaults(func=cmd_inspect)

    p = add_command(sub, "verify")
    p.add_argument("archive")
    p.add_argument("--threads", type=int, default=None, metavar="T", help="decoding threads (default / 0: every CPU, or ACZ_THREADS)")
    p.add_argument("--no-decode", action="store_true", help="check checksums and structure only, do not decode")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_limit_args(p)
    p.set_defaults(func=cmd_verify)
