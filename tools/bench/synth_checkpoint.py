"""Synthetic Llama-architecture checkpoints of a chosen size, for memory and time
measurements of the encoder (never for quality: the weights are random).

    python -m aligncodec.tools.bench.synth_checkpoint --size 0.5b -o /tmp/synth-0.5b
    python -m aligncodec.tools.bench.synth_checkpoint --size 3b -o /tmp/synth-3b --shard-gb 1
    python -m aligncodec.tools.bench.synth_checkpoint --size 3b --layers 2 -o /tmp/synth-3b-l2   # 3B widths, 2 blocks

Writes a Hugging Face folder: ``config.json`` (LlamaConfig), BF16 safetensors shards of at
most ``--shard-gb`` with ``model.safetensors.index.json``, and the tokenizer of the cached
SmolLM2 reference model (vocabulary 49,152; ``aligncodec models fetch smollm2``), so that the
encoder's calibration pass runs as on a real model. Never commit the output.

Shapes (SmolLM2-family widths, Llama layout, untied embeddings, grouped KV heads):

    size   hidden  inter  layers  heads/kv  parameters
    135m   576     1536   30      9/3       ≈ 0.16 B (SmolLM2-135M widths, embeddings untied)
    0.5b   1280    3584   20      20/5      ≈ 0.52 B
    1.5b   2048    8192   24      32/8      ≈ 1.71 B (SmolLM2-1.7B widths)
    3b     2560    8192   32      32/8      ≈ 3.02 B

Per-layer scales follow what trained Llama checkpoints show: entries drawn from a Student-t
(ν = 5, heavy tails) with standard deviation 1/√fan_in for q, k, v, gate and up; o_proj and
down_proj smaller by 1/√(2·layers) (residual-branch scaling); a log-normal scale per input
column (σ = 0.35: a few outlier channels); embeddings and lm_head with std 0.02; RMSNorm
gains 1 + N(0, 0.1²) (input norms) and 1 + N(0, 0.05²). The generator holds one shard at a
time. Each tensor's values depend only on (seed, tensor name), not on the shard split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

SIZES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "0.5b": dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=20, num_attention_heads=20, num_key_value_heads=5),
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=8),
    "3b": dict(hidden_size=2560, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
}
VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def config_dict(size: str, layers: int | None = None) -> dict:
    """The size's LlamaConfig; ``layers``: only the first ``layers`` decoder blocks (the same
    widths, vocabulary and per-layer scales: memory per block and of the embeddings is the full
    size's, the depth is not)."""
    s = dict(SIZES[size])
    if layers is not None:
        if layers < 1:
            raise SystemExit("--layers must be at least 1")
        s["num_hidden_layers"] = layers
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_act": "silu",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
            "head_dim": s["hidden_size"] // s["num_attention_heads"], **s}


def tensor_specs(cfg: dict):
    """(name, shape, kind) in checkpoint order."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (VOCAB, h), "embed"
    for l in range(L):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (h,), "norm_in"
        yield p + "self_attn.q_proj.weight", (q, h), "in"
        yield p + "self_attn.k_proj.weight", (kv, h), "in"
        yield p + "self_attn.v_proj.weight", (kv, h), "in"
        yield p + "self_attn.o_proj.weight", (h, q), "out"
        yield p + "post_attention_layernorm.weight", (h,), "norm"
        yield p + "mlp.gate_proj.weight", (i, h), "in"
        yield p + "mlp.up_proj.weight", (i, h), "in"
        yield p + "mlp.down_proj.weight", (h, i), "out"
    yield "model.norm.weight", (h,), "norm"
    yield "lm_head.weight", (VOCAB, h), "embed"


def make_tensor(name: str, shape: tuple[int, ...], kind: str, n_layers: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1)
    if kind.startswith("norm"):
        sd = 0.1 if kind == "norm_in" else 0.05
        return (1 + sd * torch.randn(shape, generator=g)).to(torch.bfloat16)
    rows, cols = shape
    std = 0.02 if kind == "embed" else cols ** -0.5 * (1 if kind == "in" else (2 * n_layers) ** -0.5)
    out = torch.empty(shape, dtype=torch.bfloat16)
    col = torch.exp(0.35 * torch.randn(cols, generator=g)) if kind != "embed" else torch.ones(cols)
    col = col / col.pow(2).mean().sqrt()
    nu = 5.0
    chunk = max(1, (1 << 22) // cols)
    for a in range(0, rows, chunk):
        b = min(rows, a + chunk)
        z = torch.randn(b - a, cols, generator=g)
        # Student-t via normal / sqrt(chi2/ν), with the chi2 drawn from the same generator
        c2 = torch.randn(b - a, cols, int(nu), generator=g).pow(2).sum(-1)
        t = z / (c2 / nu).sqrt() * ((nu - 2) / nu) ** 0.5  # unit variance
        out[a:b] = (t * col * std).to(torch.bfloat16)
    return out


def generate(size: str, out: str | os.PathLike, *, seed: int = 0, shard_gb: float = 1.0, tokenizer_dir=None,
             progress: bool = True, layers: int | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if size not in SIZES:
        raise SystemExit(f"size must be one of {', '.join(SIZES)}")
    cfg = config_dict(size, layers)
    full_depth = SIZES[size]["num_hidden_layers"]  # residual-branch scales of the full model
    tok = Path(tokenizer_dir) if tokenizer_dir else None
    if tok is None:
        from aligncodec.tools.eval.models import model_dir

        tok = model_dir("smollm2")
    if not (tok / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer.json in {tok}: run `aligncodec models fetch smollm2` or give --tokenizer DIR")
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    specs = list(tensor_specs(cfg))
    limit = int(shard_gb * (1 << 30))
    shards: list[list] = [[]]
    size_now = 0
    for nm, shape, kind in specs:
        nb = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        if shards[-1] and size_now + nb > limit:
            shards.append([])
            size_now = 0
        shards[-1].append((nm, shape, kind))
        size_now += nb
    wm = {}
    total = 0
    for si, group in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        sd = {nm: make_tensor(nm, shape, kind, full_depth, seed) for nm, shape, kind in group}
        save_file(sd, str(tmp / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in sd.values())
        for nm in sd:
            wm[nm] = fname
        del sd
        if progress:
            print(f"{fname}: {len(group)} tensors", file=sys.stderr)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in TOKENIZER_FILES:
        if (tok / f).is_file():
            shutil.copy(tok / f, tmp / f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def n_params(size: str, layers: int | None = None) -> int:
    n = 0
    for _nm, shape, _k in tensor_specs(config_dict(size, layers)):
        p = 1
        for d in shape:
            p *= d
        n += p
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", required=True, choices=sorted(SIZES))
    ap.add_argument("-o", "--output", required=True, help="folder to write (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--tokenizer", help="folder with tokenizer.json (default: the cached SmolLM2)")
    ap.add_argument("--layers", type=int, help="only the first N decoder blocks (same widths and scales): "
                    "a shallow stand-in for the memory of a model too slow to encode in full")
    a = ap.parse_args(argv)
    p = generate(a.size, a.output, seed=a.seed, shard_gb=a.shard_gb, tokenizer_dir=a.tokenizer, layers=a.layers)
    print(f"{p}: {n_params(a.size, a.layers):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
