"""formats/atomic.py: all-or-nothing output (no half file under the final name, no litter)."""

import os

import pytest

from aligncodec.formats.atomic import atomic_write


def test_writes_and_replaces(tmp_path):
    dest = tmp_path / "out.json"
    dest.write_text("old")
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text("new")

    assert atomic_write(dest, write) == dest
    assert dest.read_text() == "new"
    # hidden, same folder, the destination's suffix kept; host and pid in the name (stale clean-up)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".acz-tmp-") and seen[0].suffix == ".json"
    assert f"-{os.getpid()}-" in seen[0].name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_error_leaves_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(dest, write)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_error_before_any_byte_creates_nothing(tmp_path):
    dest = tmp_path / "new.bin"
    with pytest.raises(ValueError):
        atomic_write(dest, lambda tmp: (_ for _ in ()).throw(ValueError("no")))
    assert list(tmp_path.iterdir()) == []


def test_live_temporaries_are_listed_and_removed_for_an_abrupt_exit(tmp_path):
    """The command line's Ctrl-C handler ends the process without unwinding; it removes what
    the live atomic writes (and tracked scratch paths) hold, and only those."""
    from aligncodec.formats import atomic

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(FileNotFoundError):
        with atomic.atomic_path(tmp_path / "a.acz") as tmp, atomic.atomic_dir(tmp_path / "d") as tmpdir:
            with atomic.tracked(scratch):
                assert {str(tmp), tmpdir, str(scratch)} <= set(atomic._LIVE)
                removed = atomic.remove_live_temporaries()
                assert set(removed) == {str(tmp), tmpdir, str(scratch)}
                assert not tmp.exists() and not os.path.exists(tmpdir) and not scratch.exists()
    assert not atomic._LIVE
    assert not (tmp_path / "a.acz").exists() and not (tmp_path / "d").exists()
    with atomic.atomic_path(tmp_path / "b.acz") as tmp:
        tmp.write_bytes(b"x")
    assert not atomic._LIVE and (tmp_path / "b.acz").read_bytes() == b"x"
