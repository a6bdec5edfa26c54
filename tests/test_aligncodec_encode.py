"""The lossy encoder (aligncodec/encode/) on tiny random
checkpoints of several architectures built from Transformers' own config classes."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from aligncodec.encode import arch as A  # noqa: E402
from aligncodec import archive  # noqa: E402
from aligncodec import encode as S  # noqa: E402
from aligncodec.codec import encoder as E  # noqa: E402
from aligncodec.codec.quant import registry as Q  # noqa: E402
from aligncodec.encode import blocks as B, calibration as C, head as H, plan as P, rate as R, spool as SP  # noqa: E402

from tiny_arch import ARCHS, ToyTokenizer, make_checkpoint  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


def _opts(text_file, **kw):
    base = dict(bpw=4.0, calib_tokens=1500, calib_text=str(text_file), window=256)
    base.update(kw)
    return S.EncodeOptions(**base)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [True, False])
def test_plan_finds_blocks_linears_and_embeddings(tmp_path, arch, tied):
    d = make_checkpoint(tmp_path, arch, tied)
    plan = A.plan_model(d)
    assert len(plan.blocks) == 2 and plan.blocks_path.endswith("layers")
    leaves = [li.module.rsplit(".", 1)[-1] for li in plan.blocks[0].linears]
    if arch == "phi3":
        assert sorted(leaves) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    else:
        assert sorted(leaves) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    ckpt = A.Checkpoint(d)
    for li in plan.blocks[1].linears:
        assert ckpt.tensors[li.weight].shape == li.shape
        if arch == "qwen2" and li.module.endswith(("q_proj", "k_proj", "v_proj")):
            assert li.bias in ckpt.tensors
    assert plan.tied == tied
    assert plan.embedding in ckpt.tensors and plan.lm_head in ckpt.tensors
    assert (plan.embedding == plan.lm_head) == tied
    # every checkpoint tensor is accounted for: a block parameter, an outer parameter or an extra
    assert plan.checkpoint_names | set(plan.extra) == set(ckpt.tensors)


def test_missing_config_is_named(tmp_path):
    d = make_checkpoint(tmp_path, "llama")
    os.unlink(d / "config.json")
    with pytest.raises(A.UnsupportedArchitectureError, match="config.json"):
        A.plan_model(d)


def test_unknown_architecture_is_named(tmp_path):
    d = make_checkpoint(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no_such_model"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(A.UnsupportedArchitectureError):
        A.plan_model(d)


def test_shape_mismatch_is_named(tmp_path):
    d = make_checkpoint(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(A.CheckpointError, match="shape"):
        A.plan_model(d)


def test_truncated_and_missing_shards_are_named(tmp_path):
    d = make_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    idx = json.loads((d / A.INDEX_NAME).read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 1
    A.Checkpoint(d)  # reads
    data = (d / shards[-1]).read_bytes()
    (d / shards[-1]).write_bytes(data[: len(data) - 100])
    with pytest.raises(A.CheckpointError, match="truncated"):
        A.Checkpoint(d)
    os.unlink(d / shards[-1])
    with pytest.raises(A.CheckpointError, match="missing"):
        A.Checkpoint(d)


def test_float_mode_sigma_matches_whole_model_calibration(tmp_path, text_file):
    """Block by block on the unmodified model gives the Σ of the whole-model capture (float64),
    and the energy tr(W Σ Wᵀ) taken from the linears' outputs is that of Σ and W."""
    from aligncodec.tools.eval.calibrate import capture_sigma
    from transformers import AutoModelForCausalLM

    d = make_checkpoint(tmp_path, "gemma3", dtype=torch.float32)  # sliding + full attention layers
    tok = ToyTokenizer()
    ref, _ = capture_sigma(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval(), tok, 1000, "calib", 256,
                           threads=None, progress=False, text=TEXT)
    plan = A.plan_model(d)
    ckpt = A.Checkpoint(d)
    data = C.calibration_windows(d, _opts(text_file, calib_tokens=1000), tok)
    for path, cname in plan.outer.items():
        A.set_param(plan.model, path, ckpt.float32(cname))
    hs, kws = C.record_block_inputs(plan, data.windows)
    blocks = A.get_module(plan.model, plan.blocks_path)
    for b in plan.blocks:
        for path, cname in b.params.items():
            A.set_param(plan.model, path, ckpt.float32(cname))
        cap = [(li.weight, A.get_module(plan.model, li.module)) for li in b.linears]
        en = {}
        hs, sig = C.run_block(blocks[b.index], hs, kws[b.index], cap, energy=en)
        assert set(en) == {li.weight for li in b.linears}
        for li in b.linears:
            assert sig[li.weight].dtype == torch.float64
            W = ckpt.float32(li.weight).double()
            want = float(((W @ sig[li.weight].double()) * W).sum())
            assert en[li.weight] == pytest.approx(want, rel=1e-4), li.weight
            R = ref[li.weight] if li.weight in ref else None
            if R is None:  # stored under the first linear that reads the same input
                continue
            assert torch.allclose(sig[li.weight], R, rtol=1e-4, atol=1e-6 * float(R.abs().max())), li.weight


