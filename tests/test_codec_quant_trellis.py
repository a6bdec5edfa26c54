"""The tcq encoder's search (codec/quant/trellis.py): the Viterbi search is exact (brute force on
short columns, against the decoder's own level walk), the rate term trades distortion for rate,
the search inside GPTQ equals the independent one when there is no feedback, and the encoder
(codec/encoder.py) writes tcq tensors whose decoded bits are what it measured."""

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from aligncodec import encode as S
from aligncodec.codec.quant import registry as Q
from aligncodec.codec import encoder as E
from aligncodec.codec.modes import lossy
from aligncodec.codec.quant import trellis as T
from aligncodec.codec.quant.gptq import hessian_factor
from aligncodec.tools.cli import main


def _sse(w, K, mid, step):
    L = lossy.trellis_levels(np.asarray(K, np.int32).reshape(-1, 1), mid).reshape(-1)
    return float(((w - L * step) ** 2).sum())


@pytest.mark.parametrize("mid", sorted(lossy.TRELLIS_MACHINES))
def test_viterbi_is_exact_against_the_decoder_walk(mid):
    rng = np.random.default_rng(mid)
    step, n = 0.5, 4
    flat = np.zeros(2 * 8 + 1)
    for _ in range(3):
        w = np.clip(rng.normal(0, 0.8, n), -2.2, 2.2)  # every nearest level has |k| <= 3
        K = T.tcq_independent(w.reshape(n, 1), step, mid, flat, lam_c=0.0).reshape(-1)
        best = min(_sse(w, k, mid, step) for k in itertools.product(range(-3, 4), repeat=n))
        assert _sse(w, K, mid, step) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_rate_term_trades_distortion_for_rate():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1.0, (2000, 1))
    step = 0.2
    K0 = T.tcq_independent(w, step, 2, T.prior_bits(w, step), lam_c=0.0)
    bits = T.symbol_bits(K0)
    K1 = T.tcq_independent(w, step, 2, bits, lam_c=0.4)
    kmax = (len(bits) - 1) // 2
    r0, r1 = float(bits[K0 + kmax].sum()), float(bits[K1 + kmax].sum())
    d0, d1 = _sse(w[:, 0], K0[:, 0], 2, step), _sse(w[:, 0], K1[:, 0], 2, step)
    assert r1 < r0 and d1 > d0  # a trade, not a free lunch or a no-op


def test_symbol_bits_is_a_code_length_table():
    K = np.array([0] * 50 + [1] * 30 + [-1] * 15 + [3] * 5)
    b = T.symbol_bits(K)
    kmax = (len(b) - 1) // 2
    assert kmax >= 3 and b[kmax] < b[kmax + 1] < b[kmax - 1] < b[kmax + 3]
    assert b[kmax + 3] < b[kmax + 4] < b[kmax + 5]  # a rising tail beyond the seen range
    seen = np.arange(-1, 4) + kmax
    assert float(np.exp2(-b[seen]).sum()) == pytest.approx(1.0, abs=1e-9)


def test_gptq_without_feedback_is_the_independent_search():
    rng = np.random.default_rng(3)
    C = torch.from_numpy(rng.standard_normal((96, 40)).astype(np.float32))
    R, perm, _ = hessian_factor(2 * torch.eye(40, dtype=torch.float64), 0.01, act_order=True, factor="reverse", dtype=torch.float32)
    K = T.gptq_tcq(C, R, perm, 0.3, 2).numpy()
    K2 = T.tcq_independent(C.numpy(), 0.3, 2, T.prior_bits(C, 0.3))
    assert np.array_equal(K, K2)
    assert np.abs(K).max() <= lossy.MAX_ABS_TCQ_SYMBOL


