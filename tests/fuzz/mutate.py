"""A plain mutation fuzzer for the .acz reader and the loader (issue 15); no dependencies
beyond the project's own.

Inputs are mutated copies of small valid archives (the golden vectors and a few built
here). Most mutations are structure-aware: the archive is taken apart into its
metadata, tensor entries and tensor data, one part is damaged, and the archive is put
back together with every CRC valid, so a mutation gets past the checksums into the
validation behind them. Each input goes through ``verify`` (random access, decode),
``inspect`` and ``load_state_dict`` on a non-seekable stream (the loader's streaming
path); every 8th input and every one that verifies also through ``decompress``.

Outcomes: ``ok``, ``named`` (an AczError subclass), ``unnamed`` (anything else — a bug),
and ``disagree`` (the read paths differ on whether the input is valid; ``inspect`` may
pass an input whose only fault is found by decoding, a CorruptStreamError).

    python tests/fuzz/run.py -n 20000                 # see run.py for long runs
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for p in (str(ROOT), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

from types import SimpleNamespace  # noqa: E402

from aligncodec.formats import constants as _k, layout as _l, streams as _s, writer as _w  # noqa: E402

# the container's serialisers and constants under one name
C = SimpleNamespace(**{k: v for m in (_k, _l, _s, _w) for k, v in vars(m).items() if not k.startswith("__")})
C._serialize_entry = _w.serialize_entry
C._PREAMBLE, C._SECTION = _l.PREAMBLE, _l.SECTION
from aligncodec.formats import errors as E  # noqa: E402

VECTORS = ROOT / "spec" / "vectors"

# --------------------------------------------------------------------------- taking archives apart


@dataclass
class Parts:
    """An archive as its parts: the METADATA payload, (entry payload, data) per tensor,
    extension sections (kind, flags, payload)."""

    meta: bytes
    tensors: list[list[bytes]]  # [entry payload, data]
    ext: list[tuple[int, int, bytes]] = field(default_factory=list)
    version: int = C.FORMAT_VERSION


def split(data: bytes) -> Parts:
    """Parts of a *valid* archive (seeds only)."""
    pre = C._PREAMBLE.unpack_from(data, 0)
    version, header_size, data_offset = pre[1], pre[3], pre[4]
    hdr = data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + header_size]
    pos = 0
    meta = b""
    tensors = []
    ext = []
    while pos < len(hdr):
        kind, flags, length = C._SECTION.unpack_from(hdr, pos)
        payload = hdr[pos + 8 : pos + 8 + length]
        pos = C.align(pos + 8 + length, C.SECTION_ALIGN)
        if kind == C.SECTION_METADATA:
            meta = payload
        elif kind == C.SECTION_TENSOR:
            off, size = struct.unpack_from("<QQ", payload, 8)
            tensors.append([payload, data[data_offset + off : data_offset + off + size]])
        else:
            ext.append((kind, flags, payload))
    return Parts(meta, tensors, ext, version)


def assemble(p: Parts, *, fix_entries: bool = True, gap_byte: int = 0) -> bytes:
    """An archive from parts, canonical layout and valid CRCs; ``fix_entries`` rewrites each
    entry's offset, size and data CRC to match its data (else they stay as mutated)."""
    entries = []
    pos = 0
    for ep, d in p.tensors:
        ep = bytearray(ep)
        if fix_entries and len(ep) >= 28:
            struct.pack_into("<QQI", ep, 8, pos, len(d), C.crc32(d))
        entries.append(bytes(ep))
        pos = C.align(pos + len(d), C.DATA_ALIGN)
    datas = [d for _, d in p.tensors]
    data_size = (pos - C.align(len(datas[-1]), C.DATA_ALIGN) + len(datas[-1])) if datas else 0
    header = C.build_section(C.SECTION_METADATA, 0, p.meta) + b"".join(C.build_section(C.SECTION_TENSOR, 0, e) for e in entries)
    header += b"".join(C.build_section(k, f, x) for k, f, x in p.ext)
    data_offset = C.align(C.PREAMBLE_SIZE + len(header), C.DATA_ALIGN)
    out = bytearray(C.build_preamble(len(header), data_offset, data_size, len(entries), len(entries) + 1 + len(p.ext), C.crc32(header), p.version))
    out += header
    out += bytes(data_offset - len(out))
    for i, d in enumerate(datas):
        out += d
        if i + 1 < len(datas):
            out += bytes([gap_byte]) * (C.align(len(d), C.DATA_ALIGN) - len(d))
    return bytes(out)


