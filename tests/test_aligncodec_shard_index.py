"""Sharded Hugging Face folders (issue 26): the shard index (``model.safetensors.index.json``)
comes back from ``decompress``, derived from the archive's file split (``acz.index``, spec §3.1);
a lossless round trip gives every file back byte for byte, a lossy one a folder that
``from_pretrained`` loads; an index that disagrees with its shards is a named input error; the
other files of a real folder either round-trip or are reported as not archived."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers")

from aligncodec import archive  # noqa: E402
from aligncodec.formats import metadata as M  # noqa: E402
from aligncodec.formats.reader import ArchiveReader  # noqa: E402
from aligncodec.tools.cli import main  # noqa: E402

from tiny_arch import make_checkpoint  # noqa: E402

INDEX = "model.safetensors.index.json"

# the other files of a real Hugging Face folder that travel as auxiliary files (spec §7.3)
EXTRA_AUX = {
    "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "</s>"}\n',
    "chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}\n",
    "tokenizer.model": bytes(range(256)) * 4,  # a binary sentencepiece model
    "added_tokens.json": b'{"<tool>": 32000}',
    "tokenizer_config.json": b'{"model_max_length": 256}',
}
# ... and those that are not archived, each reported with its reason
NOT_ARCHIVED = {"LICENSE": "not a weight, index or auxiliary file type", ".gitattributes": "a hidden file",
                "original": "a folder"}


@pytest.fixture
def sharded(tmp_path):
    """A Mistral-shaped tiny folder (untied head, bf16) in 4 shards plus the files of a real folder."""
    d = make_checkpoint(tmp_path / "m", "mistral", tied=False, max_shard_size="60KB")
    assert (d / "generation_config.json").is_file()
    for n, b in EXTRA_AUX.items():
        (d / n).write_bytes(b)
    (d / "LICENSE").write_text("Apache-2.0\n")
    (d / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (d / "original").mkdir()
    (d / "original" / "params.json").write_text("{}")
    return d


def _shards(d):
    return sorted(p.name for p in d.glob("*.safetensors"))


def _index(d):
    return json.loads((d / INDEX).read_text())


def _tensor_bytes(folder):
    """total bytes of the tensors of a folder's shards, from their headers"""
    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n += st.get_tensor(k).numel() * st.get_tensor(k).element_size()
    return n


def _top_files(d):
    return sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))


def test_lossless_round_trip_is_byte_exact(sharded, tmp_path, capsys):
    assert len(_shards(sharded)) >= 3
    acz, out = tmp_path / "ll.acz", tmp_path / "out"
    assert main(["compress", str(sharded), "-o", str(acz), "--lossless"]) == 0
    err = capsys.readouterr().err
    for name, why in NOT_ARCHIVED.items():  # reported, with the reason
        assert f"note: not archived: {name} ({why}" in err
    assert "layout" not in err  # the index's bytes are reproducible
    assert main(["decompress", str(acz), "-o", str(out), "-q"]) == 0
    expect = [n for n in _top_files(sharded) if n != "LICENSE"]
    assert INDEX in expect and "generation_config.json" in expect and set(EXTRA_AUX) <= set(expect)
    assert _top_files(out) == expect
    for n in expect:
        assert (out / n).read_bytes() == (sharded / n).read_bytes(), n
    # the index is not an auxiliary file: it is rebuilt from acz.files and acz.index
    r = ArchiveReader(acz)
    assert not any(e.name.endswith(INDEX) for e in r.tensors)
    idx = json.loads(r.metadata[M.KEY_INDEX])
    assert list(idx) == [INDEX] and idx[INDEX]["files"] == _shards(sharded)
    assert idx[INDEX]["fields"] == {"metadata": _index(sharded)["metadata"]}
    assert idx[INDEX]["layout"] == {"indent": 2, "sort_keys": True, "ascii": True, "newline": True}
    r.close()
    assert _index(out)["metadata"]["total_size"] == _tensor_bytes(out)


