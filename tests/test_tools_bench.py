"""Benchmarks run end to end on tiny inputs (their numbers are not asserted: no timing in tests)."""

import json

import pytest
import torch

from aligncodec.tools.bench import bench
from aligncodec.tools.cli import main


def test_bench_decode_small_runs_every_decoder():
    res = bench.bench_decode(64, 80, threads=(1, 2), repeat=1, reference_symbols=1000, chunk_symbols=256, gpu=False,
                             tcq_states=(8, 64))
    names = [r["decoder"] for r in res["rows"]]
    assert names[0].startswith("reference")
    assert any(n.startswith("constriction") for n in names)
    whats = {(r["decoder"], r["what"]) for r in res["rows"]}
    assert ("numba CPU, 1 thread", "bf16 (fused)") in whats and ("numba CPU, 2 threads", "symbols") in whats
    assert ("numba CPU, 2 threads", "bf16 (lossy ecsq)") in whats and 1 < res["info"]["lossy_bits_per_weight"] < 6
    assert ("numba CPU, 1 thread", "bf16 (lossy tcq)") in whats and 1 < res["info"]["tcq_bits_per_weight"] < 6
    assert res["info"]["tcq_over_ecsq_speed_2t"] > 0 and res["info"]["tcq_over_ecsq_cpu_1t"] > 0
    for r in res["rows"]:
        assert r["seconds"] > 0 and r["GB_per_s_bf16"] == pytest.approx(2 * r["symbols"] / r["seconds"] / 1e9)
    assert ("numba CPU, 2 threads", "bf16 (lossy tcq64)") in whats and res["info"]["tcq64_over_tcq_speed_1t"] > 0
    assert "x constr." in bench.format_table(res) and "tcq (8 states) decode speed / ecsq's" in bench.format_table(res)
    assert "tcq64 (64 states) decode speed / tcq 8 states'" in bench.format_table(res)


