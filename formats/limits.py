"""The reader's configurable limits (spec/FORMAT.md §9).

Every read path (``verify``, ``inspect``, ``decompress``, ``load``) takes one
:class:`Limits`; the defaults keep the work of reading an archive proportional
to the bytes it actually holds, so a small hostile file never costs gigabytes
or minutes. A user who trusts an archive that needs more raises a limit
(CLI: ``--max-ratio``; Python: ``Limits(max_ratio=...)``).

The expansion limit: for every tensor *i* (in file order) the decoded bytes of
tensors 0..i together may not exceed ``ratio_slack_bytes + max_ratio × (bytes of
the file up to the end of tensor i)``. It only reads the header, so a random
access reader and a streaming one reject the same archives, and a streaming
reader has always *received* the bytes a tensor is charged against before it
decodes it. It bounds zstd and rANS expansion (a frame of zeros, a one-symbol
rANS table) and, since the work of every coding mode is linear in the decoded
size, the CPU time as well.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from aligncodec.formats.constants import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_TENSOR_BYTES
DEFAULT_MAX_METADATA_BYTES = 16 << 20
DEFAULT_MAX_RATIO = 256.0
DEFAULT_RATIO_SLACK_BYTES = 4 << 20
# the odd factor m of an ecsq Hadamard transform (spec §7.4) costs rows·n·m multiply-adds; real
# layer widths need m ≤ 231 (e.g. 29568 = 2^7·231); 1023 was measured to take minutes on 4 MB
DEFAULT_MAX_HADAMARD_M = 255


@dataclass(frozen=True)
class Limits:
    """Limits a reader enforces before it allocates or computes (``LimitError`` when passed)."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # the header (preamble field header_size)
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES  # the METADATA section's JSON
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES  # one tensor decoded (and its shape's span)
    max_ratio: float = DEFAULT_MAX_RATIO  # decoded bytes per byte present (see the module doc)
    ratio_slack_bytes: int = DEFAULT_RATIO_SLACK_BYTES  # decoded bytes allowed on top of the ratio
    max_hadamard_m: int = DEFAULT_MAX_HADAMARD_M  # the odd factor of an ecsq Hadamard transform

    def __post_init__(self) -> None:
        for k in ("max_header_bytes", "max_metadata_bytes", "max_tensor_bytes", "ratio_slack_bytes", "max_hadamard_m"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"Limits.{k} must be a non-negative integer, not {v!r}")
        r = self.max_ratio
        if not isinstance(r, (int, float)) or not r > 0:  # inf allowed: no expansion limit
            raise ValueError(f"Limits.max_ratio must be > 0, not {r!r}")

    def with_(self, **kw) -> "Limits":
        """A copy with some limits changed; None values keep the current one."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


DEFAULT_LIMITS = Limits()


def resolve(limits: Limits | None = None, **legacy) -> Limits:
    """``limits`` (or the defaults) with the legacy keyword limits (``max_header_bytes=``,
    ``max_tensor_bytes=``) applied on top."""
    base = limits if limits is not None else DEFAULT_LIMITS
    return base.with_(**legacy) if any(v is not None for v in legacy.values()) else base
