"""Files on disk (issue 15): portable auxiliary names on write and read, escaped names in
inspect, decompress all-or-nothing with --force, symlinks leaving the input folder, the
umask, stale temporaries of dead writers, a full disk, a corrupt input safetensors."""

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from aligncodec import archive
from aligncodec.codec.modes import lossless
from aligncodec.formats import atomic
from aligncodec.formats.writer import ArchiveWriter
from aligncodec.tools.cli import main


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(16, 8, generator=g), "b": torch.ones(8)}, str(d / "model.safetensors"))
    (d / "config.json").write_text('{"a": 1}')
    return d


def _archive(path, tensors: dict[str, bytes], aux: dict[str, bytes], meta: dict | None = None):
    """An archive written by the container writer directly (no name checks of the archive layer)."""
    with ArchiveWriter(path, meta or {}) as w:
        for name, data in tensors.items():
            mode, params, streams = lossless.encode(np.frombuffer(data, np.uint8), "U8", len(data))
            w.add(name, "U8", (len(data),), mode, streams, params)
        for name, data in aux.items():
            mode, params, streams = lossless.encode(np.frombuffer(data, np.uint8), "U8", len(data))
            w.add(archive.AUX_PREFIX + name, "U8", (len(data),), mode, streams, params)
    return path


BAD_AUX = ["model.safetensors", "model-00001-of-00002.safetensors", "Model.SafeTensors",
           "model.safetensors.index.json", ".bashrc", "a\nb.json", "x\x1b]0;pwn\x07.json",
           "nul\x00.json", "../up.json", "sub/dir.json", "CON.json", "-rf.json", "tail."]


@pytest.mark.parametrize("name", BAD_AUX)
def test_bad_aux_names_rejected_on_read_by_every_command(tmp_path, capsys, name):
    acz = _archive(tmp_path / "bad.acz", {"w": b"\x01\x02\x03\x04"}, {"config.json": b"{}", name: b"evil"})
    out = tmp_path / "out"
    for argv in (["decompress", str(acz), "-o", str(out), "-q"], ["verify", str(acz), "-q"], ["inspect", str(acz)]):
        assert main(argv) == 4, argv
        err = capsys.readouterr().err
        assert "HeaderError" in err and "\x1b" not in err and "\n" not in err.rstrip("\n")
    assert not out.exists()  # all or nothing: not even the weights
    assert not list(tmp_path.glob(".acz-tmp-*"))


def test_case_duplicate_aux_names_rejected(tmp_path):
    acz = _archive(tmp_path / "dup.acz", {"w": b"\x00" * 4}, {"config.json": b"{}", "CONFIG.json": b"[]"})
    with pytest.raises(archive.E.HeaderError, match="case"):
        archive.decompress(acz, tmp_path / "o", progress=False)


@pytest.mark.parametrize("name", ["tok\x1b[31m.json", "a b.json", "-x.json"])
def test_bad_aux_names_refused_on_write(folder, tmp_path, capsys, name):
    (folder / name).write_text("{}")
    out = tmp_path / "m.acz"
    assert main(["compress", str(folder), "-o", str(out), "--lossless", "-q"]) == 3
    err = capsys.readouterr().err
    assert "InputError" in err and "\x1b" not in err
    assert not out.exists()


def test_good_aux_names_round_trip(folder, tmp_path):
    for n in ("tokenizer_config.json", "special_tokens_map.json", "spiece.model", "chat_template.jinja", "README.md"):
        (folder / n).write_text(n)
    out = tmp_path / "m.acz"
    assert main(["compress", str(folder), "-o", str(out), "--lossless", "-q"]) == 0
    assert main(["decompress", str(out), "-o", str(tmp_path / "d"), "-q"]) == 0
    for n in ("tokenizer_config.json", "README.md", "config.json"):
        assert (tmp_path / "d" / n).read_bytes() == (folder / n).read_bytes()


def test_files_metadata_of_wrong_shape_is_named(tmp_path, capsys):
    for i, files in enumerate(['["model.safetensors"]', '"x"', '{"model.safetensors": {"tensors": [1]}}',
                               '{"model.safetensors": []}', '{"../x.safetensors": {"tensors": ["w"]}}',
                               '{"a.safetensors": {"tensors": ["w"]}, "b.safetensors": {"tensors": ["w"]}}']):
        acz = _archive(tmp_path / f"f{i}.acz", {"w": b"\x00" * 4}, {}, {"acz.files": files})
        assert main(["decompress", str(acz), "-o", str(tmp_path / f"o{i}"), "-q"]) == 4, files
        assert "HeaderError" in capsys.readouterr().err
        assert not (tmp_path / f"o{i}").exists()


