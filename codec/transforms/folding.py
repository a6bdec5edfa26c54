"""Function-preserving folding helpers for Llama-style decoders, shared by the SmoothQuant,
KurTail and SpinQuant baselines (weight-only setting: activations stay float).

Conventions: a linear layer computes y = x Wᵀ (W: out × in, x a row vector). Every helper
here changes weights *in place* so that the model computes the same function (exactly in
real arithmetic; to float round-off in practice), or returns the second moment Σ' = E[x' x'ᵀ]
of a layer input after the change (x' = x M  ⇒  Σ' = Mᵀ Σ M).

* ``scale_inputs``: x' = x / s per input channel. The layer keeps its function with
  W' = W diag(s); the preceding operation must produce x / s (an RMSNorm gain g → g / s,
  or the rows of the producing linear divided by s: v_proj for o_proj, per KV head;
  up_proj for down_proj, since down's input is act(gate) ⊙ up).
* ``fold_norm_gains``: RMSNorm(x) ⊙ g followed by W equals RMSNorm(x) followed by W diag(g);
  the gain is set to 1 (q/k/v after input_layernorm, gate/up after post_attention_layernorm).
  The final norm (before a tied lm_head) is left alone.
* ``rotate_v_o``: per-head rotation R2 (head_dim × head_dim) between v_proj and o_proj:
  attention is linear in V per head, so v' = v R2 per KV head (W_v rows: R2ᵀ W_v per block)
  and o's input per head is a R2, undone by W_o' = W_o blockdiag(R2). Exact for GQA (one R2
  shared by all heads, as SpinQuant's R2 is per layer). RoPE does not touch V.
* ``cayley``: R = (I − A)(I + A)⁻¹ for skew-symmetric A, an orthogonal matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = [
    "LlamaBlock",
    "llama_blocks",
    "scale_inputs",
    "fold_norm_gains",
    "rotate_v_o",
    "scale_sigma",
    "rotate_sigma",
    "blockdiag",
    "cayley",
    "skew_from_params",
    "Prepared",
    "map_sigma",
]


@dataclass
class LlamaBlock:
    """One decoder layer's modules and names (prefix: 'model.layers.i.')."""

    prefix: str
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    gate: torch.nn.Linear
    up: torch.nn.Linear
    down: torch.nn.Linear
    ln1: torch.nn.Module
    ln2: torch.nn.Module
    n_heads: int
    n_kv: int
    head_dim: int

    def name(self, part: str) -> str:
        sub = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}[part]
        return f"{self.prefix}{sub}.weight"


def llama_blocks(model) -> list[LlamaBlock]:
    """The decoder layers of a Llama-architecture HF model (SmolLM2 is one); a clear error otherwise."""
    cfg = model.config
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or getattr(cfg, "model_type", "") not in ("llama",):
        raise ValueError(f"folding supports Llama-architecture models only (got model_type="
                         f"{getattr(cfg, 'model_type', None)!r})")
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("folding: linear biases are not supported")
    out = []
    for i, L in enumerate(layers):
        a, m = L.self_attn, L.mlp
        out.append(LlamaBlock(f"model.layers.{i}.", a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                              m.down_proj, L.input_layernorm, L.post_attention_layernorm, n_heads, n_kv, hd))
    return out


@torch.no_grad()
def scale_inputs(linears, s: torch.Tensor) -> None:
    """W ← W diag(s) for every linear (their input must be divided by s elsewhere)."""
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * s.double()[None, :]).to(lin.weight.dtype))


@torch.no_grad()
def divide_norm(norm, s: torch.Tensor) -> None:
    norm.weight.copy_((norm.weight.double() / s.double()).to(norm.weight.dtype))


@torch.no_grad()
def divide_rows(lin, s: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() / s.double()[:, None]).to(lin.weight.dtype))


def kv_expand(t: torch.Tensor, blk: LlamaBlock) -> torch.Tensor:
    """A per-KV-channel vector (n_kv·hd) expanded to o_proj's input (n_heads·hd): head h reads KV head
    h // (n_heads / n_kv) (transformers' repeat_kv order)."""
    g = blk.n_heads // blk.n_kv
    return t.reshape(blk.n_kv, 1, blk.head_dim).expand(blk.n_kv, g, blk.head_dim).reshape(-1)