def fix_crcs(data: bytearray) -> None:
    """Best effort: make the preamble, header and data CRCs of a damaged file valid again."""
    if len(data) < C.PREAMBLE_SIZE:
        return
    header_size, data_offset = struct.unpack_from("<IQ", data, 12)
    if C.PREAMBLE_SIZE + header_size <= len(data):
        hdr = bytes(data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + header_size])
        struct.pack_into("<I", data, 40, C.crc32(hdr))
        pos = 0
        while pos + 8 <= len(hdr):  # tensor data CRCs, where the entry still makes sense
            kind, _, length = C._SECTION.unpack_from(hdr, pos)
            if kind == C.SECTION_TENSOR and length >= 28 and pos + 8 + length <= len(hdr):
                off, size = struct.unpack_from("<QQ", hdr, pos + 16)
                a = data_offset + off
                if a + size <= len(data) and size < (64 << 20):
                    struct.pack_into("<I", data, C.PREAMBLE_SIZE + pos + 8 + 24, C.crc32(bytes(data[a : a + size])))
                    hdr = bytes(data[C.PREAMBLE_SIZE : C.PREAMBLE_SIZE + header_size])
            pos = C.align(pos + 8 + length, C.SECTION_ALIGN)
        struct.pack_into("<I", data, 40, C.crc32(hdr))
    struct.pack_into("<I", data, 60, C.crc32(bytes(data[:60])))


# --------------------------------------------------------------------------- seeds


def seeds() -> list[bytes]:
    """Small valid archives: the golden vectors, the hostile corpus's valid cases, and a
    lossy archive with every reserved metadata key and an auxiliary file."""
    import hostile as H

    out = [p.read_bytes() for d in ("valid", "lossy") for p in sorted((VECTORS / d).glob("*.acz"))]
    out += [c.build() for c in H.CASES.values() if c.expect == "OK" and len(c.build()) < 1 << 16]
    lossy = split((VECTORS / "lossy" / "lossy_hadamard_colscale_classes.acz").read_bytes())
    names = [bytes(ep[32 + 8 * ep[3] : 32 + 8 * ep[3] + struct.unpack_from("<H", ep, 0)[0]]).decode() for ep, _ in lossy.tensors]
    meta = {"acz.tool": "fuzz", "acz.files": json.dumps({"model.safetensors": {"metadata": {"format": "pt"}, "tensors": names}}),
            "acz.lossy": json.dumps({n: {"kind": "hadamard", "bpw": 2.5, "act_rel_err": 0.01, "sqnr_db": 20.0, "type": "mlp"} for n in names}),
            "acz.lossy.summary": json.dumps({"step": 0.1})}
    aux = H.stored("acz:file/config.json", b'{"architectures": ["LlamaForCausalLM"]}')
    lossy.meta = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    aux_parts = split(H.build({}, [aux]))
    lossy.tensors = aux_parts.tensors + lossy.tensors
    out.append(assemble(lossy))
    return out


# --------------------------------------------------------------------------- mutations

INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4095, 4096, 32767, 32768,
                    65535, 65536, (1 << 24) - 1, 1 << 24, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
                    (1 << 64) - 1]
NASTY_JSON = [b"[" * 5000, b'{"a":' * 3000, b'{"a":"1","a":"2"}', b'"\\ud800"', b"NaN", b"1e99999", b"9" * 5000,
              b"[]", b"{}", b'""', b"null", b"true", b'{"x":[1,{"y":null}]}', b'\x00', b'\xff\xfe', b'{"a":"\\u0000"}']
RESERVED = ["acz.files", "acz.lossy", "acz.lossy.summary", "acz.tool", "acz.source_model"]


def _bytes_mutation(rng: random.Random, b: bytearray, max_len: int = 1 << 20) -> None:
    """One random byte-level change in place."""
    k = rng.randrange(8)
    n = len(b)
    if k == 0 and n:  # flip bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
    elif k == 1 and n:  # interesting integer at an aligned or random offset
        width = rng.choice((1, 2, 4, 8))
        v = rng.choice(INTERESTING_INTS) & ((1 << (8 * width)) - 1)
        if rng.random() < 0.3:
            v = (v + rng.choice((-1, 1))) & ((1 << (8 * width)) - 1)
        if n >= width:
            i = rng.randrange(0, n - width + 1)
            if rng.random() < 0.6:
                i -= i % width
            b[i : i + width] = v.to_bytes(width, "little")
    elif k == 2 and n:  # random bytes
        i = rng.randrange(n)
        L = min(rng.randint(1, 16), n - i)
        b[i : i + L] = bytes(rng.randrange(256) for _ in range(L))
    elif k == 3 and n:  # delete a run
        i = rng.randrange(n)
        del b[i : i + rng.randint(1, 64)]
    elif k == 4:  # insert a run
        i = rng.randrange(n + 1)
        if len(b) < max_len:
            b[i:i] = bytes([rng.choice((0, 0xFF, rng.randrange(256)))]) * rng.randint(1, 64)
    elif k == 5 and n:  # truncate
        del b[rng.randrange(n) :]
    elif k == 6 and n > 1:  # copy a run inside
        i, j = rng.randrange(n), rng.randrange(n)
        L = min(rng.randint(1, 64), n - i, n - j)
        b[j : j + L] = b[i : i + L]
    elif n:  # set a byte to an edge value
        b[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))


