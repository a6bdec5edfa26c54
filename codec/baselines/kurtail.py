"""KurTail-style learned rotations, weight-only (methods ``kurtail-gptq``, ``kurtail-rtn`` and ``-ec``
variants; after Akhondzadeh et al., 2025, "KurTail: kurtosis-based LLM quantization").

KurTail learns rotations that minimise the kurtosis (tailedness) of what is quantised, instead
of the model's loss: cheap, no backpropagation through the model. Weight-only here, so the
objective is the kurtosis of the *coded weight rows* (each row is one group of the per-row
grid): k(r) = mean(r⁴) / mean(r²)² (uncentred; Gaussian 3, uniform 1.8), averaged over rows.

Rotation sites and what they cost (the same structure as SpinQuant, ``codec/transforms/folding.py``):

1. norm gains: left in the norms by default (``fold_norms=False``). R1 is applied by the decoder
   (Ŵ = Q(W R1) R1ᵀ), so nothing requires folding them, and folding hurts: on SmolLM2 at 3 bits
   (GPTQ, 8,192 tokens) kurtail-gptq scores perplexity 38.97 / KLD 0.546 with the gains folded
   into q/k/v and gate/up and 35.50 / 0.455 without (the gains rescale the coded columns, which
   a per-row grid, and even more an entropy-coded shared step, cannot follow);
2. R2, per layer, head_dim × head_dim, between v_proj and o_proj — folded, free. Learned
   layer by layer (``steps_r2`` Adam steps) on the kurtosis of the rows of R2ᵀ W_v H1 and of
   H1ᵀ W_o blockdiag(R2), starting from a seeded randomized Hadamard;
3. R1 = H1 · cayley(A1), the residual-stream rotation (d × d), learned (``steps_r1`` Adam steps)
   on the kurtosis of the coded rows of every q/k/v/gate/up (W R1, rows sampled) and of
   o/down (R1ᵀ W, row entries sampled); applied by the decoder, its fp16 Cayley generator
   counted as side information (d(d−1)/2 · 16 bits; 0.025 bpw on SmolLM2);
4. a seeded randomized Hadamard on down_proj's input (32 bits per tensor), as QuaRot/SpinQuant.

Then the method's quantiser (GPTQ per row, or RTN per row) runs in the coded basis.
"""

from __future__ import annotations

import time

import torch

from aligncodec.codec.transforms import folding as F
from aligncodec.codec.transforms import hadamard as Hd

__all__ = ["row_kurtosis", "learn_r2", "learn_r1", "kurtail_rotations", "transform_model"]

STEPS_R1 = 200
STEPS_R2 = 100
FOLD_NORMS = False  # see the module doc, item 1
LR = 2e-3


def row_kurtosis(X: torch.Tensor) -> torch.Tensor:
    """Uncentred kurtosis of each row: mean(x⁴) / mean(x²)²."""
    m2 = X.pow(2).mean(-1)
    return X.pow(4).mean(-1) / m2.pow(2).clamp_min(1e-30)


