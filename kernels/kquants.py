"""Kernels for the K-quant block types Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (256 weights per block).

Dequantization copies gguf-py's arithmetic (gguf/quants.py) step for step in f32: the sub-block scale is
formed as `d * sc` (and `dmin * m`) in f32 first, then `scale * q - min`, with no fused multiply-add (no
fastmath), so the output is bit-identical to `gguf.quants.dequantize`.

Loop shape, everywhere: one loop over the 16 or 32 elements of a slice handles all eight sub-blocks that
share its bytes, so every bit shift is a constant and the eight sub-block scales are loop invariants; bit
fields are computed in int32 (numba widens integer arithmetic to int64, which halves the vector lanes).

matvec, where the CPU allows (kernels.simd.INT8_DOT), quantizes x to int8 per 32 values (one Q4_K/Q5_K
sub-block, two Q2_K/Q3_K/Q6_K ones) and takes one integer dot product per 32 weights (vpdpbusd / pmaddubsw)
with the block's scales unpacked in vector registers: ~3x the f32 kernels, at ~5e-3 relative error from the
activation rounding. The `- dmin * m` terms multiply the sums of the quantized activations per sub-block, as
ggml's do. Elsewhere (and as `matvec_f32`, for exact decoding) matvec keeps x in f32 and decodes the weights
in registers, summing `scale * q * x` over the eight sub-blocks of a (half) block with one horizontal sum.

matmul dequantizes a tile of rows once into a thread-local f32 buffer and multiplies it with all the tokens
by a register-blocked 4 tokens x 4 rows kernel (_multiply_tile). Block layouts: kernels.layout; the parallel
drivers over rows (dequantize, int8 matvec, matmul) are generated into kernels.kquants_drivers
(kernels.specialise).
"""

from __future__ import annotations

import numba
import numpy as np

from .common import read_f16
from .layout import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, QK_K

# Rows of W per matmul micro-kernel step, and tokens per step: 4 x 4 accumulators stay in registers.
MICRO_ROWS = 4
MICRO_TOKENS = 4


@numba.njit(inline="always")
def _byte(row: np.ndarray, i: int) -> int:
    # numba widens uint8 arithmetic to mixed signed/unsigned 64-bit; one signed type avoids float promotion
    return np.int64(row[i])


@numba.njit(inline="always")
def _field(byte: np.uint8, shift: int, mask: int) -> np.int32:
    """(byte >> shift) & mask for shift < 8, in int32 so that LLVM vectorizes with 32-bit lanes, not 64-bit
    (numba computes in int64; `& 7` proves the shift small enough for LLVM to narrow it back)."""
    return np.int32((np.int32(byte) >> (shift & 7)) & mask)


@numba.njit(inline="always")
def _signed_byte(row: np.ndarray, i: int) -> int:
    v = np.int64(row[i])
    return v - 256 if v > 127 else v


@numba.njit(inline="always")
def _scale_min_k4(row: np.ndarray, o: int, j: int) -> tuple[int, int]:
    """Sub-block j's 6-bit scale and min from the 12 packed bytes at row[o:o + 12] (ggml get_scale_min_k4)."""
    if j < 4:
        return _byte(row, o + j) & 63, _byte(row, o + j + 4) & 63
    sc = (_byte(row, o + j + 4) & 15) | ((_byte(row, o + j - 4) >> 6) << 4)
    m = (_byte(row, o + j + 4) >> 4) | ((_byte(row, o + j) >> 6) << 4)
    return sc, m


