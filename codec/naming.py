"""What a weight is, from its name (Llama-style and BERT-style checkpoints): the layer
type used by the encoder's per-type weights, its metadata and the diagnostics."""

from __future__ import annotations

import re

EMBED_RE = re.compile(r"embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|\bwte\b|\bwpe\b|lm_head")
_TYPES = (("q", r"q_proj|\.query\b"), ("k", r"k_proj|\.key\b"), ("v", r"v_proj|\.value\b"),
          ("o", r"o_proj|out_proj|attention\.output\.dense"), ("gate", r"gate_proj"), ("up", r"up_proj|intermediate\.dense"),
          ("down", r"down_proj|(?<!attention\.)output\.dense"))
LAYER_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embedding", "lm_head", "other")


def is_embedding(name: str) -> bool:
    """Token/position embeddings and the output head (``lm_head``)."""
    return EMBED_RE.search(name) is not None


def layer_type(name: str, tied_lm_head: bool = True) -> str:
    """q, k, v, o, gate, up, down, embedding (the input embeddings, or a tied ``lm_head``),
    lm_head (untied) or other."""
    for t, pat in _TYPES:
        if re.search(pat, name):
            return t
    if re.search(r"lm_head", name):
        return "embedding" if tied_lm_head else "lm_head"
    return "embedding" if is_embedding(name) else "other"
