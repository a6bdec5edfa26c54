"""The plain mutation fuzzer (tests/fuzz/mutate.py) on the reader and the loader: no unnamed
exception, and every read path agrees on which inputs are valid.

The fast suite runs 1,000 inputs; CI runs 20,000 with ``pytest -m fuzz`` (scripts/test.sh).
Long runs: ``python tests/fuzz/run.py -n 1000000`` (hang watchdog, peak memory)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
import mutate as F  # noqa: E402


def _check(res):
    msg = "\n".join(f"input {f['index']}: {f['ops']} {f['disagree'] or ''}\n{f['unnamed'][0][1] if f['unnamed'] else ''}"
                    for f in res["failures"][:5])
    assert res["counts"]["unnamed"] == 0 and res["counts"]["disagree"] == 0, msg
    # the fuzzer reaches past the checksums: valid inputs and many distinct named errors
    assert res["counts"]["ok"] > 0.02 * res["counts"]["inputs"]
    assert len([k for k in res["outcomes"] if k != "OK"]) >= 8, res["outcomes"]


def test_mutate_is_deterministic_and_seeds_are_valid():
    import random

    pool = F.seeds()
    assert len(pool) >= 15
    a = [F.mutate(random.Random(f"1:{i}"), pool[i % len(pool)]) for i in range(50)]
    b = [F.mutate(random.Random(f"1:{i}"), pool[i % len(pool)]) for i in range(50)]
    assert a == b
    from aligncodec.formats.reader import ArchiveReader

    wd = F.work_dir()
    modes = set()
    for i, s in enumerate(pool):
        assert F.run_input(s, wd / f"s{i}.acz", decompress=True)["ops"] == {"verify": "OK", "inspect": "OK", "load_stream": "OK", "decompress": "OK"}
        assert F.assemble(F.split(s)) == s  # taking apart and putting together is exact
        with ArchiveReader(wd / f"s{i}.acz") as r:
            modes |= {e.mode_name for e in r.tensors}
    assert {"stored", "float-split", "bytegroup", "ecsq", "tcq"} <= modes  # every coding mode is mutated


def test_fuzz_smoke():
    _check(F.fuzz(1000, seed=1))


@pytest.mark.fuzz
def test_fuzz_ci():
    _check(F.fuzz(20000, seed=2))
