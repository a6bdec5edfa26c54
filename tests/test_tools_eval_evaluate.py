"""Evaluation protocol and Σ capture, end to end on a tiny random Llama (no downloads)."""

import copy
import math

import pytest
import torch

from aligncodec.tools.eval import calibrate as C
from aligncodec.tools.eval import evaluate as E

TEXT = (
    "the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
    "all that glitters is not gold , but some of it is . naïve café owners sell crème brûlée . "
) * 6


def _tokenizer(text=TEXT):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(text.split()))
    vocab = {"<unk>": 0, "<bos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>")


def _model(vocab, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger weights than the default init so predictions are not uniform
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


@pytest.fixture(scope="module")
def tiny():
    tok = _tokenizer()
    return _model(len(tok)), tok


def _perturbed(model, scale=0.05, seed=1):
    m2 = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m2.named_parameters():
            if "proj" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return m2


def _direct(model, ref, tok, n, window):
    """Straightforward re-implementation of the protocol, for comparison."""
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:n]
    nll = kl = 0.0
    for a in range(0, n, window - 1):
        w = torch.tensor([tok.bos_token_id] + ids[a:a + window - 1])[None]
        with torch.no_grad():
            lq = torch.log_softmax(model(w).logits[0, :-1].double(), -1)
            lp = torch.log_softmax(ref(w).logits[0, :-1].double(), -1)
        nll -= lq.gather(1, w[0, 1:, None]).sum().item()
        kl += (lp.exp() * (lp - lq)).sum().item()
    return nll, kl


def test_end_to_end_matches_direct_computation(tiny):
    model, tok = tiny
    ref = _perturbed(model)
    n, window = 70, 16
    res = E.evaluate(model, tok, n_tokens=n, ref_model=ref, window=window, text=TEXT, progress=False)
    nll, kl = _direct(model, ref, tok, n, window)
    assert res["n_tokens"] == n and res["n_windows"] == math.ceil(n / (window - 1))
    assert res["nll_sum_nats"] == pytest.approx(nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # bytes scored: the text span of the first n tokens (WhitespaceSplit drops the separators
    # between tokens, but they lie inside the span and are counted)
    words = TEXT.split()[:n]
    span = TEXT[: TEXT.index(words[-1], len(" ".join(words[:-1]))) + len(words[-1])]
    assert res["n_bytes"] == len(span.encode("utf-8"))
    assert res["n_bytes"] > len(span)  # the non-ASCII words count as several bytes
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / res["n_bytes"], rel=1e-5)
    assert res["kld_method"] == "exact"
    assert res["kld_mean"] == pytest.approx(kl / n, rel=1e-4)
    assert res["kld_mean"] > 0


def test_kld_against_itself_is_exactly_zero(tiny):
    model, tok = tiny
    res = E.evaluate(model, tok, n_tokens=50, ref_model=model, window=16, text=TEXT, progress=False)
    assert res["kld_mean"] == 0.0 and res["kld_max"] == 0.0
    assert res["ref_perplexity"] == res["perplexity"]
    st = E.compute_reference_stats(model, tok, n_tokens=50, topk=5, window=16, progress=False,
                                   data=E.make_windows(tok, 50, window=16, text=TEXT))
    res2 = E.evaluate(model, tok, n_tokens=50, ref_model=st, window=16, text=TEXT, progress=False)
    assert res2["kld_mean"] == 0.0 and res2["kld_method"] == "top5"
    assert res2["perplexity"] == res["perplexity"]


