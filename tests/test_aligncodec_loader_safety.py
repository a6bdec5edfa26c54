"""load_hf_model trusts nothing in the archive's config.json (issue 15): the architecture comes
from transformers' causal-LM auto classes only, a bad config.json is a LoadError, and the
archive's tensor list is checked against the config before any model is built."""

import json

import numpy as np
import pytest
import torch

import aligncodec
from aligncodec import archive, loader
from aligncodec.codec.modes import lossless
from aligncodec.formats.writer import ArchiveWriter


def _tiny_llama_folder(tmp_path, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    if over:
        c = json.loads((folder / "config.json").read_text())
        c.update(over)
        (folder / "config.json").write_text(json.dumps(c))
    return folder


def _acz_with_config(tmp_path, config: bytes, tensors=None, name="c.acz"):
    path = tmp_path / name
    with ArchiveWriter(path, {}) as w:
        for n, data in {"acz:file/config.json": config, **(tensors or {})}.items():
            mode, params, streams = lossless.encode(np.frombuffer(data, np.uint8), "U8", len(data))
            w.add(n, "U8", (len(data),), mode, streams, params)
    return path


@pytest.mark.parametrize("arch", ["pipeline", "set_seed", "AutoTokenizer", "LlamaModel", "__class__"])
def test_architecture_never_names_an_arbitrary_attribute(tmp_path, monkeypatch, arch):
    import transformers

    calls = []
    for fn in ("pipeline", "set_seed"):
        monkeypatch.setattr(transformers, fn, lambda *a, _fn=fn, **k: calls.append(_fn))
    folder = _tiny_llama_folder(tmp_path, architectures=[arch])
    archive.compress(folder, tmp_path / "m.acz", progress=False)
    with pytest.raises(loader.LoadError, match="architecture"):
        aligncodec.load_hf_model(tmp_path / "m.acz")
    assert not calls


@pytest.mark.parametrize("config", [b"{not json", b"[1, 2]", b'"llama"', b"\xff\xfe", b"[" * 100000,
                                    b'{"model_type": "no-such-model"}', b'{"model_type": 7}', b'{"model_type": "bert"}',
                                    b'{"model_type": "llama", "num_hidden_layers": "many"}'])
def test_bad_config_json_is_a_load_error(tmp_path, config):
    path = _acz_with_config(tmp_path, config)
    with pytest.raises(loader.LoadError):
        aligncodec.load_hf_model(path)


def test_huge_layer_count_fails_before_building(tmp_path, monkeypatch):
    """num_hidden_layers = 100000 in a tiny archive: a LoadError before any model is built."""
    import transformers

    folder = _tiny_llama_folder(tmp_path, num_hidden_layers=100000)
    archive.compress(folder, tmp_path / "m.acz", progress=False)

    def no_build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", no_build)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_build)
    with pytest.raises(loader.LoadError, match="num_hidden_layers=100000"):
        aligncodec.load_hf_model(tmp_path / "m.acz")


def test_tensor_list_checked_before_weights_are_decoded(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder = _tiny_llama_folder(tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)  # wrong shape
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    archive.compress(folder, tmp_path / "m.acz", progress=False)
    decoded = []
    real = loader.decode_tensor

    def spy(entry, streams, **k):
        decoded.append(entry.name)
        return real(entry, streams, **k)

    monkeypatch.setattr(loader, "decode_tensor", spy)
    with pytest.raises(loader.LoadError, match="up_proj.weight: archive shape"):
        aligncodec.load_hf_model(tmp_path / "m.acz")
    assert decoded == ["acz:file/config.json"]  # only the config was decoded


def test_no_config_fails_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "w.acz"
    with ArchiveWriter(path, {}) as w:
        mode, params, streams = lossless.encode(np.zeros(16, np.uint8), "U8", 16)
        w.add("w", "U8", (16,), mode, streams, params)
    monkeypatch.setattr(loader, "decode_tensor", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(loader.LoadError, match="config.json"):
        aligncodec.load_hf_model(path)
