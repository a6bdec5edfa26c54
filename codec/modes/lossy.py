"""Lossy coding mode 2, ``ecsq`` (spec/FORMAT.md §7.4): entropy-coded uniform
scalar quantisation of a 2-D weight in a transform basis.

A weight W (out × in) is coded as integer symbols q (out × in) in a basis T of
its input space, with per-input-coordinate steps d_j:

    C[i, j] = q[i, j] · d_j          (float32, one rounding)
    W       = C · Tᵀ                  (float32, the fixed algorithm below)

Transforms (``params.transform``):

* 0 ``identity``: T = I;
* 1 ``hadamard``: T = D · (H_p/√p ⊗ Q_m), the randomized Hadamard of
  :mod:`aligncodec.codec.transforms.hadamard` with its sign diagonal D and odd-order
  orthogonal factor Q_m sent explicitly (n sign bits + m² float32), so a
  decoder needs no random-number generator or QR routine;

Per-input-coordinate steps are d_j = f32(Δ · s_j) with s_j float16 scales sent in
a raw stream (flag bit 0), else d_j = Δ.

Everything here is pure: arrays in, arrays out. The reconstruction is written
as a fixed sequence of float32 element-wise operations (numpy, no BLAS, no
fused multiply-add), so every IEEE-754 machine gets the same bits; the encoder
evaluates exactly these bits.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from aligncodec.formats.constants import DATA_ALIGN, SECTION_ALIGN, STREAM_ALIGN
from aligncodec.formats.layout import TensorEntry, align
from aligncodec.formats.streams import RansStream, RawStream, check_rans_stream, serialize_stream
from aligncodec.formats.constants import MODE_ECSQ, MODE_TCQ
from aligncodec.formats.errors import StreamError, UnsupportedError

from aligncodec.codec.transforms.fwht import butterflies, split_pow2

PARAMS_VERSION = 1
TRANSFORM_IDENTITY = 0
TRANSFORM_HADAMARD = 1
TRANSFORM_NAMES = {TRANSFORM_IDENTITY: "identity", TRANSFORM_HADAMARD: "hadamard"}
FLAG_COL_SCALES = 0x01
# the largest |q| the encoder emits: keeps the alphabet (and its table) bounded; clamping is
# part of the quantiser, so its error is part of the measured distortion
MAX_ABS_SYMBOL = 32767
MAX_CLASSES = 16
# params: version u8, transform u8, flags u8, n_classes u8, step f32, offset i32, m u16, rank u16,
#         class_axis u8, reserved u8 u16
_PARAMS = struct.Struct("<BBBBfiHHBBH")
PARAMS_SIZE = _PARAMS.size  # 20
LOSSY_DTYPES = ("F32", "F16", "BF16")


@dataclass
class EcsqParams:
    transform: int
    step: float  # float32 value
    offset: int  # q = symbol + offset
    flags: int = 0
    m: int = 0  # odd factor of n (hadamard), 0 otherwise
    rank: int = 0  # reserved for partial bases, 0
    n_classes: int = 1  # symbol classes, each with its own rANS stream (table)
    class_axis: int = 0  # 0: rows are classed, 1: columns
    trellis: int = 0  # mode 4 (tcq): the state-machine id (TRELLIS_MACHINES); 0 for mode 2 (ecsq)

    @property
    def mode(self) -> int:
        return MODE_TCQ if self.trellis else MODE_ECSQ

    def pack(self) -> bytes:
        return _PARAMS.pack(PARAMS_VERSION, self.transform, self.flags, self.n_classes, self.step, self.offset, self.m,
                            self.rank, self.class_axis, self.trellis, 0)

    @classmethod
    def unpack(cls, b: bytes, name: str = "?", mode: int = MODE_ECSQ) -> "EcsqParams":
        """Params of a mode 2 (``ecsq``) or mode 4 (``tcq``) tensor: the same 20 bytes, where
        byte 17 (reserved, 0, in ecsq) is tcq's state-machine id."""
        if len(b) != PARAMS_SIZE:
            raise StreamError(f"ecsq tensor {name!r}: params are {len(b)} bytes, {PARAMS_SIZE} expected")
        ver, tr, flags, k, step, offset, m, rank, axis, r0, r1 = _PARAMS.unpack(b)
        if ver != PARAMS_VERSION:
            raise UnsupportedError(f"ecsq tensor {name!r}: params version {ver} not supported")
        trellis = 0
        if mode == MODE_TCQ:
            if r0 not in TRELLIS_MACHINES:
                raise UnsupportedError(f"tcq tensor {name!r}: unknown state-machine id {r0}")
            trellis, r0 = r0, 0
        if r0 or r1 or rank:
            raise StreamError(f"ecsq tensor {name!r}: reserved params field not zero")
        if not 1 <= k <= MAX_CLASSES or axis > 1 or (k == 1 and axis):
            raise StreamError(f"ecsq tensor {name!r}: {k} classes on axis {axis} invalid")
        if tr not in TRANSFORM_NAMES:
            raise UnsupportedError(f"ecsq tensor {name!r}: unknown transform {tr}")
        if flags & ~FLAG_COL_SCALES:
            raise StreamError(f"ecsq tensor {name!r}: unknown flag bits {flags:#x}")
        if not (math.isfinite(step) and step > 0):
            raise StreamError(f"ecsq tensor {name!r}: step {step} is not positive and finite")
        return cls(tr, step, offset, flags, m, rank, k, axis, trellis)


