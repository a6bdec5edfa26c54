"""tools/rd.py code paths on a tiny synthetic checkpoint (no evaluation)."""

import torch
from safetensors.torch import save_file

from aligncodec.tools import rd


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
