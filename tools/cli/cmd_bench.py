"""``aligncodec bench decode|load|lossless``: decoder throughput, model load time / peak RSS (see
tools/bench/bench.py), and lossless ratio and speed against zstd and ZipNN (tools/bench/bench_lossless.py).

decode: symbols/s and GB/s of reconstructed bf16 for the reference decoder, constriction, the numba
CPU decoders (lossless float-split and bytegroup, lossy ecsq; 1 and 2 threads) and the GPU if present. load:
load time, CPU time and peak RSS of the default model from its fp16 safetensors vs its lossless
archive (and a lossy archive with --lossy), warm and cold page cache, each in a fresh subprocess.
Prints a table; --json writes the full result."""

from __future__ import annotations

import argparse

from aligncodec.tools.cli import add_command, add_model_argument, add_run_options


def add_parser(sub) -> None:
    p = add_command(sub, "bench", description=__doc__)
    bs = p.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    d = bs.add_parser("decode", help="decoder throughput on the same symbols",
                      description="Decoder throughput on the float-split symbols of a ROWSxCOLS bf16 matrix.")
    d.add_argument("--rows", type=int, default=4096, help="matrix rows (default 4096)")
    d.add_argument("--cols", type=int, default=4096, help="matrix columns (default 4096)")
    d.add_argument("--threads", default="1,2", help="comma-separated decoder thread counts (default 1,2)")
    d.add_argument("--repeat", type=int, default=3, help="timed runs per decoder, best kept (default 3)")
    d.add_argument("--reference-symbols", type=int, default=100_000,
                   help="symbols the slow reference decoder decodes (whole chunks, default 100000)")
    d.add_argument("--chunk-symbols", type=int, default=None, help="rANS chunk size (default: the encoder's)")
    d.add_argument("--tcq-states", default="8",
                   help="comma-separated tcq state machines timed beside ecsq (default 8; e.g. 8,32,64)")
    d.add_argument("--no-gpu", action="store_true", help="skip the GPU even if one is present")
    d.add_argument("--json", metavar="OUT", help="write the result as JSON to OUT ('-' for stdout)")
    d.set_defaults(func=run)
    ld = bs.add_parser("load", help="load time and peak RSS: fp16 safetensors vs lossless (and lossy) archives",
                       description="Load the model from its fp16 safetensors, from its lossless .acz (built and "
                                   "cached under $ALIGNCODEC_HOME/bench/ on first use) and from a lossy .acz "
                                   "(--lossy; make one with 'aligncodec compress smollm2 -o s3.acz --bpw 3'), each in "
                                   "fresh subprocesses, with the file in the page cache (warm) and evicted (cold).")
    add_model_argument(ld)
    ld.add_argument("--repeat", type=int, default=3, help="fresh processes per variant, median kept (default 3)")
    ld.add_argument("--lossy", metavar="ARCHIVE", help="also load this lossy archive of the same model")
    ld.add_argument("--page-cache", choices=["warm", "cold", "both"], default="both",
                    help="warm: files cached; cold: each file evicted (posix_fadvise DONTNEED) before each run "
                         "(default both)")
    ld.add_argument("--cold", action="store_true", help="same as --page-cache cold")
    ld.add_argument("--threads", type=int, help="decoder threads in the children (default: all CPUs)")
    ld.add_argument("--workdir", metavar="DIR", help="where the fp16 folder and archive are kept")
    ld.add_argument("--only", choices=["state-dict", "hf"], help="only the state-dict or only the HF-model loads")
    ld.add_argument("--lossless-mode", choices=("auto", "bytegroup", "float-split", "smallest"), default=None,
                    help="how the lossless fp16 archive is coded (as 'compress --lossless-mode'; default auto); "
                         "each is cached under its own name")
    ld.add_argument("--json", metavar="OUT", help="write the result as JSON to OUT ('-' for stdout)")
    add_run_options(ld, threads=None, progress="no progress bar while building the archive")
    ld.set_defaults(func=run)
    from aligncodec.tools.bench import bench_lossless

    ll = bs.add_parser("lossless", help="lossless ratio and speed vs zstd 3/19 and ZipNN, in the same run",
                       description=bench_lossless.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_lossless.add_arguments(ll)
    ll.set_defaults(func=run_lossless)


def run_lossless(args) -> int:
    from aligncodec.tools.bench import bench_lossless
    from aligncodec.tools.cli import EXIT_USAGE, CLIError

    try:
        return bench_lossless.main_args(args)
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def run(args) -> int:
    import os

    from aligncodec.tools.bench import bench
    from aligncodec.tools.cli import EXIT_USAGE, CLIError

    if args.repeat < 1:
        raise CLIError("--repeat must be >= 1", EXIT_USAGE)
    if args.bench_kind == "decode":
        try:
            threads = tuple(int(x) for x in args.threads.split(",") if x.strip())
        except ValueError:
            raise CLIError(f"--threads must be comma-separated integers, not {args.threads!r}", EXIT_USAGE) from None
        if not threads or min(threads) < 1 or args.rows < 1 or args.cols < 1:
            raise CLIError("--threads, --rows and --cols must be positive", EXIT_USAGE)
        from aligncodec.codec.quant import registry as Q

        try:
            tcq_states = tuple(int(x) for x in args.tcq_states.split(",") if x.strip())
            for S in tcq_states:
                Q.trellis_id("tcq", S)
        except ValueError as exc:
            raise CLIError(f"--tcq-states {args.tcq_states!r}: {exc}", EXIT_USAGE) from None
        res = bench.bench_decode(args.rows, args.cols, threads=threads, repeat=args.repeat,
                                 reference_symbols=args.reference_symbols, chunk_symbols=args.chunk_symbols,
                                 gpu=not args.no_gpu, tcq_states=tcq_states)
    else:
        kinds = {"state-dict": ("st-sd", "acz-sd"), "hf": ("st-hf", "acz-hf"), None: ("st-sd", "acz-sd", "st-hf", "acz-hf")}[args.only]
        if args.lossy is not None and not os.path.isfile(args.lossy):
            raise CLIError(f"lossy archive {args.lossy!r} does not exist", EXIT_USAGE)
        if args.threads is not None and args.threads < 1:
            raise CLIError("--threads must be positive", EXIT_USAGE)
        caches = {"warm": ("warm",), "cold": ("cold",), "both": ("warm", "cold")}["cold" if args.cold else args.page_cache]
        res = bench.bench_load(args.model, repeat=args.repeat, workdir=args.workdir, progress=not args.no_progress,
                               kinds=kinds, lossy=args.lossy, caches=caches, threads=args.threads,
                               lossless_mode=args.lossless_mode)
    print(bench.format_table(res))
    if args.json:
        bench.write_json(res, args.json)
    return 0
