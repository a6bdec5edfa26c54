"""Reference rANS decoder, written to follow spec/FORMAT.md §6.4 line by line.

Plain Python integers, no numba, no numpy in the loop: slow, obviously
correct, and the yardstick the fast decoders (numba CPU, CUDA) are held to,
bit for bit, in the tests.
"""

from __future__ import annotations

from aligncodec.formats.errors import CorruptStreamError

L = 1 << 16  # lower bound of the state interval [L, 2^32)


def decode_chunk(chunk: bytes, m: int, freqs: list[int], precision: int) -> list[int]:
    """Decode ``m`` symbols from one chunk (spec §6.4)."""
    M = 1 << precision
    # cumulative frequencies: cum[s] = f[0] + ... + f[s-1]
    cum = [0] * len(freqs)
    for s in range(1, len(freqs)):
        cum[s] = cum[s - 1] + freqs[s - 1]
    # 1. the first 4 bytes are the encoder's final state, little-endian
    if len(chunk) < 4:
        raise CorruptStreamError("chunk shorter than its state")
    x = int.from_bytes(chunk[0:4], "little")
    pos = 4
    # 2. it must lie in [L, 2^32)
    if x < L:
        raise CorruptStreamError("initial state below L")
    out = []
    for _ in range(m):
        # 3. the low P bits select the slot; the slot's symbol s has cum[s] <= slot < cum[s] + f[s]
        slot = x % M
        s = 0
        while not (cum[s] <= slot < cum[s] + freqs[s]):
            s += 1
        out.append(s)
        # 4. state update
        x = freqs[s] * (x // M) + slot - cum[s]
        # 5. renormalise: one 16-bit little-endian word when the state fell below L
        if x < L:
            if pos + 2 > len(chunk):
                raise CorruptStreamError("chunk ran out of words")
            x = (x << 16) | int.from_bytes(chunk[pos : pos + 2], "little")
            pos += 2
    # 6. a well-formed chunk ends in state L with every word consumed
    if x != L:
        raise CorruptStreamError("final state is not L")
    if pos != len(chunk):
        raise CorruptStreamError("words left over in chunk")
    return out


def decode_chunk_lanes(chunk: bytes, m: int, freqs: list[int], precision: int, lanes: int) -> list[int]:
    """Decode ``m`` symbols from one chunk of interleaved lanes (spec §6.6)."""
    M = 1 << precision
    cum = [0] * len(freqs)
    for s in range(1, len(freqs)):
        cum[s] = cum[s - 1] + freqs[s - 1]
    # 1. w = min(lanes, m) states, u32 little-endian, lane 0 first
    w = min(lanes, m)
    if len(chunk) < 4 * w:
        raise CorruptStreamError("chunk shorter than its states")
    x = [int.from_bytes(chunk[4 * j : 4 * j + 4], "little") for j in range(w)]
    pos = 4 * w
    # 2. every state in [L, 2^32)
    if any(v < L for v in x):
        raise CorruptStreamError("initial state below L")
    out = []
    for t in range(m):
        # 3. symbol t is decoded by lane t mod lanes, exactly as in §6.4 steps 3-5 ...
        j = t % lanes
        slot = x[j] % M
        s = 0
        while not (cum[s] <= slot < cum[s] + freqs[s]):
            s += 1
        out.append(s)
        x[j] = freqs[s] * (x[j] // M) + slot - cum[s]
        # ... all lanes reading their renormalisation words from the one shared word stream
        if x[j] < L:
            if pos + 2 > len(chunk):
                raise CorruptStreamError("chunk ran out of words")
            x[j] = (x[j] << 16) | int.from_bytes(chunk[pos : pos + 2], "little")
            pos += 2
    # 4. every lane ends in state L, every word consumed
    if any(v != L for v in x):
        raise CorruptStreamError("final state is not L")
    if pos != len(chunk):
        raise CorruptStreamError("words left over in chunk")
    return out


def decode(stream) -> list[int]:
    """Decode a whole :class:`~aligncodec.formats.streams.RansStream`, chunk after chunk."""
    freqs = [int(f) for f in stream.freqs]
    lanes = getattr(stream, "lanes", 1)
    out: list[int] = []
    pos = 0
    for i, length in enumerate(stream.chunk_lengths):
        length = int(length)
        m = min(stream.chunk_symbols, stream.n_symbols - i * stream.chunk_symbols)
        chunk = stream.payload[pos : pos + length]
        out += decode_chunk(chunk, m, freqs, stream.precision) if lanes == 1 else decode_chunk_lanes(chunk, m, freqs, stream.precision, lanes)
        pos += length
    return out