@numba.njit(inline="always")
def _scale_q3_k(row: np.ndarray, o: int, s: int) -> int:
    """Sub-block s's signed 6-bit scale from the 12 packed bytes at row[o:o + 12]."""
    low = (_byte(row, o + s) & 15) if s < 8 else (_byte(row, o + s - 8) >> 4)
    high = (_byte(row, o + 8 + s % 4) >> (2 * (s // 4))) & 3
    return (low | (high << 4)) - 32


# --- one row of blocks -> f32 (exact); shared by dequantize and matmul -------------------------------------
# Each loop runs over the elements e of a 16- or 32-element slice and writes all eight sub-blocks that share
# its bytes, so every shift is a constant and the sub-block scales are loop invariants.


@numba.njit(inline="always")
def _q3(q: np.uint8, shift: int, high: np.uint8, bit: int) -> np.float32:
    # a clear high bit subtracts 4: q in [-4, 3]
    return np.float32(np.int32(_field(q, shift, 3) - 4 + 4 * _field(high, bit, 1)))


@numba.njit(inline="always")
def _q5(q: np.uint8, shift: int, high: np.uint8, bit: int) -> np.float32:
    return np.float32(np.int32(_field(q, shift, 15) | (_field(high, bit, 1) << 4)))


@numba.njit(inline="always")
def _q6(low: np.uint8, shift: int, high: np.uint8, high_shift: int) -> np.float32:
    return np.float32(np.int32((_field(low, shift, 15) | (_field(high, high_shift, 3) << 4)) - 32))


@numba.njit(cache=True, nogil=True)
def _dequantize_row_q2_k(row: np.ndarray, y: np.ndarray) -> None:
    for b in range(row.shape[0] // Q2_K.bytes):
        o = b * Q2_K.bytes
        d = read_f16(row, o + Q2_K.d)
        dmin = read_f16(row, o + Q2_K.dmin)
        for half in range(2):
            # sub-block 8h + 2j + half: the 2-bit fields j of qs[32h + 16 half + e], 16 elements each
            s = o + Q2_K.scales + half
            d0, m0 = d * np.float32(_byte(row, s) & 15), dmin * np.float32(_byte(row, s) >> 4)
            d1, m1 = d * np.float32(_byte(row, s + 2) & 15), dmin * np.float32(_byte(row, s + 2) >> 4)
            d2, m2 = d * np.float32(_byte(row, s + 4) & 15), dmin * np.float32(_byte(row, s + 4) >> 4)
            d3, m3 = d * np.float32(_byte(row, s + 6) & 15), dmin * np.float32(_byte(row, s + 6) >> 4)
            d4, m4 = d * np.float32(_byte(row, s + 8) & 15), dmin * np.float32(_byte(row, s + 8) >> 4)
            d5, m5 = d * np.float32(_byte(row, s + 10) & 15), dmin * np.float32(_byte(row, s + 10) >> 4)
            d6, m6 = d * np.float32(_byte(row, s + 12) & 15), dmin * np.float32(_byte(row, s + 12) >> 4)
            d7, m7 = d * np.float32(_byte(row, s + 14) & 15), dmin * np.float32(_byte(row, s + 14) >> 4)
            qs = row[o + Q2_K.qs + 16 * half : o + Q2_K.qs + 64]
            out = y[QK_K * b + 16 * half : QK_K * (b + 1)]
            for e in range(16):
                q = qs[e]
                p = qs[32 + e]
                out[e] = d0 * np.float32(_field(q, 0, 3)) - m0
                out[32 + e] = d1 * np.float32(_field(q, 2, 3)) - m1
                out[64 + e] = d2 * np.float32(_field(q, 4, 3)) - m2
                out[96 + e] = d3 * np.float32(_field(q, 6, 3)) - m3
                out[128 + e] = d4 * np.float32(_field(p, 0, 3)) - m4
                out[160 + e] = d5 * np.float32(_field(p, 2, 3)) - m5
                out[192 + e] = d6 * np.float32(_field(p, 4, 3)) - m6
                out[224 + e] = d7 * np.float32(_field(p, 6, 3)) - m7


@numba.njit(cache=True, nogil=True)
def _dequantize_row_q3_k(row: np.ndarray, y: np.ndarray) -> None:
    for b in range(row.shape[0] // Q3_K.bytes):
        o = b * Q3_K.bytes
        d = read_f16(row, o + Q3_K.d)
        for half in range(2):
            d0 = d * np.float32(_scale_q3_k(row, o + Q3_K.scales, half))
            d1 = d * np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 2))
            d2 = d * np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 4))
            d3 = d * np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 6))
            d4 = d * np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 8))
            d5 = d * np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 10))
            d6 = d * np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 12))
            d7 = d * np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 14))
            hmask = row[o + Q3_K.hmask + 16 * half : o + Q3_K.hmask + 16 * half + 16]
            qs = row[o + Q3_K.qs + 16 * half : o + Q3_K.qs + 64]
            out = y[QK_K * b + 16 * half : QK_K * (b + 1)]
            for e in range(16):
                q = qs[e]
                p = qs[32 + e]
                m = hmask[e]
                out[e] = d0 * _q3(q, 0, m, 0)
                out[32 + e] = d1 * _q3(q, 2, m, 1)
                out[64 + e] = d2 * _q3(q, 4, m, 2)
                out[96 + e] = d3 * _q3(q, 6, m, 3)
                out[128 + e] = d4 * _q3(p, 0, m, 4)
                out[160 + e] = d5 * _q3(p, 2, m, 5)
                out[192 + e] = d6 * _q3(p, 4, m, 6)
                out[224 + e] = d7 * _q3(p, 6, m, 7)


