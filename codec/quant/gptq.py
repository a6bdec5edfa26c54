"""GPTQ (Frantar et al., 2023): the one Hessian preparation and the column kernel, used by
the baselines (:func:`gptq`, any grid of :mod:`.grids`) and the lossy encoder
(:func:`gptq_ecsq`, a uniform step, act order, no groups).

H = 2Σ; dead inputs (H_jj = 0) get H_jj = 1 (and zero weight); with act order the columns
are processed by decreasing H_jj; damping adds ``damp``·mean(diag H) to the diagonal; the
column loop needs the upper Cholesky factor U of H⁻¹ (:func:`hessian_factor`).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from aligncodec.codec.entropy.rans import launch, serial_twin
from aligncodec.codec.quant.grids import QuantResult, check_weight, column_groups

__all__ = ["hessian_factor", "gptq_affine_block", "gptq", "gptq_ecsq"]


FACTOR_COLS = 512  # rows gathered / columns flipped at a time by hessian_factor (memory: no n × n temporary)


def hessian_factor(H: "torch.Tensor | list[torch.Tensor]", damp: float, *, act_order: bool,
                   factor: str, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(F, perm, dead)`` for the damped H' = H + damp·mean(diag H)·I in processing order:
    ``perm`` that order (act order: decreasing H_jj, stable; else identity), ``dead`` the inputs
    with H_jj ≤ 0 (given H_jj = 1). ``H`` given as a one-element list: the caller's temporary,
    taken out of the list and overwritten (no copy; freed early). The work is float64.

    ``factor`` picks F:

    * ``"reverse"`` (the lossy encoder, :func:`gptq_ecsq` / ``trellis.gptq_tcq``): R = J·L·J,
      upper triangular with H' = R·Rᵀ (L the lower Cholesky factor of J·H'·J, J the exchange
      matrix). GPTQ's factor U (upper, Uᵀ U = H'⁻¹) is R⁻¹; it is never formed (one
      factorisation, n³/3 flops; :func:`lazy_batches` needs only R and R's diagonal blocks);
      returned in ``dtype`` (a float32 factorisation, as in GPTQ's reference code, was
      measured worse on Gemma-3's rotated Hessians: codec/encoder.py ``rotate_sigma``);
    * ``"reference"`` (the baselines, as in the GPTQ reference code): U itself, as Cholesky of
      H', its inverse, Cholesky of that (float64)."""
    # Memory (a wide input, e.g. 8192² float64 = 0.5 GB per copy): the caller's H, plus J·H'·J
    # gathered a row block at a time into one new array, plus the factor; never a whole-matrix
    # temporary of the gather or the flip.
    if isinstance(H, list):  # [H]: the caller hands over its only reference (freed once gathered)
        H = H.pop()
        H = H if H.dtype == torch.float64 else H.to(torch.float64)
    else:
        H = H.to(torch.float64).clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    n = H.shape[0]
    perm = torch.arange(n)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    shift = damp * torch.mean(torch.diag(H)[perm])
    if factor == "reverse":
        order = perm.flip(0)  # J·H[perm][:, perm]·J = H[order][:, order]
        Hf = torch.empty(n, n, dtype=H.dtype)
        for a in range(0, n, FACTOR_COLS):  # rows, then columns: two contiguous gathers
            torch.index_select(H.index_select(0, order[a:a + FACTOR_COLS]), 1, order, out=Hf[a:a + FACTOR_COLS])
        del H
        Hf.diagonal().add_(shift)
        L = torch.linalg.cholesky(Hf)
        del Hf
        F = torch.empty(n, n, dtype=dtype)
        for a in range(0, n, FACTOR_COLS):  # R[i, j] = L[n−1−i, n−1−j], a block of columns at a time
            b = min(n, a + FACTOR_COLS)
            F[:, n - b:n - a] = L[:, a:b].flip(0, 1).to(dtype)
        del L
    elif factor == "reference":
        H = H[perm[:, None], perm[None, :]]
        H.diagonal().add_(shift)
        F = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    else:
        raise ValueError(f"unknown factor {factor!r}")
    return F, perm, dead


