"""Test helper: a rANS stream with one payload byte damaged (the byte-flip corpora of the decoder tests)."""

from aligncodec.formats.streams import RansStream


def byte_flips(s: RansStream, rng, count: int):
    """``count`` distinct payload positions of ``s`` chosen by ``rng``; for each, yields
    (position, a copy of ``s`` with that byte XOR a random non-zero byte). The draws are
    rng.choice for the positions, then one rng.integers per position, in that order."""
    for i in rng.choice(len(s.payload), size=count, replace=False):
        bad = bytearray(s.payload)
        bad[i] ^= int(rng.integers(1, 256))
        yield i, RansStream(s.precision, s.chunk_symbols, s.n_symbols, s.freqs, s.chunk_lengths, bytes(bad), s.lanes)