@pytest.mark.parametrize("arch,tied", [("llama", True), ("gemma3", False),
                                       pytest.param("qwen2", False, marks=pytest.mark.slow),
                                       pytest.param("phi3", True, marks=pytest.mark.slow),
                                       pytest.param("mistral", True, marks=pytest.mark.slow)])
def test_encode_whole_file_rate_and_roundtrip(tmp_path, text_file, arch, tied):
    d = make_checkpoint(tmp_path / "m", arch, tied)
    out = tmp_path / "m.acz"
    summ = S.encode(d, out, _opts(text_file), tokenizer=ToyTokenizer(), progress=False)
    info = archive.inspect(out)
    n = info["n_weights"]
    assert abs(8 * os.path.getsize(out) / n / 4.0 - 1) <= 0.01
    assert summ["bpw_file"] == pytest.approx(8 * os.path.getsize(out) / n)
    archive.verify(out)
    rows = {r["name"]: r for r in info["tensors"]}
    plan = A.plan_model(d)
    assert rows[plan.embedding]["mode"] == "ecsq"  # whole-model scope: the embedding is lossy
    for b in plan.blocks:
        for li in b.linears:
            if li.bias:
                assert rows[li.bias]["mode"] != "ecsq"
    assert not SP.spool_dir(out).exists()
    # the decoded archive runs as a model
    from aligncodec.loader import load_state_dict

    sd = load_state_dict(out)
    assert all(torch.isfinite(v.float()).all() for v in sd.values())


def test_linear_scope_keeps_embeddings_lossless(tmp_path, text_file):
    d = make_checkpoint(tmp_path / "m", "llama", False)
    out = tmp_path / "m.acz"
    summ = S.encode(d, out, _opts(text_file, scope="linear", bpw=3.0), tokenizer=ToyTokenizer(), progress=False)
    rows = {r["name"]: r for r in archive.inspect(out)["tensors"]}
    assert rows["model.embed_tokens.weight"]["mode"] != "ecsq" and rows["lm_head.weight"]["mode"] != "ecsq"
    assert abs(summ["bpw_linear_all_in"] / 3.0 - 1) <= 0.03  # two blocks only: the controller has one correction


def test_quantized_and_float_calibration_differ(tmp_path, text_file):
    d = make_checkpoint(tmp_path / "m", "llama")
    a, b = tmp_path / "q.acz", tmp_path / "f.acz"
    S.encode(d, a, _opts(text_file, calibration="quantized"), tokenizer=ToyTokenizer(), progress=False)
    S.encode(d, b, _opts(text_file, calibration="float"), tokenizer=ToyTokenizer(), progress=False)
    qa = json.loads(archive.inspect(a)["metadata"]["acz.lossy.summary"])
    qb = json.loads(archive.inspect(b)["metadata"]["acz.lossy.summary"])
    assert qa["calibration"] == "quantized" and qb["calibration"] == "float"
    assert a.read_bytes() != b.read_bytes()


