"""KurTail-style learned rotations (codec/baselines/kurtail.py): lower kurtosis, orthogonal, function kept on a tiny
random Llama, side information counted."""

import pytest
import torch

from aligncodec.codec import baselines as B
from aligncodec.codec.transforms import folding as F
from aligncodec.codec.baselines import kurtail as KT
from aligncodec.tools.experiments import baseline as BL

from test_codec_transforms_folding import capture, ids, logits, tiny_llama

pytest.importorskip("transformers")


def test_row_kurtosis_known_answers():
    g = torch.Generator().manual_seed(0)
    assert float(KT.row_kurtosis(torch.randn(4, 200000, generator=g, dtype=torch.float64)).mean()) == pytest.approx(3, abs=0.05)
    u = torch.rand(4, 200000, generator=g, dtype=torch.float64) * 2 - 1
    assert float(KT.row_kurtosis(u).mean()) == pytest.approx(1.8, abs=0.02)


def test_learn_r1_lowers_kurtosis_of_heavy_tailed_rows():
    g = torch.Generator().manual_seed(0)
    d = 32
    rows = torch.distributions.StudentT(2.5).sample((400, d)).float()  # heavy tails per coordinate
    rows[:, 3] *= 8  # an outlier input channel
    H = torch.eye(d, dtype=torch.float64)  # start from the identity: learning must do the work
    A, hist = KT.learn_r1(rows, [], H, steps=150, lr=2e-2, batch_rows=400)
    R = F.cayley(A)
    assert torch.allclose(R.T @ R, torch.eye(d, dtype=torch.float64), atol=1e-10)
    before = float(KT.row_kurtosis(rows.double()).mean())
    after = float(KT.row_kurtosis(rows.double() @ R).mean())
    assert after < 0.6 * before and hist[-1] < hist[0]


@pytest.mark.parametrize("fold_norms", [True, False])
def test_kurtail_transform_keeps_function_and_counts_rotation(fold_norms):
    model = tiny_llama()
    x = ids()
    ref = torch.log_softmax(logits(model, x), -1)
    sigma, _ = capture(model, x)
    plain_w = {n: m.weight.detach().clone() for n, m in BL.linear_weights(model).items()}
    method = B.get_method("kurtail-rtn")
    norms = [m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("layernorm")]
    prep = KT.transform_model(model, sigma, method=method, bits=8, seed=0, steps_r1=40, steps_r2=20, fold_norms=fold_norms)
    after = [m.weight.detach() for n, m in model.named_modules() if n.endswith("layernorm")]
    assert norms and not all(bool((b == 1).all()) for b in norms)  # the tiny model has real gains
    for a, b in zip(after, norms):  # folded into the linears, or left in the norms untouched
        assert bool((a == 1).all()) if fold_norms else torch.equal(a, b)
    mods = BL.linear_weights(model)
    coded = {n: prep.coded(n, m.weight.detach().clone()) for n, m in mods.items()}
    with torch.no_grad():  # before quantisation: the same function
        for n, W in coded.items():
            mods[n].weight.copy_(prep.install(n, W))
    out = torch.log_softmax(logits(model, x), -1)
    assert torch.allclose(out, ref, atol=1e-4)
    d, L = model.config.hidden_size, model.config.num_hidden_layers
    assert prep.side_bits == 32 + F.gen_bits(d) + 32 * L
    # bits: the per-row fixed-length count of rtn, plus the rotation's side bits once
    res = BL.quantize_model_weights(coded, prep.sigma, method, bits=8)
    plain = BL.quantize_model_weights(plain_w, sigma, B.get_method("rtn"), bits=8)
    assert [r.bits for r in res] == [r.bits for r in plain]
    with torch.no_grad():
        for r in res:
            mods[r.name].weight.copy_(prep.install(r.name, r.W_hat))
    q = torch.log_softmax(logits(model, x), -1)
    assert float((ref.exp() * (ref - q)).sum(-1).mean()) < 1e-3
    # the learned rotation lowered the kurtosis of the coded rows relative to the model's own rows
    k_plain = torch.cat([KT.row_kurtosis(W.double()) for n, W in plain_w.items() if "q_proj" in n]).mean()
    k_coded = torch.cat([KT.row_kurtosis(W.double()) for n, W in coded.items() if "q_proj" in n]).mean()
    assert float(k_coded) < float(k_plain)


def test_methods_registered():
    for n in ("kurtail-gptq", "kurtail-rtn", "kurtail-gptq-ec"):
        assert n in B.METHODS and n in B.MODEL_TRANSFORMS
