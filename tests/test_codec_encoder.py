"""The encoder's transforms fold exactly (the function is unchanged before quantisation),
the distortion is basis-independent, GPTQ error feedback helps, and the mode decision is J."""

import math

import numpy as np
import pytest
import torch

from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossy
from aligncodec.codec.quant.gptq import gptq_ecsq


def _setup(rows=48, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    S = A @ A.T + 0.05 * torch.eye(n, dtype=torch.float64)
    S[:, 3] *= 8
    S[3, :] *= 8  # one strong, correlated input direction
    W = torch.randn(rows, n, generator=g) * 0.05
    return W, S


@pytest.mark.parametrize("kind", E.CANDIDATES)
def test_transform_folds_exactly(kind):
    W, S = _setup()
    job = E.TensorJob("t.weight", W, "F32", S)
    E.build_candidates(job, (kind,))
    c = job.cands[0]
    Cm = c.C.double()
    if c.scales is not None:
        Cm = Cm * torch.from_numpy(c.scales.astype(np.float64))[None, :]
    back = Cm.numpy() @ c.hd.matrix64().T if c.hd is not None else Cm.numpy()
    assert np.allclose(back, W.double().numpy(), atol=1e-6)


def test_distortion_is_the_same_in_every_basis():
    W, S = _setup()
    hd = lossy.HadamardData.from_seed(96, 5)
    T = hd.matrix64()
    dC = np.random.default_rng(1).standard_normal((48, 96)) * 1e-3
    s = np.random.default_rng(2).uniform(0.5, 2, 96)
    dW = (dC * s) @ T.T
    St = T.T @ S.numpy() @ T
    a = np.trace(dW @ S.numpy() @ dW.T)
    b = np.trace((dC * s) @ St @ (dC * s).T)
    assert a == pytest.approx(b, rel=1e-9)
    # the fast rotation of Σ used by build_candidates() equals the dense product
    fast = hd.apply64(np.ascontiguousarray(hd.apply64(S.numpy()).T))
    assert np.allclose(fast, St, atol=1e-10)


def test_error_feedback_lowers_activation_weighted_error():
    W, S = _setup(rows=64)
    job = E.TensorJob("t.weight", W, "F32", S)
    E.build_candidates(job, ("identity",))
    c = job.cands[0]
    step = 0.02
    q_gptq = gptq_ecsq(c.C, c.R, c.perm, step, maxq=lossy.MAX_ABS_SYMBOL).numpy()
    q_rtn = np.round(c.C.numpy() / step).astype(np.int32)

    def err(q):
        D = torch.from_numpy(q * np.float32(step)).double() - W.double()
        return float(((D @ S) * D).sum())

    assert err(q_gptq) < 0.8 * err(q_rtn)


def test_mode_decision_minimises_lagrangian_cost():
    W, S = _setup(seed=3)
    job = E.TensorJob("t.weight", W, "F32", S)
    E.build_candidates(job, ("identity", "hadamard", "colscale"))
    cand, tc = E.choose(job, 0.03)
    codes = [E.code_candidate(job, c, 0.03) for c in job.cands]
    lam = 2 * math.log(2) * min(t.dist for t in codes) / job.numel
    J = [t.dist + lam * 8 * t.bytes_all_in for t in codes]
    assert tc.kind == job.cands[int(np.argmin(J))].kind
    assert cand.kind == tc.kind


def _gptq_textbook(C, S, step, damp=0.01):
    """Unblocked GPTQ in float64 straight from the paper: inverse Hessian updated column by column."""
    W = C.double().clone()
    n = W.shape[1]
    H = 2 * S.double()
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.empty_like(W)
    for i in range(n):
        q = torch.round(W[:, i] / step)
        Q[:, i] = q
        err = (W[:, i] - q * step) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        # eliminate column i from the inverse Hessian (OBS update)
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out.numpy().astype(np.int32)


@pytest.mark.parametrize("block", [128, 7])
def test_gptq_kernel_matches_textbook_gptq(block):
    W, S = _setup(rows=40, n=96, seed=4)
    job = E.TensorJob("t.weight", W, "F32", S)
    E.build_candidates(job, ("identity",))
    c = job.cands[0]
    step = 0.03
    q = gptq_ecsq(c.C, c.R, c.perm, step, maxq=lossy.MAX_ABS_SYMBOL, block=block).numpy()
    ref = _gptq_textbook(c.C, S, step)
    assert q.shape == ref.shape and q.dtype == np.int32
    # float32 vs float64 arithmetic may flip a rounding tie now and then, never more
    assert (q != ref).mean() < 0.01
    assert np.abs(q - ref).max() <= 1
    assert np.abs(q).max() > 2  # not a degenerate all-zero case


@pytest.mark.parametrize("kind", ["hadamard", "colscale"])
@pytest.mark.parametrize("sigma", [True, False])
def test_row_chunked_work_gives_the_same_code(monkeypatch, kind, sigma):
    """Large tensors are prepared, reconstructed and measured in row chunks (memory): the
    symbols, bytes and reconstruction are bit-identical, the error sums equal up to round-off."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(300, 48, generator=g)
    X = torch.randn(500, 48, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, 48, dtype=torch.float64)
    S = X.T @ X / 500 if sigma else None

    def code():
        job = E.TensorJob("w", W, "BF16", S)
        E.build_candidates(job, (kind,), seed=1)
        return E.code_candidate(job, job.cands[0], 0.05), job

    ref, jref = code()
    monkeypatch.setattr(E, "CHUNK_ROWS", 64)
    monkeypatch.setattr(lossy, "_CLASS_CHUNK", 64)
    monkeypatch.setattr(lossy, "_CLASS_ELEMS", 1000)
    got, jgot = code()
    assert torch.equal(jref.cands[0].C, jgot.cands[0].C)
    assert got.bytes_all_in == ref.bytes_all_in and got.params == ref.params
    assert lossy.streams_bytes(got.streams) == lossy.streams_bytes(ref.streams)
    assert [getattr(s, "payload", getattr(s, "data", None)) for s in got.streams] == [getattr(s, "payload", getattr(s, "data", None)) for s in ref.streams]
    assert np.array_equal(got.W_hat, ref.W_hat)
    for a in ("dist", "noise", "sqnr_db"):
        assert getattr(got, a) == pytest.approx(getattr(ref, a), rel=1e-9)
    assert jgot.energy == pytest.approx(jref.energy, rel=1e-9)


def test_make_classes_in_row_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    q = (rng.laplace(size=(1000, 40)) * rng.uniform(0.5, 4, size=40)[None, :] * rng.uniform(0.5, 4, size=(1000, 1))).round().astype(np.int32)
    ref = [lossy.make_classes(q, k, ax) for k, ax in ((4, 0), (8, 1))]
    monkeypatch.setattr(lossy, "_CLASS_CHUNK", 96)
    for elems in (1 << 20, 40 * 7, 1):  # one chunk; 7 rows a chunk; one row
        monkeypatch.setattr(lossy, "_CLASS_ELEMS", elems)
        for r, (k, ax) in zip(ref, ((4, 0), (8, 1))):
            assert np.array_equal(lossy.make_classes(q, k, ax), r)


def test_histogram_in_chunks_is_bincount():
    from aligncodec.codec.entropy.rans import histogram

    rng = np.random.default_rng(5)
    v = rng.integers(-300, 200, size=10_001).astype(np.int32)
    lo, hi = int(v.min()), int(v.max())
    assert np.array_equal(histogram(v, lo, hi, chunk=1000), np.bincount(v - lo))
    assert np.array_equal(histogram(v, lo, hi), np.bincount(v - lo))
    # clipped to [lo, hi], chunk by chunk (symbol_bits's kmax window), wider than the values too
    assert np.array_equal(histogram(v, -50, 60, chunk=999), np.bincount(np.clip(v, -50, 60) + 50, minlength=111))
    assert np.array_equal(histogram(v, -400, 400, chunk=777), np.bincount(v + 400, minlength=801))


@pytest.mark.parametrize("kind", ["hadamard", "colscale"])
def test_row_view_codes_the_same_as_a_tensor(monkeypatch, kind):
    """A tensor read through a RowView (rows fetched and transformed one chunk at a time, no
    float32 copy of the whole tensor or of any candidate's C) codes to the same bytes, full and
    on a row subsample; keep_w_hat=False keeps no reconstruction and changes nothing else."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(300, 48, generator=g)
    X = torch.randn(500, 48, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, 48, dtype=torch.float64)
    S = X.T @ X / 500
    monkeypatch.setattr(E, "CHUNK_ROWS", 64)
    fetched = []

    def fetch(sl):
        fetched.append(len(range(*sl.indices(300))))
        return W[sl].clone()

    ref_job = E.TensorJob("w", W, "BF16", S)
    E.build_candidates(ref_job, (kind,), seed=1)
    lazy_job = E.TensorJob("w", E.RowView(fetch, (300, 48)), "BF16", S)
    E.build_candidates(lazy_job, (kind,), seed=1, lazy=True)
    assert isinstance(lazy_job.cands[0].C, E.RowView) and lazy_job.energy == pytest.approx(ref_job.energy, rel=1e-12)
    for stride in (1, 7):
        ref = E.code_candidate(ref_job, ref_job.cands[0], 0.05, stride)
        fetched.clear()
        got = E.code_candidate(lazy_job, lazy_job.cands[0], 0.05, stride, keep_w_hat=False)
        assert max(fetched) <= 64  # never more than one chunk of rows at a time
        assert got.W_hat is None and got.bytes_all_in == ref.bytes_all_in and got.params == ref.params
        assert [getattr(s, "payload", getattr(s, "data", None)) for s in got.streams] == \
               [getattr(s, "payload", getattr(s, "data", None)) for s in ref.streams]
        for a in ("dist", "noise", "sqnr_db"):
            assert getattr(got, a) == pytest.approx(getattr(ref, a), rel=1e-9)
    view = E.RowView(fetch, (300, 48))
    assert view[::1] is view and view[::7].shape == (43, 48)
    assert torch.equal(view[::7][10:20], W[70:140:7])
    with pytest.raises(TypeError):
        view[3]


def test_symmetrize_in_place_is_the_expression():
    g = torch.Generator().manual_seed(5)
    for n in (7, 300, 1030):
        M = torch.randn(n, n, generator=g, dtype=torch.float64)
        ref = (M + M.T) / 2
        out = E.symmetrize_(M, tile=256)
        assert out is M and torch.equal(M, ref)


def test_hessian_factor_handed_over_gives_the_same_factor():
    """hessian_factor([H]) (the caller's temporary, overwritten and freed early: memory of wide
    inputs) and hessian_factor(H) give the factor of the plain textbook expressions, bit for bit:
    the reverse Cholesky factor R (H' = R Rᵀ, R upper) and the reference U (Uᵀ U = H'⁻¹) = R⁻¹."""
    from aligncodec.codec.quant.gptq import hessian_factor

    g = torch.Generator().manual_seed(6)
    X = torch.randn(400, 96, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 96, dtype=torch.float64)
    H = 2 * (X.T @ X) / 400
    H[7, :] = 0
    H[:, 7] = 0  # a dead input
    n = H.shape[0]
    Hd = H.clone()
    Hd[7, 7] = 1.0
    perm = torch.argsort(torch.diag(Hd), descending=True, stable=True)
    Hd = Hd[perm][:, perm]
    Hd += 0.01 * torch.mean(torch.diag(Hd)) * torch.eye(n, dtype=Hd.dtype)
    R_ref = torch.linalg.cholesky(Hd.flip(0, 1)).flip(0, 1)
    assert torch.equal(R_ref, torch.triu(R_ref)) and torch.allclose(R_ref @ R_ref.T, Hd)
    keep = H.clone()
    from aligncodec.codec.quant import gptq as G

    G_cols = G.FACTOR_COLS
    G.FACTOR_COLS = 40  # several column blocks (the default is one block at this size)
    try:
        R1, p1, d1 = hessian_factor(H, 0.01, act_order=True, factor="reverse")
    finally:
        G.FACTOR_COLS = G_cols
    assert torch.equal(H, keep)  # a tensor argument is not modified
    box = [H.clone()]
    R2, p2, d2 = hessian_factor(box, 0.01, act_order=True, factor="reverse", dtype=torch.float32)
    assert box == []
    assert torch.equal(R1, R_ref) and torch.equal(R2, R_ref.to(torch.float32))
    assert torch.equal(p1, perm) and torch.equal(p2, perm)
    assert bool(d1[7]) and int(d1.sum()) == 1
    U, p3, _ = hessian_factor(H, 0.01, act_order=True, factor="reference")  # the baselines' factor: R⁻¹
    assert torch.equal(p3, perm) and torch.allclose(U @ R_ref, torch.eye(n, dtype=U.dtype), atol=1e-9)


def _rotated64(hd, S):
    """The plain expression of the encoder's Tᵀ Σ T: float64 transforms of Σ, symmetrised
    (float64 throughout: encoder.rotate_sigma)."""
    St = hd.apply64(np.ascontiguousarray(hd.apply64(np.asarray(S)).T))
    return torch.from_numpy((St + St.T) / 2)


def test_rotated_sigma_in_row_chunks_is_the_same(monkeypatch):
    """Tᵀ Σ T is built a row chunk of Σ at a time (memory of wide inputs): the same factor and
    the same code as the whole-matrix transforms."""
    g = torch.Generator().manual_seed(8)
    W = torch.randn(40, 96, generator=g)
    X = torch.randn(300, 96, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, 96, dtype=torch.float64)
    S = X.T @ X / 300

    def build():
        job = E.TensorJob("w", W, "BF16", S)
        E.build_candidates(job, ("hadamard",), seed=2)
        return job.cands[0]

    ref = build()
    St = _rotated64(ref.hd, S.numpy())
    monkeypatch.setattr(E, "TRANSFORM_ROWS", 40)
    got = build()
    assert torch.equal(got.R, ref.R) and torch.equal(got.perm, ref.perm)
    # and the same as the plain expression's factor
    from aligncodec.codec.quant.gptq import hessian_factor

    R, perm, _ = hessian_factor([2 * St], 0.01, act_order=True, factor="reverse", dtype=torch.float32)
    assert torch.equal(R, got.R) and torch.equal(perm, got.perm)


@pytest.mark.parametrize("sigma", [True, False])
def test_candidate_factors_are_the_plain_expression_and_leave_sigma_alone(sigma):
    """build_candidates builds each candidate's H = 2·diag(s)·(Tᵀ Σ T)·diag(s) in one array (in
    place where the array is its own): the factor is bit for bit the plain expression's, and Σ,
    shared by the tensors of one input site, is not modified."""
    from aligncodec.codec.quant.gptq import hessian_factor

    W, S = _setup(seed=4)
    S0 = S.clone()
    job = E.TensorJob("t.weight", W, "F32", S if sigma else None)
    E.build_candidates(job, ("identity", "hadamard", "colscale", "hadamard-colscale"), seed=3)
    assert torch.equal(S, S0)
    # each candidate's H in float64 (without calibration I: Tᵀ I T = I, taken as exact)
    Sd = S0.numpy() if sigma else np.eye(W.shape[1])
    for c in job.cands:
        if c.hd is not None and sigma:
            St = _rotated64(c.hd, Sd)
        else:
            St = torch.from_numpy(Sd.astype(np.float64))
        if c.scales is not None:
            assert np.array_equal(c.scales, E.col_scales(torch.diag(St), 0.5))
            v = torch.from_numpy(c.scales).to(St.dtype)
            St = St * v[:, None] * v[None, :]
        R, perm, _ = hessian_factor([2 * St], 0.01, act_order=True, factor="reverse", dtype=torch.float32)
        assert torch.equal(c.R, R) and torch.equal(c.perm, perm), c.kind


@pytest.mark.parametrize("trellis", [0, 2])
def test_saturated_symbols_clamp_at_the_format_bound_without_wrapping(trellis):
    """A step far too small for the weights: every symbol clamps at the format's bound (ecsq
    ±32767, tcq ±16383), is flagged, and decodes to the clamped value with its sign (the
    encoder holds the symbols as int16: no wrap-around)."""
    W = torch.tensor([[1.0, -1.0, 0.5, -0.25]] * 8)
    job = E.TensorJob("t.weight", W, "F32", None, trellis=trellis)
    E.build_candidates(job, ("identity",))
    step = 1e-6
    tc = E.code_candidate(job, job.cands[0], step)
    assert tc.saturated
    bound = lossy.MAX_ABS_SYMBOL if not trellis else 2 * lossy.MAX_ABS_TCQ_SYMBOL - 1
    got = np.abs(tc.W_hat / np.float32(tc.params.step))
    assert np.all(np.sign(tc.W_hat) == np.sign(W.numpy()))
    assert got.max() <= bound + 2 and got.min() >= bound - 2


@pytest.mark.parametrize("n,block", [(50, 1024), (130, 32), (96, 96)])
def test_sigma_quad_in_blocks_is_the_product(n, block):
    """sum((D Σ) ∘ D) with a float64 Σ converted a row block at a time: the plain float32
    expression's value (its bits where one block holds Σ), and Σ is not modified."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(300, n, generator=g, dtype=torch.float64)
    S = X.T @ X / 300
    S0 = S.clone()
    D = torch.randn(40, n, generator=g)
    ref = float(((D @ S.to(torch.float32)) * D).double().sum())
    got = E.sigma_quad(D, S, block)
    assert torch.equal(S, S0)
    assert got == pytest.approx(ref, rel=1e-5)
    if block >= n:
        assert got == ref
    assert E.sigma_quad(D, S.to(torch.float32)) == ref