@pytest.mark.parametrize("cal", ["float", "quantized"])
def test_interrupt_then_resume_is_byte_identical(tmp_path, text_file, cal):
    d = make_checkpoint(tmp_path / "m", "llama", False)
    ref = tmp_path / "ref.acz"
    S.encode(d, ref, _opts(text_file, calibration=cal), tokenizer=ToyTokenizer(), progress=False)
    out = tmp_path / "out.acz"

    def stop(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.encode(d, out, _opts(text_file, calibration=cal), tokenizer=ToyTokenizer(), progress=False, on_block=stop)
    assert not out.exists() and SP.spool_dir(out).is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".acz")]  # no writer temp left
    with pytest.raises(SP.ResumeError, match="settings"):
        S.encode(d, out, _opts(text_file, bpw=3.0, calibration=cal), tokenizer=ToyTokenizer(), progress=False, resume=True)
    S.encode(d, out, _opts(text_file, calibration=cal), tokenizer=ToyTokenizer(), progress=False, resume=True)
    assert out.read_bytes() == ref.read_bytes()
    assert not SP.spool_dir(out).exists()


_KILL_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from aligncodec import encode as S
from tiny_arch import ToyTokenizer

def die(i):
    if i == 0:  # block 0 finished and spooled: the process dies as under kill -9 (no cleanup runs)
        os.kill(os.getpid(), signal.SIGKILL)

opts = S.EncodeOptions(bpw=4.0, calib_tokens=1500, calib_text={text!r}, window=256)
S.encode({src!r}, {out!r}, opts, tokenizer=ToyTokenizer(), progress=False, on_block=die)
"""


def test_sigkill_then_resume_is_byte_identical(tmp_path, text_file):
    """A real kill -9 (SIGKILL: no finally, no atexit) after the first block: no file under the
    final name, and --resume yields the uninterrupted run's bytes."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    d = make_checkpoint(tmp_path / "m", "llama", True)
    ref = tmp_path / "ref.acz"
    S.encode(d, ref, _opts(text_file), tokenizer=ToyTokenizer(), progress=False)
    out = tmp_path / "out.acz"
    code = _KILL_CHILD.format(tests=str(Path(__file__).parent), text=str(text_file), src=str(d), out=str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists() and SP.spool_dir(out).is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".acz")]  # no writer temp left
    S.encode(d, out, _opts(text_file), tokenizer=ToyTokenizer(), progress=False, resume=True)
    assert out.read_bytes() == ref.read_bytes()
    assert not SP.spool_dir(out).exists()


def test_resume_against_other_input_or_damaged_spool(tmp_path, text_file):
    d = make_checkpoint(tmp_path / "m", "llama")
    out = tmp_path / "out.acz"

    def stop(i):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.encode(d, out, _opts(text_file), tokenizer=ToyTokenizer(), progress=False, on_block=stop)
    sp = SP.spool_dir(out)
    step = sorted(sp.glob("step-*.pt"))[0]
    step.write_bytes(step.read_bytes()[:-3])
    with pytest.raises(SP.ResumeError, match="damaged"):
        S.encode(d, out, _opts(text_file), tokenizer=ToyTokenizer(), progress=False, resume=True)
    d2 = make_checkpoint(tmp_path / "m2", "llama", seed=1)
    with pytest.raises(SP.ResumeError, match="input"):
        S.encode(d2, out, _opts(text_file), tokenizer=ToyTokenizer(), progress=False, resume=True)


def test_nan_weight_fails_before_any_output(tmp_path, text_file):
    from safetensors.torch import load_file, save_file

    d = make_checkpoint(tmp_path / "m", "llama", dtype=torch.float32)
    f = d / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    out = tmp_path / "out.acz"
    with pytest.raises(P.NonFiniteError, match="up_proj"):
        S.encode(d, out, _opts(text_file), tokenizer=ToyTokenizer(), progress=False)
    assert not out.exists()


def test_workers_give_the_same_bytes(tmp_path, text_file):
    d = make_checkpoint(tmp_path / "m", "llama")
    a, b = tmp_path / "a.acz", tmp_path / "b.acz"
    S.encode(d, a, _opts(text_file), tokenizer=ToyTokenizer(), progress=False)
    S.encode(d, b, _opts(text_file, workers=3), tokenizer=ToyTokenizer(), progress=False)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("quantizer,calibration", [("tcq", "float"), ("ecsq", "quantized")])
