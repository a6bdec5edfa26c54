"""Hostile archives (tests/hostile.py, issue 15): every read path — verify, inspect, decompress,
load (random access and streaming) — raises the same named error on each case, the CLI exits
with the documented code, and the bounded-work cases stay within a small memory budget."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aligncodec.formats import errors as E
from aligncodec.formats.limits import Limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile as H  # noqa: E402

NAMED = {c.__name__ for c in (E.AczError, *E.AczError.__subclasses__())} | {
    c.__name__ for c in E.FormatError.__subclasses__()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    H.write_corpus(d)
    return d


def test_every_case_has_a_named_expectation():
    assert len(H.CASES) >= 40
    for name, case in H.CASES.items():
        assert case.expect == "OK" or case.expect in NAMED, name


@pytest.mark.parametrize("name", sorted(H.CASES))
def test_read_paths_agree(name, corpus, tmp_path):
    case = H.CASES[name]
    path = corpus / f"{name}.acz"
    got = {op: H.run_op(op, path, tmp_path) for op in H.OPS}
    outcome = {op: r[0] for op, r in got.items()}
    assert outcome == {op: case.expect for op in H.OPS}, {op: repr(r[1])[:300] for op, r in got.items()}
    if case.expect == "OK":
        import torch
        from safetensors.torch import load_file

        def raw(t):
            return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

        loaded = got["load"][1]
        assert {n: raw(loaded[n]) for n in case.tensors} == case.tensors
        files = [p for p in got["decompress"][1] if p.suffix == ".safetensors"]
        written = {}
        for f in files:
            for n, a in load_file(f).items():
                assert n not in written
                written[n] = raw(a)
        assert written == case.tensors  # every tensor written once, none lost


@pytest.mark.parametrize("name", sorted(H.CASES))
def test_cli_exit_codes(name, corpus, capsys):
    from aligncodec.tools.cli import main

    case = H.CASES[name]
    want = 0 if case.expect == "OK" else (5 if case.expect == "ChecksumError" else 6 if case.expect == "UnsupportedError" else 4)
    for cmd in (["verify", "-q"], ["inspect", "--json"]):
        rc = main([cmd[0], str(corpus / f"{name}.acz"), *cmd[1:]])
        err = capsys.readouterr().err
        assert rc == want, err
        if case.expect != "OK":
            assert f"error: {case.expect}:" in err and "Traceback" not in err


def test_max_ratio_flag_raises_the_expansion_limit(tmp_path, capsys):
    from aligncodec.tools.cli import main

    p = tmp_path / "big.acz"
    p.write_bytes(H.build({}, [H.T("w", "U8", (8 << 20,), 0, [H.C.ZstdStream(H.zstd_rle_frame(8 << 20), 8 << 20)])]))
    assert main(["verify", "-q", str(p)]) == 4
    assert "LimitError" in capsys.readouterr().err
    assert main(["verify", "-q", "--max-ratio", "inf", str(p)]) == 0
    assert main(["verify", "-q", "--max-ratio", "1e5", str(p)]) == 0
    assert main(["inspect", "--max-ratio", "0", str(p)]) == 2


def test_hadamard_limit_is_configurable(corpus, tmp_path):
    from aligncodec import archive

    p = tmp_path / "h.acz"
    p.write_bytes(H._hadamard(2, 1023, 1023))
    with pytest.raises(E.LimitError):
        archive.inspect(p)
    info = archive.inspect(p, limits=Limits(max_hadamard_m=1023))
    assert info["tensors"][0]["shape"] == [2, 1023]


def test_metadata_limit(tmp_path):
    from aligncodec import archive

    p = tmp_path / "m.acz"
    p.write_bytes(H.build({"x": "y" * 5000}, [H.W]))
    archive.verify(p)
    with pytest.raises(E.LimitError):
        archive.verify(p, limits=Limits(max_metadata_bytes=4096))


_PEAK = r"""
import io, json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import hostile as H
d = Path(sys.argv[2])  # the test's tmp_path: removed by pytest, not left in /tmp
H.write_corpus(d)
def kb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# warm up every path (imports, numba kernels) on valid archives, then take the baseline
for n in ("orphan_name_collision", "zero_size_ok"):
    for op in H.OPS:
        assert H.run_op(op, d / f"{n}.acz", d)[0] == "OK"
base = kb()
res = {}
for n in sys.argv[3:]:
    for op in H.OPS:
        res[f"{n}/{op}"] = H.run_op(op, d / f"{n}.acz", d)[0]
print(json.dumps({"base_kb": base, "peak_kb": kb(), "res": res}))
"""

BOUNDED = ["zstd_bogus_256MiB", "zstd_rle_256MiB", "zstd_rle_1GiB", "rans_ecsq_32GiB", "rans_float_split_64MiB",
           "many_tensors_expansion", "hadamard_m_1023", "zero_dim_huge", "nested_metadata", "zstd_rle_under_slack"]


def test_bounded_work_peak_memory(tmp_path):
    """Every bounded-work case through every read path costs < 64 MB over the warmed baseline."""
    p = subprocess.run([sys.executable, "-c", _PEAK, str(Path(__file__).resolve().parent), str(tmp_path), *BOUNDED],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert all(v == H.CASES[k.split("/")[0]].expect for k, v in out["res"].items()), out["res"]
    assert (out["peak_kb"] - out["base_kb"]) / 1024 < 64, out
