"""The stats and baseline tools on a tiny randomly initialised Llama (no reference model needed)."""

import json
import math

import pytest
import torch

from aligncodec.codec import baselines as B
from aligncodec.codec.baselines import quantize as BQ
from aligncodec.codec.naming import layer_type
from aligncodec.tools.experiments import baseline as BL
from aligncodec.tools.eval import stats as S

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _capture_sigma(model, ids):
    """Σ per linear, the q/k/v (and gate/up) entries being the same tensor object (like load_sigma)."""
    acc, by_input, alive = {}, {}, []
    hooks = []
    for name, mod in BL.linear_weights(model).items():
        def hook(m, inp, name=name):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            alive.append(inp[0])  # keep inputs alive so equal ids mean the same input tensor
            key = id(inp[0])
            if key not in by_input:
                by_input[key] = x.T @ x / x.shape[0]
            acc[name] = by_input[key]
        hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return acc


@pytest.fixture(scope="module")
def tiny():
    """(model, ids, Σ) shared by the tests; tests restore any weight they change."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(1))
    return model, ids, _capture_sigma(model, ids)


def test_linear_weights_skip_tied_head_and_sites(tiny):
    model, ids, sig = tiny
    lw = BL.linear_weights(model)
    assert len(lw) == 2 * 7 and not any("lm_head" in n for n in lw)
    groups = BL.sites(list(lw), sig)
    assert len(groups) == 2 * 4  # qkv, o, gate+up, down per layer
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1, 2, 2, 3, 3]


def test_sites_side_by_side_give_the_one_thread_results(tiny):
    """threads > 1 (the demo's fixed-rate arm): whole sites at once, each on one torch thread;
    the results, in site order, are bit for bit those of the sites one after another on one thread."""
    from aligncodec.encode.blocks import thread_limits

    model, ids, sig = tiny
    weights = {n: m.weight.detach().clone() for n, m in BL.linear_weights(model).items()}
    m = B.get_method("hadamard-gptq", 32)
    with thread_limits(1):
        one = BL.quantize_model_weights(weights, sig, m, bits=3, act_order=True)
    two = BL.quantize_model_weights(weights, sig, m, bits=3, act_order=True, threads=3)
    assert [r.name for r in two] == [r.name for r in one]
    for a, b in zip(one, two):
        assert torch.equal(a.W_hat, b.W_hat) and a.bits == b.bits


@pytest.mark.parametrize("method", ["rtn", "rtn-g128", "hadamard-rtn", "gptq", "hadamard-gptq"])
def test_quantised_tiny_model_close_at_8_bits_and_bits_add_up(tiny, method):
    model, ids, sig = tiny
    mods = BL.linear_weights(model)
    weights = {n: m.weight.detach().clone() for n, m in mods.items()}
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits, -1)
    res = BL.quantize_model_weights(weights, sig, B.get_method(method), bits=8)
    assert [r.name for r in res] and {r.name for r in res} == set(weights)
    with torch.no_grad():
        for r in res:
            mods[r.name].weight.copy_(r.W_hat)
        out = torch.log_softmax(model(ids).logits, -1)
        for n, w in weights.items():  # restore the shared model
            mods[n].weight.copy_(w)
    kl = (ref.exp() * (ref - out)).sum(-1).mean()
    assert kl < 1e-3
    numel = sum(w.numel() for w in weights.values())
    bpw = sum(r.bits for r in res) / numel
    assert 8 < bpw < 8.7


def test_rate_search_hits_target_on_tiny_model(tiny):
    model, ids, sig = tiny
    weights = {n: m.weight.detach().clone() for n, m in BL.linear_weights(model).items()}
    numel = sum(w.numel() for w in weights.values())
    m = B.get_method("hadamard-gptq-ec")

    def rate(c):
        return sum(t.bits for t in BL.quantize_model_weights(weights, sig, m, mult=c)) / numel

    c, r, _ = BQ.find_multiplier(rate, 4.0, BL.initial_multiplier(m, weights, 4.0, "shared"), tol=0.02)
    assert abs(rate(c) - 4.0) <= 0.02


def test_tensor_stats_known_answers():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))[0][:, :4]
    V = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))[0][:, :4]
    W = U @ V.T  # rank 4, equal singular values
    st = S.tensor_stats(W, torch.eye(96, dtype=torch.float64), seed=3)
    for b in S.BASES:
        assert st[b]["eff_rank"] == pytest.approx(4.0, rel=1e-6)
    assert st["aligned"]["top1"] == pytest.approx(0.25)  # k = ceil(0.96) = 1 of 4 equal energies
    assert st["aligned"]["top10"] == pytest.approx(1.0)  # 10 coordinates hold the 4 non-zero ones
    assert st["as_is"]["top10"] < 0.5
    # the aligned basis needs far fewer bits at the same relative step
    assert st["aligned"]["entropy_bits"] < st["as_is"]["entropy_bits"]


def test_stats_table_json_png(tiny, tmp_path):
    from safetensors.torch import save_model

    model = tiny[0]
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    res = S.model_stats(str(tmp_path), use_sigma=False, progress=False)
    types = set(res["summary"])
    assert {"q", "k", "v", "o", "gate", "up", "down", "embedding"} <= types
    assert res["summary"]["q"]["n"] == 2 and "aligned_act" not in res["summary"]["q"]
    txt = S.format_table(res)
    assert "rotated" in txt and "kurt" in txt
    md = S.format_table(res, markdown=True)
    assert md.startswith("| type")
    json.dumps(res)
    png = S.plot(res, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_type():
    assert layer_type("model.layers.3.self_attn.q_proj.weight") == "q"
    assert layer_type("model.layers.3.mlp.down_proj.weight") == "down"
    assert layer_type("lm_head.weight", tied_lm_head=True) == "embedding"
    assert layer_type("lm_head.weight", tied_lm_head=False) == "lm_head"
    assert layer_type("model.embed_tokens.weight") == "embedding"
    assert layer_type("foo.bar") == "other"


@pytest.mark.model
@pytest.mark.slow
def test_baseline_smollm2_rtn_end_to_end(tmp_path):
    from aligncodec.tools.eval import models as Mo

    try:
        Mo.resolve_model("smollm2")
    except Mo.ModelError:
        pytest.skip("smollm2 not cached (aligncodec models fetch smollm2)")
    res = BL.run_baseline("smollm2", "rtn-g128", 4, outdir=tmp_path, progress=False, log=lambda s: None)
    assert res["n_linear"] == 210
    expect = sum(r * n * 4 + r * math.ceil(n / 128) * (16 + 4) for r, n in (t["shape"] for t in res["tensors"]))
    assert res["total_bits"] == expect
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert math.isfinite(res["mean_act_rel_err"])