def test_thread_counts_give_the_same_bytes(tmp_path, text_file, monkeypatch, quantizer, calibration):
    """Every thread count (0: every core; the deprecated workers) writes the same archive bytes:
    what runs in parallel (a block's linears, the next block's forward pass, the rate pass, the
    row chunks of a tall tensor: a wavefront for tcq) is computed exactly as with one thread.
    Small row chunks give the embedding and lm_head several chunks, so the wavefront runs."""
    import threading

    from aligncodec.codec import encoder as E
    from aligncodec.codec import parallel

    d = make_checkpoint(tmp_path / "m", "llama", False)
    monkeypatch.setattr(B, "LAZY_MIN_ROWS", 16)
    monkeypatch.setattr(E, "CHUNK_ROWS", 32)
    where, fanout = set(), []
    real_code, real_pipe, real_tasks = B.code_tensor, parallel.pipeline, parallel.run_tasks

    def code_spy(*a, **kw):
        where.add(threading.current_thread().name.split("_")[0])
        return real_code(*a, **kw)

    def pipe_spy(plans, threads, init=None):
        fanout.append(("pipeline", len(plans), threads))
        return real_pipe(plans, threads, init)

    def tasks_spy(tasks, threads, init=None):
        fanout.append(("tasks", len(tasks), threads))
        return real_tasks(tasks, threads, init)

    monkeypatch.setattr(B, "code_tensor", code_spy)
    monkeypatch.setattr(parallel, "pipeline", pipe_spy)
    monkeypatch.setattr(parallel, "run_tasks", tasks_spy)
    trellis = Q.trellis_id(quantizer, 8 if quantizer == "tcq" else None)
    data = {}
    for label, kw in (("t1", dict(threads=1)), ("t2", dict(threads=2)), ("t3", dict(threads=3)), ("w2", dict(workers=2)),
                      ("t0", dict(threads=0))):
        where.clear()
        fanout.clear()
        out = tmp_path / f"{label}.acz"
        S.encode(d, out, _opts(text_file, trellis=trellis, calibration=calibration, **kw), tokenizer=ToyTokenizer(),
                        progress=False)
        data[label] = out.read_bytes()
        if label == "t1":
            assert where == {"MainThread"} and all(t == 1 for _k, _n, t in fanout)
        if label == "t2":  # the parallel paths did run: linears in the pool, chunks on two threads
            assert "acz-encode" in where
            kind = "pipeline" if quantizer == "tcq" else "tasks"
            assert any(k == kind and n > 1 and t == 2 for k, n, t in fanout), fanout
    assert all(v == data["t1"] for v in data.values()), [k for k, v in data.items() if v != data["t1"]]
    archive.verify(tmp_path / "t2.acz")


def test_no_calibration_without_config(tmp_path):
    d = make_checkpoint(tmp_path / "m", "llama", False)
    os.unlink(d / "config.json")
    out = tmp_path / "o.acz"
    with pytest.raises(A.UnsupportedArchitectureError):
        S.encode(d, out, S.EncodeOptions(bpw=4.0), progress=False)
    summ = S.encode(d, out, S.EncodeOptions(bpw=4.0, calibration="none"), progress=False)
    assert summ["calibration"] == "none" and abs(summ["bpw_file"] / 4.0 - 1) <= 0.01


def test_cli_stream_compress_and_named_errors(tmp_path, capsys):
    from aligncodec.tools.cli import EXIT_IO, EXIT_UNSUPPORTED, main

    d = make_checkpoint(tmp_path / "m", "llama", False)
    out = tmp_path / "o.acz"
    # no tokenizer in the folder: calibration cannot run, a named error before any output
    assert main(["compress", str(d), "-o", str(out), "--bpw", "4", "--encoder", "stream"]) == EXIT_IO
    assert "tokenizer" in capsys.readouterr().err and not out.exists()
    assert main(["compress", str(d), "-o", str(out), "--bpw", "4", "--encoder", "stream", "--no-calibration", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["bpw_file"] / 4 - 1) <= 0.01 and info["bpw_linear"] > 0
    # the whole-model encoder is gone (2026-12-08): asking for it is a usage error
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(d), "-o", str(out), "-f", "--bpw", "4", "--encoder", "whole"])
    assert exc.value.code == 2
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no_such_model"
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["compress", str(d), "-o", str(tmp_path / "x.acz"), "--bpw", "4", "--encoder", "stream"]) == EXIT_UNSUPPORTED
    assert not (tmp_path / "x.acz").exists()


