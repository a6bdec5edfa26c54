"""Every number the .acz format fixes (spec/FORMAT.md): magic, versions, sizes and
alignments, limits, section kinds, dtype codes, coding-mode and coder ids.

The one place these are declared; the reader, the writer and the codecs import them
from here. Pure constants: no imports beyond the standard library.
"""

from __future__ import annotations

MAGIC = b"\x89ACZ\r\n\x1a\n"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)  # retired ids are never reused (spec §2)

# sizes and alignments (spec §3-§5)
PREAMBLE_SIZE = 64
DATA_ALIGN = 64
SECTION_ALIGN = 8
STREAM_ALIGN = 8

# header sections (spec §3)
SECTION_METADATA = 1
SECTION_TENSOR = 2
SECTION_FLAG_REQUIRED = 0x0001
FIRST_EXTENSION_KIND = 0x0100

# limits every reader enforces (spec §3, §6)
MAX_NDIM = 8
MAX_NAME_BYTES = 4096
MAX_STREAMS = 64
MAX_ALPHABET = 1 << 16
MAX_PRECISION = 16
MAX_CHUNK_SYMBOLS = 1 << 24

# defaults of the reader's own limits (overridable per reader)
DEFAULT_MAX_HEADER_BYTES = 256 << 20
DEFAULT_MAX_TENSOR_BYTES = 64 << 30

# dtype code -> (name, bytes per element). Names as in safetensors.
DTYPES: dict[int, tuple[str, int]] = {
    1: ("F32", 4),
    2: ("F16", 2),
    3: ("BF16", 2),
    4: ("F64", 8),
    5: ("I8", 1),
    6: ("I16", 2),
    7: ("I32", 4),
    8: ("I64", 8),
    9: ("U8", 1),
    10: ("BOOL", 1),
    11: ("U16", 2),
    12: ("U32", 4),
    13: ("U64", 8),
    14: ("F8_E4M3", 1),
    15: ("F8_E5M2", 1),
}
DTYPE_CODES = {name: code for code, (name, _) in DTYPES.items()}
DTYPE_SIZES = {name: size for name, size in DTYPES.values()}

# IEEE binary float dtypes -> (width W, exponent bits E) (spec §7.2, float-split)
FLOAT_FORMATS = {"F16": (16, 5), "BF16": (16, 8), "F32": (32, 8), "F64": (64, 11)}

# coding modes (spec §7; implemented in codec/modes, dispatched by codec/modes/__init__.py)
MODE_STORED = 0
MODE_FLOAT_SPLIT = 1
MODE_ECSQ = 2  # lossy (spec §7.4)
MODE_BYTEGROUP = 3  # lossless byte planes (spec §7.5)
MODE_TCQ = 4  # lossy, trellis-coded quantisation (spec §7.6)
MODE_NAMES = {MODE_STORED: "stored", MODE_FLOAT_SPLIT: "float-split", MODE_ECSQ: "ecsq", MODE_BYTEGROUP: "bytegroup",
              MODE_TCQ: "tcq"}

# stream coders (spec §5)
CODER_RAW = 0
CODER_ZSTD = 1
CODER_RANS = 2
CODER_RANS_LANES = 3  # interleaved lanes (spec §6.6)
CODER_NAMES = {CODER_RAW: "raw", CODER_ZSTD: "zstd", CODER_RANS: "rans", CODER_RANS_LANES: "rans-lanes"}
MAX_LANES = 32  # coder 3: lanes per chunk (one GPU warp)

RANS_STATE_LOWER = 1 << 16  # L: rANS state interval [L, 2^32) (spec §6)

# auxiliary files (config, tokenizer, ...) travel as U8 tensors named AUX_PREFIX + file name (spec §7.3)
AUX_PREFIX = "acz:file/"