def test_topk_kld_is_a_lower_bound_and_exact_at_full_vocab(tiny, tmp_path):
    model, tok = tiny
    other = _perturbed(model, scale=0.2)
    data = E.make_windows(tok, 60, window=16, text=TEXT)
    exact = E.evaluate(other, tok, 60, ref_model=model, window=16, text=TEXT, progress=False)["kld_mean"]
    for k, check in ((3, "bound"), (len(tok), "equal")):
        st = E.compute_reference_stats(model, tok, 60, topk=k, window=16, progress=False, data=data)
        st.save(tmp_path / f"k{k}.safetensors")
        st = E.ReferenceStats.load(tmp_path / f"k{k}.safetensors")
        got = E.evaluate(other, tok, 60, ref_model=st, window=16, text=TEXT, progress=False)
        if check == "bound":
            assert 0 < got["kld_mean"] <= exact + 1e-7
        else:
            assert got["kld_mean"] == pytest.approx(exact, rel=1e-4, abs=1e-7)
        assert got["ref_perplexity"] == pytest.approx(
            E.evaluate(model, tok, 60, window=16, text=TEXT, progress=False)["perplexity"], rel=1e-5)


def test_deterministic(tiny):
    model, tok = tiny
    a = E.evaluate(model, tok, 45, window=16, text=TEXT, progress=False)
    b = E.evaluate(model, tok, 45, window=16, text=TEXT, progress=False)
    assert a["nll_sum_nats"] == b["nll_sum_nats"]


def test_bad_requests(tiny):
    model, tok = tiny
    with pytest.raises(E.EvalError, match="only"):
        E.make_windows(tok, 10**6, text=TEXT)
    with pytest.raises(E.EvalError):
        E.evaluate(model, tok, 10, ref_model="smollm2", window=16, text=TEXT, progress=False)
    st = E.compute_reference_stats(model, tok, 20, topk=4, window=16, progress=False,
                                   data=E.make_windows(tok, 20, window=16, text=TEXT))
    with pytest.raises(E.EvalError, match="cover"):
        E.evaluate(model, tok, 40, ref_model=st, window=16, text=TEXT, progress=False)


def test_archive_is_evaluated_through_the_streaming_loader(tiny, tmp_path):
    """A lossless archive of a model folder evaluates exactly like the folder itself."""
    from safetensors.torch import save_model

    from aligncodec.formats.errors import BadMagicError
    from aligncodec import archive

    model, tok = tiny
    folder = tmp_path / "tiny"
    folder.mkdir()
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    archive.compress(folder, tmp_path / "tiny.acz", progress=False)
    m2, tok2 = E.load_model_for_eval(str(tmp_path / "tiny.acz"))
    a = E.evaluate(model, tok, 40, window=16, text=TEXT, progress=False)
    b = E.evaluate(m2, tok2, 40, window=16, text=TEXT, progress=False)
    assert a["perplexity"] == b["perplexity"] and a["n_bytes"] == b["n_bytes"]
    bad = tmp_path / "bad.acz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(BadMagicError):
        E.load_model_for_eval(str(bad))


# ----------------------------------------------------------------------------- Σ capture


