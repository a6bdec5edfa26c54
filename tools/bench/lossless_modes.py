"""Archive bytes of a model's tensors under each lossless policy (codec/modes/lossless.py), cast to
one dtype: which mode each policy picks, the bytes and bits per weight, and the encode time.

    python -m aligncodec.tools.bench.lossless_modes [--model smollm2] [--dtype F16|BF16|F32] [--json OUT]

Bytes are the tensors' streams with their headers and padding plus a fixed per-entry estimate
(64 bytes + name + params); the archive's preamble and metadata, the same for every policy, are
left out. Encoding runs in this process, one tensor at a time.
"""

from __future__ import annotations

import argparse
import sys
import time


def measure(model: str = "smollm2", dtype: str = "F16", policies=("auto", "bytegroup", "float-split")) -> dict:
    import torch
    from safetensors import safe_open

    from aligncodec.codec.modes import lossless
    from aligncodec.codec.torch_interop import TORCH_DTYPES, tensor_bytes
    from aligncodec.formats.constants import MODE_NAMES
    from aligncodec.tools.eval.models import resolve_model

    tdt = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    src = resolve_model(model)
    files = sorted((src if src.is_dir() else src.parent).glob("*.safetensors"))
    res = {p: {"bytes": 0, "encode_s": 0.0, "modes": {}} for p in policies}
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if t.is_floating_point():
                    t = t.to(tdt)
                t = t.contiguous()
                dt = {str(getattr(torch, v)): k for k, v in TORCH_DTYPES.items()}[str(t.dtype)]
                raw = tensor_bytes(t).tobytes()
                n += t.numel()
                for p in policies:
                    t0 = time.perf_counter()
                    mode, params, streams = lossless.encode(raw, dt, t.numel(), policy=p)
                    r = res[p]
                    r["encode_s"] += time.perf_counter() - t0
                    r["bytes"] += lossless._streams_size(streams) + 64 + len(name.encode()) + len(params)
                    r["modes"][MODE_NAMES[mode]] = r["modes"].get(MODE_NAMES[mode], 0) + 1
    for r in res.values():
        r["bits_per_weight"] = 8 * r["bytes"] / n
    ref = res.get("float-split")
    if ref:
        for r in res.values():
            r["x_float_split"] = r["bytes"] / ref["bytes"]
    return {"model": model, "dtype": dtype, "weights": n, "policies": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="F16", choices=("F16", "BF16", "F32"))
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args(argv)
    res = measure(a.model, a.dtype)
    print(f"{a.model} as {a.dtype}: {res['weights']:,} weights")
    print(f"{'policy':12s} {'MB':>9s} {'bpw':>8s} {'x float-split':>13s} {'encode s':>9s}  modes")
    for p, r in res["policies"].items():
        print(f"{p:12s} {r['bytes'] / 1e6:9.2f} {r['bits_per_weight']:8.4f} {r.get('x_float_split', float('nan')):13.4f} {r['encode_s']:9.1f}  {r['modes']}")
    if a.json:
        from aligncodec.tools.bench.bench import write_json

        write_json(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
