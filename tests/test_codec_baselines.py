"""Bit accounting and rate control of the baseline methods (aligncodec.codec.baselines)."""

import math

import pytest
import torch

from aligncodec.codec import baselines as B
from aligncodec.codec.baselines import quantize as BQ
from aligncodec.codec.transforms import hadamard as Hd
from aligncodec.codec import metrics as M


def _site(seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = {
        "q": torch.randn(96, 320, generator=g) * 0.02,
        "k": torch.randn(32, 320, generator=g) * 0.03,
    }
    A = torch.randn(320, 320, generator=g) / 18
    X = torch.randn(2048, 320, generator=g) @ A
    X[:, :4] *= 8
    return ws, (X.T @ X / 2048).double()


@pytest.mark.parametrize("name", ["rtn", "rtn-g128", "hadamard-rtn", "gptq", "hadamard-gptq"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fixed_length_bits_equal_formula(name, bits):
    ws, S = _site()
    m = B.get_method(name)
    res = BQ.quantize_site(ws, m, bits=bits, sigma=S, seed=5)
    for r, (k, W) in zip(res, ws.items()):
        rows, n = W.shape
        groups = rows * (math.ceil(n / m.group_size) if m.group_size else 1)
        zero_bits = 0 if bits <= 2 else bits  # auto grid: symmetric (no zero-point) at 2 bits
        expect = rows * n * bits + groups * (16 + zero_bits) + (32 if m.rotate else 0)
        assert r.name == k and r.numel == W.numel()
        assert r.bits == expect
        assert r.W_hat.shape == W.shape
        # a sane reconstruction (GPTQ optimises the activation-weighted error, not the weight MSE)
        err = M.act_weighted_rel_error(W, r.W_hat, S) if m.needs_sigma else 10 ** (-M.sqnr_db(W, r.W_hat) / 10)
        assert -10 * math.log10(err) > 2.5 * bits


@pytest.mark.parametrize("name", ["rtn-ec", "rtn-g128-ec", "hadamard-rtn-ec", "gptq-ec", "hadamard-gptq-ec"])
def test_entropy_coded_bits_and_error(name):
    ws, S = _site()
    m = B.get_method(name)
    mult = 0.5 if name.startswith("rtn-g128") else 0.01
    res = BQ.quantize_site(ws, m, mult=mult, sigma=S, seed=5)
    for r, (k, W) in zip(res, ws.items()):
        assert r.symbol_bits > 0 and r.side_bits >= 64
        if m.rotate:
            Wr = Hd.fold_weight(W.double(), Hd.RandomizedHadamard(W.shape[1], 5))
            Wr_hat = Hd.fold_weight(r.W_hat.double(), Hd.RandomizedHadamard(W.shape[1], 5))
        else:
            Wr, Wr_hat = W.double(), r.W_hat.double()
        if m.algo == "rtn" and not name.startswith("rtn-g128"):
            # plain ECSQ: every coefficient within half a step, symbols = round(w / step)
            assert (Wr_hat - Wr).abs().max() <= mult / 2 + 1e-6
            sym = torch.round(Wr / mult).to(torch.int64)
            bits, _ = BQ.coded_bits((sym - sym.min()).numpy())
            assert r.symbol_bits == bits
            assert r.side_bits == 64 + (32 if m.rotate else 0)


def test_gptq_beats_rtn_in_baselines():
    ws, S = _site(1)
    ws = {k: w[:, :] for k, w in ws.items()}
    for a, b in (("rtn", "gptq"), ("hadamard-rtn", "hadamard-gptq"), ("rtn-ec", "gptq-ec")):
        kw = dict(bits=3, mult=0.01, sigma=S, seed=2)
        ra = BQ.quantize_site(ws, B.get_method(a, 0), **kw)
        rb = BQ.quantize_site(ws, B.get_method(b, 0), **kw)
        ea = sum(M.act_weighted_rel_error(ws[r.name], r.W_hat, S) for r in ra)
        eb = sum(M.act_weighted_rel_error(ws[r.name], r.W_hat, S) for r in rb)
        assert eb < ea


def test_find_multiplier_synthetic_and_real():
    # a rate law with slope -1.3 bits per doubling: the search still converges
    c, r, hist = BQ.find_multiplier(lambda c: 9.0 - 1.3 * math.log2(c * 1000), 3.0, 0.01, tol=1e-4)
    assert r == pytest.approx(3.0, abs=1e-4)
    assert c == pytest.approx(2 ** (6 / 1.3) / 1000, rel=1e-3)
    # real: rtn-ec on a site, target 3 bits per weight all-in
    ws, _ = _site()
    m = B.get_method("rtn-ec")
    numel = sum(w.numel() for w in ws.values())

    def rate(c):
        return sum(t.bits for t in BQ.quantize_site(ws, m, mult=c)) / numel

    c, r, hist = BQ.find_multiplier(rate, 3.0, 0.02, tol=0.01)
    assert abs(rate(c) - 3.0) <= 0.01
    assert len(hist) <= 20


def test_errors():
    with pytest.raises(ValueError, match="unknown baseline"):
        B.get_method("nope")
    ws, S = _site()
    with pytest.raises(ValueError, match="Σ"):
        BQ.quantize_site(ws, B.get_method("gptq"), bits=3)
    with pytest.raises(ValueError, match="bits"):
        BQ.quantize_site(ws, B.get_method("rtn"))
    with pytest.raises(ValueError, match="multiplier"):
        BQ.quantize_site(ws, B.get_method("rtn-ec"))
    with pytest.raises(ValueError, match="same input"):
        BQ.quantize_site({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)}, B.get_method("rtn"), bits=3)
    with pytest.raises(ValueError, match="step rule"):
        BQ.quantize_site(ws, B.get_method("rtn-ec"), mult=0.1, step_rule="x")
