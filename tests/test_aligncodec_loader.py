"""Streaming loader: path and pipe sources, exact read-ahead bound, errors, tiny Llama round trip."""

import os
import subprocess
import threading

import pytest
import torch

import aligncodec
from aligncodec.formats.reader import ArchiveReader
from aligncodec.formats import errors as E
from aligncodec import archive, loader


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": (torch.randn(64, 48, generator=g) * 0.05).to(torch.bfloat16),
        "b.weight": torch.randn(300, generator=g),
        "c.half": (torch.randn(40, 40, generator=g)).to(torch.float16),
        "d.ids": torch.arange(1000, dtype=torch.int64),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
        "g.mask": torch.rand(77, generator=g) > 0.5,
    }


@pytest.fixture(scope="module")
def acz(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ld")
    tensors = _tensors()
    save_file(tensors, str(d / "m.safetensors"))
    archive.compress(d / "m.safetensors", d / "m.acz", progress=False)
    return d / "m.acz", tensors


def _same(a, b):
    """Same dtype, shape and bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def test_load_from_path_in_file_order(acz):
    path, tensors = acz
    got = list(aligncodec.load(path))
    with ArchiveReader(path) as r:
        assert [n for n, _ in got] == [e.name for e in r.tensors]
    for name, t in got:
        assert _same(t, tensors[name]), name
    sd = aligncodec.load_state_dict(path, dtype=torch.float32)
    assert sd["a.weight"].dtype == torch.float32 and torch.equal(sd["a.weight"], tensors["a.weight"].float())
    assert sd["d.ids"].dtype == torch.int64  # dtype applies to floating-point tensors only


def test_load_from_os_pipe_with_short_reads(acz):
    path, tensors = acz
    data = path.read_bytes()
    r, w = os.pipe()

    def writer():
        with os.fdopen(w, "wb", buffering=0) as f:
            for i in range(0, len(data), 997):  # odd-sized pieces: reads return short
                f.write(data[i : i + 997])

    th = threading.Thread(target=writer)
    th.start()
    with os.fdopen(r, "rb", buffering=0) as f:
        got = dict(aligncodec.load(f, threads=1))
    th.join()
    assert set(got) == set(tensors)
    assert all(_same(got[n], tensors[n]) for n in tensors)


def test_load_from_subprocess_cat(acz):
    path, tensors = acz
    p = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    try:
        got = dict(aligncodec.load(p.stdout))
    finally:
        p.stdout.close()
        p.wait()
    assert all(_same(got[n], tensors[n]) for n in tensors)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_read_ahead_is_exactly_bounded(acz, prefetch):
    """At each yield the reader has read exactly up to the end of tensor i + 1 + prefetch
    (it reads ahead, and no further), and never holds more than 1 + prefetch tensors."""
    path, _ = acz
    with ArchiveReader(path) as r:
        entries = r.tensors
        base = r.header.data_offset
    stats = loader.LoadStats()
    n = 0
    with open(path, "rb") as f:
        for i, (name, _t) in enumerate(loader.load(f, prefetch=prefetch, include_aux=True, stats=stats)):
            assert name == entries[i].name
            assert stats.reader_idle.wait(30)
            j = min(i + 1 + prefetch, len(entries) - 1)
            assert stats.bytes_read == base + entries[j].offset + entries[j].size, (i, prefetch)
            assert stats.in_flight <= 1 + prefetch
            n += 1
    assert n == len(entries)
    assert stats.max_in_flight <= 1 + prefetch
    assert stats.decoded_bytes == sum(e.nbytes for e in entries)


def test_early_stop_ends_reader_thread(acz):
    path, _ = acz
    gen = aligncodec.load(path, prefetch=1)
    next(gen)
    gen.close()
    for t in threading.enumerate():
        if t.name == "acz-reader":
            t.join(10)
    assert not any(t.name == "acz-reader" and t.is_alive() for t in threading.enumerate())


def test_truncated_stream_raises_named_error(acz):
    import io

    path, _ = acz
    data = path.read_bytes()
    with pytest.raises(E.TruncatedError):
        list(aligncodec.load(io.BytesIO(data[: len(data) - 100])))
    bad = bytearray(data)
    bad[-10] ^= 0xFF
    with pytest.raises(E.ChecksumError):
        list(aligncodec.load(io.BytesIO(bytes(bad))))
    with pytest.raises(TypeError):
        list(aligncodec.load(12345))
    with pytest.raises(ValueError):
        list(aligncodec.load(path, prefetch=-1))


# ----------------------------------------------------------------- Hugging Face models


def _tiny_llama(tmp_path, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path / f"llama-{tie}"
    model.save_pretrained(folder)
    out = tmp_path / f"llama-{tie}.acz"
    archive.compress(folder, out, progress=False)
    return model, out


@pytest.mark.parametrize("tie", [True, False])
def test_hf_model_round_trip_identical_outputs(tmp_path, tie):
    model, path = _tiny_llama(tmp_path, tie)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    got_model = aligncodec.load_hf_model(path)
    assert type(got_model) is type(model)
    assert not any(p.device.type == "meta" for p in got_model.parameters())
    if tie:
        assert got_model.lm_head.weight.data_ptr() == got_model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        got = got_model(ids).logits
    assert torch.equal(got, want)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), got_model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_hf_model_honours_reader_limits(tmp_path):
    """load_hf_model passes ``limits`` to the reader: a tensor larger than max_tensor_bytes is a
    LimitError before it is decoded; the default limits load the same archive."""
    from aligncodec.formats.errors import LimitError
    from aligncodec.formats.limits import Limits

    _, path = _tiny_llama(tmp_path, True)
    with pytest.raises(LimitError):
        aligncodec.load_hf_model(path, limits=Limits(max_tensor_bytes=1024))
    assert aligncodec.load_hf_model(path, limits=Limits()) is not None


def test_hf_model_from_pipe_and_dtype(tmp_path):
    model, path = _tiny_llama(tmp_path, True)
    p = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    try:
        m2 = aligncodec.load_hf_model(p.stdout, dtype=torch.bfloat16)
    finally:
        p.stdout.close()
        p.wait()
    assert all(q.dtype == torch.bfloat16 for q in m2.parameters())
    ref = model.to(torch.bfloat16)
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_hf_model_needs_config_and_matching_weights(tmp_path, acz):
    path, _ = acz
    with pytest.raises(loader.LoadError, match="config.json"):
        aligncodec.load_hf_model(path)
    # an archive whose weights do not fit its config
    from safetensors.torch import load_file, save_file

    model, good = _tiny_llama(tmp_path, True)
    folder = tmp_path / "llama-True"
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    archive.compress(folder, tmp_path / "bad.acz", progress=False)
    with pytest.raises(loader.LoadError, match="not in the model"):
        aligncodec.load_hf_model(tmp_path / "bad.acz")
    del sd["model.extra.weight"], sd["model.norm.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    archive.compress(folder, tmp_path / "bad2.acz", progress=False)
    with pytest.raises(loader.LoadError, match="not in the archive"):
        aligncodec.load_hf_model(tmp_path / "bad2.acz")
