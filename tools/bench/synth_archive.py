"""A stand-in lossy archive at the widths of a synthetic checkpoint (tools/bench/synth_checkpoint.py),
written in seconds without an encoder run: for load-speed measurements (GPU or CPU decoder),
never for quality.

    python -m aligncodec.tools.bench.synth_archive --size 1.5b --layers 4 -o /tmp/synth-1.5b-l4.acz

Every linear layer of the checkpoint's layout (same names and shapes; the archive lists tensors by name) is a lossy tensor
in the default mode, ``tcq`` with 64 states (spec §7.6), randomized Hadamard transform, column
scales and 4 row classes, holding random symbols (Laplace, scale ``--scale``: about 3 bits per
symbol before side information at the default), in the encoder's default rANS layout. The
embeddings and lm_head are synth_checkpoint's random BF16 values coded losslessly (float-split),
the norms likewise (whatever lossless mode is smallest), as the whole-file lossy encoder leaves
them (``--lossless``: every tensor so, a lossless stand-in). The archive is a valid .acz:
every decoder gives the same bytes (the decoders do not care
that the symbols came from no real weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def write(size: str, out, *, layers: int | None = 4, seed: int = 0, scale: float = 1.3, embeddings: bool = True,
          lossless: bool = False) -> dict:
    """Write the stand-in archive; returns counts (tensors, weights, bytes). ``lossless``: every
    tensor is synth_checkpoint's random BF16 values coded float-split (a lossless stand-in)."""
    import torch

    from aligncodec.codec.modes import lossless as ll_mode, lossy
    from aligncodec.formats.writer import ArchiveWriter
    from aligncodec.tools.bench import synth_checkpoint as sc

    cfg = sc.config_dict(size, layers)
    rng = np.random.default_rng(seed)
    mid = max(lossy.TRELLIS_MACHINES)  # the encoder's default: the 64-state machine
    n_t = n_w = 0
    with ArchiveWriter(out) as w:
        for name, shape, kind in sc.tensor_specs(cfg):
            if kind in ("in", "out") and not lossless:
                rows, n = shape
                q = np.round(rng.laplace(0, scale, size=shape)).astype(np.int32)
                _, m = lossy.split_pow2(n)
                Q = np.linalg.qr(rng.standard_normal((m, m)))[0].astype(np.float32)
                hd = lossy.HadamardData(np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32), Q)
                cs = (0.5 + rng.random(n)).astype(np.float16).astype(np.float32)
                base = lossy.EcsqParams(lossy.TRANSFORM_HADAMARD, float(np.float32(0.002)), 0, lossy.FLAG_COL_SCALES, m, trellis=mid)
                params, streams = lossy.encode_symbols(q, base, cs, hd, classes=(4, 0))
                w.add(name, "BF16", shape, params.mode, streams, params.pack())
            else:
                if kind == "embed" and not embeddings:
                    continue
                t = sc.make_tensor(name, shape, kind, cfg["num_hidden_layers"], seed)
                raw = t.contiguous().view(torch.uint8).numpy()
                mode, params, streams = ll_mode.encode(raw, "BF16", t.numel(), policy="float-split")
                w.add(name, "BF16", shape, mode, streams, params)
            n_t += 1
            n_w += int(np.prod(shape))
    return {"tensors": n_t, "weights": n_w, "bytes": Path(out).stat().st_size}


def main(argv=None) -> int:
    from aligncodec.tools.bench import synth_checkpoint as sc

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", required=True, choices=sorted(sc.SIZES))
    ap.add_argument("--layers", type=int, default=4, help="decoder blocks (the size's widths)")
    ap.add_argument("--no-embeddings", action="store_true", help="leave out embed_tokens and lm_head")
    ap.add_argument("--scale", type=float, default=1.3, help="Laplace scale of the random symbols")
    ap.add_argument("--lossless", action="store_true", help="every tensor synth_checkpoint's random BF16 values, float-split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    r = write(args.size, args.output, layers=args.layers, seed=args.seed, scale=args.scale, embeddings=not args.no_embeddings,
              lossless=args.lossless)
    print(f"{args.output}: {r['tensors']} tensors, {r['weights'] / 1e6:.1f} M weights, {r['bytes'] / 2**20:.1f} MiB, "
          f"{8 * r['bytes'] / r['weights']:.2f} bits/weight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