def test_inspect_escapes_names(tmp_path, capsys):
    evil = "w\x1b[2J\x1b]0;title\x07\u202e\r"
    acz = _archive(tmp_path / "e.acz", {evil: b"\x00" * 4, "fine.weight": b"\x00" * 4}, {})
    assert main(["inspect", str(acz)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    assert "\\x1b[2J" in out and "fine.weight" in out
    assert main(["inspect", str(acz), "--json"]) == 0  # JSON escapes on its own
    assert "\x1b" not in capsys.readouterr().out


def test_lossy_metadata_of_wrong_shape_is_a_named_error_in_inspect(tmp_path, capsys):
    for i, lm in enumerate(['[1, 2]', '"s"', '{"w": {"kind": 3, "rank": "x", "act_rel_err": "y"}}']):
        acz = _archive(tmp_path / f"l{i}.acz", {"w": b"\x00" * 4}, {}, {"acz.lossy": lm})
        assert main(["inspect", str(acz)]) == 4, lm
        err = capsys.readouterr().err
        assert "HeaderError" in err and "Traceback" not in err


def test_decompress_is_all_or_nothing_and_needs_force(folder, tmp_path, capsys):
    acz = tmp_path / "m.acz"
    assert main(["compress", str(folder), "-o", str(acz), "--lossless", "-q"]) == 0
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    (dest / "config.json").write_text("old")
    assert main(["decompress", str(acz), "-o", str(dest), "-q"]) == 3
    err = capsys.readouterr().err
    assert "OutputError" in err and "--force" in err
    assert (dest / "config.json").read_text() == "old" and not (dest / "model.safetensors").exists()
    assert main(["decompress", str(acz), "-o", str(dest), "-q", "--force"]) == 0
    assert (dest / "mine.txt").read_text() == "keep me"  # --force replaces namesakes only
    assert (dest / "config.json").read_text() == '{"a": 1}'
    assert set(load_file(str(dest / "model.safetensors"))) == {"w", "b"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["decompress", str(acz), "-o", str(empty), "-q"]) == 0  # an empty folder is fine
    assert (empty / "model.safetensors").exists()
    assert not list(tmp_path.glob(".acz-tmp-*"))


def test_decompress_failure_leaves_nothing(folder, tmp_path, monkeypatch):
    acz = tmp_path / "m.acz"
    archive.compress(folder, acz, progress=False)
    from aligncodec.codec import modes

    real = modes.decode_entry

    def fail_on_aux(e, streams, **k):
        if e.name.startswith(archive.AUX_PREFIX):
            raise archive.E.CorruptStreamError("boom")
        return real(e, streams, **k)

    monkeypatch.setattr(modes, "decode_entry", fail_on_aux)
    with pytest.raises(archive.E.CorruptStreamError):
        archive.decompress(acz, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # the weights were decoded first, yet nothing is left
    assert not list(tmp_path.glob(".acz-tmp-*"))


def test_decompress_full_disk_is_exit_3(folder, tmp_path, capsys, monkeypatch):
    acz = tmp_path / "m.acz"
    archive.compress(folder, acz, progress=False)
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):  # what safetensors raises when the disk fills up
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["decompress", str(acz), "-o", str(tmp_path / "o"), "-q"]) == 3
    assert "OutputError" in capsys.readouterr().err
    monkeypatch.undo()

    def enospc(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_bytes", enospc)
    assert main(["decompress", str(acz), "-o", str(tmp_path / "o2"), "-q"]) == 3
    assert "No space" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 8 + b"{", None])
def test_corrupt_input_safetensors_is_input_error(tmp_path, capsys, content):
    p = tmp_path / "bad.safetensors"
    if content is None:  # a real file, truncated
        save_file({"w": torch.randn(64, 64)}, str(p))
        p.write_bytes(p.read_bytes()[:-100])
    else:
        p.write_bytes(content)
    for extra in (["--lossless"], ["--bpw", "3", "--no-calibration"], ["--distortion", "0.01", "--no-calibration"]):
        assert main(["compress", str(p), "-o", str(tmp_path / "m.acz"), "-q", *extra]) == 3, (content, extra)
        err = capsys.readouterr().err
        assert "InputError" in err and "Traceback" not in err