@torch.no_grad()
def fold_norm_gains(blocks: list[LlamaBlock]) -> dict[str, torch.Tensor]:
    """Fold each RMSNorm gain into the linears that read it; gains become 1. Returns the gains
    {norm-site first weight name: g} (needed to transform Σ)."""
    gains = {}
    for b in blocks:
        for norm, lins, key in ((b.ln1, (b.q, b.k, b.v), b.name("q")), (b.ln2, (b.gate, b.up), b.name("gate"))):
            g = norm.weight.detach().double().clone()
            scale_inputs(lins, g)
            norm.weight.fill_(1.0)
            gains[key] = g
    return gains


def blockdiag(R: torch.Tensor, n: int) -> torch.Tensor:
    return torch.block_diag(*([R] * n))


@torch.no_grad()
def rotate_v_o(blk: LlamaBlock, R2: torch.Tensor) -> None:
    """Fold a per-head rotation R2 between v_proj and o_proj (see the module doc)."""
    R2 = R2.double()
    Wv = blk.v.weight.double().reshape(blk.n_kv, blk.head_dim, -1)
    Wv = torch.einsum("dk,hdi->hki", R2, Wv).reshape(blk.n_kv * blk.head_dim, -1)  # R2ᵀ W_v per block
    blk.v.weight.copy_(Wv.to(blk.v.weight.dtype))
    Wo = blk.o.weight.double() @ blockdiag(R2, blk.n_heads)
    blk.o.weight.copy_(Wo.to(blk.o.weight.dtype))


