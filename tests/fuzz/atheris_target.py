"""atheris (libFuzzer) target for the .acz reader and the loader (issue 15).

    pip install -e '.[fuzz]'                          # atheris, an optional extra
    python tests/fuzz/atheris_target.py --write-seeds fuzz-corpus   # the seed archives
    python tests/fuzz/atheris_target.py fuzz-corpus -rss_limit_mb=2048 -timeout=10 -runs=1000000

Every input goes through ``verify``, ``inspect``, ``load_state_dict`` (streaming) and,
when it verifies, ``decompress`` (tests/fuzz/mutate.py: ``run_input``). The target
fails on an exception that is not one of the format's named errors
(``aligncodec.formats.errors.AczError``) and on read paths that disagree on whether the
input is valid; libFuzzer's own ``-timeout`` and ``-rss_limit_mb`` catch hangs and
memory blow-ups. Without atheris, tests/fuzz/run.py runs the plain mutation fuzzer.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class FuzzFailure(AssertionError):
    pass


_WD = None


def test_one_input(data: bytes) -> None:
    global _WD
    import mutate as F

    if _WD is None:
        import numba

        numba.set_num_threads(1)
        _WD = F.work_dir()
    r = F.run_input(bytes(data), _WD / "in.acz")
    if r["unnamed"]:
        raise FuzzFailure(f"unnamed exception in {r['unnamed'][0][0]}:\n{r['unnamed'][0][1]}")
    if r["disagree"]:
        raise FuzzFailure(f"read paths disagree: {r['disagree']} ({r['ops']})")


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's byte mutations, then every CRC made valid again (so they reach past the
    checksums), or — on inputs that still parse — the structure-aware mutations of mutate.py."""
    import random

    import atheris
    import mutate as F

    rng = random.Random(seed)
    if rng.random() < 0.5:
        try:
            return F.mutate(rng, bytes(data))[:max_size]
        except Exception:  # noqa: BLE001 - not an archive any more: fall back to bytes
            pass
    out = bytearray(atheris.Mutate(data, max_size))
    if rng.random() < 0.8:
        F.fix_crcs(out)
    return bytes(out)


def write_seeds(folder: str) -> int:
    import mutate as F

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    seeds = F.seeds()
    for i, s in enumerate(seeds):
        (out / f"seed-{i:03d}.acz").write_bytes(s)
    print(f"wrote {len(seeds)} seeds to {out}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "--write-seeds":
        return write_seeds(argv[2])
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install -e '.[fuzz]' (or run tests/fuzz/run.py, which needs nothing)", file=sys.stderr)
        return 7
    with atheris.instrument_imports(include=["aligncodec"]):
        import aligncodec.archive  # noqa: F401
        import aligncodec.loader  # noqa: F401
        import aligncodec.formats.reader  # noqa: F401
        import aligncodec.validation  # noqa: F401
        import aligncodec.formats.metadata  # noqa: F401
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