def test_symlink_out_of_the_folder_needs_flag(folder, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not embed")
    (folder / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "m.acz"
    assert main(["compress", str(folder), "-o", str(out), "--lossless", "-q"]) == 3
    err = capsys.readouterr().err
    assert "InputError" in err and "--follow-symlinks" in err and not out.exists()
    assert main(["compress", str(folder), "-o", str(out), "--lossless", "-q", "--follow-symlinks"]) == 0
    assert archive.extract_aux_files(out, tmp_path)  # written, with the target's bytes
    assert (tmp_path / "tokenizer.json").read_text() == "do not embed"
    # a weights file linked from outside is refused too; a link inside the folder is fine
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(folder / "config.json")
    assert main(["compress", str(folder), "-o", str(out), "--lossless", "-q", "--force"]) == 0
    other = tmp_path / "w2.safetensors"
    save_file({"x": torch.ones(3)}, str(other))
    (folder / "more.safetensors").symlink_to(other)
    assert main(["compress", str(folder), "-o", str(out), "--lossless", "-q", "--force"]) == 3


def test_outputs_respect_the_umask(folder, tmp_path):
    old = os.umask(0o022)
    try:
        acz = tmp_path / "m.acz"
        assert main(["compress", str(folder), "-o", str(acz), "--lossless", "-q"]) == 0
        assert acz.stat().st_mode & 0o777 == 0o644
        assert main(["decompress", str(acz), "-o", str(tmp_path / "d"), "-q"]) == 0
        for f in (tmp_path / "d").iterdir():
            assert f.stat().st_mode & 0o777 == 0o644, f
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        acz2 = tmp_path / "m2.acz"
        assert main(["compress", str(folder), "-o", str(acz2), "--lossless", "-q"]) == 0
        assert acz2.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed(folder, tmp_path):
    host = atomic._host_tag()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f".acz-tmp-{host}-{_dead_pid()}-aaaa.part"
        dead_dir = tmp_path / f".acz-tmp-{host}-{_dead_pid()}-bbbb.d"
        alive = tmp_path / f".acz-tmp-{host}-{live.pid}-cccc.part"
        mine = tmp_path / f".acz-tmp-{host}-{os.getpid()}-dddd.part"
        other_host = tmp_path / f".acz-tmp-otherhost-{_dead_pid()}-eeee.part"
        legacy_new = tmp_path / ".acz-tmp-k2j3h4.part"  # old name (no pid): only removed once old
        legacy_old = tmp_path / ".acz-tmp-zz9y8x.part"
        unrelated = tmp_path / ".acz-tmp-notes.txt"
        for f in (dead, alive, mine, other_host, legacy_new, legacy_old, unrelated):
            f.write_bytes(b"x" * 10)
        dead_dir.mkdir()
        (dead_dir / "model.safetensors").write_bytes(b"x")
        day_ago = time.time() - 2 * atomic.STALE_SECONDS
        os.utime(legacy_old, (day_ago, day_ago))
        assert main(["compress", str(folder), "-o", str(tmp_path / "m.acz"), "--lossless", "-q"]) == 0
        assert not dead.exists() and not dead_dir.exists() and not legacy_old.exists()
        assert alive.exists() and mine.exists() and other_host.exists() and legacy_new.exists() and unrelated.exists()
    finally:
        live.kill()
        live.wait()


def test_kill_9_leftover_is_cleaned_by_the_next_write(folder, tmp_path):
    """A writer killed with SIGKILL inside the final write leaves its temporary file; the next
    write to that folder removes it."""
    code = ("import os, signal, sys\n"
            "from aligncodec.formats.atomic import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'wb').write(b'x' * 100000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.acz")])
    assert p.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".acz-tmp-*"))
    assert len(left) == 1 and not (tmp_path / "m.acz").exists()
    assert main(["compress", str(folder), "-o", str(tmp_path / "m.acz"), "--lossless", "-q"]) == 0
    assert not list(tmp_path.glob(".acz-tmp-*"))


def test_temp_names_carry_host_and_pid():
    n = atomic.temp_name()
    assert n.startswith(f".acz-tmp-{atomic._host_tag()}-{os.getpid()}-") and n.endswith(".part")
    assert socket.gethostname() is not None