def test_cli_bench_decode_json(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["bench", "decode", "--rows", "32", "--cols", "40", "--repeat", "1", "--threads", "1",
                 "--reference-symbols", "500", "--chunk-symbols", "100", "--no-gpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "decode" and res["info"]["symbols"] == 32 * 40
    assert "numba CPU, 1 thread" in capsys.readouterr().out
    assert main(["bench", "decode", "--threads", "x"]) == 2


@pytest.mark.slow
def test_bench_load_tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    res = bench.bench_load(str(tmp_path / "tiny"), repeat=1, workdir=tmp_path / "work", progress=False)
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds == ["st-sd", "acz-sd", "st-hf", "acz-hf"]
    assert all(r["warm"]["cpu_seconds_median"] > 0 for r in res["rows"])
    sd = {r["kind"]: r["tensor_bytes"] for r in res["rows"]}
    assert sd["st-sd"] == sd["acz-sd"] > 0  # both loads hold the same fp16 weights
    assert "peak RSS" in bench.format_table(res)


@pytest.mark.slow
def test_bench_load_lossy_warm_and_cold(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligncodec import encode as S

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    lossy = tmp_path / "tiny-3.acz"
    S.encode(tmp_path / "tiny", lossy, S.EncodeOptions(bpw=3.0, scope="linear", calibration="none"), progress=False)
    out = bench.bench_load(str(tmp_path / "tiny"), repeat=1, workdir=tmp_path / "work", progress=False,
                           kinds=("st-sd", "acz-sd"), lossy=lossy, caches=("warm", "cold"), threads=2)
    assert [r["kind"] for r in out["rows"]] == ["st-sd", "acz-sd", "lossy-sd"]
    for r in out["rows"]:
        for c in ("warm", "cold"):
            assert r[c]["seconds_median"] > 0 and r[c]["peak_rss"] > 0 and r[c]["x_safetensors_touched"] > 0
    assert out["info"]["evicted_with_fadvise"] is True
    table = bench.format_table(out)
    assert "lossy .acz" in table and "cold s" in table


@pytest.mark.model
def test_stream_profile_reports_each_block(tmp_path, capsys):
    """tools/bench/stream_profile.py on the tiny synthetic checkpoint (SmolLM2's cached tokenizer)."""
    import json

    from aligncodec.tools.bench import stream_profile, synth_checkpoint

    d = tmp_path / "tiny"
    assert synth_checkpoint.main(["--size", "tiny", "-o", str(d)]) in (0, None)
    capsys.readouterr()
    assert stream_profile.main([str(d), "--blocks", "2", "--calib-tokens", "512"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(rep["wall_s_per_block"]) == len(rep["cpu_s_per_block"]) == 2
    assert all(t > 0 for t in rep["cpu_s_per_block"])


def test_synth_checkpoint_layers_keeps_widths_and_tensors(tmp_path, monkeypatch):
    """--layers N: the first N blocks of the size, bit for bit the same tensors as the full
    checkpoint's (values depend on name and seed, scales on the full depth), the same widths."""
    from safetensors.torch import load_file

    from aligncodec.tools.bench import synth_checkpoint as SC

    full, short = SC.config_dict("1.5b"), SC.config_dict("1.5b", 2)
    assert short["num_hidden_layers"] == 2 and {k: v for k, v in short.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in full.items() if k != "num_hidden_layers"}
    assert SC.n_params("1.5b", 3) - SC.n_params("1.5b", 2) == (SC.n_params("1.5b") - SC.n_params("1.5b", 2)) / 22
    monkeypatch.setattr(SC, "VOCAB", 64)  # small embeddings: a quick test
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    a = SC.generate("tiny", tmp_path / "a", tokenizer_dir=tok, progress=False)
    b = SC.generate("tiny", tmp_path / "b", tokenizer_dir=tok, progress=False, layers=1)
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert set(tb) < set(ta) and not any(".layers.1." in k for k in tb)
    assert all(torch.equal(tb[k], ta[k]) for k in tb)
    assert json.loads((b / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(SystemExit):
        SC.config_dict("tiny", 0)


def test_rans_precision_rate_and_speed(capsys):
    """tools/bench/rans_precision.py: capping P never lowers the rate estimate below the encoder's own
    choice, costs nothing at the full range, and the capped encoder's stream decodes bit-exact."""
    from aligncodec.tools.bench import rans_precision

    e, streams = bench.lossy_entry(64, 96)
    full = rans_precision.rate_cost([(e.numel, streams)], cap=16)
    assert full["delta_bpw"] == 0 and full["rans_symbols"] == e.numel and full["weights"] == e.numel
    low = rans_precision.rate_cost([(e.numel, streams)], cap=10)
    assert low["delta_bpw"] >= 0 and low["rans_MB_written"] == full["rans_MB_written"]
    rows = rans_precision.decode_speed(64, 96, caps=(16, 10), repeat=1)  # asserts bit-exactness itself
    assert [r["cap"] for r in rows] == [16, 10] and max(rows[1]["precisions"]) <= 10
    assert all(r["decode_ns_per_weight"] > 0 for r in rows)
    assert rans_precision.main(["--rows", "32", "--cols", "48", "--repeat", "1", "--cap", "11"]) == 0
    assert "P <= 11" in capsys.readouterr().out


def test_load_profile_splits_bytegroup_planes(tmp_path):
    """tools/bench/load_profile.py on a small fp16 archive: each step timed, each byte plane's stored fraction."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from aligncodec import archive
    from aligncodec.tools.bench import load_profile

    g = torch.Generator().manual_seed(0)
    save_file({"w": (torch.randn(600, 512, generator=g) * 0.02).half(), "b": torch.zeros(7, dtype=torch.float16)},
              str(tmp_path / "m.safetensors"))
    from aligncodec.codec.modes import lossless

    with lossless.use_policy("bytegroup"):  # (the default codes fp16 as float-split since 2026-12-07)
        archive.compress(tmp_path / "m.safetensors", tmp_path / "m.acz", progress=False)
    T = load_profile.profile(str(tmp_path / "m.acz"))
    assert T["total"] > 0 and T["bytegroup_zstd"] > 0 and T["bytegroup_join"] > 0
    assert 0 < T["plane0_stored_fraction"] <= 1 and 0 < T["plane1_stored_fraction"] < T["plane0_stored_fraction"]
    assert np.isfinite(T["plane0_zstd"]) and T["plane1_zstd"] > 0


def test_synth_archive_stand_in(tmp_path):
    """tools/bench/synth_archive.py: synth_checkpoint's tensor names and shapes, the
    linear layers in the default lossy mode (tcq, 64 states) at about 3 bits per weight, the
    rest lossless; the archive decodes (CPU decoder) to finite bf16 tensors of those shapes."""
    import torch

    import aligncodec
    from aligncodec.codec.modes import lossy
    from aligncodec.formats.constants import MODE_TCQ
    from aligncodec.formats.reader import ArchiveReader
    from aligncodec.tools.bench import synth_archive, synth_checkpoint as SC

    p = tmp_path / "s.acz"
    info = synth_archive.write("tiny", p, layers=1, embeddings=False)
    specs = [s for s in SC.tensor_specs(SC.config_dict("tiny", 1)) if s[2] != "embed"]
    with ArchiveReader(p) as r:
        ts = r.tensors
        assert sorted((e.name, e.shape) for e in ts) == sorted((n, tuple(s)) for n, s, _ in specs)  # the writer's order
        kinds = {n: k for n, _, k in specs}
        lin = [e for e in ts if kinds[e.name] in ("in", "out")]
        assert lin and all(e.mode == MODE_TCQ for e in lin)
        assert all(lossy.EcsqParams.unpack(e.params, e.name, e.mode).trellis == max(lossy.TRELLIS_MACHINES) for e in lin)
        bpw = 8 * sum(e.size for e in lin) / sum(e.numel for e in lin)
        assert 2.0 < bpw < 4.0, bpw
    assert info["tensors"] == len(specs)
    sd = aligncodec.load_state_dict(p, threads=1)
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all() for t in sd.values())
    # the lossless stand-in: every tensor synth_checkpoint's values, bit for bit
    q = tmp_path / "l.acz"
    synth_archive.write("tiny", q, layers=1, embeddings=False, lossless=True)
    cfg = SC.config_dict("tiny", 1)
    for name, t in aligncodec.load(q, threads=1):
        shape, kind = next((s, k) for n, s, k in specs if n == name)
        assert torch.equal(t.view(torch.int16), SC.make_tensor(name, shape, kind, cfg["num_hidden_layers"], 0).view(torch.int16)), name