def test_sigma_matches_direct_computation(tiny, tmp_path):
    model, tok = tiny
    n, window = 50, 16
    sigma, info = C.capture_sigma(model, tok, n, window=window, progress=False, text=TEXT)
    data = E.make_windows(tok, n, window=window, text=TEXT)
    assert info["n_positions"] == n + len(data.windows) == sum(len(w) for w in data.windows)
    # direct: layer 0 attention input = input_layernorm(embeddings); lm_head input = final norm output
    xs0, xsf = [], []
    with torch.no_grad():
        for w in data.windows:
            out = model(w[None], output_hidden_states=True)
            xs0.append(model.model.layers[0].input_layernorm(out.hidden_states[0])[0])
            xsf.append(out.hidden_states[-1][0])
    for key, xs in (("model.layers.0.self_attn.q_proj.weight", xs0), ("lm_head.weight", xsf)):
        X = torch.cat(xs).double()
        want = X.T @ X / X.shape[0]
        torch.testing.assert_close(sigma[key], want, rtol=1e-6, atol=1e-9)
    # q, k, v read the same input: stored once; gate/up likewise; o and down have their own
    assert info["aliases"]["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert info["aliases"]["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert "model.layers.0.self_attn.o_proj.weight" in sigma and "model.layers.0.mlp.down_proj.weight" in sigma
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(info["linears"]) == n_lin == len(sigma) + len(info["aliases"])

    path = C.save_sigma(tmp_path / "s.safetensors", sigma, info, "tiny", "ab" * 32)
    full, meta = C.read_sigma_file(path)
    assert set(full) == set(info["linears"])
    for k, v in full.items():
        assert v.dtype == torch.float64 and v.shape[0] == v.shape[1]
        assert torch.equal(v, v.T)
        assert torch.linalg.eigvalsh(v).min() > -1e-9  # positive semi-definite
    assert torch.equal(full["model.layers.0.self_attn.v_proj.weight"], sigma["model.layers.0.self_attn.q_proj.weight"])
    assert meta["n_tokens"] == str(n) and meta["weights_sha256"] == "ab" * 32


def test_sigma_file_format_checked(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    with pytest.raises(C.CalibrationError, match="aligncodec-sigma"):
        C.read_sigma_file(tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------- real model


@pytest.mark.model
def test_smollm2_short_eval_and_bytes():
    from aligncodec.tools.eval.models import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    data = E.make_windows(tok, 1500)
    ids = E._tokenize(tok, "eval")[0][:1500]
    assert data.n_bytes == len(tok.decode(ids).encode("utf-8"))
    res = E.evaluate(model, tok, 1100, ref_model=model, progress=False)
    assert res["kld_mean"] == 0.0
    assert 5 < res["perplexity"] < 60


def test_eval_of_an_archive_finds_its_reference_or_says_it_cannot(tiny, tmp_path, monkeypatch, capsys):
    """An archive of a plain folder holding a copy of a cached reference model's weights records
    that model as its source (acz.source_model: eval's KLD reference); an archive of a modified
    copy (same config, same file size) records none, and eval says so in one stderr line and
    scores no KLD; --ref DIR names the reference folder."""
    import json
    import os
    import shutil

    from safetensors.torch import save_model

    from aligncodec import archive
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.tools.cli import main
    from aligncodec.tools.eval import models as M

    monkeypatch.setenv("ALIGNCODEC_HOME", str(tmp_path / "home"))
    model, tok = tiny
    cached = M.model_dir("smollm2")
    cached.mkdir(parents=True)
    model.config.save_pretrained(cached)
    tok.save_pretrained(cached)
    save_model(model, str(cached / M.WEIGHTS))
    (cached / M.MANIFEST).write_text(json.dumps({"format": M.MANIFEST_FORMAT, "name": "smollm2",
                                                 "files": M._hash_tree(cached)}))
    copy, mod = tmp_path / "copy", tmp_path / "mod"
    shutil.copytree(cached, copy)
    os.unlink(copy / M.MANIFEST)
    shutil.copytree(copy, mod)
    save_model(_perturbed(model), str(mod / M.WEIGHTS))
    assert os.path.getsize(mod / M.WEIGHTS) == os.path.getsize(copy / M.WEIGHTS)

    def source_of(acz):
        with ArchiveReader(acz) as r:
            return r.metadata.get("acz.source_model")

    a_copy, a_mod = tmp_path / "copy.acz", tmp_path / "mod.acz"
    archive.compress(copy, a_copy, progress=False)
    archive.compress(mod, a_mod, progress=False)
    assert source_of(a_copy) == "smollm2" and E.find_reference(str(a_copy)) == ("smollm2", None)
    assert source_of(a_mod) is None
    name, why = E.find_reference(str(a_mod))
    assert name is None and "does not record" in why

    assert main(["eval", str(a_mod), "--tokens", "40", "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if "no KLD reference" in ln]
    assert len(lines) == 1 and "--ref" in lines[0]
    res = json.loads(out)
    assert res["ref"] is None and res.get("kld_mean") is None
    assert main(["eval", str(a_mod), "--ref", str(copy), "--tokens", "40", "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert "no KLD reference" not in err and res["ref"] == str(copy) and res["kld_mean"] > 0
    assert main(["eval", str(a_copy), "--tokens", "40", "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert "no KLD reference" not in err and res["ref"] == "smollm2" and res["kld_mean"] == 0.0
