"""Kernels for ggml's original 32-weight blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Dequantization and quantization reproduce gguf-py (gguf/quants.py) bit for bit: the same f32 operations in
the same order, never fused (no fastmath there). matmul keeps the activations in f32 and dequantizes each
block in registers. matvec, where the CPU allows (kernels.simd.INT8_DOT), does as llama.cpp does: x is
quantized to int8 per 32 values and each block is one integer dot product (vpdpbusd / pmaddubsw, 2.3-4x the
f32 kernels, which stay registered as matvec_f32; kernels.simd and kernels.legacy_drivers); the activation
rounding costs ~5e-3 relative error.

Block layouts: kernels.layout. This module holds the per-block decoders, f32 dot products and encoders; the
parallel drivers over rows are generated from one template into kernels.legacy_drivers (kernels.specialise).
"""

from __future__ import annotations

import numba
import numpy as np

from .common import f32_to_f16, read_f16, read_u32, write_u16
from .layout import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, QK

I32_1, I32_4, I32_8, I32_15, I32_16 = (np.int32(v) for v in (1, 4, 8, 15, 16))

# ---------------------------------------------------------------------------------------------------------
# Per-block decoders, shared by dequantize and matmul. `o` is the block's byte offset in `row`, `w` receives
# its 32 weights at w[k:k + 32]. The integer arithmetic stays in int32 (numba widens to int64 otherwise, and
# LLVM then vectorizes with half as many lanes). `half` is always QK // 2, but passed in from _opaque_half:
# with a constant trip count LLVM unrolls the loop and leaves it to the SLP vectorizer, which gives up because
# the output might alias the blocks; the loop vectorizer instead checks for overlap at run time (3x faster).


@numba.njit(inline="always")
def _opaque_half(cols: int, n_blocks: int) -> int:
    """QK // 2, derived from the shapes so that LLVM cannot fold it into a constant."""
    return cols // max(n_blocks, 1) // 2


@numba.njit(inline="always")
def _bit(bits: np.int32, j: int) -> np.int32:
    """Bit j of `bits`, as 0 or 16: the fifth bit of a Q5 weight."""
    return ((bits >> np.int32(j)) & I32_1) << I32_4


@numba.njit(inline="always")
def _decode_q4_0(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o + Q4_0.d)
    for j in range(half):
        q = np.int32(row[o + Q4_0.qs + j])
        w[k + j] = d * np.float32((q & I32_15) - I32_8)
        w[k + j + half] = d * np.float32((q >> I32_4) - I32_8)


@numba.njit(inline="always")
def _decode_q4_1(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o + Q4_1.d)
    m = read_f16(row, o + Q4_1.m)
    for j in range(half):
        q = np.int32(row[o + Q4_1.qs + j])
        w[k + j] = d * np.float32(q & I32_15) + m
        w[k + j + half] = d * np.float32(q >> I32_4) + m


@numba.njit(inline="always")
def _decode_q5_0(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o + Q5_0.d)
    qh = np.int32(read_u32(row, o + Q5_0.qh))
    for j in range(half):
        q = np.int32(row[o + Q5_0.qs + j])
        w[k + j] = d * np.float32(((q & I32_15) | _bit(qh, j)) - I32_16)
        w[k + j + half] = d * np.float32(((q >> I32_4) | _bit(qh, j + half)) - I32_16)


@numba.njit(inline="always")
def _decode_q5_1(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o + Q5_1.d)
    m = read_f16(row, o + Q5_1.m)
    qh = np.int32(read_u32(row, o + Q5_1.qh))
    for j in range(half):
        q = np.int32(row[o + Q5_1.qs + j])
        w[k + j] = d * np.float32((q & I32_15) | _bit(qh, j)) + m
        w[k + j + half] = d * np.float32((q >> I32_4) | _bit(qh, j + half)) + m


@numba.njit(inline="always")
def _decode_q8_0(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o + Q8_0.d)
    for j in range(2 * half):
        w[k + j] = d * np.float32(np.int32(np.int8(row[o + Q8_0.qs + j])))


# Per-block dot products for matvec: acc[j] += w[j] * x[k + j], one f32 lane per weight of the block, so the
# sum over blocks needs no horizontal reduction until the row ends.


@numba.njit(inline="always")
def _accumulate_q4_0(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o + Q4_0.d)
    for j in range(16):
        q = np.int32(row[o + Q4_0.qs + j])
        acc[j] += d * np.float32((q & I32_15) - I32_8) * x[k + j]
        acc[j + 16] += d * np.float32((q >> I32_4) - I32_8) * x[k + j + 16]


@numba.njit(inline="always")
def _accumulate_q4_1(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o + Q4_1.d)
    m = read_f16(row, o + Q4_1.m)
    for j in range(16):
        q = np.int32(row[o + Q4_1.qs + j])
        acc[j] += (d * np.float32(q & I32_15) + m) * x[k + j]
        acc[j + 16] += (d * np.float32(q >> I32_4) + m) * x[k + j + 16]


@numba.njit(inline="always")
def _accumulate_q5_0(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o + Q5_0.d)
    qh = np.int32(read_u32(row, o + Q5_0.qh))
    for j in range(16):
        q = np.int32(row[o + Q5_0.qs + j])
        acc[j] += d * np.float32(((q & I32_15) | _bit(qh, j)) - I32_16) * x[k + j]
        acc[j + 16] += d * np.float32(((q >> I32_4) | _bit(qh, j + 16)) - I32_16) * x[k + j + 16]