def lazy_batches(C: torch.Tensor, R: torch.Tensor, perm: torch.Tensor, block: int, run_block) -> None:
    """GPTQ's column sweep (act order ``perm``, lazy batches of ``block`` columns) in the form
    that needs only the reverse Cholesky factor R of H (H = R Rᵀ, R upper; :func:`hessian_factor`
    ``"reverse"``) instead of U = R⁻¹.

    With D = W − Q (original weights minus their quantized values, processing order) GPTQ's
    errors are E = D·R (since W − Q = E·U). For a batch B after the columns A already done, the
    weights GPTQ quantizes are therefore W_B + D_A·R_AB·R_BB⁻¹ (the textbook's trailing updates
    E_A·U_AB, with U_AB = −R_AA⁻¹ R_AB R_BB⁻¹ and E_A = D_A R_AA): one GEMM over the done
    columns per batch, the same flops as the textbook's trailing updates; inside the batch the
    column loop runs with U_BB = R_BB⁻¹ (a batch-sized triangular inverse). The same symbols as
    the U form up to float rounding (a re-association), without the n³ inverse.

    ``run_block(W1, U1, i1, i2)`` quantizes the batch's weights W1 (rows × b, float32,
    contiguous, overwritten by the column loop) with the factor block U1 and returns their
    quantized values (rows × b)."""
    for _ in lazy_batch_steps(C, R, perm, block, run_block):
        pass


def lazy_batch_steps(C: torch.Tensor, R: torch.Tensor, perm: torch.Tensor, block: int, run_block):
    """:func:`lazy_batches` as a generator that yields after each batch (callers interleave the
    batches of several row chunks: ``trellis.gptq_tcq_steps``)."""
    W = C[:, perm].contiguous().numpy()  # a copy (indexing by perm): C is not modified
    Rn = R.to(C.dtype).contiguous().numpy()
    n = W.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        R1 = torch.from_numpy(Rn[i1:i2, i1:i2]).to(torch.float64)
        U1 = torch.linalg.solve_triangular(R1, torch.eye(i2 - i1, dtype=torch.float64), upper=True)
        U1 = np.ascontiguousarray(U1.to(C.dtype).numpy())
        W1 = np.ascontiguousarray(W[:, i1:i2])
        if i1 and np.any(Rn[:i1, i1:i2]):  # (R diagonal, Σ = I: no feedback, no GEMM)
            W1 += (W[:, :i1] @ Rn[:i1, i1:i2]) @ U1
        Q1 = run_block(W1, U1, i1, i2)
        W[:, i1:i2] -= Q1  # D_B: the batch's columns now hold W − Q
        yield


@numba.njit(parallel=True, cache=True)
def gptq_affine_block(W1, Hinv1, scale, zero, lo, hi, S1, Q1, E1):  # pragma: no cover - numba
    """GPTQ's column loop over one block, row-parallel: symbol clamp(round(w/scale + zero), lo, hi),
    reconstruction scale·(q − zero), error fed forward through the block's inverse-Hessian factor."""
    rows, b = W1.shape
    for r in numba.prange(rows):
        for i in range(b):
            w = W1[r, i]
            q = np.rint(w / scale[r, i] + zero[r, i])
            if q < lo:
                q = lo
            elif q > hi:
                q = hi
            S1[r, i] = np.int64(q)
            d = scale[r, i] * (q - zero[r, i])
            Q1[r, i] = d
            err = (w - d) / Hinv1[i, i]
            E1[r, i] = err
            for j in range(i + 1, b):
                W1[r, j] -= err * Hinv1[i, j]


_gptq_affine_block_serial = serial_twin(gptq_affine_block)