def test_row_lambda_weights_the_rate_of_each_row():
    """row_lambda None and all ones are the same search (bit for bit); a larger λ on some rows
    lowers their rate (more zero symbols), raises their error and leaves the plain rows' cost
    the same or better, with and without GPTQ feedback."""
    rng = np.random.default_rng(5)
    C = torch.from_numpy(rng.standard_normal((256, 48)).astype(np.float32))
    X = torch.randn(600, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    R, perm, _ = hessian_factor(2 * X.T @ X / 600, 0.01, act_order=True, factor="reverse", dtype=torch.float32)
    step = 0.3
    bits = T.prior_bits(C, step)
    plain = T.gptq_tcq(C, R, perm, step, 2).numpy()
    assert np.array_equal(plain, T.gptq_tcq(C, R, perm, step, 2, row_lambda=np.ones(256)).numpy())
    K0 = T.tcq_independent(C.numpy(), step, 2, bits)
    assert np.array_equal(K0, T.tcq_independent(C.numpy(), step, 2, bits, row_lambda=np.ones(256)))
    rl = np.ones(256)
    rl[::2] = 16.0  # the even rows: their rate weighs 16x
    for ref, K1 in ((plain, T.gptq_tcq(C, R, perm, step, 2, row_lambda=rl).numpy()),
                    (K0, T.tcq_independent(C.numpy(), step, 2, bits, row_lambda=rl))):
        assert (K1[::2] == 0).mean() > (ref[::2] == 0).mean() + 0.05  # the weighted rows: cheaper
        assert np.abs(K1[::2]).mean() < 0.9 * np.abs(ref[::2]).mean()
        assert abs((K1[1::2] == 0).mean() - (ref[1::2] == 0).mean()) < 0.05  # the others: about as before
    with pytest.raises(ValueError, match="row_lambda"):
        T.gptq_tcq(C, R, perm, step, 2, row_lambda=np.ones(3))
    with pytest.raises(ValueError, match="row_lambda"):
        T.tcq_independent(C.numpy(), step, 2, bits, row_lambda=-np.ones(256))


def test_tcq_beats_ecsq_on_gaussian_columns():
    """About 1 dB at equal entropy on i.i.d. Gaussian data (no feedback): the trellis's gain."""
    rng = np.random.default_rng(4)
    C = torch.from_numpy(rng.standard_normal((1024, 64)).astype(np.float32))
    R, perm, _ = hessian_factor(2 * torch.eye(64, dtype=torch.float64), 0.01, act_order=True, factor="reverse", dtype=torch.float32)
    from aligncodec.codec.quant.gptq import gptq_ecsq

    def ent(q):
        _, c = np.unique(q, return_counts=True)
        p = c / c.sum()
        return float(-(p * np.log2(p)).sum())

    pts_e = []
    for st in (0.45, 0.55, 0.65):
        q = gptq_ecsq(C, R, perm, st, maxq=32767).numpy()
        pts_e.append((ent(q), 10 * np.log10(1 / float(((q * st - C.numpy()) ** 2).mean()))))
    K = T.gptq_tcq(C, R, perm, 0.33, 2).numpy()
    L = lossy.trellis_levels(K, 2)
    h, snr = ent(K), 10 * np.log10(1 / float(((L * 0.33 - C.numpy()) ** 2).mean()))
    pts_e.sort()
    snr_e = float(np.interp(h, [p[0] for p in pts_e], [p[1] for p in pts_e]))
    assert pts_e[0][0] <= h <= pts_e[-1][0]
    assert snr - snr_e > 0.5


# --------------------------------------------------------------------------- the encoder

O_PROJ = "model.layers.0.self_attn.o_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def _ckpt(tmp_path, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    sd = {O_PROJ: (torch.randn(96, 64, generator=g) * 0.05).to(dtype),
          DOWN: (torch.randn(64, 160, generator=g) * 0.03).to(dtype),
          "model.norm.weight": torch.ones(64).to(dtype)}
    p = tmp_path / "model.safetensors"
    save_file(sd, str(p))
    return p, sd