def test_hub_layout_is_byte_exact_too(tmp_path):
    """huggingface_hub's save_torch_state_dict: keys in state-dict order, no trailing newline."""
    from huggingface_hub import save_torch_state_dict

    d = tmp_path / "hub"
    d.mkdir()
    g = torch.Generator().manual_seed(3)
    sd = {f"layer.{i}.{k}": torch.randn(32, 32, generator=g) for i in (10, 2, 1) for k in ("w", "b")}
    save_torch_state_dict(sd, str(d), max_shard_size=8000, metadata={"producer": "test"})
    raw = (d / INDEX).read_bytes()
    assert not raw.endswith(b"\n") and list(json.loads(raw)["weight_map"]) != sorted(sd)  # not HF's sorted layout
    assert main(["compress", str(d), "-o", str(tmp_path / "h.acz"), "--lossless", "-q"]) == 0
    assert main(["decompress", str(tmp_path / "h.acz"), "-o", str(tmp_path / "o"), "-q"]) == 0
    assert (tmp_path / "o" / INDEX).read_bytes() == raw
    assert sorted(os.listdir(tmp_path / "o")) == sorted(os.listdir(d))


def test_other_layouts_keep_the_content(sharded, tmp_path, capsys):
    """An index the writer cannot lay out again (compact separators) comes back with the same
    content, in Hugging Face's layout; compress says so."""
    idx = _index(sharded)
    idx["metadata"]["format_note"] = {"nested": [1, 2.5, None, True]}
    (sharded / INDEX).write_text(json.dumps(idx, separators=(",", ":")))
    acz = tmp_path / "c.acz"
    assert main(["compress", str(sharded), "-o", str(acz), "--lossless"]) == 0
    assert "decompress writes the same content in Hugging Face's layout" in capsys.readouterr().err
    assert main(["decompress", str(acz), "-o", str(tmp_path / "o"), "-q"]) == 0
    back = (tmp_path / "o" / INDEX).read_text()
    assert json.loads(back) == idx
    assert back == json.dumps(idx, indent=2, sort_keys=True) + "\n"


def _break(kind):
    def edit(d):
        idx = _index(d)
        wm = idx["weight_map"]
        shards = sorted(set(wm.values()))
        if kind == "missing_tensor":  # from a shard that holds others too
            del wm[next(t for t, f in wm.items() if list(wm.values()).count(f) > 1)]
        elif kind == "shard_not_in_index":  # every tensor of the last shard gone from the index
            for t in [t for t, f in wm.items() if f == shards[-1]]:
                del wm[t]
        elif kind == "tensor_no_shard_holds":
            wm["model.extra.weight"] = shards[0]
        elif kind == "wrong_shard":
            t = next(t for t, f in wm.items() if f == shards[0])
            wm[t] = shards[1]
        elif kind == "missing_file":
            wm[sorted(wm)[0]] = "model-00009-of-00009.safetensors"
        elif kind == "no_weight_map":
            idx = {"metadata": idx["metadata"]}
        elif kind == "total_size_negative":
            idx["metadata"]["total_size"] = -1
        text = json.dumps(idx, indent=2, sort_keys=True)
        if kind == "listed_twice":  # a duplicated key, which json.loads would silently merge
            t = sorted(wm)[0]
            text = text.replace(f'    "{t}": ', f'    "{t}": "{wm[t]}",\n    "{t}": ', 1)
        if kind == "not_json":
            text = text[:-5]
        (d / INDEX).write_text(text)
    return edit


@pytest.mark.parametrize("kind", ["missing_tensor", "shard_not_in_index", "tensor_no_shard_holds", "wrong_shard", "missing_file",
                                  "listed_twice", "not_json", "no_weight_map", "total_size_negative"])