# --------------------------------------------------------------------------- trellis (mode 4)

# state-machine id → (states S, feedback taps): a shift register of log2(S) bits; the quantiser
# of a state is its top bit; the next state shifts in (parity of the symbol) XOR (the parity of
# the state's bits under the taps). Id 1 is VVC's 4-state dependent quantisation; ids 4 and 5
# (32 and 64 states) are format 1.6 (spec §7.6). Id 255 is reserved: never assigned, the golden
# vector of an unknown id (spec/vectors/invalid/tcq_machine_255).
TRELLIS_MACHINES = {1: (4, 0b01), 2: (8, 0b11), 3: (16, 0b11), 4: (32, 0b11), 5: (64, 0b11)}
RESERVED_TRELLIS_ID = 255
# tcq symbols k satisfy |k| ≤ 16383, so the levels 2k and 2k − sgn k stay within ±32767 and the
# §7.4 finiteness bound holds unchanged
MAX_ABS_TCQ_SYMBOL = 16383


def trellis_machine(mid: int) -> tuple[np.ndarray, np.ndarray]:
    """(trans[S, 2], qsel[S]) of state machine ``mid`` (spec §7.6): next state for symbol parity 0/1,
    and each state's quantiser (0 or 1), both int8."""
    if mid not in TRELLIS_MACHINES:
        raise UnsupportedError(f"unknown trellis state-machine id {mid}")
    n_states, taps = TRELLIS_MACHINES[mid]
    bits = n_states.bit_length() - 1
    trans = np.zeros((n_states, 2), np.int8)
    qsel = np.zeros(n_states, np.int8)
    for s in range(n_states):
        fb = bin(s & taps).count("1") & 1
        for par in (0, 1):
            trans[s, par] = (s >> 1) | ((par ^ fb) << (bits - 1))
        qsel[s] = (s >> (bits - 1)) & 1
    return trans, qsel


def trellis_levels(q: np.ndarray, mid: int, out: np.ndarray | None = None) -> np.ndarray:
    """Integer levels L (int32, rows × n) of tcq symbols k (rows × n): each column walks its rows
    from state 0; quantiser 0 gives L = 2k, quantiser 1 gives L = 2k − sgn(k) (spec §7.6).
    The reference form (numpy, one vector step per row); the value is C = f32(L) · d.
    ``out``: an int32 rows × n array to write L into (int16 holds every level of symbols within
    MAX_ABS_TCQ_SYMBOL; ``q`` itself is fine: each row's symbols are read before its levels are
    written)."""
    trans, qsel = trellis_machine(mid)
    q = np.asarray(q)
    rows, n = q.shape
    L = np.empty((rows, n), np.int32) if out is None else out
    s = np.zeros(n, np.intp)
    for i in range(rows):
        k = q[i].astype(np.int32)
        L[i] = 2 * k - np.where(qsel[s] == 1, np.sign(k), 0).astype(np.int32)
        s = trans[s, k & 1]
    return L


# --------------------------------------------------------------------------- transforms


