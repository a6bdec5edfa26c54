"""SmoothQuant scale migration (codec/baselines/smoothquant.py) on a tiny random Llama: the smoothed model computes
the same function, Σ maps are exact, the search never does worse than no smoothing, bits are counted as
for RTN/GPTQ."""

import pytest
import torch

from aligncodec.codec import baselines as B
from aligncodec.codec.quant.grids import FixedGrid, rtn
from aligncodec.codec.baselines import smoothquant as SQ
from aligncodec.tools.experiments import baseline as BL

from test_codec_transforms_folding import capture, ids, logits, tiny_llama

pytest.importorskip("transformers")


def test_smoothing_scales_formula_and_errors():
    x = torch.tensor([1.0, 4.0, 9.0])
    w = torch.tensor([1.0, 2.0, 0.5])
    s = SQ.smoothing_scales(x, w, 0.5)
    raw = x.double().sqrt() / w.double().sqrt()
    assert torch.allclose(s, raw / torch.exp(torch.log(raw).mean()))
    assert torch.allclose(torch.log(s).mean(), torch.zeros((), dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        SQ.smoothing_scales(x, w, 1.5)


def test_smoothed_model_same_function_and_sigma_exact():
    model = tiny_llama()
    x = ids()
    ref = logits(model, x)
    sigma, _ = capture(model, x)
    grid = FixedGrid(3, clip=False)
    new_sigma, chosen = SQ.smooth_model(model, sigma, grid, 0)
    assert len(chosen) == 4 * model.config.num_hidden_layers
    assert any(a is not None for a in chosen.values())  # smoothing is actually applied somewhere
    assert torch.allclose(logits(model, x), ref, atol=1e-4, rtol=1e-4)
    # Σ' equals the second moment of the smoothed model's real inputs
    sig_after, _ = capture(model, x)
    for n in sig_after:
        assert torch.allclose(new_sigma[n], sig_after[n], rtol=1e-4, atol=1e-6), n
    assert len(BL.sites(list(sig_after), new_sigma)) == len(BL.sites(list(sig_after), sigma))


def test_alpha_search_never_worse_than_identity():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 40, generator=g)
    X = torch.randn(500, 40, generator=g) * torch.logspace(-1, 1.5, 40)  # uneven channel scales
    S = (X.T @ X / 500).double()
    grid = FixedGrid(3, clip=False)
    s, a, err = SQ.choose_scales(W, S, grid, 0)
    base = SQ._rel_err(W, rtn(W, grid, 0).W_hat, S)
    assert err <= base
    assert a is not None and err < 0.9 * base  # outlier channels: migration helps


@pytest.mark.parametrize("name,plain", [("smoothquant-rtn", "rtn"), ("smoothquant-gptq", "gptq")])
def test_bits_counted_like_the_plain_method_and_close_at_8_bits(name, plain):
    model = tiny_llama()
    x = ids()
    ref = torch.log_softmax(logits(model, x), -1)
    sigma, _ = capture(model, x)
    plain_w = {n: m.weight.detach().clone() for n, m in BL.linear_weights(model).items()}
    plain_res = BL.quantize_model_weights(plain_w, sigma, B.get_method(plain), bits=8)
    method = B.get_method(name)
    prep = B.MODEL_TRANSFORMS[name](model, sigma, method=method, bits=8)
    mods = BL.linear_weights(model)
    w = {n: prep.coded(n, m.weight.detach().clone()) for n, m in mods.items()}
    res = BL.quantize_model_weights(w, prep.sigma, method, bits=8)
    assert prep.side_bits == 0
    assert [r.bits for r in res] == [r.bits for r in plain_res]  # same shapes, same fixed-length counting
    with torch.no_grad():
        for r in res:
            mods[r.name].weight.copy_(prep.install(r.name, r.W_hat))
    out = torch.log_softmax(logits(model, x), -1)
    assert float((ref.exp() * (ref - out)).sum(-1).mean()) < 1e-3


def test_methods_registered():
    for n in ("smoothquant-rtn", "smoothquant-gptq", "smoothquant-rtn-ec", "smoothquant-gptq-ec"):
        assert n in B.METHODS and n in B.MODEL_TRANSFORMS