def scale_sigma(S: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ of x / s: diag(1/s) Σ diag(1/s)."""
    inv = 1.0 / s.double()
    return S.double() * inv[:, None] * inv[None, :]


def rotate_sigma(S: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Σ of x R: Rᵀ Σ R (symmetrised)."""
    R = R.double()
    out = R.T @ S.double() @ R
    return (out + out.T) / 2


def map_sigma(sigma: dict[str, torch.Tensor], fn: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
    """Apply fn(first name, Σ) once per distinct Σ object, keeping names that shared one sharing one."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for n, S in sigma.items():
        if id(S) not in done:
            done[id(S)] = fn(n, S)
        out[n] = done[id(S)]
    return out


def skew_from_params(P: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric A from a square parameter: strictly upper triangle minus its transpose."""
    U = torch.triu(P, diagonal=1)
    return U - U.T


def cayley(A: torch.Tensor) -> torch.Tensor:
    """R = (I − A)(I + A)⁻¹, orthogonal for skew-symmetric A (A = 0 gives I)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye + A, eye - A, left=False)


@dataclass
class Prepared:
    """A whole-model transform applied before quantisation (the hook of run_baseline).

    The model has been changed in place (function-preserving). ``coded(name, W)`` maps the
    model's weight to the coded basis the quantiser sees; ``sigma`` is Σ of the coded inputs,
    keyed by weight name, one object per group of names reading the same input.
    ``install(name, W_hat)`` maps a coded reconstruction back to the tensor the model holds.
    ``side_bits``: side information not folded anywhere (e.g. a learned rotation's generator),
    charged once for the model. ``info``: JSON-able description (parameters, times)."""

    sigma: dict[str, torch.Tensor]
    coded: Callable[[str, torch.Tensor], torch.Tensor] = lambda n, W: W
    install: Callable[[str, torch.Tensor], torch.Tensor] = lambda n, W: W
    side_bits: int = 0
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- learned rotations

GEN_BITS = 16  # bits per entry of a learned rotation's Cayley generator (fp16, strictly upper triangle)


def gen_bits(n: int) -> int:
    """Side bits of a learned n × n rotation sent as its fp16 Cayley generator (upper triangle)."""
    return GEN_BITS * n * (n - 1) // 2


def round_generator(A: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric generator as a decoder reads it: upper triangle rounded to fp16."""
    U = torch.triu(A.detach(), diagonal=1).to(torch.float16).double()
    return U - U.T


@dataclass
class Rotations:
    """SpinQuant/KurTail rotation set for a Llama model (see ``apply_rotations``).

    R1 = H(d, r1_seed) · cayley(A1): residual-stream rotation (seeded randomized Hadamard times a
    learned Cayley factor; A1 = None means H alone). R2[i]: per-head rotation of layer i
    (head_dim × head_dim), folded into v_proj/o_proj. ``down_seed``: seeded randomized Hadamard
    on down_proj's input (None: none)."""

    r1_seed: int
    A1: torch.Tensor | None
    R2: list[torch.Tensor]
    down_seed: int | None = None

    def R1(self, d: int) -> torch.Tensor:
        from aligncodec.codec.transforms.hadamard import RandomizedHadamard

        H = RandomizedHadamard(d, self.r1_seed).matrix(torch.float64)
        return H if self.A1 is None else H @ cayley(round_generator(self.A1))

    def side_bits(self, d: int, n_down: int) -> int:
        from aligncodec.codec.transforms.hadamard import SEED_BITS

        bits = SEED_BITS + (gen_bits(d) if self.A1 is not None else 0)
        return bits + (SEED_BITS * n_down if self.down_seed is not None else 0)


def seeded_hadamard(n: int, seed: int) -> torch.Tensor:
    from aligncodec.codec.transforms.hadamard import RandomizedHadamard

    return RandomizedHadamard(n, seed).matrix(torch.float64)


def apply_rotations(model, sigma: dict[str, torch.Tensor], rot: Rotations, fold_norms: bool = True,
                    gains: dict | None = None, info: dict | None = None) -> Prepared:
    """Fold norm gains and the per-head R2 into the model in place (free, function-preserving) and
    return the coded view for the quantiser:

    * q/k/v/gate/up (read the residual stream): coded W' = W diag(g) R1, installed Ŵ' R1ᵀ;
    * o_proj (writes the stream): coded W' = R1ᵀ W_o blockdiag(R2), installed R1 Ŵ';
    * down_proj: coded W' = R1ᵀ W H4 (H4 the seeded Hadamard of ``down_seed``), installed R1 Ŵ' H4ᵀ.

    R1 is applied by the decoder (Ŵ = Q(W R1) R1ᵀ, as the Hadamard baselines do) rather than folded
    into the embedding: the tied embedding/lm_head of SmolLM2 cannot carry R1 without untying
    (a second 49152 × 576 float matrix) or an unfoldable gain, so the learned part of R1 is sent
    as side information (its fp16 Cayley generator, ``gen_bits``), counted in ``side_bits``.
    Mathematically Q(W R1) R1ᵀ is exactly SpinQuant's rotated-stream model."""
    blocks = llama_blocks(model)
    d = model.config.hidden_size
    if gains is None:
        gains = fold_norm_gains(blocks) if fold_norms else {}
    R1 = rot.R1(d)
    kinds: dict[str, tuple[str, LlamaBlock]] = {}
    for i, b in enumerate(blocks):
        rotate_v_o(b, rot.R2[i])
        for p in ("q", "k", "v", "gate", "up", "o", "down"):
            kinds[b.name(p)] = (p, b)
    n_ffn = blocks[0].down.weight.shape[1]
    H4 = seeded_hadamard(n_ffn, rot.down_seed) if rot.down_seed is not None else None

    def sig(name, S):
        if name not in kinds:
            return S
        p, b = kinds[name]
        if p in ("q", "gate"):
            g = gains.get(b.name(p))
            if g is not None:
                inv = torch.where(g == 0, torch.zeros_like(g), 1.0 / g)
                S = S.double() * inv[:, None] * inv[None, :]
            return rotate_sigma(S, R1)
        if p == "o":
            return rotate_sigma(S, blockdiag(rot.R2[int(b.prefix.split(".")[2])].double(), b.n_heads))
        if p == "down":
            return rotate_sigma(S, H4) if H4 is not None else S
        raise AssertionError(p)

    new_sigma = map_sigma(sigma, sig)

    def to_basis(name, W, back: bool):
        """The coded basis (back=False): Wᵀ-side R1 (and the down_proj Hadamard) for o/down, W R1 for the
        others; back=True is the exact inverse, applied to a reconstruction before it is installed."""
        if name not in kinds:
            return W
        p = kinds[name][0]
        W = W.double()
        if p in ("o", "down"):
            if back:
                if p == "down" and H4 is not None:
                    W = W @ H4.T
                W = R1 @ W
            else:
                W = R1.T @ W
                if p == "down" and H4 is not None:
                    W = W @ H4
        else:
            W = W @ (R1.T if back else R1)
        return W.float()

    side = rot.side_bits(d, len(blocks))
    info = {**(info or {}), "side_bits": side,
            "side_info": "R1 generator fp16 (d(d-1)/2 x 16 bits) + 32-bit seeds (R1 Hadamard, one per down_proj "
                         "Hadamard); R2 folded into v/o (free); norm gains "
                         + ("folded (free)" if gains else "left in the norms")}
    return Prepared(new_sigma, lambda n, W: to_basis(n, W, False), lambda n, W: to_basis(n, W, True), side, info)