def test_sigma_only_pass_gives_the_same_sigma(tmp_path, text_file):
    """Quantized calibration's first pass stops each window once every linear has its input:
    the Σ are exactly those of the full pass, and it returns no outputs."""
    d = make_checkpoint(tmp_path, "llama", dtype=torch.float32)
    plan = A.plan_model(d)
    ckpt = A.Checkpoint(d)
    data = C.calibration_windows(d, _opts(text_file, calib_tokens=600), ToyTokenizer())
    for path, cname in plan.outer.items():
        A.set_param(plan.model, path, ckpt.float32(cname))
    hs, kws = C.record_block_inputs(plan, data.windows)
    b = plan.blocks[0]
    for path, cname in b.params.items():
        A.set_param(plan.model, path, ckpt.float32(cname))
    blk = A.get_module(plan.model, plan.blocks_path)[0]
    cap = [(li.weight, A.get_module(plan.model, li.module)) for li in b.linears]
    outs, full = C.run_block(blk, hs, kws[0], cap)
    none, part = C.run_block(blk, hs, kws[0], cap, sigma_only=True)
    assert len(outs) == len(hs) and none == []
    assert set(full) == set(part) == {li.weight for li in b.linears}
    for k in full:
        assert torch.equal(full[k], part[k]), k


def test_controller_aggregate_matches_per_tensor_prediction():
    """solve() sums the remaining curves once; the total equals the per-tensor sum."""
    import numpy as np

    rng = np.random.default_rng(1)
    curves = {}
    for i in range(12):
        bits = np.sort(rng.uniform(0, 12, len(R.LOG2_GRID)))[::-1].copy()
        curves[f"t{i}"] = R.RateCurve(f"t{i}", ("q_proj", "down_proj", "embedding")[i % 3], int(rng.integers(4096, 10**6)), bits)
    ctl = R.RateController(3e6, curves)
    ctl.record("t0", -3.0, 90_000)
    ctl.record("t4", -3.0, 50_000)
    names = sorted(ctl.remaining)
    agg = ctl._aggregate(names)
    for x in (-30.0, -24.0, -7.3, -1.0, 0.4, 6.0, 9.0):
        assert ctl._predict_agg(x, *agg) == pytest.approx(ctl.predict(x, names), rel=1e-12)
    x = ctl.solve()
    assert ctl.predict(x, names) == pytest.approx(ctl.budget - ctl.spent, rel=1e-6)


def test_controller_offsets_price_a_tensor_at_its_own_step():
    """A tensor with an offset (the output head's step multiple) is predicted at x + offset, in
    the aggregate as per tensor; the solved step meets the budget with it."""
    import numpy as np

    rng = np.random.default_rng(2)
    curves = {}
    for i in range(6):
        bits = np.sort(rng.uniform(0, 12, len(R.LOG2_GRID)))[::-1].copy()
        curves[f"t{i}"] = R.RateCurve(f"t{i}", ("q_proj", "down_proj", "embedding")[i % 3], int(rng.integers(4096, 10**6)), bits)
    off = {"t2": -1.25}
    ctl, plain = R.RateController(3e6, curves, off), R.RateController(3e6, curves)
    assert ctl.offset("t2") == -1.25 and ctl.offset("t1") == 0.0
    names = sorted(ctl.remaining)
    agg = ctl._aggregate(names)
    for x in (-7.3, -4.0, -1.0, 0.4):
        assert ctl._predict_agg(x, *agg) == pytest.approx(ctl.predict(x, names), rel=1e-9)
        assert ctl.predict(x, ["t2"]) == pytest.approx(plain.predict(x - 1.25, ["t2"]), rel=1e-12)
    x = ctl.solve()
    assert ctl.predict(x, names) == pytest.approx(ctl.budget, rel=1e-6)
    assert x > plain.solve()  # the finer head leaves the others a coarser step


