"""SpinQuant-style learned rotations, weight-only (methods ``spinquant-gptq``, ``spinquant-rtn`` and
``-ec`` variants; after Liu et al., 2024, "SpinQuant: LLM quantization with learned rotations").

Structure (shared with KurTail, ``codec/transforms/folding.apply_rotations``):

* RMSNorm gains folded into q/k/v and gate/up (free);
* R1 = H1 · cayley(A1) on the residual stream (H1 a seeded randomized Hadamard, SpinQuant's
  initialisation): the quantiser sees W R1 (readers) and R1ᵀ W (writers o/down); it is applied
  by the decoder (Ŵ = Q(W R1) R1ᵀ), which is the same function as SpinQuant's rotated-stream
  model. SmolLM2 ties lm_head to the embedding and the final RMSNorm gain sits between them, so R1
  cannot be folded into the embedding without untying (a second 49152 × 576 float matrix); the
  learned generator A1 is sent instead, fp16 upper triangle, counted (0.025 bpw on SmolLM2);
* R2 = H2 · cayley(A2) per layer (head_dim × head_dim) between v_proj and o_proj: folded, free;
* a seeded randomized Hadamard on down_proj's input (SpinQuant's R4, 32 bits per tensor).

Training (``train_rotations``): the model's loss (next-token cross-entropy) on calibration
windows of ``seqlen`` tokens, with every linear weight replaced by its straight-through
quantised coded version (per-row asymmetric min–max RTN at B bits, STE: forward Q(W), backward
identity), the stream rotated by R1 after the embedding and back before the final norm — the
rotated-stream model SpinQuant trains. Only A1 and the A2 are trained (Adam, ``steps`` steps,
one window per step); the weights are frozen. After training, GPTQ (per row) quantises the
coded weights. The learned rotations are cached (keyed by model, bits, steps, seed) by the hook.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from aligncodec.codec.transforms import folding as F
from aligncodec.codec.transforms import hadamard as Hd

__all__ = ["ste_rtn", "train_rotations", "transform_model"]

STEPS = 40
SEQLEN = 128
LR = 1e-3
STE_BITS = None  # None: the STE bit width is round(bits); an int: train at that width whatever the target


def ste_rtn(W: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row asymmetric min–max RTN with a straight-through gradient."""
    maxq = 2**bits - 1
    lo = W.detach().amin(1, keepdim=True).clamp(max=0)
    hi = W.detach().amax(1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / maxq).clamp_min(1e-8)
    z = torch.round(-lo / s)
    q = (torch.clamp(torch.round(W.detach() / s) + z, 0, maxq) - z) * s
    return W + (q - W).detach()