@dataclass
class HadamardData:
    """The explicit randomized Hadamard T = D (H_p/√p ⊗ Q_m) of dimension n = p·m."""

    signs: np.ndarray  # float32 ±1, n
    Q: np.ndarray  # float32 m × m (row-major)

    @property
    def n(self) -> int:
        return len(self.signs)

    @property
    def m(self) -> int:
        return self.Q.shape[0]

    def to_bytes(self) -> bytes:
        bits = (self.signs < 0).astype(np.uint8)
        return np.packbits(bits, bitorder="little").tobytes() + self.Q.astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, b: bytes, n: int, m: int, name: str = "?") -> "HadamardData":
        p, mm = split_pow2(n)
        if mm != m:
            raise StreamError(f"ecsq tensor {name!r}: hadamard odd factor {m}, {n} needs {mm}")
        nb = (n + 7) // 8
        if len(b) != nb + 4 * m * m:
            raise StreamError(f"ecsq tensor {name!r}: hadamard data is {len(b)} bytes, {nb + 4 * m * m} expected")
        raw = np.frombuffer(b, dtype=np.uint8, count=nb)
        if n % 8 and raw[-1] >> (n % 8):
            raise StreamError(f"ecsq tensor {name!r}: non-zero padding bits in the sign bits")
        bits = np.unpackbits(raw, bitorder="little")[:n]
        signs = np.where(bits == 1, np.float32(-1), np.float32(1)).astype(np.float32)
        Q = np.frombuffer(b, dtype="<f4", offset=nb, count=m * m).reshape(m, m).astype(np.float32)
        if not np.all(np.isfinite(Q)):
            raise StreamError(f"ecsq tensor {name!r}: non-finite hadamard factor")
        return cls(signs, Q)

    @classmethod
    def from_seed(cls, n: int, seed: int) -> "HadamardData":
        from aligncodec.codec.transforms.hadamard import RandomizedHadamard

        rh = RandomizedHadamard(n, seed)
        return cls(rh.signs.numpy().astype(np.float32), rh.Q.numpy().astype(np.float32))

    def apply64(self, X: np.ndarray) -> np.ndarray:
        """X · T for row vectors X (k × n; float32 or float64, not modified), float64, fast
        (signs and butterflies in one numba pass, then the m × m factor and the scale in place)."""
        from aligncodec.codec.transforms.fwht_jit import signed_butterflies  # encoder side: numba

        k, n = X.shape
        p, m = split_pow2(n)
        Y = signed_butterflies(X, self.signs, p, m)  # the same bits as fwht.butterflies of X·diag(signs)
        if m > 1:
            Y = Y @ self.Q.astype(np.float64)
        else:  # a 1 × 1 factor: the product Y @ Q is this multiplication, bit for bit
            Y *= np.float64(self.Q[0, 0])
        Y /= math.sqrt(p)
        return Y.reshape(k, n)

    def matrix64(self) -> np.ndarray:
        """T as a float64 n × n matrix built from the float32 data (encoder side)."""
        p, m = split_pow2(self.n)
        Hp = np.ones((1, 1))
        while Hp.shape[0] < p:
            Hp = np.block([[Hp, Hp], [Hp, -Hp]])
        K = np.kron(Hp / math.sqrt(p), self.Q.astype(np.float64))
        return self.signs.astype(np.float64)[:, None] * K


def inverse_hadamard_f32(Cm: np.ndarray, hd: HadamardData) -> np.ndarray:
    """W = C · Tᵀ in float32 by the normative algorithm of spec §7.4 (rows of C are row vectors)."""
    rows, n = Cm.shape
    p, m = split_pow2(n)
    X = butterflies(np.asarray(Cm, dtype=np.float32).reshape(rows, p, m))  # Sylvester butterflies, element-wise float32
    if m > 1:  # Y[., j] = sum_k X[., k] · Q[j, k], k ascending, float32 each step (all j at once)
        Q = np.ascontiguousarray(hd.Q, dtype=np.float32)
        acc = np.zeros_like(X)
        prod = np.empty_like(X)
        for k in range(m):
            np.multiply(X[:, :, k : k + 1], Q[None, None, :, k], out=prod)
            np.add(acc, prod, out=acc)
        del prod
        X = acc
    g = np.float32(1.0 / math.sqrt(p))
    X = X * g
    return X.reshape(rows, n) * hd.signs[None, :]


# --------------------------------------------------------------------------- reconstruction


def column_steps(params: EcsqParams, scales: np.ndarray | None) -> np.ndarray | np.float32:
    step = np.float32(params.step)
    if scales is None:
        return step
    return (step * scales.astype(np.float32)).astype(np.float32)