@numba.njit(inline="always")
def _scales_k4(row: np.ndarray, o: int, d: np.float32, j: int) -> tuple[np.float32, np.float32]:
    sc, m = _scale_min_k4(row, o, j)
    return d * np.float32(sc), np.float32(m)


@numba.njit(cache=True, nogil=True)
def _dequantize_row_q4_k(row: np.ndarray, y: np.ndarray) -> None:
    for b in range(row.shape[0] // Q4_K.bytes):
        o = b * Q4_K.bytes
        d = read_f16(row, o + Q4_K.d)
        dmin = read_f16(row, o + Q4_K.dmin)
        d0, m0 = _scales_k4(row, o + Q4_K.scales, d, 0)
        d1, m1 = _scales_k4(row, o + Q4_K.scales, d, 1)
        d2, m2 = _scales_k4(row, o + Q4_K.scales, d, 2)
        d3, m3 = _scales_k4(row, o + Q4_K.scales, d, 3)
        d4, m4 = _scales_k4(row, o + Q4_K.scales, d, 4)
        d5, m5 = _scales_k4(row, o + Q4_K.scales, d, 5)
        d6, m6 = _scales_k4(row, o + Q4_K.scales, d, 6)
        d7, m7 = _scales_k4(row, o + Q4_K.scales, d, 7)
        m0, m1, m2, m3 = dmin * m0, dmin * m1, dmin * m2, dmin * m3
        m4, m5, m6, m7 = dmin * m4, dmin * m5, dmin * m6, dmin * m7
        qs = row[o + Q4_K.qs : o + Q4_K.qs + 128]
        out = y[QK_K * b : QK_K * (b + 1)]
        for e in range(32):
            q0 = qs[e]
            q1 = qs[32 + e]
            q2 = qs[64 + e]
            q3 = qs[96 + e]
            out[e] = d0 * np.float32(_field(q0, 0, 15)) - m0
            out[32 + e] = d1 * np.float32(_field(q0, 4, 15)) - m1
            out[64 + e] = d2 * np.float32(_field(q1, 0, 15)) - m2
            out[96 + e] = d3 * np.float32(_field(q1, 4, 15)) - m3
            out[128 + e] = d4 * np.float32(_field(q2, 0, 15)) - m4
            out[160 + e] = d5 * np.float32(_field(q2, 4, 15)) - m5
            out[192 + e] = d6 * np.float32(_field(q3, 0, 15)) - m6
            out[224 + e] = d7 * np.float32(_field(q3, 4, 15)) - m7


@numba.njit(cache=True, nogil=True)
def _dequantize_row_q5_k(row: np.ndarray, y: np.ndarray) -> None:
    for b in range(row.shape[0] // Q5_K.bytes):
        o = b * Q5_K.bytes
        d = read_f16(row, o + Q5_K.d)
        dmin = read_f16(row, o + Q5_K.dmin)
        d0, m0 = _scales_k4(row, o + Q5_K.scales, d, 0)
        d1, m1 = _scales_k4(row, o + Q5_K.scales, d, 1)
        d2, m2 = _scales_k4(row, o + Q5_K.scales, d, 2)
        d3, m3 = _scales_k4(row, o + Q5_K.scales, d, 3)
        d4, m4 = _scales_k4(row, o + Q5_K.scales, d, 4)
        d5, m5 = _scales_k4(row, o + Q5_K.scales, d, 5)
        d6, m6 = _scales_k4(row, o + Q5_K.scales, d, 6)
        d7, m7 = _scales_k4(row, o + Q5_K.scales, d, 7)
        m0, m1, m2, m3 = dmin * m0, dmin * m1, dmin * m2, dmin * m3
        m4, m5, m6, m7 = dmin * m4, dmin * m5, dmin * m6, dmin * m7
        qh = row[o + Q5_K.qh : o + Q5_K.qh + 32]
        qs = row[o + Q5_K.qs : o + Q5_K.qs + 128]
        out = y[QK_K * b : QK_K * (b + 1)]
        for e in range(32):
            h = qh[e]
            q0 = qs[e]
            q1 = qs[32 + e]
            q2 = qs[64 + e]
            q3 = qs[96 + e]
            out[e] = d0 * _q5(q0, 0, h, 0) - m0
            out[32 + e] = d1 * _q5(q0, 4, h, 1) - m1
            out[64 + e] = d2 * _q5(q1, 0, h, 2) - m2
            out[96 + e] = d3 * _q5(q1, 4, h, 3) - m3
            out[128 + e] = d4 * _q5(q2, 0, h, 4) - m4
            out[160 + e] = d5 * _q5(q2, 4, h, 5) - m5
            out[192 + e] = d6 * _q5(q3, 0, h, 6) - m6
            out[224 + e] = d7 * _q5(q3, 4, h, 7) - m7


@numba.njit(cache=True, nogil=True)
def _dequantize_row_q6_k(row: np.ndarray, y: np.ndarray) -> None:
    for b in range(row.shape[0] // Q6_K.bytes):
        o = b * Q6_K.bytes
        d = read_f16(row, o + Q6_K.d)
        for half in range(2):
            # sub-block 8h + 2j + half holds elements 128h + 32j + 16 half + e, e < 16
            s = o + Q6_K.scales + half
            d0 = d * np.float32(_signed_byte(row, s))
            d1 = d * np.float32(_signed_byte(row, s + 2))
            d2 = d * np.float32(_signed_byte(row, s + 4))
            d3 = d * np.float32(_signed_byte(row, s + 6))
            d4 = d * np.float32(_signed_byte(row, s + 8))
            d5 = d * np.float32(_signed_byte(row, s + 10))
            d6 = d * np.float32(_signed_byte(row, s + 12))
            d7 = d * np.float32(_signed_byte(row, s + 14))
            ql = row[o + Q6_K.ql + 16 * half : o + Q6_K.ql + 128]
            qh = row[o + Q6_K.qh + 16 * half : o + Q6_K.qh + 64]
            out = y[QK_K * b + 16 * half : QK_K * (b + 1)]
            for e in range(16):
                a0 = ql[e]
                a1 = ql[32 + e]
                a2 = ql[64 + e]
                a3 = ql[96 + e]
                h0 = qh[e]
                h1 = qh[32 + e]
                out[e] = d0 * _q6(a0, 0, h0, 0)
                out[32 + e] = d1 * _q6(a1, 0, h0, 2)
                out[64 + e] = d2 * _q6(a0, 4, h0, 4)
                out[96 + e] = d3 * _q6(a1, 4, h0, 6)
                out[128 + e] = d4 * _q6(a2, 0, h1, 0)
                out[160 + e] = d5 * _q6(a3, 0, h1, 2)
                out[192 + e] = d6 * _q6(a2, 4, h1, 4)
                out[224 + e] = d7 * _q6(a3, 4, h1, 6)


# --- matvec: y[rows] = W x, weights decoded in registers ----------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath=True)
def _sub_block_sums(x: np.ndarray, size: int) -> np.ndarray:
    """x f32[cols] -> f32[cols // size], the sums the `- dmin * m` terms multiply."""
    sums = np.empty(x.shape[0] // size, np.float32)
    for s in range(sums.shape[0]):
        total = np.float32(0)
        for e in range(size):
            total += x[size * s + e]
        sums[s] = total
    return sums


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def matvec_q2_k(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    n_blocks = blocks.shape[1] // Q2_K.bytes
    x_sums = _sub_block_sums(x, 16)
    for r in numba.prange(blocks.shape[0]):
        row = blocks[r]
        acc = np.float32(0)
        for b in range(n_blocks):
            o = b * Q2_K.bytes
            scaled = np.float32(0)
            mins = np.float32(0)
            for s in range(16):
                mins += np.float32(_byte(row, o + Q2_K.scales + s) >> 4) * x_sums[16 * b + s]
            for half in range(2):
                # sub-block 8h + 2j + half: the 2-bit fields j of qs[32h + 16 half + e], 16 elements each;
                # fields are masked in place, not shifted down, and the scale takes the 4**-j instead
                s = o + Q2_K.scales + half
                sc0 = np.float32(_byte(row, s) & 15)
                sc1 = np.float32(_byte(row, s + 2) & 15) * np.float32(0.25)
                sc2 = np.float32(_byte(row, s + 4) & 15) * np.float32(0.0625)
                sc3 = np.float32(_byte(row, s + 6) & 15) * np.float32(0.015625)
                sc4 = np.float32(_byte(row, s + 8) & 15)
                sc5 = np.float32(_byte(row, s + 10) & 15) * np.float32(0.25)
                sc6 = np.float32(_byte(row, s + 12) & 15) * np.float32(0.0625)
                sc7 = np.float32(_byte(row, s + 14) & 15) * np.float32(0.015625)
                qs = row[o + Q2_K.qs + 16 * half : o + Q2_K.qs + 64]
                xs = x[QK_K * b + 16 * half : QK_K * (b + 1)]
                for e in range(16):
                    q = qs[e]
                    p = qs[32 + e]
                    scaled += (
                        sc0 * np.float32(_field(q, 0, 3)) * xs[e]
                        + sc1 * np.float32(_field(q, 0, 12)) * xs[32 + e]
                        + sc2 * np.float32(_field(q, 0, 48)) * xs[64 + e]
                        + sc3 * np.float32(_field(q, 0, 192)) * xs[96 + e]
                        + sc4 * np.float32(_field(p, 0, 3)) * xs[128 + e]
                        + sc5 * np.float32(_field(p, 0, 12)) * xs[160 + e]
                        + sc6 * np.float32(_field(p, 0, 48)) * xs[192 + e]
                        + sc7 * np.float32(_field(p, 0, 192)) * xs[224 + e]
                    )
            acc += read_f16(row, o + Q2_K.d) * scaled - read_f16(row, o + Q2_K.dmin) * mins
        y[r] = acc


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def matvec_q3_k(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    n_blocks = blocks.shape[1] // Q3_K.bytes
    for r in numba.prange(blocks.shape[0]):
        row = blocks[r]
        acc = np.float32(0)
        for b in range(n_blocks):
            o = b * Q3_K.bytes
            scaled = np.float32(0)
            for half in range(2):
                sc0 = np.float32(_scale_q3_k(row, o + Q3_K.scales, half))
                sc1 = np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 2))
                sc2 = np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 4))
                sc3 = np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 6))
                sc4 = np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 8))
                sc5 = np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 10))
                sc6 = np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 12))
                sc7 = np.float32(_scale_q3_k(row, o + Q3_K.scales, half + 14))
                hmask = row[o + Q3_K.hmask + 16 * half : o + Q3_K.hmask + 16 * half + 16]
                qs = row[o + Q3_K.qs + 16 * half : o + Q3_K.qs + 64]
                xs = x[QK_K * b + 16 * half : QK_K * (b + 1)]
                for e in range(16):
                    q = qs[e]
                    p = qs[32 + e]
                    m = hmask[e]
                    scaled += (
                        sc0 * _q3(q, 0, m, 0) * xs[e]
                        + sc1 * _q3(q, 2, m, 1) * xs[32 + e]
                        + sc2 * _q3(q, 4, m, 2) * xs[64 + e]
                        + sc3 * _q3(q, 6, m, 3) * xs[96 + e]
                        + sc4 * _q3(p, 0, m, 4) * xs[128 + e]
                        + sc5 * _q3(p, 2, m, 5) * xs[160 + e]
                        + sc6 * _q3(p, 4, m, 6) * xs[192 + e]
                        + sc7 * _q3(p, 6, m, 7) * xs[224 + e]
                    )
            acc += read_f16(row, o + Q3_K.d) * scaled
        y[r] = acc


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def matvec_q4_k(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    n_blocks = blocks.shape[1] // Q4_K.bytes
    x_sums = _sub_block_sums(x, 32)
    for r in numba.prange(blocks.shape[0]):
        row = blocks[r]
        acc = np.float32(0)
        for b in range(n_blocks):
            o = b * Q4_K.bytes
            sc0, m0 = _scale_min_k4(row, o + Q4_K.scales, 0)
            sc1, m1 = _scale_min_k4(row, o + Q4_K.scales, 1)
            sc2, m2 = _scale_min_k4(row, o + Q4_K.scales, 2)
            sc3, m3 = _scale_min_k4(row, o + Q4_K.scales, 3)
            sc4, m4 = _scale_min_k4(row, o + Q4_K.scales, 4)
            sc5, m5 = _scale_min_k4(row, o + Q4_K.scales, 5)
            sc6, m6 = _scale_min_k4(row, o + Q4_K.scales, 6)
            sc7, m7 = _scale_min_k4(row, o + Q4_K.scales, 7)
            s = x_sums[8 * b : 8 * b + 8]
            mins = (
                np.float32(m0) * s[0] + np.float32(m1) * s[1] + np.float32(m2) * s[2] + np.float32(m3) * s[3]
            )
            mins += (
                np.float32(m4) * s[4] + np.float32(m5) * s[5] + np.float32(m6) * s[6] + np.float32(m7) * s[7]
            )
            f0, f1, f2, f3 = np.float32(sc0), np.float32(sc1), np.float32(sc2), np.float32(sc3)
            f4, f5, f6, f7 = np.float32(sc4), np.float32(sc5), np.float32(sc6), np.float32(sc7)
            qs = row[o + Q4_K.qs : o + Q4_K.qs + 128]
            xs = x[QK_K * b : QK_K * (b + 1)]
            scaled = np.float32(0)
            for e in range(32):
                q0 = qs[e]
                q1 = qs[32 + e]
                q2 = qs[64 + e]
                q3 = qs[96 + e]
                scaled += (
                    f0 * np.float32(_field(q0, 0, 15)) * xs[e]
                    + f1 * np.float32(_field(q0, 4, 15)) * xs[32 + e]
                    + f2 * np.float32(_field(q1, 0, 15)) * xs[64 + e]
                    + f3 * np.float32(_field(q1, 4, 15)) * xs[96 + e]
                    + f4 * np.float32(_field(q2, 0, 15)) * xs[128 + e]
                    + f5 * np.float32(_field(q2, 4, 15)) * xs[160 + e]
                    + f6 * np.float32(_field(q3, 0, 15)) * xs[192 + e]
                    + f7 * np.float32(_field(q3, 4, 15)) * xs[224 + e]
                )
            acc += read_f16(row, o + Q4_K.d) * scaled - read_f16(row, o + Q4_K.dmin) * mins
        y[r] = acc


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def matvec_q5_k(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    n_blocks = blocks.shape[1] // Q5_K.bytes
    x_sums = _sub_block_sums(x, 32)
    for r in numba.prange(blocks.shape[0]):
        row = blocks[r]
        acc = np.float32(0)
        for b in range(n_blocks):
            o = b * Q5_K.bytes
            sc0, m0 = _scale_min_k4(row, o + Q5_K.scales, 0)
            sc1, m1 = _scale_min_k4(row, o + Q5_K.scales, 1)
            sc2, m2 = _scale_min_k4(row, o + Q5_K.scales, 2)
            sc3, m3 = _scale_min_k4(row, o + Q5_K.scales, 3)
            sc4, m4 = _scale_min_k4(row, o + Q5_K.scales, 4)
            sc5, m5 = _scale_min_k4(row, o + Q5_K.scales, 5)
            sc6, m6 = _scale_min_k4(row, o + Q5_K.scales, 6)
            sc7, m7 = _scale_min_k4(row, o + Q5_K.scales, 7)
            s = x_sums[8 * b : 8 * b + 8]
            mins = (
                np.float32(m0) * s[0] + np.float32(m1) * s[1] + np.float32(m2) * s[2] + np.float32(m3) * s[3]
            )
            mins += (
                np.float32(m4) * s[4] + np.float32(m5) * s[5] + np.float32(m6) * s[6] + np.float32(m7) * s[7]
            )
            f0, f1, f2, f3 = np.float32(sc0), np.float32(sc1), np.float32(sc2), np.float32(sc3)
            f4, f5, f6, f7 = np.float32(sc4), np.float32(sc5), np.float32(sc6), np.float32(sc7)
            qh = row[o + Q5_K.qh : o + Q5_K.qh + 32]
            qs = row[o + Q5_K.qs : o + Q5_K.qs + 128]
            xs = x[QK_K * b : QK_K * (b + 1)]
            scaled = np.float32(0)
            for e in range(32):
                h = qh[e]
                q0 = qs[e]
                q1 = qs[32 + e]
                q2 = qs[64 + e]
                q3 = qs[96 + e]
                scaled += (
                    f0 * _q5(q0, 0, h, 0) * xs[e]
                    + f1 * _q5(q0, 4, h, 1) * xs[32 + e]
                    + f2 * _q5(q1, 0, h, 2) * xs[64 + e]
                    + f3 * _q5(q1, 4, h, 3) * xs[96 + e]
                    + f4 * _q5(q2, 0, h, 4) * xs[128 + e]
                    + f5 * _q5(q2, 4, h, 5) * xs[160 + e]
                    + f6 * _q5(q3, 0, h, 6) * xs[192 + e]
                    + f7 * _q5(q3, 4, h, 7) * xs[224 + e]
                )
            acc += read_f16(row, o + Q5_K.d) * scaled - read_f16(row, o + Q5_K.dmin) * mins
        y[r] = acc


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def matvec_q6_k(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    n_blocks = blocks.shape[1] // Q6_K.bytes
    for r in numba.prange(blocks.shape[0]):
        row = blocks[r]
        acc = np.float32(0)
        for b in range(n_blocks):
            o = b * Q6_K.bytes
            scaled = np.float32(0)
            for half in range(2):
                # sub-block 8h + 2j + half holds elements 128h + 32j + 16 half + e, e < 16
                s = o + Q6_K.scales + half
                sc0 = np.float32(_signed_byte(row, s))
                sc1 = np.float32(_signed_byte(row, s + 2))
                sc2 = np.float32(_signed_byte(row, s + 4))
                sc3 = np.float32(_signed_byte(row, s + 6))
                sc4 = np.float32(_signed_byte(row, s + 8))
                sc5 = np.float32(_signed_byte(row, s + 10))
                sc6 = np.float32(_signed_byte(row, s + 12))
                sc7 = np.float32(_signed_byte(row, s + 14))
                ql = row[o + Q6_K.ql + 16 * half : o + Q6_K.ql + 128]
                qh = row[o + Q6_K.qh + 16 * half : o + Q6_K.qh + 64]
                xs = x[QK_K * b + 16 * half : QK_K * (b + 1)]
                for e in range(16):
                    a0 = ql[e]
                    a1 = ql[32 + e]
                    a2 = ql[64 + e]
                    a3 = ql[96 + e]
                    h0 = qh[e]
                    h1 = qh[32 + e]
                    scaled += (
                        sc0 * _q6(a0, 0, h0, 0) * xs[e]
                        + sc1 * _q6(a1, 0, h0, 2) * xs[32 + e]
                        + sc2 * _q6(a0, 4, h0, 4) * xs[64 + e]
                        + sc3 * _q6(a1, 4, h0, 6) * xs[96 + e]
                        + sc4 * _q6(a2, 0, h1, 0) * xs[128 + e]
                        + sc5 * _q6(a3, 0, h1, 2) * xs[160 + e]
                        + sc6 * _q6(a2, 4, h1, 4) * xs[192 + e]
                        + sc7 * _q6(a3, 4, h1, 6) * xs[224 + e]
                    )
            acc += read_f16(row, o + Q6_K.d) * scaled
        y[r] = acc


# --- matmul: Y[n, rows] = X W^T, one dequantized tile of W at a time -------------------------------------


@numba.njit(cache=True, nogil=True, fastmath=True)
def _multiply_tile(w: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int) -> None:
    """y[:, r0:r0 + len(w)] = x @ w.T for a dequantized tile w f32[tile_rows, cols], x f32[n, cols]."""
    tile_rows, cols = w.shape
    n = x.shape[0]
    for i0 in range(0, n, MICRO_TOKENS):
        for j0 in range(0, tile_rows, MICRO_ROWS):
            if i0 + MICRO_TOKENS <= n and j0 + MICRO_ROWS <= tile_rows:
                # 4 tokens x 4 rows: each x and w load feeds four multiply-adds
                x0, x1, x2, x3 = x[i0], x[i0 + 1], x[i0 + 2], x[i0 + 3]
                w0, w1, w2, w3 = w[j0], w[j0 + 1], w[j0 + 2], w[j0 + 3]
                a00 = a01 = a02 = a03 = np.float32(0)
                a10 = a11 = a12 = a13 = np.float32(0)
                a20 = a21 = a22 = a23 = np.float32(0)
                a30 = a31 = a32 = a33 = np.float32(0)
                for k in range(cols):
                    a00 += x0[k] * w0[k]
                    a01 += x0[k] * w1[k]
                    a02 += x0[k] * w2[k]
                    a03 += x0[k] * w3[k]
                    a10 += x1[k] * w0[k]
                    a11 += x1[k] * w1[k]
                    a12 += x1[k] * w2[k]
                    a13 += x1[k] * w3[k]
                    a20 += x2[k] * w0[k]
                    a21 += x2[k] * w1[k]
                    a22 += x2[k] * w2[k]
                    a23 += x2[k] * w3[k]
                    a30 += x3[k] * w0[k]
                    a31 += x3[k] * w1[k]
                    a32 += x3[k] * w2[k]
                    a33 += x3[k] * w3[k]
                r = r0 + j0
                y[i0, r], y[i0, r + 1], y[i0, r + 2], y[i0, r + 3] = a00, a01, a02, a03
                y[i0 + 1, r], y[i0 + 1, r + 1], y[i0 + 1, r + 2], y[i0 + 1, r + 3] = a10, a11, a12, a13
                y[i0 + 2, r], y[i0 + 2, r + 1], y[i0 + 2, r + 2], y[i0 + 2, r + 3] = a20, a21, a22, a23
                y[i0 + 3, r], y[i0 + 3, r + 1], y[i0 + 3, r + 2], y[i0 + 3, r + 3] = a30, a31, a32, a33
            else:
                for i in range(i0, min(n, i0 + MICRO_TOKENS)):
                    for j in range(j0, min(tile_rows, j0 + MICRO_ROWS)):
                        total = np.float32(0)
                        for k in range(cols):
                            total += x[i, k] * w[j, k]
                        y[i, r0 + j] = total