def train_rotations(model, windows: list[torch.Tensor], bits: int, *, seed: int = 0, steps: int = STEPS,
                    lr: float = LR, log=None) -> tuple[F.Rotations, dict, dict]:
    """Fold the norm gains in place, then learn A1 and the A2 on ``windows`` (1-D token id tensors, one
    per step, reused cyclically). Returns (rotations, gains, info)."""
    if not windows:
        raise ValueError("spinquant: no calibration windows")
    if steps < 0:
        raise ValueError(f"spinquant: steps must be >= 0, got {steps}")
    t0 = time.time()
    blocks = F.llama_blocks(model)
    gains = F.fold_norm_gains(blocks)
    d = model.config.hidden_size
    r1_seed = Hd.tensor_seed(seed, "R1")
    down_seed = Hd.tensor_seed(seed, "down_proj")
    H1 = F.seeded_hadamard(d, r1_seed).float()
    H4 = F.seeded_hadamard(blocks[0].down.weight.shape[1], down_seed).float()
    H2 = [F.seeded_hadamard(b.head_dim, Hd.tensor_seed(seed, b.prefix + "R2")).float() for b in blocks]
    hd, nh, nkv = blocks[0].head_dim, blocks[0].n_heads, blocks[0].n_kv
    with torch.no_grad():  # fixed parts: weights with H1 (readers) / H1ᵀ (writers) applied once
        base = []
        for b in blocks:
            base.append({
                "q": b.q.weight.detach().float() @ H1, "k": b.k.weight.detach().float() @ H1,
                "v": (b.v.weight.detach().float() @ H1).reshape(nkv, hd, d),
                "o": (H1.T @ b.o.weight.detach().float()).reshape(d, nh, hd),
                "gate": b.gate.weight.detach().float() @ H1, "up": b.up.weight.detach().float() @ H1,
                "down": H1.T @ b.down.weight.detach().float() @ H4,
            })
    P1 = torch.zeros(d, d, requires_grad=True)
    P2 = [torch.zeros(hd, hd, requires_grad=True) for _ in blocks]
    opt = torch.optim.Adam([P1, *P2], lr=lr)
    for p in model.parameters():
        p.requires_grad_(False)
    state = {}
    emb = model.get_input_embeddings()
    h_emb = emb.register_forward_hook(lambda m, a, out: out @ state["R1"])
    h_norm = model.model.norm.register_forward_pre_hook(lambda m, a: (a[0] @ state["R1"].T,))
    hist = []
    model.eval()
    try:
        for step in range(steps):
            C1 = F.cayley(F.skew_from_params(P1))
            state["R1"] = H1 @ C1
            params = {}
            for i, (b, w) in enumerate(zip(blocks, base)):
                R2 = H2[i] @ F.cayley(F.skew_from_params(P2[i]))
                for p in ("q", "k", "gate", "up"):
                    params[b.name(p)] = ste_rtn(w[p] @ C1, bits)
                v = torch.einsum("dk,hdi->hki", R2, w["v"]).reshape(nkv * hd, d) @ C1  # R2ᵀ W_v R1
                params[b.name("v")] = ste_rtn(v, bits)
                o = C1.T @ (w["o"] @ R2).reshape(d, nh * hd)  # R1ᵀ W_o blockdiag(R2)
                params[b.name("o")] = ste_rtn(o, bits)
                params[b.name("down")] = ste_rtn(C1.T @ w["down"], bits) @ H4.T
            ids = windows[step % len(windows)][None]
            out = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": ids, "labels": ids,
                                                                             "use_cache": False})
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            hist.append(float(out.loss.detach()))
            if log and (step % 10 == 0 or step == steps - 1):
                log(f"  spinquant step {step + 1}/{steps}: loss {hist[-1]:.4f} ({time.time() - t0:.0f} s)")
    finally:
        h_emb.remove()
        h_norm.remove()
        state.clear()
    with torch.no_grad():
        R2s = [(H2[i].double() @ F.cayley(F.skew_from_params(P2[i].detach().double()))) for i in range(len(blocks))]
        A1 = F.skew_from_params(P1.detach().double())
    rot = F.Rotations(r1_seed, A1, R2s, down_seed)
    info = {"transform": "spinquant", "steps": steps, "lr": lr, "ste_bits": bits, "seqlen": int(windows[0].numel()),
            "loss_first_last": [hist[0], hist[-1]] if hist else None, "loss_history": hist,
            "train_seconds": time.time() - t0}
    return rot, gains, info


def _cache_file(cache_dir, bits: int, steps: int, seqlen: int, seed: int, lr: float):
    return Path(cache_dir) / f"spinquant-b{bits}-s{steps}-l{seqlen}-seed{seed}-lr{lr:g}.pt"


def transform_model(model, sigma, *, method, bits, seed: int = 0, calib_windows=None, cache_dir=None, log=None,
            steps: int | None = None, seqlen: int | None = None, lr: float | None = None, **_) -> F.Prepared:
    """run_baseline hook: train (or load cached) rotations, fold what folds, return the coded view.
    ``calib_windows(n_tokens, window)``: the calibration text as token windows (BOS first), supplied by
    the caller; ``cache_dir``: where trained rotations of this model are kept (None: no cache).
    STE bit width: ``STE_BITS`` if set, else ``bits`` (fixed-length methods) or round(target bpw) (-ec
    methods), within 2..8. ``steps``/``seqlen``/``lr`` default to the module's STEPS/SEQLEN/LR."""
    steps = STEPS if steps is None else steps
    seqlen = SEQLEN if seqlen is None else seqlen
    lr = LR if lr is None else lr
    b = int(min(8, max(2, round(float(bits) if STE_BITS is None else STE_BITS))))
    path = _cache_file(cache_dir, b, steps, seqlen, seed, lr) if cache_dir is not None else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        gains = F.fold_norm_gains(F.llama_blocks(model))
        rot = F.Rotations(saved["r1_seed"], saved["A1"], list(saved["R2"]), saved["down_seed"])
        info = {**saved["info"], "cached": str(path)}
        if log:
            log(f"  spinquant: rotations from cache {path} (trained in {info['train_seconds']:.0f} s)")
    else:
        if calib_windows is None:
            raise ValueError("spinquant: needs calib_windows, the calibration text")
        windows = list(calib_windows(steps * seqlen, seqlen + 1))
        rot, gains, info = train_rotations(model, windows, b, seed=seed, steps=steps, lr=lr, log=log)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"r1_seed": rot.r1_seed, "A1": rot.A1, "R2": torch.stack(rot.R2), "down_seed": rot.down_seed,
                        "info": {k: v for k, v in info.items()}}, path)
    return F.apply_rotations(model, sigma, rot, gains=gains, info=info)

