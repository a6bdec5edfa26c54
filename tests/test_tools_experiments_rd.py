"""tools/experiments/rd.py code paths on a tiny synthetic checkpoint (no evaluation)."""

import pytest
import torch
from safetensors.torch import save_file

from aligncodec.tools.experiments import rd


def test_encoder_methods_rows_and_table(tmp_path):
    g = torch.Generator().manual_seed(3)
    p = tmp_path / "model.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(192, 128, generator=g) * 0.04,
               "model.layers.0.self_attn.v_proj.weight": torch.randn(128, 128, generator=g) * 0.02}, str(p))
    rows = [rd.run_encoder_method(str(p), m, 3.0, evaluate=False, sigma="none", progress=False) for m in ("align", "hadamard")]
    for r in rows:
        assert abs(r["bpw"] / 3.0 - 1) <= 0.01
        assert sum(sum(v.values()) for v in r["modes_by_type"].values()) == 2
    assert set(rows[1]["modes_by_type"]["up"]) == {"hadamard"}
    res = {"model": "tiny", "n_tokens": 0, "kld": "none", "reference": None, "rows": rows}
    table = rd.format_table(res)
    assert "| align | 3.0 |" in table and "| hadamard | 3.0 |" in table


def _row(method, target, ppl, kld=0.5):
    return {"method": method, "target_bpw": target, "bpw": target * 1.004, "perplexity": ppl, "kld": kld,
            "act_sqnr_db": 20.0 + target, "mean_sqnr_db": 15.0, "encode_seconds": 10.0}


def _write(folder, rows, n_tokens=32768, ref=20.94):
    import json

    folder.mkdir()
    res = {"model": "smollm2", "n_tokens": n_tokens, "kld": "top-256 reference",
           "reference": {"perplexity": ref}, "rows": rows}
    (folder / "rd.json").write_text(json.dumps(res))
    return folder


def test_merge_orders_rows_and_later_run_wins(tmp_path):
    a = _write(tmp_path / "a", [_row("align", 3.0, 28.2), _row("hadamard", 3.0, 28.4), _row("align", 2.5, 44.6)])
    b = _write(tmp_path / "b", [_row("rtn", 2.5, 111.0), _row("hadamard", 3.0, 28.5)])
    res, notes = rd.merge_results([a, b / "rd.json"])
    got = [(r["method"], r["target_bpw"], r["perplexity"]) for r in res["rows"]]
    assert got == [("align", 2.5, 44.6), ("rtn", 2.5, 111.0), ("align", 3.0, 28.2), ("hadamard", 3.0, 28.5)]
    assert len(notes) == 1 and "hadamard at 3.0" in notes[0]
    assert res["reference"]["perplexity"] == 20.94 and res["n_tokens"] == 32768
    out = tmp_path / "out"
    rd.save_result(out, res)
    assert "| rtn | 2.5 |" in (out / "rd.md").read_text()
    assert (out / "rd.png").stat().st_size > 0 and not list(out.glob(".*tmp*"))


@pytest.mark.parametrize("case", ["tokens", "reference", "missing", "garbage", "row", "badref", "badtarget"])
def test_merge_refuses_mixed_or_bad_inputs(tmp_path, case, capsys):
    from aligncodec.tools.cli import main

    a = _write(tmp_path / "a", [_row("align", 3.0, 28.2)])
    if case == "tokens":
        b = _write(tmp_path / "b", [_row("rtn", 3.0, 50.0)], n_tokens=8192)
    elif case == "reference":
        b = _write(tmp_path / "b", [_row("rtn", 3.0, 50.0)], ref=21.95)
    elif case == "missing":
        b = tmp_path / "nope"
    elif case == "garbage":
        b = tmp_path / "b.json"
        b.write_bytes(b"\x00{not json")
    elif case == "badref":
        b = _write(tmp_path / "b", [_row("rtn", 3.0, 50.0)], ref="x")
    elif case == "badtarget":
        b = _write(tmp_path / "b", [dict(_row("rtn", 3.0, 50.0), target_bpw="3.0")])
    else:
        b = _write(tmp_path / "b", [{"method": "rtn"}])
    with pytest.raises(rd.MergeError):
        rd.merge_results([a, b])
    assert main(["rd", "--merge", str(a), str(b), "-o", str(tmp_path / "out")]) == 2
    assert "aligncodec" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_weight_domain_curve_codes_an_encoder_only_model_tensor_by_tensor(tmp_path):
    """MiniLM-like input (a BERT folder: no causal LM, no block plan): without calibration the one
    encoder codes its linear weights one by one with weight MSE; the SQNR is measured on what
    the decoder reads back, and it rises with the rate."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    res = rd.weight_domain_curve(str(tmp_path / "bert"), rates=(2.5, 4.0), candidates_by_method={"ecsq": ("identity",)})
    pts = res["ecsq"]["points"]
    assert [abs(p["bpw"] / r - 1) <= 0.01 for p, r in zip(pts, (2.5, 4.0))] == [True, True]
    assert 5 < pts[0]["sqnr_db"] < pts[1]["sqnr_db"] < 40