def test_index_disagreeing_with_shards_is_exit_3(sharded, tmp_path, capsys, kind):
    _break(kind)(sharded)
    out = tmp_path / "x.acz"
    assert main(["compress", str(sharded), "-o", str(out), "--lossless", "-q"]) == 3
    err = capsys.readouterr().err
    assert "ShardIndexError" in err and INDEX in err
    assert {"missing_tensor": "is missing from the index", "shard_not_in_index": "is in the folder but not in the index",
            "tensor_no_shard_holds": "which no shard holds", "wrong_shard": "but it is in", "missing_file": "not in the folder",
            "listed_twice": "is listed twice", "not_json": "not UTF-8 JSON", "no_weight_map": "no 'weight_map'",
            "total_size_negative": "total_size"}[kind] in err
    assert not out.exists() and not list(tmp_path.glob(".acz-tmp-*"))
    # the lossy encoder checks it before any work too
    assert main(["compress", str(sharded), "-o", str(out), "--bpw", "4", "--no-calibration", "-q"]) == 3
    assert "ShardIndexError" in capsys.readouterr().err
    assert not out.exists()


def test_index_names_outside_the_portable_set_are_refused(sharded, tmp_path, capsys):
    (sharded / INDEX).rename(sharded / "my model.safetensors.index.json")
    assert main(["compress", str(sharded), "-o", str(tmp_path / "x.acz"), "--lossless", "-q"]) == 3
    assert "ShardIndexError" in capsys.readouterr().err


def _logits(model):
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("enc", ["all", "linear"])
def test_lossy_sharded_folder_loads_with_from_pretrained(sharded, tmp_path, enc):
    from transformers import AutoModelForCausalLM

    from aligncodec import load_hf_model

    acz, out = tmp_path / "l.acz", tmp_path / "out"
    extra = ["--bpw-scope", enc]
    assert main(["compress", str(sharded), "-o", str(acz), "--bpw", "3", "--no-calibration", "-q", *extra]) == 0
    assert main(["decompress", str(acz), "-o", str(out), "-q"]) == 0
    assert _shards(out) == _shards(sharded)
    assert _index(out) == _index(sharded)  # same weight map, same metadata
    assert (out / INDEX).read_bytes() == (sharded / INDEX).read_bytes()
    assert _index(out)["metadata"]["total_size"] == _tensor_bytes(out)  # the tensors kept their dtype
    ref = AutoModelForCausalLM.from_pretrained(str(sharded)).eval()
    folder = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    streamed = load_hf_model(acz)
    a, b = _logits(folder), _logits(streamed)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, _logits(ref))  # lossy: the weights did change


def test_decompress_without_an_index_writes_none(tmp_path):
    d = make_checkpoint(tmp_path / "one", "llama")
    assert main(["compress", str(d), "-o", str(tmp_path / "a.acz"), "--lossless", "-q"]) == 0
    assert M.KEY_INDEX not in ArchiveReader(tmp_path / "a.acz").metadata
    assert main(["decompress", str(tmp_path / "a.acz"), "-o", str(tmp_path / "o"), "-q"]) == 0
    assert not list((tmp_path / "o").glob("*.index.json"))


def test_smuggled_index_aux_file_is_refused(sharded, tmp_path, capsys):
    """An archive whose index arrives as an auxiliary file (beside a valid acz.index) is refused by
    every reader, and nothing is written."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hostile as H

    for case in ("aux_index_smuggled", "aux_index_smuggled_case"):
        p = tmp_path / f"{case}.acz"
        p.write_bytes(H.CASES[case].build())
        for argv in (["decompress", str(p), "-o", str(tmp_path / "o"), "-q"], ["verify", str(p), "-q"], ["inspect", str(p)]):
            assert main(argv) == 4
            assert "HeaderError" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    # and compress never stores the index as one: the archive of a sharded folder has no such entry
    assert archive.find_inputs(sharded).indexes == [sharded / INDEX]
    assert all(not a.name.endswith(".index.json") for a in archive.find_inputs(sharded).aux)