def test_thread_limits_set_and_restore():
    import numba

    before = (torch.get_num_threads(), numba.get_num_threads())
    with B.thread_limits(1):
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
    with B.thread_limits(None):
        assert torch.get_num_threads() == before[0]


@pytest.mark.parametrize("tied", [True, False])
def test_row_chunked_embeddings_give_the_same_archive(tmp_path, text_file, monkeypatch, tied):
    """Embeddings and lm_head read and coded a row chunk at a time (RowView; what a large
    vocabulary gets) write the same archive bytes as the whole-tensor path."""
    d = make_checkpoint(tmp_path / "m", "llama", tied)
    ref, out = tmp_path / "ref.acz", tmp_path / "out.acz"
    monkeypatch.setattr(B, "LAZY_MIN_ROWS", 1 << 30)
    S.encode(d, ref, _opts(text_file), tokenizer=ToyTokenizer(), progress=False)
    from aligncodec.codec import encoder as E

    monkeypatch.setattr(B, "LAZY_MIN_ROWS", 16)
    monkeypatch.setattr(E, "CHUNK_ROWS", 32)
    seen = []
    real = A.Checkpoint.rows_float32

    def spy(self, name, rows):
        t = real(self, name, rows)
        seen.append(t.shape[0])
        return t

    monkeypatch.setattr(A.Checkpoint, "rows_float32", spy)
    S.encode(d, out, _opts(text_file), tokenizer=ToyTokenizer(), progress=False)
    assert seen and max(seen) <= 32
    assert out.read_bytes() == ref.read_bytes()


