"""codec/transforms/folding.py: norm-gain folding, per-head R2, residual R1 (decoder-applied) keep the function
of a tiny random Llama (GQA, tied embedding, non-trivial norm gains); Σ maps are exact."""

import pytest
import torch

from aligncodec.codec.transforms import folding as F
from aligncodec.tools.experiments import baseline as BL

pytest.importorskip("transformers")


def tiny_llama(seed=0, hidden=48, heads=4, kv=2, inter=96, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, some small, so folding is exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.empty_like(p).uniform_(0.05, 2.0))
    return model


def ids(seed=1):
    return torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.double()


def capture(model, x):
    """(Σ per linear with shared objects for shared inputs, raw inputs per linear)."""
    acc, by_input, raw, alive, hooks = {}, {}, {}, [], []
    for name, mod in BL.linear_weights(model).items():
        def hook(m, inp, name=name):
            xx = inp[0].reshape(-1, inp[0].shape[-1]).double()
            alive.append(inp[0])
            if id(inp[0]) not in by_input:
                by_input[id(inp[0])] = xx.T @ xx / xx.shape[0]
            acc[name] = by_input[id(inp[0])]
            raw[name] = xx
        hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return acc, raw


def random_rotations(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    hd = d // model.config.num_attention_heads
    A1 = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    R2 = [torch.linalg.qr(torch.randn(hd, hd, generator=g, dtype=torch.float64))[0]
          for _ in range(model.config.num_hidden_layers)]
    return F.Rotations(1234, F.skew_from_params(A1), R2, down_seed=99)


def test_cayley_orthogonal_and_identity_at_zero():
    A = F.skew_from_params(torch.randn(20, 20, dtype=torch.float64))
    R = F.cayley(A)
    assert torch.allclose(R.T @ R, torch.eye(20, dtype=torch.float64), atol=1e-12)
    assert torch.equal(F.cayley(torch.zeros(5, 5)), torch.eye(5))
    # the decoder's view (fp16 generator) is orthogonal too
    R16 = F.cayley(F.round_generator(A))
    assert torch.allclose(R16.T @ R16, torch.eye(20, dtype=torch.float64), atol=1e-12)
    assert F.gen_bits(576) == 16 * 576 * 575 // 2


def test_fold_norm_gains_and_v_o_rotation_keep_function():
    model = tiny_llama()
    x = ids()
    ref = logits(model, x)
    blocks = F.llama_blocks(model)
    gains = F.fold_norm_gains(blocks)
    assert all(float((b.ln1.weight.detach() - 1).abs().max()) == 0 for b in blocks) and len(gains) == 2 * len(blocks)
    for b, R2 in zip(blocks, random_rotations(model).R2):
        F.rotate_v_o(b, R2)
    assert torch.allclose(logits(model, x), ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, tiny_llama().model.layers[0].self_attn.v_proj.weight)


def test_apply_rotations_function_and_sigma_exact():
    model = tiny_llama()
    x = ids()
    ref = logits(model, x)
    sigma, _ = capture(model, x)
    rot = random_rotations(model)
    prep = F.apply_rotations(model, sigma, rot)
    mods = BL.linear_weights(model)
    coded = {n: prep.coded(n, m.weight.detach().clone()) for n, m in mods.items()}
    # the coded weights are really rotated (not the model's own)
    assert not torch.allclose(coded["model.layers.0.self_attn.q_proj.weight"], mods["model.layers.0.self_attn.q_proj.weight"].weight)
    with torch.no_grad():
        for n, W in coded.items():
            mods[n].weight.copy_(prep.install(n, W))
    assert torch.allclose(logits(model, x), ref, atol=1e-4, rtol=1e-4)
    # Σ of the coded input: the output error of any coded perturbation, predicted by Σ', equals the
    # error measured on the transformed model's real inputs
    _, raw = capture(model, x)
    g = torch.Generator().manual_seed(5)
    for n, W in coded.items():
        D = torch.randn(W.shape, generator=g, dtype=torch.float64) * 1e-2
        pred = float(torch.einsum("ij,jk,ik->", D, prep.sigma[n].double(), D))
        D_model = prep.install(n, W + D.float()).double() - prep.install(n, W).double()
        meas = float((raw[n] @ D_model.T).pow(2).sum(1).mean())
        assert pred == pytest.approx(meas, rel=2e-3), n
    # names that share an input still share one Σ object (sites unchanged)
    assert len(BL.sites(list(mods), prep.sigma)) == len(BL.sites(list(mods), sigma))
    d, L = model.config.hidden_size, model.config.num_hidden_layers
    assert prep.side_bits == 32 + F.gen_bits(d) + 32 * L


def test_non_llama_model_is_refused():
    class Cfg:
        model_type = "bert"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(ValueError, match="Llama"):
        F.llama_blocks(M())
