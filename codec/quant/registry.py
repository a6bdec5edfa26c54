"""The lossy quantisers: one entry each. The command line's ``--quantizer`` choices and
``--trellis-states``, ``rd``'s row labels, the benchmarks' arms and the demo read this table.

A quantiser is its module (the rounding inside GPTQ's column sweep) plus one entry here; the
per-tensor encoder (codec/encoder.py) picks its rounding by the entry's ``trellis`` field of a
:class:`TensorJob` (0: scalar). Adding one that writes new bytes also needs its coding mode
(codec/modes/), its section in spec/FORMAT.md and golden vectors.

An encoder run names one quantiser by its *trellis id*: 0 for ``ecsq``, else the id of the
state machine of mode 4 (``lossy.TRELLIS_MACHINES``, spec §7.6).
"""

from __future__ import annotations

from dataclasses import dataclass

from aligncodec.formats.constants import MODE_ECSQ, MODE_TCQ


@dataclass(frozen=True)
class Quantizer:
    name: str
    mode: int  # the coding mode its tensors are written in (spec §7)
    module: str  # where its rounding lives
    summary: str
    states: tuple[int, ...] = ()  # trellis state counts it offers (tcq)
    default_states: int | None = None
    step_ratio: float = 1.0  # its step over the ECSQ step at about equal rate (a start for step searches)


def _tcq_states() -> tuple[int, ...]:
    from aligncodec.codec.modes.lossy import TRELLIS_MACHINES

    return tuple(sorted(s for s, _taps in TRELLIS_MACHINES.values()))


QUANTIZERS: dict[str, Quantizer] = {
    "ecsq": Quantizer("ecsq", MODE_ECSQ, "aligncodec.codec.quant.gptq",
                      "entropy-coded uniform scalar quantiser with GPTQ error feedback (mode 2)"),
    # tcq's union-grid step sits near 0.6 x the ECSQ step at equal rate
    "tcq": Quantizer("tcq", MODE_TCQ, "aligncodec.codec.quant.trellis",
                     "trellis-coded quantiser inside GPTQ's column sweep (mode 4, spec §7.6)",
                     states=_tcq_states(), default_states=64, step_ratio=0.6),
}
# the command line's default: tcq measured better at equal rate (SmolLM2 3.0 bpw: exact KLD 0.2418
# vs 0.2944; MiniLM weight domain 3.29 vs 3.44 bpw at 20 dB; docs/results/2026-11-30-tcq.md); 64
# states since 2026-12-01 (docs/results/2026-12-01-table32k-final.md: against 8 states, SmolLM2
# whole file 3.0 bpw KLD 0.3328 vs 0.3511 for 1.36x the encode CPU; decode at 0.90-0.98 of 8 states').
# The library (EncodeOptions, rd) codes ecsq unless given a trellis id.
DEFAULT = "tcq"


def trellis_id(name: str, states: int | None = None) -> int:
    """The trellis id of a quantiser (0 for ecsq; tcq: the state machine with ``states`` states,
    default its ``default_states``). ValueError naming the choices for an unknown one."""
    q = QUANTIZERS.get(name)
    if q is None:
        raise ValueError(f"unknown quantizer {name!r}; choose from {', '.join(QUANTIZERS)}")
    if not q.states:
        if states is not None:
            raise ValueError(f"{name} has no trellis states")
        return 0
    from aligncodec.codec.modes.lossy import TRELLIS_MACHINES

    s = q.default_states if states is None else states
    ids = {n: mid for mid, (n, _taps) in TRELLIS_MACHINES.items()}
    if s not in ids:
        raise ValueError(f"{name} has no {s}-state machine; choose from {', '.join(map(str, sorted(ids)))}")
    return ids[s]


def by_trellis(tid: int) -> Quantizer:
    """The quantiser of a trellis id (ValueError for an unknown id)."""
    if tid == 0:
        return QUANTIZERS["ecsq"]
    from aligncodec.codec.modes.lossy import TRELLIS_MACHINES

    if tid not in TRELLIS_MACHINES:
        raise ValueError(f"unknown trellis state-machine id {tid}")
    return QUANTIZERS["tcq"]


def label(tid: int) -> str:
    """A run's quantiser as rows and summaries name it: ``ecsq``, ``tcq64``, ..."""
    q = by_trellis(tid)
    if not q.states:
        return q.name
    from aligncodec.codec.modes.lossy import TRELLIS_MACHINES

    return f"{q.name}{TRELLIS_MACHINES[tid][0]}"


def default_trellis() -> int:
    """The command line's default quantiser as a trellis id."""
    return trellis_id(DEFAULT)