def _rot(H: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    return H @ F.cayley(F.skew_from_params(P))


def learn_r2(Wv_H1: torch.Tensor, H1t_Wo: torch.Tensor, blk, H2: torch.Tensor, steps: int = STEPS_R2,
             lr: float = LR) -> torch.Tensor:
    """Per-head rotation R2 = H2 · cayley(A) minimising the mean row kurtosis of the coded v rows
    (R2ᵀ per KV block of W_v H1) and o rows (H1ᵀ W_o blockdiag(R2))."""
    hd = blk.head_dim
    Wv = Wv_H1.double().reshape(blk.n_kv, hd, -1)
    Wo = H1t_Wo.double().reshape(H1t_Wo.shape[0], blk.n_heads, hd)
    P = torch.zeros(hd, hd, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([P], lr=lr)
    for _ in range(steps):
        R2 = _rot(H2, P)
        v = torch.einsum("dk,hdi->hki", R2, Wv).reshape(-1, Wv.shape[-1])
        o = (Wo @ R2).reshape(Wo.shape[0], -1)
        loss = row_kurtosis(v).mean() + row_kurtosis(o).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _rot(H2, P).detach()


def learn_r1(col_rows: torch.Tensor, row_mats: list[torch.Tensor], H1: torch.Tensor, steps: int = STEPS_R1,
             lr: float = LR, batch_rows: int = 2048, batch_layers: int = 4, batch_cols: int = 512,
             seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Cayley generator A1 (R1 = H1 · cayley(A1)) minimising the mean row kurtosis of the coded rows:
    ``col_rows`` (stacked rows of every weight reading the stream, coded as r R1) and, per matrix M of
    ``row_mats`` (o/down, d × n), the rows of R1ᵀ M (their entries sampled, ``batch_cols``).
    Returns (A1, loss history)."""
    g = torch.Generator().manual_seed(seed)
    CH = (col_rows.double() @ H1).float()  # rows already rotated by H1; R1 = H1 C  ->  r R1 = (r H1) C
    HM = [(H1.T @ M.double()).float() for M in row_mats]  # R1ᵀ M = Cᵀ (H1ᵀ M)
    d = H1.shape[0]
    P = torch.zeros(d, d, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([P], lr=lr)
    hist = []
    for _ in range(steps):
        C = F.cayley(F.skew_from_params(P))
        idx = torch.randint(0, CH.shape[0], (batch_rows,), generator=g)
        loss = row_kurtosis(CH[idx] @ C).mean()
        if HM:
            mats = torch.randperm(len(HM), generator=g)[:batch_layers].tolist()
            rk = []
            for m in mats:
                M = HM[m]
                cols = torch.randperm(M.shape[1], generator=g)[:batch_cols]
                rk.append(row_kurtosis(C.T @ M[:, cols]).mean())
            loss = loss + torch.stack(rk).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(float(loss.detach()))
    return P.detach().double().triu(1) - P.detach().double().triu(1).T, hist


def kurtail_rotations(model, seed: int = 0, steps_r1: int = STEPS_R1, steps_r2: int = STEPS_R2,
                      lr: float = LR, log=None, fold_norms: bool = FOLD_NORMS) -> tuple[F.Rotations, dict, dict]:
    """Fold the norm gains in place (unless ``fold_norms`` is false: R1 is decoder-applied, so the
    gains may stay in the norms) and learn (R2 per layer, then R1); returns (rotations, gains, info)."""
    t0 = time.time()
    blocks = F.llama_blocks(model)
    gains = F.fold_norm_gains(blocks) if fold_norms else {}
    d = model.config.hidden_size
    r1_seed = Hd.tensor_seed(seed, "R1")
    H1 = F.seeded_hadamard(d, r1_seed)
    down_seed = Hd.tensor_seed(seed, "down_proj")
    H4 = F.seeded_hadamard(blocks[0].down.weight.shape[1], down_seed)
    R2s = []
    for b in blocks:
        H2 = F.seeded_hadamard(b.head_dim, Hd.tensor_seed(seed, b.prefix + "R2"))
        R2s.append(learn_r2(b.v.weight.detach().double() @ H1, H1.T @ b.o.weight.detach().double(), b, H2,
                            steps_r2, lr))
    t_r2 = time.time() - t0
    with torch.no_grad():
        cols, mats = [], []
        for b, R2 in zip(blocks, R2s):
            Wv = torch.einsum("dk,hdi->hki", R2, b.v.weight.double().reshape(b.n_kv, b.head_dim, -1)).reshape(
                -1, d)
            cols += [b.q.weight.double(), b.k.weight.double(), Wv, b.gate.weight.double(), b.up.weight.double()]
            mats += [b.o.weight.double() @ F.blockdiag(R2, b.n_heads), b.down.weight.double() @ H4]
        col_rows = torch.cat(cols).float()
    A1, hist = learn_r1(col_rows, mats, H1, steps_r1, lr, seed=seed)
    del col_rows
    rot = F.Rotations(r1_seed, A1, R2s, down_seed)
    info = {"transform": "kurtail", "steps_r1": steps_r1, "steps_r2": steps_r2, "lr": lr, "fold_norms": fold_norms,
            "r1_loss_first_last": [hist[0], hist[-1]] if hist else None, "seconds_r2": t_r2,
            "seconds": time.time() - t0}
    if log:
        log(f"  kurtail: R2 x{len(blocks)} in {t_r2:.0f} s, R1 loss {hist[0]:.3f} -> {hist[-1]:.3f} "
            f"({info['seconds']:.0f} s)")
    return rot, gains, info


def transform_model(model, sigma, *, method, bits=None, seed: int = 0, log=None, steps_r1: int = STEPS_R1,
            steps_r2: int = STEPS_R2, fold_norms: bool = FOLD_NORMS, **_) -> F.Prepared:
    """run_baseline hook: learn the rotations, fold what folds, return the coded view."""
    rot, gains, info = kurtail_rotations(model, seed=seed, steps_r1=steps_r1, steps_r2=steps_r2, log=log,
                                         fold_norms=fold_norms)
    return F.apply_rotations(model, sigma, rot, fold_norms=fold_norms, gains=gains, info=info)

