"""Tiny random checkpoints of several causal-LM architectures (no download: Transformers
ships the config classes). Used by the block-sequential encoder tests."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_config(arch: str, tied: bool = True):
    import transformers as T

    if arch == "llama":
        return T.LlamaConfig(**COMMON, tie_word_embeddings=tied)
    if arch == "qwen2":
        return T.Qwen2Config(**COMMON, tie_word_embeddings=tied)  # q/k/v biases
    if arch == "mistral":
        return T.MistralConfig(**COMMON, tie_word_embeddings=tied, sliding_window=16)
    if arch == "phi3":
        return T.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, tie_word_embeddings=tied)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**COMMON, head_dim=16, tie_word_embeddings=tied, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"])
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "mistral", "phi3", "gemma3")


def make_checkpoint(folder: Path, arch: str = "llama", tied: bool = True, dtype=torch.bfloat16, seed: int = 0,
                    max_shard_size: str | None = None) -> Path:
    """Save a randomly initialised tiny model (weights scaled to realistic magnitudes) into
    ``folder`` (config.json + safetensors), optionally sharded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_config(arch, tied)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
            elif "bias" in n:
                p.normal_(0, 0.05)
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kw)
    return Path(folder)


class ToyTokenizer:
    """A byte-level tokenizer good enough for the encoder's calibration (ids < vocab)."""

    bos_token_id = 1
    eos_token_id = 2
    name_or_path = "toy"

    def __init__(self, vocab: int = 96):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False, verbose=False):
        b = text.encode("utf-8")
        ids = [3 + (c % (self.vocab - 3)) for c in b]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(ids))]
        return out