def test_last_tensor_is_searched_on_a_subsample_and_coded_in_full_once(tmp_path, text_file, monkeypatch):
    """The last tensor's step search (what makes the file land on --bpw) runs on a row
    subsample; the tensor is coded in full exactly once, and the file still lands within 1 %."""
    import tiny_arch
    from aligncodec.codec import encoder as E

    monkeypatch.setitem(tiny_arch.COMMON, "vocab_size", 4096)  # the embedding: 4096 x 64, most of the file
    d = make_checkpoint(tmp_path / "m", "llama", True)
    monkeypatch.setattr(H, "SEARCH_ROWS", 512)
    calls = []
    real = E.code_candidate

    def spy(job, cand, step, stride=1, *a, **kw):
        calls.append((job.name, stride))
        return real(job, cand, step, stride, *a, **kw)

    monkeypatch.setattr(E, "code_candidate", spy)
    out = tmp_path / "m.acz"
    S.encode(d, out, _opts(text_file, bpw=3.0), tokenizer=ToyTokenizer(vocab=4096), progress=False)
    emb = [s for n, s in calls if n == "model.embed_tokens.weight"]
    assert emb.count(1) == 1  # one full code
    assert len(emb) >= 3 and all(s == 8 for s in emb if s != 1 and s != 4096 // 64)  # the search: stride 8 (4096 / 512 rows)
    n = archive.inspect(out)["n_weights"]
    assert abs(8 * os.path.getsize(out) / n / 3.0 - 1) <= 0.01
    archive.verify(out)


def test_stream_encoder_writes_tcq_that_decodes_to_what_it_measured(tmp_path, text_file):
    """--quantizer tcq through the stream encoder: every lossy tensor is mode 4, the file lands on
    the rate, and the decoded linears carry the error the encoder recorded (the archive verifies)."""
    d = make_checkpoint(tmp_path / "m", "llama", True)
    out = tmp_path / "m.acz"
    summ = S.encode(d, out, _opts(text_file, trellis=2), tokenizer=ToyTokenizer(), progress=False)
    assert summ["quantizer"] == "tcq8"
    info = archive.inspect(out)
    modes = {r["name"]: r["mode"] for r in info["tensors"]}
    plan = A.plan_model(d)
    assert modes[plan.embedding] == "tcq" and "ecsq" not in modes.values()
    assert sum(modes[li.weight] == "tcq" for b in plan.blocks for li in b.linears) >= 4
    assert abs(8 * os.path.getsize(out) / info["n_weights"] / 4.0 - 1) <= 0.01
    archive.verify(out)
    with pytest.raises(ValueError):
        S.EncodeOptions(bpw=3.0, trellis=9)


@pytest.mark.parametrize("tied", [True, False])
def test_head_step_multiple_is_recorded_decodes_and_lands_on_the_rate(tmp_path, text_file, tied):
    """head_step: the output head (tied embedding or untied lm_head) coded at a finer step than the
    blocks, recorded per tensor and in the summary; the file still lands within 1 % of the target;
    the same bytes on a second run; the archive verifies (its check decodes every tensor)."""
    import math

    d = make_checkpoint(tmp_path / "m", "llama", tied)
    plan = A.plan_model(d)
    head = plan.embedding if tied else plan.lm_head
    outs = {}
    for hs in (1.0, 0.5, 0.5):
        out = tmp_path / f"m{hs}-{len(outs)}.acz"
        summ = S.encode(d, out, _opts(text_file, head_step=hs, trellis=2), tokenizer=ToyTokenizer(), progress=False)
        info = archive.inspect(out)
        assert abs(8 * os.path.getsize(out) / info["n_weights"] / 4.0 - 1) <= 0.01
        assert summ["head_step"] == hs and summ["head"] == head
        per = json.loads(info["metadata"]["acz.lossy"])
        blocks = [per[li.weight]["step"] for b in plan.blocks for li in b.linears if li.weight in per]
        ratio = per[head]["step"] / float(np.median(blocks))
        outs.setdefault(hs, []).append((out, ratio))
        archive.verify(out)
    # the head absorbs the controller's miss (two blocks: a large one), so compare the two runs
    assert math.log2(outs[1.0][0][1] / outs[0.5][0][1]) > 0.5
    assert outs[0.5][0][0].read_bytes() == outs[0.5][1][0].read_bytes()
    with pytest.raises(ValueError, match="head step"):
        S.EncodeOptions(bpw=3.0, head_step=0.0)
    # not given: the balance rule from the parameter ratio, recorded as such
    out = tmp_path / "auto.acz"
    summ = S.encode(d, out, _opts(text_file, trellis=2), tokenizer=ToyTokenizer(), progress=False)
    ckpt = A.Checkpoint(d)
    n_head = ckpt.tensors[head].numel
    n_others = summ["n_lossy_weights"] - n_head
    assert summ["head_step"] == pytest.approx(H.auto_head_step(n_head, n_others)) and not summ["head_step_given"]
    assert abs(8 * os.path.getsize(out) / archive.inspect(out)["n_weights"] / 4.0 - 1) <= 0.01


def test_auto_head_step_balances_the_head_against_the_rest():
    """A small head (SmolLM2's share) gets a finer step than the blocks, a head larger than the
    rest (Gemma-3's 262k-token embedding) a coarser one; m rises with the head's share."""
    ms = [H.auto_head_step(h, 100) for h in (1, 10, 27, 60, 100, 167, 400)]
    assert all(a < b for a, b in zip(ms, ms[1:]))
    assert 0.55 < H.auto_head_step(28_311_552, 106_168_320) < 0.7
    assert 1.0 < H.auto_head_step(167_772_160, 100_300_000) < 1.25
    assert H.auto_head_step(0, 100) == 1.0 == H.auto_head_step(5, 0)


def test_cli_default_encoder_is_stream_and_checks_each_tensor(tmp_path, capsys, monkeypatch):
    """`compress --bpw` without --encoder is the stream encoder (whole-file --bpw); its check of
    each block tensor compares the decoded values bit for bit with the encoder's reconstruction:
    one flipped bit there (the error sum barely moves) is EncodeVerifyError (exit 8), nothing kept."""
    from aligncodec.codec import encoder as E
    from aligncodec.tools.cli import EXIT_VERIFY, main

    d = make_checkpoint(tmp_path / "m", "llama", False)
    out = tmp_path / "o.acz"
    assert main(["compress", str(d), "-o", str(out), "--bpw", "4", "--no-calibration", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    summ = json.loads(info["metadata"]["acz.lossy.summary"])
    assert summ["encoder"] == "stream" and summ["target"] == {"bpw": 4.0, "scope": "all"}
    assert abs(info["bpw_file"] / 4 - 1) <= 0.01
    real = E.code_candidate

    def off_by_one_ulp(*a, **k):
        c = real(*a, **k)
        if c.W_hat is not None:
            c.W_hat.view("u4")[0, 0] ^= 1
        return c

    monkeypatch.setattr(E, "code_candidate", off_by_one_ulp)
    out2 = tmp_path / "o2.acz"
    assert main(["compress", str(d), "-o", str(out2), "--bpw", "4", "--no-calibration", "-q"]) == EXIT_VERIFY
    err = capsys.readouterr().err
    assert "EncodeVerifyError" in err and "reconstruction" in err and "Traceback" not in err
    assert not out2.exists() and not list(tmp_path.glob(".acz-tmp-*")) and not list(tmp_path.glob(".acz-spool-*"))


@pytest.mark.parametrize("n,tile", [(50, 1024), (130, 32), (100, 100)])
def test_gram_from_the_lower_triangle_is_the_full_product(n, tile):
    """Σ accumulated on and below the diagonal, a column tile at a time, then mirrored: exactly
    symmetric, and the full product's values (the same float32 products where a tile holds every
    column: one product, the same bits as before)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(70, n, generator=g) * torch.linspace(0.1, 2, n) for _ in range(2)]
    G = torch.zeros(n, n, dtype=torch.float64)
    full = torch.zeros(n, n, dtype=torch.float64)
    for x in xs:
        C.add_gram_lower_(G, x, tile)
        full.add_(x.T @ x)
    C.mirror_lower_(G, tile)
    assert torch.equal(G, G.T)
    assert torch.allclose(G, full, rtol=1e-5, atol=1e-4)
    if tile >= n:
        assert torch.equal(G, E.symmetrize_(full))


def _save_word_tokenizer(folder, text: str, first_id: int) -> int:
    """A word-level fast tokenizer beside the weights whose words get ids from ``first_id`` up
    (a tokenizer of another model); returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<x{i}>": i for i in range(3, first_id)}}
    for i, w in enumerate(sorted(set(text.split()))):
        vocab[w] = first_id + i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(str(folder))
    return max(vocab.values()) + 1


def test_tokenizer_that_does_not_fit_the_model_is_a_named_input_error(tmp_path, text_file, capsys):
    """A tokenizer of another model beside the weights (ids beyond the vocabulary: a 49,152-token
    tokenizer beside a 32,000-token Mistral) is TokenizerMismatchError, exit 3, naming the id and
    the vocabulary, before any output; the model's own vocabulary range encodes."""
    import tiny_arch
    from aligncodec.tools.cli import EXIT_IO, exit_code_for, main

    d = make_checkpoint(tmp_path / "m", "mistral", False, max_shard_size="100KB")  # sharded, untied, vocab 96
    vocab = tiny_arch.COMMON["vocab_size"]
    size = _save_word_tokenizer(d, TEXT, first_id=vocab + 50)
    out = tmp_path / "o.acz"
    with pytest.raises(P.TokenizerMismatchError) as ei:
        S.encode(d, out, _opts(text_file, calib_tokens=100), progress=False)
    msg = str(ei.value)
    assert f"vocabulary of {vocab} (config vocab_size)" in msg and f"of {size} tokens" in msg
    top = int(re.search(r"gives token id (\d+)", msg).group(1))
    assert vocab <= top < size
    assert exit_code_for(ei.value) == EXIT_IO and isinstance(ei.value, archive.InputError)
    assert not out.exists()
    assert main(["compress", str(d), "-o", str(out), "--bpw", "3", "--calib-text", str(text_file), "--calib-tokens", "100"]) == EXIT_IO
    err = capsys.readouterr().err
    assert "TokenizerMismatchError" in err and str(vocab) in err and not out.exists()
    # ids inside the vocabulary: the same folder encodes
    _save_word_tokenizer(d, TEXT, first_id=3)
    S.encode(d, out, _opts(text_file, calib_tokens=100), progress=False)
    archive.verify(out)