def _mutate_meta(rng: random.Random, p: Parts) -> None:
    r = rng.random()
    if r < 0.4:
        try:
            meta = json.loads(p.meta)
        except (ValueError, RecursionError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        key = rng.choice(RESERVED + ["user"])
        if key in meta and rng.random() < 0.6:  # damage the value's JSON text
            v = bytearray(meta[key].encode("utf-8", "surrogatepass"))
            for _ in range(rng.randint(1, 3)):
                _bytes_mutation(rng, v, 1 << 16)
            meta[key] = v.decode("utf-8", "replace")
        else:
            meta[key] = rng.choice(NASTY_JSON).decode("utf-8", "replace")
        p.meta = json.dumps(meta, separators=(",", ":")).encode()
    elif r < 0.5:
        p.meta = rng.choice(NASTY_JSON)
    else:
        b = bytearray(p.meta)
        for _ in range(rng.randint(1, 3)):
            _bytes_mutation(rng, b, 1 << 16)
        p.meta = bytes(b)


def _mutate_entry(rng: random.Random, p: Parts) -> bool:
    """Damage one entry's fields (dtype, ndim, mode, stream count, shape, name, params)."""
    ep = bytearray(p.tensors[rng.randrange(len(p.tensors))][0] if p.tensors else b"")
    if not ep:
        return True
    r = rng.random()
    ndim = ep[3] if len(ep) > 3 else 0
    if r < 0.2 and len(ep) >= 4:
        ep[2] = rng.choice((0, 1, 2, 3, 4, 5, 9, 10, 13, 15, 16, 255))  # dtype
    elif r < 0.3 and len(ep) >= 6:
        struct.pack_into("<H", ep, 4, rng.choice((0, 1, 2, 3, 77, 65535)))  # mode
    elif r < 0.4 and len(ep) >= 8:
        struct.pack_into("<H", ep, 6, rng.choice((0, 1, 2, 3, 4, 5, 64, 65)))  # stream count
    elif r < 0.7 and ndim and len(ep) >= 32 + 8 * ndim:  # a shape dimension
        i = rng.randrange(ndim)
        old = struct.unpack_from("<Q", ep, 32 + 8 * i)[0]
        v = rng.choice([rng.choice(INTERESTING_INTS), old * 2, old // 2, old + 1, max(old - 1, 0), 0])
        struct.pack_into("<Q", ep, 32 + 8 * i, v & ((1 << 64) - 1))
    else:
        for _ in range(rng.randint(1, 3)):
            _bytes_mutation(rng, ep, 1 << 16)
    p.tensors[rng.randrange(len(p.tensors))][0] = bytes(ep)  # may land on another entry: fine
    return rng.random() < 0.9


def _mutate_data(rng: random.Random, p: Parts) -> None:
    if not p.tensors:
        return
    t = p.tensors[rng.randrange(len(p.tensors))]
    d = bytearray(t[1])
    for _ in range(rng.randint(1, 3)):
        _bytes_mutation(rng, d)
    t[1] = bytes(d)


def mutate(rng: random.Random, seed: bytes) -> bytes:
    """One fuzz input from one seed."""
    r = rng.random()
    if r < 0.15:  # raw bytes: exercises the checksums and the first checks
        b = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            _bytes_mutation(rng, b)
        return bytes(b)
    if r < 0.3:  # raw bytes, then every CRC made valid again
        b = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            _bytes_mutation(rng, b)
        fix_crcs(b)
        return bytes(b)
    p = split(seed)
    fix = True
    gap = 0
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        k = rng.random()
        if k < 0.25:
            _mutate_meta(rng, p)
        elif k < 0.55:
            fix = _mutate_entry(rng, p) and fix
        elif k < 0.9:
            _mutate_data(rng, p)
        elif k < 0.95 and p.tensors:  # drop, duplicate or reorder tensors
            op = rng.randrange(3)
            if op == 0:
                p.tensors.pop(rng.randrange(len(p.tensors)))
            elif op == 1:
                p.tensors.insert(rng.randrange(len(p.tensors) + 1), list(p.tensors[rng.randrange(len(p.tensors))]))
            else:
                rng.shuffle(p.tensors)
        else:  # extension sections, version, padding
            op = rng.randrange(3)
            if op == 0:
                p.ext.append((rng.choice((0x100, 0xFFFF, 3, 0)), rng.choice((0, 1, 2)), bytes(rng.randrange(40))))
            elif op == 1:
                p.version = rng.choice((0, 1, 2))
            else:
                gap = rng.choice((1, 0xFF))
    return assemble(p, fix_entries=fix, gap_byte=gap)


# --------------------------------------------------------------------------- running one input

DECODE_ONLY = {"CorruptStreamError"}  # faults that only decoding finds (inspect may pass them)


def _named(exc: BaseException) -> bool:
    return isinstance(exc, E.AczError)


def run_input(data: bytes, path: Path, *, decompress: bool = False, limits=None) -> dict:
    """Every read path on one input. Returns {op: outcome class name or "OK"} plus
    "unnamed": [(op, repr)] and "disagree": a reason or None."""
    from aligncodec import archive, loader

    path.write_bytes(data)
    res: dict = {}
    unnamed = []
    kw = {} if limits is None else {"limits": limits}

    def call(op, fn):
        try:
            fn()
            res[op] = "OK"
        except Exception as exc:  # noqa: BLE001
            res[op] = type(exc).__name__
            if not _named(exc):
                import traceback

                unnamed.append((op, "".join(traceback.format_exception(exc))[-4000:]))

    call("verify", lambda: archive.verify(path, **kw))
    call("inspect", lambda: archive.inspect(path, **kw))
    call("load_stream", lambda: loader.load_state_dict(io.BufferedReader(io.BytesIO(data)), threads=1, prefetch=0, **kw))
    if decompress or res["verify"] == "OK":
        out = Path(tempfile.mkdtemp(prefix="acz-fuzz-out-", dir=path.parent))
        try:
            call("decompress", lambda: archive.decompress(path, out, progress=False, **kw))
        finally:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    disagree = None
    v_ok = res["verify"] == "OK"
    if (res["load_stream"] == "OK") != v_ok:
        disagree = f"verify {res['verify']} / load {res['load_stream']}"
    elif "decompress" in res and (res["decompress"] == "OK") != v_ok:
        disagree = f"verify {res['verify']} / decompress {res['decompress']}"
    elif (res["inspect"] == "OK") != v_ok and not (res["inspect"] == "OK" and res["verify"] in DECODE_ONLY):
        disagree = f"verify {res['verify']} / inspect {res['inspect']}"
    return {"ops": res, "unnamed": unnamed, "disagree": disagree}


def work_dir() -> Path:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="acz-fuzz-", dir=base))


def fuzz(n: int, seed: int = 0, *, start: int = 0, on_case=None, on_done=None, decompress_every: int = 8,
         save_dir: Path | None = None) -> dict:
    """Run inputs start..start+n-1 of the stream of ``seed`` (input i is a pure function of
    (seed, i), so a run can be split or resumed). Returns counts and the failing inputs.
    ``on_case(i)`` is called before input i, ``on_done(i, category, ops)`` after it."""
    import shutil

    import numba

    numba.set_num_threads(1)  # inputs are tiny: one thread avoids the parallel launch cost
    pool = seeds()
    wd = work_dir()
    counts = {"inputs": 0, "ok": 0, "named": 0, "unnamed": 0, "disagree": 0}
    errors: dict[str, int] = {}
    failures = []
    try:
        for i in range(start, start + n):
            rng = random.Random(f"{seed}:{i}")
            data = mutate(rng, pool[rng.randrange(len(pool))])
            if on_case:
                on_case(i)
            r = run_input(data, wd / "in.acz", decompress=(i % decompress_every == 0))
            counts["inputs"] += 1
            cat = "unnamed" if r["unnamed"] else "disagree" if r["disagree"] else "ok" if r["ops"]["verify"] == "OK" else "named"
            counts[cat] += 1
            if on_done:
                on_done(i, cat, r["ops"])
            for v in r["ops"].values():
                errors[v] = errors.get(v, 0) + 1
            if r["unnamed"] or r["disagree"]:
                failures.append({"index": i, "ops": r["ops"], "unnamed": r["unnamed"], "disagree": r["disagree"]})
                if save_dir is not None:
                    save_dir.mkdir(parents=True, exist_ok=True)
                    (save_dir / f"fail-{seed}-{i}.acz").write_bytes(data)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return {"counts": counts, "outcomes": errors, "failures": failures}