@numba.njit(inline="always")
def _accumulate_q5_1(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o + Q5_1.d)
    m = read_f16(row, o + Q5_1.m)
    qh = np.int32(read_u32(row, o + Q5_1.qh))
    for j in range(16):
        q = np.int32(row[o + Q5_1.qs + j])
        acc[j] += (d * np.float32((q & I32_15) | _bit(qh, j)) + m) * x[k + j]
        acc[j + 16] += (d * np.float32((q >> I32_4) | _bit(qh, j + 16)) + m) * x[k + j + 16]


@numba.njit(inline="always")
def _accumulate_q8_0(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o + Q8_0.d)
    for j in range(32):
        acc[j] += d * np.float32(np.int32(np.int8(row[o + Q8_0.qs + j]))) * x[k + j]


# ---------------------------------------------------------------------------------------------------------
# Quantizers, following gguf-py's numpy code operation by operation (itself bit-exact with ggml's reference):
# f32 arithmetic throughout, the scale computed in f32 and stored rounded to f16.


@numba.njit(inline="always")
def _signed_absmax(x: np.ndarray, k: int) -> np.float32:
    """The value of largest magnitude in x[k:k + 32], the first one on ties."""
    best = np.float32(0)
    best_abs = np.float32(0)
    for j in range(QK):
        v = x[k + j]
        if abs(v) > best_abs:
            best_abs = abs(v)
            best = v
    return best


@numba.njit(inline="always")
def _min_max(x: np.ndarray, k: int) -> tuple[np.float32, np.float32]:
    lo = x[k]
    hi = x[k]
    for j in range(1, QK):
        lo = min(lo, x[k + j])
        hi = max(hi, x[k + j])
    return lo, hi


@numba.njit(inline="always")
def _inverse(d: np.float32) -> np.float32:
    return np.float32(1) / d if d != 0 else np.float32(0)


@numba.njit(inline="always")
def _truncate_to(v: np.float32, top: int) -> np.int32:
    """np.trunc(v).astype(uint8).clip(0, top) for the v >= 0 that the quantizers produce."""
    return np.int32(min(np.float32(top), np.trunc(v)))


@numba.njit(inline="always")
def _round_away(v: np.float32) -> np.float32:
    """gguf-py's np_roundf: halves away from zero, exact in f32."""
    a = abs(v)
    floored = np.floor(a)
    rounded = floored + np.floor(np.float32(2) * (a - floored))
    return rounded if v >= 0 else -rounded


@numba.njit(inline="always")
def _encode_q4_0(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    d = _signed_absmax(x, k) / np.float32(-8)
    inv = _inverse(d)
    write_u16(row, o + Q4_0.d, f32_to_f16(d))
    for j in range(16):
        low = _truncate_to(x[k + j] * inv + np.float32(8.5), 15)
        high = _truncate_to(x[k + j + 16] * inv + np.float32(8.5), 15)
        row[o + Q4_0.qs + j] = np.uint8(low | (high << 4))


@numba.njit(inline="always")
def _encode_q4_1(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    lo, hi = _min_max(x, k)
    d = (hi - lo) / np.float32(15)
    inv = _inverse(d)
    write_u16(row, o + Q4_1.d, f32_to_f16(d))
    write_u16(row, o + Q4_1.m, f32_to_f16(lo))
    for j in range(16):
        low = _truncate_to((x[k + j] - lo) * inv + np.float32(0.5), 15)
        high = _truncate_to((x[k + j + 16] - lo) * inv + np.float32(0.5), 15)
        row[o + Q4_1.qs + j] = np.uint8(low | (high << 4))


@numba.njit(inline="always")
def _encode_q5_0(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    d = _signed_absmax(x, k) / np.float32(-16)
    inv = _inverse(d)
    write_u16(row, o + Q5_0.d, f32_to_f16(d))
    qh = 0
    for j in range(16):
        low = _truncate_to(x[k + j] * inv + np.float32(16.5), 31)
        high = _truncate_to(x[k + j + 16] * inv + np.float32(16.5), 31)
        row[o + Q5_0.qs + j] = np.uint8((low & 15) | ((high & 15) << 4))
        qh |= ((low >> 4) << j) | ((high >> 4) << (j + 16))
    for i in range(4):
        row[o + Q5_0.qh + i] = np.uint8((qh >> (8 * i)) & 0xFF)


@numba.njit(inline="always")
def _encode_q5_1(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    lo, hi = _min_max(x, k)
    d = (hi - lo) / np.float32(31)
    inv = _inverse(d)
    write_u16(row, o + Q5_1.d, f32_to_f16(d))
    write_u16(row, o + Q5_1.m, f32_to_f16(lo))
    qh = 0
    for j in range(16):
        low = _truncate_to((x[k + j] - lo) * inv + np.float32(0.5), 31)
        high = _truncate_to((x[k + j + 16] - lo) * inv + np.float32(0.5), 31)
        row[o + Q5_1.qs + j] = np.uint8((low & 15) | ((high & 15) << 4))
        qh |= ((low >> 4) << j) | ((high >> 4) << (j + 16))
    for i in range(4):
        row[o + Q5_1.qh + i] = np.uint8((qh >> (8 * i)) & 0xFF)


@numba.njit(inline="always")
def _encode_q8_0(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    amax = np.float32(0)
    for j in range(QK):
        amax = max(amax, abs(x[k + j]))
    d = amax / np.float32(127)
    inv = _inverse(d)
    write_u16(row, o + Q8_0.d, f32_to_f16(d))
    for j in range(QK):
        row[o + Q8_0.qs + j] = np.uint8(np.int32(_round_away(x[k + j] * inv)) & 0xFF)