def gptq(
    W: torch.Tensor,
    sigma: torch.Tensor,
    grid,
    group_size: int = 0,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    use_kernel: bool = True,
) -> QuantResult:
    """GPTQ with H = 2Σ (Σ = E[x xᵀ] of the layer input, in × in). See the module doc."""
    W = check_weight(W).clone()
    rows, n = W.shape
    if sigma.shape != (n, n):
        raise ValueError(f"gptq: Σ has shape {tuple(sigma.shape)}, expected {(n, n)}")
    if not damp > 0:
        raise ValueError(f"gptq: damp must be positive, got {damp}")
    Hinv, perm, dead = hessian_factor(2 * sigma.detach().to(torch.float64), damp, act_order=act_order, factor="reference")
    Hinv = Hinv.to(W.dtype)
    W[:, dead] = 0.0
    groups = column_groups(n, group_size)
    gs = group_size or n
    n_groups = len(groups)
    P = None  # per-group params, each rows × n_groups

    def store(gi, p):
        nonlocal P
        if P is None:
            P = [torch.empty(rows, n_groups, dtype=W.dtype) for _ in p]
        for i, t in enumerate(p):
            P[i][:, gi] = t

    static = act_order or not group_size  # params fixed before the sweep
    if static:
        for gi, (a, b) in enumerate(groups):
            store(gi, grid.params(W[:, a:b]))
    if act_order:
        W = W[:, perm]
    col_group = perm // gs  # group of the column processed at each position
    Q = torch.empty_like(W)
    S = torch.empty(W.shape, dtype=torch.int64)
    bs = group_size if (group_size and not act_order) else block_size
    fast = hasattr(grid, "affine") and W.dtype in (torch.float32, torch.float64) and use_kernel
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        if not static:  # a group starts here (bs == group_size): params from updated weights
            store(i1 // gs, grid.params(W1))
        if fast:  # the column loop in a numba kernel, parallel over rows (same arithmetic)
            gis = col_group[i1:i2]
            scale, zero, lo, hi = grid.affine(tuple(t[:, gis] for t in P))
            S1 = np.empty(W1.shape, dtype=np.int64)
            Q1 = np.empty(W1.shape, dtype=np.float32 if W1.dtype == torch.float32 else np.float64)
            E1 = np.empty_like(Q1)
            W1n = W1.numpy()
            gptq_affine_block(W1n, np.ascontiguousarray(Hinv1.numpy()),
                              np.ascontiguousarray(scale.to(W1.dtype).numpy()),
                              np.ascontiguousarray(zero.to(W1.dtype).numpy()), lo, hi, S1, Q1, E1)
            S[:, i1:i2] = torch.from_numpy(S1)
            Q[:, i1:i2] = torch.from_numpy(Q1)
            Err1 = torch.from_numpy(E1)
        else:
            Err1 = torch.empty_like(W1)
            for i in range(i2 - i1):
                gi = int(col_group[i1 + i])
                p = tuple(t[:, gi] for t in P)
                w = W1[:, i]
                s, q = grid.quant(w, p)
                S[:, i1 + i] = s
                Q[:, i1 + i] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        inv = torch.argsort(perm)
        Q, S = Q[:, inv], S[:, inv]
    return QuantResult(Q.contiguous(), S.contiguous(), tuple(P), group_size)


def gptq_ecsq(C: torch.Tensor, R: torch.Tensor, perm: torch.Tensor, step: float, *, maxq: int,
              block: int = 128) -> torch.Tensor:
    """GPTQ (act order, lazy batches: :func:`lazy_batches`, R the reverse Cholesky factor of H)
    with the uniform step ``step``: integer symbols clamp(round(w/Δ), ±maxq) (int32), in the
    original column order. Within a batch the column loop is :func:`gptq_affine_block` (numba,
    parallel over rows; the same kernel as :func:`gptq`).

    Rounding is plain (unbiased): a dead zone (offset ½ − θ towards zero) was measured inside
    GPTQ at −0.07 dB (θ = 0.1) and −0.8 dB (θ = 0.2) at equal rate, so there is none."""
    rows, n = C.shape
    out = np.empty((rows, n), dtype=np.int32)  # |symbols| ≤ maxq ≤ 32767, in the original column order
    pn = perm.numpy()

    def run_block(W1, U1, i1, i2):
        E1 = np.empty_like(W1)
        V1 = np.empty_like(W1)
        S1 = np.empty(W1.shape, dtype=np.int64)
        scale = np.full(W1.shape, step, dtype=W1.dtype)
        launch(gptq_affine_block, _gptq_affine_block_serial, W1, U1, scale, np.zeros_like(scale), float(-maxq), float(maxq),
               S1, V1, E1)
        out[:, pn[i1:i2]] = S1
        return V1

    lazy_batches(C, R, perm, block, run_block)
    return torch.from_numpy(out)
