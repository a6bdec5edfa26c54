"""SpinQuant-style learned rotations (codec/baselines/spinquant.py) on a tiny random Llama: STE, training runs and
lowers the quantised model's loss, the folded model computes the same function, bits counted."""

import pytest
import torch

from aligncodec.codec import baselines as B
from aligncodec.codec.transforms import folding as F
from aligncodec.codec.baselines import spinquant as SP
from aligncodec.tools.experiments import baseline as BL

from test_codec_transforms_folding import capture, ids, logits, tiny_llama

pytest.importorskip("transformers")


def test_ste_rtn_forward_quantised_backward_identity():
    W = torch.randn(6, 10, requires_grad=True)
    Q = SP.ste_rtn(W, 2)
    for row in Q.detach():
        assert len(torch.unique(row)) <= 4
    Q.sum().backward()
    assert torch.equal(W.grad, torch.ones_like(W))


def test_training_lowers_quantised_loss_and_function_kept():
    model = tiny_llama(hidden=32, heads=4, kv=2, inter=64)
    x = ids()
    ref = torch.log_softmax(logits(model, x), -1)
    sigma, _ = capture(model, x)
    windows = [x[0]]  # one window: the STE loss on it must go down
    rot, gains, info = SP.train_rotations(model, windows, 2, steps=25, lr=2e-2)
    hist = info["loss_history"]
    assert len(hist) == 25 and min(hist[-5:]) < hist[0]
    prep = F.apply_rotations(model, sigma, rot, gains=gains)
    mods = BL.linear_weights(model)
    coded = {n: prep.coded(n, m.weight.detach().clone()) for n, m in mods.items()}
    with torch.no_grad():
        for n, W in coded.items():
            mods[n].weight.copy_(prep.install(n, W))
    assert torch.allclose(torch.log_softmax(logits(model, x), -1), ref, atol=1e-4)
    assert prep.side_bits == 32 + F.gen_bits(32) + 32 * model.config.num_hidden_layers
    assert not torch.equal(rot.A1, torch.zeros_like(rot.A1))  # something was learned
    method = B.get_method("spinquant-gptq")
    res = BL.quantize_model_weights(coded, prep.sigma, method, bits=4)
    plain = BL.quantize_model_weights({n: m.weight.detach() for n, m in mods.items()}, sigma,
                                      B.get_method("hadamard-gptq"), bits=4)
    # per-row fixed-length counting identical to hadamard-gptq except its 32-bit seed per tensor
    assert [r.bits for r in res] == [r.bits - 32 for r in plain]


def test_bad_input_errors():
    model = tiny_llama(hidden=32, heads=4, kv=2, inter=64)
    with pytest.raises(ValueError, match="windows"):
        SP.train_rotations(model, [], 3)


def test_methods_registered():
    for n in ("spinquant-gptq", "spinquant-rtn", "spinquant-gptq-ec"):
        assert n in B.METHODS and n in B.MODEL_TRANSFORMS
