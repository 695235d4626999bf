"""Byte layouts of the GGUF block types: one table that the kernels, quantizers and tests read.

One NamedTuple per block type, its fields the block's size (`weights` per block, `bytes`) and the byte offset
of each field inside a block, named as in ggml-common.h (whose struct each docstring quotes, with the dequant
formula). NamedTuples because numba reads a global one as constants: `row[o + Q4_K.qs + e]` compiles to the
same code as a bare offset. Sizes are checked against gguf-py's GGML_QUANT_SIZES, and the fields against
each other (they tile the block exactly), at import.

All little-endian; `half` is an IEEE f16, read as f32.
"""

from __future__ import annotations

from typing import NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK = 32  # weights per block of the legacy types (QK4_0 ... QK8_0)
QK_K = 256  # weights per K-quant super-block


class F32Layout(NamedTuple):
    """One f32 per weight."""

    qtype: GGMLQuantizationType = GGMLQuantizationType.F32
    weights: int = 1
    bytes: int = 4


class F16Layout(NamedTuple):
    """One IEEE half per weight."""

    qtype: GGMLQuantizationType = GGMLQuantizationType.F16
    weights: int = 1
    bytes: int = 2


class BF16Layout(NamedTuple):
    """One bfloat16 (the top half of an f32) per weight."""

    qtype: GGMLQuantizationType = GGMLQuantizationType.BF16
    weights: int = 1
    bytes: int = 2


class Q4_0Layout(NamedTuple):
    """struct block_q4_0 { ggml_half d; uint8_t qs[QK4_0 / 2]; };
    w[j] = ((qs[j] & 15) - 8) d, w[j + 16] = ((qs[j] >> 4) - 8) d"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q4_0
    weights: int = QK
    bytes: int = 18
    d: int = 0
    qs: int = 2


class Q4_1Layout(NamedTuple):
    """struct block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[QK4_1 / 2]; };
    w[j] = (qs[j] & 15) d + m, w[j + 16] = (qs[j] >> 4) d + m"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q4_1
    weights: int = QK
    bytes: int = 20
    d: int = 0
    m: int = 2
    qs: int = 4


class Q5_0Layout(NamedTuple):
    """struct block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; };
    h = u32(qh): w[j] = ((qs[j] & 15 | bit j of h << 4) - 16) d, w[j + 16] with qs[j] >> 4 and bit j + 16"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q5_0
    weights: int = QK
    bytes: int = 22
    d: int = 0
    qh: int = 2
    qs: int = 6


class Q5_1Layout(NamedTuple):
    """struct block_q5_1 { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2]; };
    as Q5_0 without the - 16, plus m"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q5_1
    weights: int = QK
    bytes: int = 24
    d: int = 0
    m: int = 2
    qh: int = 4
    qs: int = 8


class Q8_0Layout(NamedTuple):
    """struct block_q8_0 { ggml_half d; int8_t qs[QK8_0]; };  w[j] = qs[j] d"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0
    weights: int = QK
    bytes: int = 34
    d: int = 0
    qs: int = 2


class Q2_KLayout(NamedTuple):
    """struct block_q2_K { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; ggml_half d; ggml_half dmin; };
    e = 128h + 32j + l: q = (qs[32h + l] >> 2j) & 3, sc = scales[8h + 2j + l / 16],
    w[e] = d (sc & 15) q - dmin (sc >> 4)"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q2_K
    weights: int = QK_K
    bytes: int = 84
    scales: int = 0
    qs: int = 16
    d: int = 80
    dmin: int = 82