def test_trellis_id():
    assert Q.trellis_id("ecsq") == 0
    assert [lossy.TRELLIS_MACHINES[Q.trellis_id("tcq", s)][0] for s in (4, 8, 16, 32, 64)] == [4, 8, 16, 32, 64]
    with pytest.raises(ValueError):
        Q.trellis_id("tcq", 5)
    with pytest.raises(ValueError):
        Q.trellis_id("tcq", 128)
    with pytest.raises(ValueError):
        Q.trellis_id("vq")


def test_registry_is_what_the_command_line_offers():
    """codec/quant/registry.py: each quantiser's mode and labels; the CLI's --quantizer and
    --trellis-states choices are the registry's (a new entry needs no CLI edit)."""
    from aligncodec.tools.cli import build_parser

    assert Q.by_trellis(0).mode == lossy.MODE_ECSQ and Q.label(0) == "ecsq"
    for mid, (states, _taps) in lossy.TRELLIS_MACHINES.items():
        assert Q.by_trellis(mid).mode == lossy.MODE_TCQ and Q.label(mid) == f"tcq{states}"
        assert Q.trellis_id("tcq", states) == mid
    assert Q.label(Q.default_trellis()) == "tcq64"
    with pytest.raises(ValueError):
        Q.by_trellis(99)
    with pytest.raises(ValueError):
        Q.trellis_id("ecsq", 8)
    act = {a.dest: a for a in build_parser("compress")._subparsers._group_actions[0].choices["compress"]._actions}
    assert tuple(act["quantizer"].choices) == tuple(Q.QUANTIZERS)
    assert list(act["trellis_states"].choices) == sorted(Q.QUANTIZERS["tcq"].states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cands", [("identity",), ("hadamard", "colscale")])
def test_tcq_archive_decodes_to_the_encoders_w_hat(tmp_path, dtype, cands, full_codes):
    src, sd = _ckpt(tmp_path, dtype)
    out = tmp_path / "m.acz"
    summ = S.encode(src, out, S.EncodeOptions(bpw=3.0, scope="linear", calibration="none", candidates=cands, trellis=2),
                    progress=False)
    assert summ["quantizer"] == "tcq8"
    res_codes = {n: full_codes[n] for n in json.loads(__import__("aligncodec").archive.inspect(out)["metadata"]["acz.lossy"])}
    d = tmp_path / "dec"
    assert main(["decompress", str(out), "-o", str(d), "-q"]) == 0
    dec = load_file(str(d / "model.safetensors"))
    from aligncodec.formats.reader import ArchiveReader

    with ArchiveReader(out) as r:
        modes = {e.name: e.mode for e in r.tensors}
    assert res_codes
    for name, code in res_codes.items():
        assert code.params.trellis == 2 and modes[name] == lossy.MODE_TCQ
        got = dec[name].to(torch.float32).numpy()
        assert np.array_equal(got.view(np.uint32), code.W_hat.view(np.uint32))  # bit-exact: what was measured


def test_tcq_rate_lands_and_beats_ecsq_at_equal_rate(tmp_path, capsys):
    """The rate search meets the target with tcq, and at that rate the weight error is lower
    than ecsq's (Σ = I, Gaussian weights: no calibration; at the lossy tensors' rate)."""
    encoder = ["--bpw-scope", "linear"]
    src, sd = _ckpt(tmp_path)
    err = {}
    for q in ("ecsq", "tcq"):
        out = tmp_path / f"{q}.acz"
        assert main(["compress", str(src), "-o", str(out), "--no-calibration", "-q", "--bpw", "3",
                     "--candidates", "identity", "--quantizer", q, *encoder]) == 0
        capsys.readouterr()
        assert main(["inspect", str(out), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        summ = json.loads(info["metadata"]["acz.lossy.summary"])
        assert abs(summ["bpw_lossy_all_in"] / 3.0 - 1) <= 0.0091
        assert {r["name"]: r["mode"] for r in info["tensors"]}[O_PROJ] == q
        d = tmp_path / f"dec-{q}"
        assert main(["decompress", str(out), "-o", str(d), "-q"]) == 0
        dec = load_file(str(d / "model.safetensors"))
        err[q] = sum(float(((dec[n] - sd[n]) ** 2).sum()) for n in (O_PROJ, DOWN))
    assert err["tcq"] < err["ecsq"] * 0.95  # > 0.2 dB at equal rate (measured ~0.8 dB on such data)


def test_choose_keeps_the_least_lagrangian_cost_with_tcq():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(64, 64, generator=g) * 0.05
    X = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 3.0, 64)
    job = E.TensorJob("model.layers.0.self_attn.o_proj.weight", W, "F32", (X.T @ X / 512).double(), trellis=1)
    E.build_candidates(job, ("identity", "hadamard", "colscale"))
    cand, tc = E.choose(job, 0.004)
    codes = [E.code_candidate(job, c, 0.004) for c in job.cands]
    lam = 2 * np.log(2) * min(c.dist for c in codes) / job.numel
    J = [c.dist + lam * 8 * c.bytes_all_in for c in codes]
    assert tc.params.trellis == 1 and cand.kind == job.cands[int(np.argmin(J))].kind


def test_cli_quantizer_errors(tmp_path, capsys):
    src, _ = _ckpt(tmp_path)
    out = tmp_path / "m.acz"
    assert main(["compress", str(src), "-o", str(out), "--no-calibration", "-q", "--bpw", "3",
                 "--quantizer", "ecsq", "--trellis-states", "4"]) == 2
    assert "--trellis-states needs a trellis quantizer (tcq)" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["compress", str(src), "-o", str(out), "--bpw", "3", "--quantizer", "tcq", "--trellis-states", "5"])


def test_gptq_tcq_lazy_batches_match_one_batch():
    """The lazy-batch form (errors of done batches fed through R, the reverse Cholesky factor)
    is a re-association of the one-batch column loop with U = R⁻¹: the same symbols up to
    float32 rounding ties."""
    g = torch.Generator().manual_seed(11)
    n = 96
    X = torch.randn(400, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, n, dtype=torch.float64)
    X[:, 5] += 3 * X[:, 9]  # correlated inputs: real feedback
    R, perm, _ = hessian_factor(2 * X.T @ X / 400, 0.01, act_order=True, factor="reverse", dtype=torch.float32)
    C = torch.randn(200, n, generator=g) * 0.05
    one = T.gptq_tcq(C, R, perm, 0.02, 2, block=128).numpy()  # n < block: one batch, U = R⁻¹ throughout
    for block in (7, 32):
        K = T.gptq_tcq(C, R, perm, 0.02, 2, block=block).numpy()
        assert (K != one).mean() < 0.01
    assert np.abs(one).max() > 2


@pytest.mark.parametrize("lazy", [False, True], ids=["tensor", "rowview"])
def test_tcq_tensor_taller_than_a_row_chunk_decodes_to_what_was_measured(tmp_path, monkeypatch, lazy):
    """tcq's state machine walks all the rows of a column (spec §7.6): a tensor coded and
    measured in row chunks (more rows than encoder.CHUNK_ROWS, here made small; the stream
    encoder's embeddings are such RowViews) must decode bit for bit to the encoder's
    reconstruction and to the error it measured."""
    from aligncodec.codec.modes import decode_entry
    from aligncodec.codec.torch_interop import bytes_to_tensor
    from aligncodec.formats.streams import parse_streams
    from aligncodec.formats.writer import ArchiveWriter

    monkeypatch.setattr(E, "CHUNK_ROWS", 64)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(300, 32, generator=g) * 0.05
    src = E.RowView(lambda sl: W[sl].clone(), tuple(W.shape)) if lazy else W
    job = E.TensorJob("t.weight", src, "F32", None, trellis=2)
    E.build_candidates(job, ("identity",), lazy=lazy)
    tc = E.code_candidate(job, job.cands[0], 0.01)
    w = ArchiveWriter(tmp_path / "t.acz")
    e = w.add("t.weight", "F32", tuple(W.shape), tc.params.mode, tc.streams, tc.params.pack())
    dec = bytes_to_tensor(e, decode_entry(e, parse_streams(w.read_back(e), e.stream_count))).to(torch.float32)
    w.abort()
    assert np.array_equal(dec.numpy().view(np.uint32), tc.W_hat.view(np.uint32))
    assert float(((dec - W).double() ** 2).sum()) == pytest.approx(tc.noise, rel=1e-9)


# --------------------------------------------------------------------------- class-aware rate (weight domain)


def test_class_rate_prices_each_symbol_by_its_class_table():
    rng = np.random.default_rng(5)
    K = np.rint(rng.normal(0, 1, (12, 10)) * np.r_[0.3, 3.0][np.arange(12) % 2][:, None]).astype(np.int32)
    ids = (np.arange(12) % 2).astype(np.uint8)
    bits, rtab, ctab = T.class_rate(K, ids, 0)
    assert bits.shape[0] == 2 and np.array_equal(rtab, ids) and not ctab.any()
    kmax = (bits.shape[1] - 1) // 2
    for c in (0, 1):
        assert np.array_equal(bits[c], T.symbol_bits(K[ids == c], kmax))
    bits1, rtab1, ctab1 = T.class_rate(K.T, ids, 1)
    assert np.array_equal(ctab1, ids) and not rtab1.any() and np.array_equal(bits1, bits)


def test_per_class_search_is_each_class_searched_with_its_table():
    rng = np.random.default_rng(6)
    C = rng.standard_normal((64, 24))
    ids = (np.arange(24) % 3).astype(np.uint8)  # column classes
    bits = np.stack([T.symbol_bits(rng.integers(-s, s + 1, 500), 12) for s in (1, 3, 6)])
    K = T.tcq_independent(C, 0.25, 2, bits, lam_c=0.4, ctab=ids.astype(np.int64))
    for c in range(3):
        Kc = T.tcq_independent(np.ascontiguousarray(C[:, ids == c]), 0.25, 2, bits[c], lam_c=0.4)
        assert np.array_equal(K[:, ids == c], Kc)
    # row classes through GPTQ without feedback: the same as the independent search
    rids = (np.arange(64) % 2).astype(np.int64)
    R, perm, _ = hessian_factor(2 * torch.eye(24, dtype=torch.float64), 0.01, act_order=True, factor="reverse", dtype=torch.float32)
    Kg = T.gptq_tcq(torch.from_numpy(C.astype(np.float32)), R, perm, 0.25, 2, lam_c=0.4,
                    rate=(bits[:2], rids, None)).numpy()
    assert np.array_equal(Kg, T.tcq_independent(C.astype(np.float32), 0.25, 2, bits[:2], lam_c=0.4, rtab=rids))
    with pytest.raises(ValueError):
        T.tcq_independent(C, 0.25, 2, bits, ctab=np.full(24, 3, np.int64))  # no table 3


def test_weight_domain_settings_and_their_code_decodes_exactly():
    rng = np.random.default_rng(7)
    W = torch.from_numpy((rng.standard_normal((48, 32)) * np.linspace(0.2, 2, 32)).astype(np.float32))
    job = E.TensorJob("w", W, "F32", None, trellis=2)
    assert job.settings() == E.WEIGHT_DOMAIN_SETTINGS
    assert E.TensorJob("w", W, "F32", torch.eye(32, dtype=torch.float64)).settings() == E.CALIBRATED_SETTINGS
    E.build_candidates(job, ("identity",))
    code = E.code_candidate(job, job.cands[0], 0.1)
    entry = lossy_entry(code, W.shape)
    assert np.array_equal(lossy.decode(entry, code.streams).view(np.float32).reshape(W.shape), code.W_hat)
    job0 = E.TensorJob("w", W, "F32", None, trellis=2, tcq_lambda=E.WEIGHT_DOMAIN_SETTINGS[0], tcq_passes=0,
                       refine_classes=False)
    E.build_candidates(job0, ("identity",))
    code0 = E.code_candidate(job0, job0.cands[0], 0.1)
    # the passes and refined classes do not cost rate at equal distortion (J at the measured slope)
    lam = 0.335 * 0.1 ** 2
    assert code.noise / lam + 8 * code.bytes_all_in <= code0.noise / lam + 8 * code0.bytes_all_in


def lossy_entry(code, shape):
    from aligncodec.formats.layout import TensorEntry

    return TensorEntry(code.name, "F32", tuple(shape), code.params.mode, len(code.streams), 0, 0, 0, code.params.pack())


# --------------------------------------------------------------------------- row chunks: the trellis state carried


def _walk(K, mid, s):
    """Levels of symbols K down one column entering in state s, and the state after the last."""
    trans, qsel = lossy.trellis_machine(mid)
    L = []
    for k in K:
        k = int(k)
        L.append(2 * k - (int(np.sign(k)) if qsel[s] == 1 else 0))
        s = int(trans[s, k & 1])
    return np.array(L, np.int64), s


@pytest.mark.parametrize("mid", sorted(lossy.TRELLIS_MACHINES))
def test_viterbi_from_a_given_state_is_exact_and_returns_its_end_state(mid):
    """A search entering in state s0 is the best path among those that start in s0 (brute
    force), and the state it hands back is where the decoder's walk of its symbols ends."""
    rng = np.random.default_rng(20 + mid)
    step, n = 0.5, 4
    flat = np.zeros(2 * 8 + 1)
    n_states = lossy.TRELLIS_MACHINES[mid][0]
    for s0 in range(n_states):
        w = np.clip(rng.normal(0, 0.8, n), -2.2, 2.2)
        st = np.array([s0])
        K = T.tcq_independent(w.reshape(n, 1), step, mid, flat, lam_c=0.0, state=st).reshape(-1)
        L, end = _walk(K, mid, s0)
        best = min(float(((w - _walk(k, mid, s0)[0] * step) ** 2).sum())
                   for k in itertools.product(range(-3, 4), repeat=n))
        assert float(((w - L * step) ** 2).sum()) == pytest.approx(best, rel=1e-12, abs=1e-15)
        assert int(st[0]) == end
    with pytest.raises(ValueError):
        T.tcq_independent(w.reshape(n, 1), step, mid, flat, state=np.array([n_states]))


def test_gptq_tcq_row_chunks_with_carried_states_are_the_decoder_walk():
    """GPTQ with feedback on a tall tensor, searched in row chunks whose columns enter in the
    final states of the chunk above: the decoder's whole-column walk of the symbols gives
    exactly the levels each chunk's search chose (the final state array is the walk's state),
    and the error is within a few per cent of the all-rows search."""
    g = torch.Generator().manual_seed(12)
    n, rows, step = 48, 300, 0.02
    X = torch.randn(600, n, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2, n, dtype=torch.float64)
    X[:, 3] += 2 * X[:, 7]
    R, perm, _ = hessian_factor(2 * X.T @ X / 600, 0.01, act_order=True, factor="reverse", dtype=torch.float32)
    C = torch.randn(rows, n, generator=g) * 0.05
    bits = T.prior_bits(C, step)  # one table for both, so that only the chunking differs
    whole = T.gptq_tcq(C, R, perm, step, 2, rate=(bits, None, None)).numpy()
    K = np.empty_like(whole)
    state = np.zeros(n, np.int64)
    levels = np.empty_like(whole)
    for a in range(0, rows, 64):
        r = slice(a, min(a + 64, rows))
        entry = state.copy()
        K[r] = T.gptq_tcq(C[r], R, perm, step, 2, rate=(bits, None, None), state=state).numpy()
        for j in range(n):  # the chunk's own levels, walked from its entry states
            levels[r, j], end = _walk(K[r, j], 2, int(entry[j]))
            assert end == state[j]
    L = lossy.trellis_levels(K, 2)
    assert np.array_equal(L, levels)
    H = (X.T @ X / 600).to(torch.float32).numpy()

    def err(Lv):
        D = Lv * step - C.numpy()
        return float(np.einsum("ij,jk,ik->", D, H, D))

    e_chunk, e_whole = err(L), err(lossy.trellis_levels(whole, 2))
    assert e_chunk <= 1.05 * e_whole
    # the bug this replaces: chunks restarted at state 0 decode far worse than they measured
    K0 = np.concatenate([T.gptq_tcq(C[a:a + 64], R, perm, step, 2, rate=(bits, None, None)).numpy()
                         for a in range(0, rows, 64)])
    assert err(lossy.trellis_levels(K0, 2)) > 1.3 * e_whole


@pytest.mark.parametrize("lazy", [False, True], ids=["tensor", "rowview"])
def test_tcq_encoder_in_small_row_chunks_decodes_exactly_and_close_to_the_all_rows_search(tmp_path, monkeypatch, lazy):
    """The encoder with a calibrated Σ (GPTQ feedback) on a 300-row tensor coded in 64-row
    chunks: the real decoder gives the encoder's own reconstruction bit for bit, and the
    activation-weighted error is close to the same tensor coded in one chunk."""
    from aligncodec.codec.modes import decode_entry
    from aligncodec.codec.torch_interop import bytes_to_tensor
    from aligncodec.formats.streams import parse_streams
    from aligncodec.formats.writer import ArchiveWriter

    g = torch.Generator().manual_seed(13)
    n = 48
    X = torch.randn(600, n, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2, n, dtype=torch.float64)
    X[:, 3] += 2 * X[:, 7]
    S = X.T @ X / 600
    W = torch.randn(300, n, generator=g) * 0.05

    def code(chunk):
        monkeypatch.setattr(E, "CHUNK_ROWS", chunk)
        src = E.RowView(lambda sl: W[sl].clone(), tuple(W.shape)) if lazy else W
        job = E.TensorJob("t.weight", src, "F32", S, trellis=2)
        E.build_candidates(job, ("identity",), lazy=lazy)
        return E.code_candidate(job, job.cands[0], 0.02)

    whole, tc = code(8192), code(64)
    w = ArchiveWriter(tmp_path / "t.acz")
    e = w.add("t.weight", "F32", tuple(W.shape), tc.params.mode, tc.streams, tc.params.pack())
    dec = bytes_to_tensor(e, decode_entry(e, parse_streams(w.read_back(e), e.stream_count))).to(torch.float32)
    w.abort()
    assert np.array_equal(dec.numpy().view(np.uint32), tc.W_hat.view(np.uint32))
    D = (dec - W).double()
    assert float((D ** 2).sum()) == pytest.approx(tc.noise, rel=1e-9)
    assert float(((D @ S) * D).sum()) == pytest.approx(tc.dist, rel=1e-4)
    assert tc.dist <= 1.1 * whole.dist
    assert abs(tc.bytes_all_in - whole.bytes_all_in) <= 0.05 * whole.bytes_all_in


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_levels_kernel_is_the_reference_walk(threads):
    """trellis.levels (the encoder's numba walk, columns split over threads) gives the integers of
    lossy.trellis_levels (the spec's reference form), in a new array or in place in the symbols."""
    from aligncodec.codec.modes import lossy
    from aligncodec.codec.quant import trellis as T

    rng = np.random.default_rng(threads)
    for mid in lossy.TRELLIS_MACHINES:
        for shape in ((1, 1), (9, 3), (257, 130)):
            K = rng.integers(-lossy.MAX_ABS_TCQ_SYMBOL, lossy.MAX_ABS_TCQ_SYMBOL + 1, size=shape).astype(np.int16)
            K[: shape[0] // 2] //= 64  # small symbols too
            ref = lossy.trellis_levels(K, mid)
            assert np.array_equal(T.levels(K, mid, threads=threads), ref)
            K2 = K.copy()
            T.levels(K2, mid, out=K2, threads=threads)
            assert np.array_equal(K2, ref)