def reconstruct_from(params: EcsqParams, q: np.ndarray, scales: np.ndarray | None, hd: HadamardData | None) -> np.ndarray:
    """float32 weight (out × in) from integer symbols q (out × in, already offset).

    Valid params (``check_params``: the §7.4 bound keeps |W| < 2^127) never overflow; the
    silenced numpy warnings matter only to direct calls with unchecked params."""
    if params.trellis:
        q = trellis_levels(q, params.trellis)
    with np.errstate(over="ignore", invalid="ignore"):
        d = column_steps(params, scales)
        Cm = q.astype(np.float32) * (d[None, :] if isinstance(d, np.ndarray) else d)
        if params.transform == TRANSFORM_IDENTITY:
            return Cm
        if params.transform == TRANSFORM_HADAMARD:
            return inverse_hadamard_f32(Cm, hd)
    raise UnsupportedError(f"unknown transform {params.transform}")


def round_to_dtype(W: np.ndarray, dtype: str) -> np.ndarray:
    """The stored value's bits: float32 W rounded to the tensor's dtype (round-to-nearest-even,
    spec §7.4), as a little-endian array of that dtype's width (F32: W itself).

    numpy only; bit for bit what torch's ``.to(dtype)`` gives for every non-NaN value (a NaN,
    which only a malformed file can produce, becomes 0xFFFF in BF16 as in torch's vectorised path)."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    if dtype == "F32":
        return W.astype("<f4", copy=False)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return W.astype("<f2")
    if dtype == "BF16":
        u = W.view(np.uint32)
        b = ((u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)).astype("<u2")
        b[np.isnan(W)] = 0xFFFF
        return b
    raise StreamError(f"dtype {dtype} is not a lossy dtype")


def rounded_f32(W: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of :func:`round_to_dtype` (what a decoder yields, widened back to float32)."""
    r = round_to_dtype(W, dtype)
    if dtype == "BF16":
        return (r.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return r.astype(np.float32)


def _raw_any(stream, what: str) -> bytes:
    if not isinstance(stream, RawStream):
        raise StreamError(f"{what} must be a raw stream")
    return stream.data


@dataclass
class ClassMap:
    """Symbol classes along one axis: ``ids[i]`` is the class of row/column i; class c's
    symbols are q[i, j] + ... for the rows/columns of class c, in row-major order of that
    sub-matrix, coded in their own rANS stream with integer offset ``offsets[c]``."""

    ids: np.ndarray  # uint8, length = the classed axis
    offsets: list[int]

    @property
    def k(self) -> int:
        return len(self.offsets)

    def to_bytes(self) -> bytes:
        ids = self.ids.astype(np.uint8)
        if len(ids) % 2:
            ids = np.append(ids, np.uint8(0))
        packed = (ids[0::2] | (ids[1::2] << 4)).astype(np.uint8)  # 4 bits per id, low nibble first
        return np.asarray(self.offsets, dtype="<i4").tobytes() + packed.tobytes()

    @classmethod
    def from_bytes(cls, b: bytes, k: int, length: int, name: str = "?") -> "ClassMap":
        need = 4 * k + (length + 1) // 2
        if len(b) != need:
            raise StreamError(f"ecsq tensor {name!r}: class map is {len(b)} bytes, {need} expected")
        offsets = [int(x) for x in np.frombuffer(b, dtype="<i4", count=k)]
        if any(not -MAX_ABS_SYMBOL <= o <= 0 for o in offsets):
            raise StreamError(f"ecsq tensor {name!r}: class offset outside [-{MAX_ABS_SYMBOL}, 0]")
        packed = np.frombuffer(b, dtype=np.uint8, offset=4 * k)
        ids = np.empty(2 * len(packed), dtype=np.uint8)
        ids[0::2] = packed & 15
        ids[1::2] = packed >> 4
        if length % 2 and ids[-1]:
            raise StreamError(f"ecsq tensor {name!r}: non-zero padding nibble in the class map")
        ids = ids[:length]
        if ids.max(initial=0) >= k:
            raise StreamError(f"ecsq tensor {name!r}: class id ≥ {k}")
        return cls(ids, offsets)

    def symbol_counts(self, other: int) -> list[int]:
        return [int((self.ids == c).sum()) * other for c in range(self.k)]

    def split(self, q: np.ndarray, axis: int, k: int):
        """The symbols of each class in turn (flattened copies), one alive at a time: a large
        tensor's classes together would be a second copy of it."""
        for c in range(k):
            yield (q[self.ids == c] if axis == 0 else q[:, self.ids == c]).reshape(-1)

    def assemble(self, syms: list[np.ndarray], shape: tuple[int, int], axis: int, name: str = "?") -> np.ndarray:
        q = np.empty(shape, dtype=np.int32)
        other = shape[1 - axis]
        for c in range(self.k):
            sel = self.ids == c
            cnt = int(sel.sum())
            if syms[c].size != cnt * other:
                raise StreamError(f"ecsq tensor {name!r}: class {c} has {syms[c].size} symbols, {cnt * other} expected")
            v = syms[c].astype(np.int32) + np.int32(self.offsets[c])
            if axis == 0:
                q[sel] = v.reshape(cnt, other)
            else:
                q[:, sel] = v.reshape(other, cnt)
        return q


def _raw(stream, size: int, what: str) -> bytes:
    if not isinstance(stream, RawStream):
        raise StreamError(f"{what} must be a raw stream")
    if len(stream.data) != size:
        raise StreamError(f"{what}: {len(stream.data)} bytes, {size} expected")
    return stream.data


def parse_side(entry: TensorEntry, side_streams: list) -> tuple[EcsqParams, np.ndarray | None, HadamardData | None, ClassMap | None]:
    """Validate an ecsq entry's params and its streams after the first (column scales,
    transform data): everything but the symbols."""
    name = entry.name
    if entry.dtype not in LOSSY_DTYPES:
        raise StreamError(f"ecsq tensor {name!r}: dtype {entry.dtype} not allowed")
    if len(entry.shape) != 2 or entry.numel == 0:
        raise StreamError(f"ecsq tensor {name!r}: shape {entry.shape} is not a non-empty matrix")
    rows, n = entry.shape
    p = EcsqParams.unpack(entry.params, name, entry.mode)
    want = (p.n_classes > 1) + bool(p.flags & FLAG_COL_SCALES) + (p.transform == TRANSFORM_HADAMARD)
    if len(side_streams) != want:
        raise StreamError(f"ecsq tensor {name!r}: {len(side_streams) + p.n_classes} streams, {want + p.n_classes} expected")
    if not -MAX_ABS_SYMBOL <= p.offset <= 0:
        raise StreamError(f"ecsq tensor {name!r}: symbol offset {p.offset} outside [-{MAX_ABS_SYMBOL}, 0]")
    i = 0
    classes = None
    if p.n_classes > 1:
        classes = ClassMap.from_bytes(_raw_any(side_streams[0], f"ecsq tensor {name!r} class map"), p.n_classes,
                                      entry.shape[p.class_axis], name)
        i += 1
    scales = None
    if p.flags & FLAG_COL_SCALES:
        scales = np.frombuffer(_raw(side_streams[i], 2 * n, f"ecsq tensor {name!r} column scales"), dtype="<f2").astype(np.float32)
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            raise StreamError(f"ecsq tensor {name!r}: column scales must be positive and finite")
        i += 1
    hd = None
    if p.transform == TRANSFORM_HADAMARD:
        if not isinstance(side_streams[i], RawStream):
            raise StreamError(f"ecsq tensor {name!r}: hadamard data must be a raw stream")
        hd = HadamardData.from_bytes(side_streams[i].data, n, p.m, name)
    elif p.m:
        raise StreamError(f"ecsq tensor {name!r}: m must be 0 without a hadamard transform")
    check_finite_bound(p, scales, hd, n, name)
    return p, scales, hd, classes


# |W| < 2^127 by this bound, so the reconstruction never overflows (no inf, no NaN: every
# decoder gives the same bits; NaN payloads are not portable between CPUs and GPUs)
FINITE_BOUND = 2.0**127


def check_finite_bound(p: EcsqParams, scales: np.ndarray | None, hd: HadamardData | None, n: int, name: str = "?") -> None:
    """Spec §7.4: n · max(1, max|Q|) · 32767 · Δ · max(s) < 2^127 (float64), else StreamError."""
    smax = float(scales.max()) if scales is not None and len(scales) else 1.0
    qmax = max(1.0, float(np.abs(hd.Q).max())) if hd is not None and hd.Q.size else 1.0
    if float(n) * qmax * MAX_ABS_SYMBOL * float(p.step) * smax >= FINITE_BOUND:
        raise StreamError(f"ecsq tensor {name!r}: step, scales and factor could overflow float32")


def check_params(entry: TensorEntry, limits=None) -> EcsqParams:
    """Validate an ecsq entry's header fields (dtype, shape, params, stream count, the Hadamard
    factor's m against the reader limit, formats/limits.py) before any of its data is read."""
    from aligncodec.formats.errors import LimitError
    from aligncodec.formats.limits import DEFAULT_MAX_HADAMARD_M

    name = entry.name
    if entry.dtype not in LOSSY_DTYPES:
        raise StreamError(f"ecsq tensor {name!r}: dtype {entry.dtype} not allowed")
    if len(entry.shape) != 2 or entry.numel == 0:
        raise StreamError(f"ecsq tensor {name!r}: shape {entry.shape} is not a non-empty matrix")
    p = EcsqParams.unpack(entry.params, name, entry.mode)
    n = entry.shape[1]
    if p.transform == TRANSFORM_HADAMARD:
        if p.m != split_pow2(n)[1]:
            raise StreamError(f"ecsq tensor {name!r}: hadamard odd factor {p.m}, {n} needs {split_pow2(n)[1]}")
        limit = DEFAULT_MAX_HADAMARD_M if limits is None else limits.max_hadamard_m
        if p.m > limit:
            raise LimitError(f"ecsq tensor {name!r}: hadamard odd factor m = {p.m} above the reader limit {limit}")
    elif p.m:
        raise StreamError(f"ecsq tensor {name!r}: m must be 0 without a hadamard transform")
    want = p.n_classes + (p.n_classes > 1) + bool(p.flags & FLAG_COL_SCALES) + (p.transform == TRANSFORM_HADAMARD)
    if entry.stream_count != want:
        raise StreamError(f"ecsq tensor {name!r}: {entry.stream_count} streams, {want} expected")
    return p


def n_symbol_streams(entry: TensorEntry) -> int:
    return EcsqParams.unpack(entry.params, entry.name, entry.mode).n_classes


def parse(entry: TensorEntry, streams: list):
    """Validate an ecsq entry and all its streams (before decoding anything).
    Returns (params, symbol streams, scales, hadamard data, class map)."""
    k = n_symbol_streams(entry)
    if len(streams) < k or not all(isinstance(s, RansStream) for s in streams[:k]):
        raise StreamError(f"ecsq tensor {entry.name!r}: the first {k} streams must be rANS")
    p, scales, hd, cm = parse_side(entry, list(streams[k:]))
    rows, n = entry.shape
    counts = [entry.numel] if cm is None else cm.symbol_counts(entry.shape[1 - p.class_axis])
    offsets = [p.offset] if cm is None else cm.offsets
    for c, (s, cnt, off) in enumerate(zip(streams[:k], counts, offsets)):
        check_rans_stream(s, cnt, 1 << 16)
        if off + s.alphabet_size - 1 > MAX_ABS_SYMBOL:
            raise StreamError(f"ecsq tensor {entry.name!r}: class {c} alphabet reaches past +{MAX_ABS_SYMBOL}")
        if p.trellis and (off < -MAX_ABS_TCQ_SYMBOL or off + s.alphabet_size - 1 > MAX_ABS_TCQ_SYMBOL):
            raise StreamError(f"tcq tensor {entry.name!r}: class {c} alphabet reaches past ±{MAX_ABS_TCQ_SYMBOL}")
    return p, list(streams[:k]), scales, hd, cm


def validate(entry: TensorEntry, streams: list) -> None:
    """Check an ecsq entry's params and all its streams without decoding (the registry's validate)."""
    parse(entry, streams)


def reconstruct(entry: TensorEntry, decoded_streams: list) -> np.ndarray:
    """float32 weight (out × in) from the entry and its streams with stream 0 already
    decoded to symbols (uint16 array); the other streams as parsed (raw bytes).

    This is the step the CPU/GPU loaders call after symbol decoding."""
    k = n_symbol_streams(entry)
    p, scales, hd, cm = parse_side(entry, list(decoded_streams[k:]))
    rows, n = entry.shape
    syms = [np.asarray(x) for x in decoded_streams[:k]]
    if cm is None:
        if syms[0].size != rows * n:
            raise StreamError(f"ecsq tensor {entry.name!r}: {syms[0].size} symbols, {rows * n} expected")
        q = syms[0].reshape(rows, n).astype(np.int32) + np.int32(p.offset)
    else:
        q = cm.assemble(syms, (rows, n), p.class_axis, entry.name)
    return reconstruct_from(p, q, scales, hd)


def decode(entry: TensorEntry, streams: list, *, reference: bool = False) -> np.ndarray:
    """Decode an ecsq tensor to its little-endian bytes (uint8), as the mode registry wants.

    Default: the numba kernels of :mod:`aligncodec.codec.modes.lossy_cpu` (parallel, one pass per
    row); ``reference=True``: the reference rANS decoder and the numpy reconstruction below
    (slow; the tests hold the two bit-identical)."""
    if not reference:
        from aligncodec.codec.modes import lossy_cpu

        return lossy_cpu.decode(entry, streams)
    return decode_numpy(entry, streams, reference=True)


def decode_numpy(entry: TensorEntry, streams: list, *, reference: bool = False) -> np.ndarray:
    """The numpy reconstruction (spec §7.4 written as float32 array operations) after
    decoding the symbols with the fast decoder (or the reference one)."""
    p, sstreams, _scales, _hd, _cm = parse(entry, streams)
    if reference:
        from aligncodec.codec.entropy import rans_reference

        syms = [np.asarray(rans_reference.decode(s0), dtype=np.uint16) for s0 in sstreams]
    else:
        from aligncodec.codec.entropy import rans

        syms = [rans.decode(s0) for s0 in sstreams]
    W = reconstruct(entry, syms + list(streams[len(sstreams):]))
    return round_to_dtype(W, entry.dtype).reshape(-1).view(np.uint8)


# --------------------------------------------------------------------------- encoding


def _sym_stream(v: np.ndarray, chunk_symbols: int | None, lanes: int | None = None) -> tuple[int, RansStream]:
    lo, hi = int(v.min()), int(v.max())
    if -lo > MAX_ABS_SYMBOL or hi > MAX_ABS_SYMBOL:
        raise ValueError(f"symbols outside ±{MAX_ABS_SYMBOL}")
    lo = min(lo, 0)  # offset ≤ 0 keeps the params check simple
    from aligncodec.codec.entropy import rans

    return lo, rans.encode(v, offset=lo, chunk_symbols=chunk_symbols, lanes=lanes)  # v − lo, no shifted copy


_CLASS_CHUNK = 8192  # tensors with more rows are measured by make_classes a row chunk at a time
_CLASS_ELEMS = 1 << 20  # symbols per chunk there (float64 temporaries of 8 MB)


def make_classes(q: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Class ids: rows/columns sorted by the mean |q|, split into k groups of equal count."""
    rows = q.shape[0]
    if rows <= _CLASS_CHUNK:
        a = np.abs(q.astype(np.float64)).mean(axis=1 - axis)
    else:  # a large tensor (an embedding): one row chunk at a time
        step = max(1, _CLASS_ELEMS // max(1, q.shape[1]))
        if axis == 0:  # each row's mean within its chunk: independent of the chunk size
            a = np.concatenate([np.abs(q[i:i + step].astype(np.float64)).mean(axis=1)
                                for i in range(0, rows, step)])
        else:  # exact integer column sums: independent of the chunk size
            a = np.zeros(q.shape[1], np.int64)
            for i in range(0, rows, step):
                a += np.abs(q[i:i + step]).sum(axis=0, dtype=np.int64)
            a = a / rows
    order = np.argsort(a, kind="stable")
    ids = np.empty(len(a), dtype=np.uint8)
    ids[order] = (np.arange(len(a)) * k // len(a)).astype(np.uint8)
    return ids


def lloyd_classes(cnt: np.ndarray, ids: np.ndarray, k: int, iters: int) -> np.ndarray:
    """Lloyd rounds on per-line symbol counts ``cnt`` (lines × alphabet, float64): each line to
    the class whose add-½ table codes it in the fewest bits, tables re-counted, until nothing
    moves (at most ``iters`` rounds). Returns the ids (int64)."""
    for _ in range(iters):
        tabs = np.stack([cnt[ids == c].sum(0) for c in range(k)]) + 0.5
        lp = np.log2(tabs / tabs.sum(1, keepdims=True))
        new = np.argmin(-cnt @ lp.T, axis=1)
        if np.array_equal(new, ids):
            break
        ids = new
    return ids


def refine_classes(q: np.ndarray, ids: np.ndarray, axis: int, iters: int = 20) -> np.ndarray:
    """Lloyd refinement of a class map: each row (axis 0) or column (1) moves to the class whose
    table (the classes' symbol frequencies, add-½ smoothed) codes it in the fewest bits, the
    tables are re-counted, until nothing moves (at most ``iters`` rounds). Empty classes are
    dropped and the ids renumbered 0..k'−1 in order of the classes' mean |q| (uint8)."""
    q = np.asarray(q)
    lines = q.shape[axis]
    ids = np.asarray(ids, dtype=np.int64).copy()
    k = int(ids.max()) + 1 if ids.size else 1
    lo = int(q.min()) if q.size else 0
    A = (int(q.max()) - lo + 1) if q.size else 1
    # per-line symbol counts and sums of |q|, exact integers, a row chunk of q at a time (a large
    # tensor, e.g. a 3B model's embedding: no int64 copy of all its symbols)
    step = max(1, _CLASS_ELEMS // max(1, q.shape[1]))
    abs_sum = np.zeros(lines, np.int64)
    counting = k > 1 and A <= 1 << 12  # (per-line counts: lines × alphabet; wide alphabets keep the sorted split)
    cnt = np.zeros(lines * A if counting else 0, np.int64)
    for a in range(0, q.shape[0], step):
        c = q[a:a + step].astype(np.int64)
        if axis == 0:
            abs_sum[a:a + c.shape[0]] = np.abs(c).sum(axis=1)
            line = np.arange(a, a + c.shape[0], dtype=np.int64)[:, None]
        else:
            abs_sum += np.abs(c).sum(axis=0)
            line = np.arange(q.shape[1], dtype=np.int64)[None, :]
        if counting:
            c -= lo
            c += line * A
            cnt += np.bincount(c.reshape(-1), minlength=lines * A)
    if counting:
        ids = lloyd_classes(cnt.reshape(lines, A).astype(np.float64), ids, k, iters)
    used = np.unique(ids)
    per_line = q.shape[1 - axis]
    # each class's mean |q|: its exact integer sum over its symbols (what the float64 mean of
    # integers below 2^53 gives, bit for bit)
    mean_abs = np.array([abs_sum[ids == c].sum() / (int((ids == c).sum()) * per_line) for c in used])
    rank = np.empty(len(used), dtype=np.int64)
    rank[np.argsort(mean_abs, kind="stable")] = np.arange(len(used))
    return rank[np.searchsorted(used, ids)].astype(np.uint8)


def encode_symbols(q: np.ndarray, params: EcsqParams, scales: np.ndarray | None, hd: HadamardData | None,
                   chunk_symbols: int | None = None, classes: tuple = (1, 0), lanes: int | None = None) -> tuple[EcsqParams, list]:
    """Streams (and params with offsets filled in) for integer symbols q (out × in);
    ``classes = (k, axis)`` splits the symbols into k classes of rows (axis 0) or columns (1)
    by :func:`make_classes`; ``(k, axis, ids)`` gives the class map (ids < k, every class used).
    ``chunk_symbols``/``lanes``: the rANS layout (None: the encoder's default, rans.default_layout)."""
    q = np.asarray(q)
    k, axis = classes[:2]
    ids = classes[2] if len(classes) > 2 else None
    k = min(k, q.shape[axis]) if ids is None else k
    if ids is not None and (len(ids) != q.shape[axis] or int(np.max(ids)) >= k or len(np.unique(ids)) != k):
        raise ValueError("class ids must cover 0..k-1 along the class axis")
    if k > 1:
        cm = ClassMap(make_classes(q, k, axis) if ids is None else np.asarray(ids, dtype=np.uint8), [])
        streams = []
        for part in cm.split(q, axis, k):
            lo, st = _sym_stream(part, chunk_symbols, lanes)
            cm.offsets.append(lo)
            streams.append(st)
        params = EcsqParams(params.transform, float(np.float32(params.step)), 0, params.flags, params.m, 0, k, axis,
                            params.trellis)
        streams.append(RawStream(cm.to_bytes()))
    else:
        lo, st = _sym_stream(q.reshape(-1), chunk_symbols, lanes)
        params = EcsqParams(params.transform, float(np.float32(params.step)), lo, params.flags, params.m, 0,
                            trellis=params.trellis)
        streams = [st]
    if scales is not None:
        streams.append(RawStream(np.asarray(scales, dtype="<f2").tobytes()))
    if hd is not None:
        streams.append(RawStream(hd.to_bytes()))
    return params, streams


def streams_bytes(streams: list) -> int:
    """Bytes the streams take in a tensor's data (inner padding included, as the writer lays them out)."""
    sizes = [len(serialize_stream(s)) for s in streams]
    return sum(align(s, STREAM_ALIGN) for s in sizes[:-1]) + sizes[-1]


def entry_bytes(name: str, ndim: int, params_len: int, data_size: int) -> int:
    """All-in bytes a tensor adds to an archive: its header section (padded to 8) and its
    data padded to the 64-byte alignment."""
    section = align(8 + 32 + 8 * ndim + len(name.encode("utf-8")) + params_len, SECTION_ALIGN)
    return section + align(data_size, DATA_ALIGN)