class Q3_KLayout(NamedTuple):
    """struct block_q3_K { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; ggml_half d; };
    e = 128h + 32j + l: q = ((qs[32h + l] >> 2j) & 3) - (bit 4h + j of hmask[l] ? 0 : 4),
    w[e] = d S[8h + 2j + l / 16] q, S the 6-bit scales minus 32 (low 4 bits in scales[0:8], high 2 in
    scales[8:12])"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q3_K
    weights: int = QK_K
    bytes: int = 110
    hmask: int = 0
    qs: int = 32
    scales: int = 96
    d: int = 108


class Q4_KLayout(NamedTuple):
    """struct block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; };
    chunk c < 4, l < 32, (sc, m) = get_scale_min_k4 of sub-blocks 2c, 2c + 1:
    w[64c + l] = d sc (qs[32c + l] & 15) - dmin m, w[64c + 32 + l] the same with qs >> 4"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q4_K
    weights: int = QK_K
    bytes: int = 144
    d: int = 0
    dmin: int = 2
    scales: int = 4
    qs: int = 16


class Q5_KLayout(NamedTuple):
    """struct block_q5_K { ggml_half d; ggml_half dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2]; };  as Q4_K, bit s of qh[l] the fifth bit of sub-block s's weight l"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q5_K
    weights: int = QK_K
    bytes: int = 176
    d: int = 0
    dmin: int = 2
    scales: int = 4
    qh: int = 16
    qs: int = 48


class Q6_KLayout(NamedTuple):
    """struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16];
    ggml_half d; };
    half h, l < 32: w[128h + 32j + l] = d scales[8h + 2j + l / 16] (6-bit q - 32), the low 4 bits from
    ql[64h + 32 (j % 2) + l] (nibble j / 2), the high 2 from bits 2j of qh[32h + l]"""

    qtype: GGMLQuantizationType = GGMLQuantizationType.Q6_K
    weights: int = QK_K
    bytes: int = 210
    ql: int = 0
    qh: int = 128
    scales: int = 192
    d: int = 208


F32, F16, BF16 = F32Layout(), F16Layout(), BF16Layout()
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = Q4_0Layout(), Q4_1Layout(), Q5_0Layout(), Q5_1Layout(), Q8_0Layout()
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = Q2_KLayout(), Q3_KLayout(), Q4_KLayout(), Q5_KLayout(), Q6_KLayout()
LAYOUTS: dict[GGMLQuantizationType, NamedTuple] = {
    layout.qtype: layout
    for layout in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
}

# Bytes of each field, for the check below that the offsets tile the block.
_FIELD_BYTES: dict[GGMLQuantizationType, dict[str, int]] = {
    Q4_0.qtype: {"d": 2, "qs": 16},
    Q4_1.qtype: {"d": 2, "m": 2, "qs": 16},
    Q5_0.qtype: {"d": 2, "qh": 4, "qs": 16},
    Q5_1.qtype: {"d": 2, "m": 2, "qh": 4, "qs": 16},
    Q8_0.qtype: {"d": 2, "qs": 32},
    Q2_K.qtype: {"scales": 16, "qs": 64, "d": 2, "dmin": 2},
    Q3_K.qtype: {"hmask": 32, "qs": 64, "scales": 12, "d": 2},
    Q4_K.qtype: {"d": 2, "dmin": 2, "scales": 12, "qs": 128},
    Q5_K.qtype: {"d": 2, "dmin": 2, "scales": 12, "qh": 32, "qs": 128},
    Q6_K.qtype: {"ql": 128, "qh": 64, "scales": 16, "d": 2},
}


def _check(layout: NamedTuple) -> None:
    if GGML_QUANT_SIZES[layout.qtype] != (layout.weights, layout.bytes):
        raise AssertionError(f"{layout.qtype.name}: {layout} disagrees with gguf's GGML_QUANT_SIZES")
    sizes = _FIELD_BYTES.get(layout.qtype, {})
    fields = sorted((getattr(layout, name), size) for name, size in sizes.items())
    at = 0
    for offset, size in fields:
        if offset != at:
            raise AssertionError(f"{layout.qtype.name}: a field at {offset}, expected {at}")
        at += size
    if sizes and at != layout.bytes:
        raise AssertionError(f"{layout.qtype.name}: fields end at {at}, the block at {layout.bytes}")


for _layout in LAYOUTS.values():
    _check(_layout)
