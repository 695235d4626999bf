"""Kernels for ggml's original 32-weight blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Dequantization and quantization reproduce gguf-py (gguf/quants.py) bit for bit: the same f32 operations in
the same order, never fused (no fastmath there). matmul keeps the activations in f32 and dequantizes each
block in registers. matvec, where the CPU allows (kernels.simd.INT8_DOT), does as llama.cpp does: x is
quantized to int8 per 32 values and each block is one integer dot product (vpdpbusd / pmaddubsw, 2.3-4x the
f32 kernels, which stay registered elsewhere); the activation rounding costs ~5e-3 relative error.

Block layouts (32 weights each, little-endian, f16 scales):
    Q4_0  d, qs[16]              w = (q - 8) d
    Q4_1  d, m, qs[16]           w = q d + m
    Q5_0  d, qh[4], qs[16]       w = (q - 16) d, the 5th bit of weight j is bit j of qh
    Q5_1  d, m, qh[4], qs[16]    w = q d + m
    Q8_0  d, qs[32] int8         w = q d
Byte j of qs holds weight j in its low nibble and weight j + 16 in its high nibble.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import prange

from . import BlockKernels, register
from .common import f32_to_f16, n_tiles, read_f16, read_u32, tile_times_tokens, write_u16
from .simd import (
    INT8_DOT,
    accumulate_i8_32,
    accumulate_q4_0,
    accumulate_q4_1,
    accumulate_q5_0,
    accumulate_q5_1,
    load_f16,
    prefetch_ahead,
    quantize_activations,
    quantized_sums,
    sum_f32x8,
    zeros_f32x8,
)

QK = 32
I32_1, I32_4, I32_8, I32_15, I32_16 = (np.int32(v) for v in (1, 4, 8, 15, 16))
# Rows per parallel task, enough to amortize its setup. A matmul tile of 16 rows x 768 f32 is 48 KB:
# dequantized once, it stays in L1/L2 while every token passes over it.
ROW_TILE = 64
MATMUL_ROW_TILE = 16

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
    d = read_f16(row, o)
    for j in range(half):
        q = np.int32(row[o + 2 + j])
        w[k + j] = d * np.float32((q & I32_15) - I32_8)
        w[k + j + half] = d * np.float32((q >> I32_4) - I32_8)


@numba.njit(inline="always")
def _decode_q4_1(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o)
    m = read_f16(row, o + 2)
    for j in range(half):
        q = np.int32(row[o + 4 + j])
        w[k + j] = d * np.float32(q & I32_15) + m
        w[k + j + half] = d * np.float32(q >> I32_4) + m


@numba.njit(inline="always")
def _decode_q5_0(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o)
    qh = np.int32(read_u32(row, o + 2))
    for j in range(half):
        q = np.int32(row[o + 6 + j])
        w[k + j] = d * np.float32(((q & I32_15) | _bit(qh, j)) - I32_16)
        w[k + j + half] = d * np.float32(((q >> I32_4) | _bit(qh, j + half)) - I32_16)


@numba.njit(inline="always")
def _decode_q5_1(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o)
    m = read_f16(row, o + 2)
    qh = np.int32(read_u32(row, o + 4))
    for j in range(half):
        q = np.int32(row[o + 8 + j])
        w[k + j] = d * np.float32((q & I32_15) | _bit(qh, j)) + m
        w[k + j + half] = d * np.float32((q >> I32_4) | _bit(qh, j + half)) + m


@numba.njit(inline="always")
def _decode_q8_0(row: np.ndarray, o: int, w: np.ndarray, k: int, half: int) -> None:
    d = read_f16(row, o)
    for j in range(2 * half):
        w[k + j] = d * np.float32(np.int32(np.int8(row[o + 2 + j])))


# Per-block dot products for matvec: acc[j] += w[j] * x[k + j], one f32 lane per weight of the block, so the
# sum over blocks needs no horizontal reduction until the row ends.


@numba.njit(inline="always")
def _accumulate_q4_0(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o)
    for j in range(16):
        q = np.int32(row[o + 2 + j])
        acc[j] += d * np.float32((q & I32_15) - I32_8) * x[k + j]
        acc[j + 16] += d * np.float32((q >> I32_4) - I32_8) * x[k + j + 16]


@numba.njit(inline="always")
def _accumulate_q4_1(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o)
    m = read_f16(row, o + 2)
    for j in range(16):
        q = np.int32(row[o + 4 + j])
        acc[j] += (d * np.float32(q & I32_15) + m) * x[k + j]
        acc[j + 16] += (d * np.float32(q >> I32_4) + m) * x[k + j + 16]


@numba.njit(inline="always")
def _accumulate_q5_0(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o)
    qh = np.int32(read_u32(row, o + 2))
    for j in range(16):
        q = np.int32(row[o + 6 + j])
        acc[j] += d * np.float32(((q & I32_15) | _bit(qh, j)) - I32_16) * x[k + j]
        acc[j + 16] += d * np.float32(((q >> I32_4) | _bit(qh, j + 16)) - I32_16) * x[k + j + 16]


@numba.njit(inline="always")
def _accumulate_q5_1(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o)
    m = read_f16(row, o + 2)
    qh = np.int32(read_u32(row, o + 4))
    for j in range(16):
        q = np.int32(row[o + 8 + j])
        acc[j] += (d * np.float32((q & I32_15) | _bit(qh, j)) + m) * x[k + j]
        acc[j + 16] += (d * np.float32((q >> I32_4) | _bit(qh, j + 16)) + m) * x[k + j + 16]


@numba.njit(inline="always")
def _accumulate_q8_0(row: np.ndarray, o: int, x: np.ndarray, k: int, acc: np.ndarray) -> None:
    d = read_f16(row, o)
    for j in range(32):
        acc[j] += d * np.float32(np.int32(np.int8(row[o + 2 + j]))) * x[k + j]


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
    write_u16(row, o, f32_to_f16(d))
    for j in range(16):
        low = _truncate_to(x[k + j] * inv + np.float32(8.5), 15)
        high = _truncate_to(x[k + j + 16] * inv + np.float32(8.5), 15)
        row[o + 2 + j] = np.uint8(low | (high << 4))


@numba.njit(inline="always")
def _encode_q4_1(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    lo, hi = _min_max(x, k)
    d = (hi - lo) / np.float32(15)
    inv = _inverse(d)
    write_u16(row, o, f32_to_f16(d))
    write_u16(row, o + 2, f32_to_f16(lo))
    for j in range(16):
        low = _truncate_to((x[k + j] - lo) * inv + np.float32(0.5), 15)
        high = _truncate_to((x[k + j + 16] - lo) * inv + np.float32(0.5), 15)
        row[o + 4 + j] = np.uint8(low | (high << 4))


@numba.njit(inline="always")
def _encode_q5_0(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    d = _signed_absmax(x, k) / np.float32(-16)
    inv = _inverse(d)
    write_u16(row, o, f32_to_f16(d))
    qh = 0
    for j in range(16):
        low = _truncate_to(x[k + j] * inv + np.float32(16.5), 31)
        high = _truncate_to(x[k + j + 16] * inv + np.float32(16.5), 31)
        row[o + 6 + j] = np.uint8((low & 15) | ((high & 15) << 4))
        qh |= ((low >> 4) << j) | ((high >> 4) << (j + 16))
    for i in range(4):
        row[o + 2 + i] = np.uint8((qh >> (8 * i)) & 0xFF)


@numba.njit(inline="always")
def _encode_q5_1(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    lo, hi = _min_max(x, k)
    d = (hi - lo) / np.float32(31)
    inv = _inverse(d)
    write_u16(row, o, f32_to_f16(d))
    write_u16(row, o + 2, f32_to_f16(lo))
    qh = 0
    for j in range(16):
        low = _truncate_to((x[k + j] - lo) * inv + np.float32(0.5), 31)
        high = _truncate_to((x[k + j + 16] - lo) * inv + np.float32(0.5), 31)
        row[o + 8 + j] = np.uint8((low & 15) | ((high & 15) << 4))
        qh |= ((low >> 4) << j) | ((high >> 4) << (j + 16))
    for i in range(4):
        row[o + 4 + i] = np.uint8((qh >> (8 * i)) & 0xFF)


@numba.njit(inline="always")
def _encode_q8_0(x: np.ndarray, k: int, row: np.ndarray, o: int) -> None:
    amax = np.float32(0)
    for j in range(QK):
        amax = max(amax, abs(x[k + j]))
    d = amax / np.float32(127)
    inv = _inverse(d)
    write_u16(row, o, f32_to_f16(d))
    for j in range(QK):
        row[o + 2 + j] = np.uint8(np.int32(_round_away(x[k + j] * inv)) & 0xFF)


# ---------------------------------------------------------------------------------------------------------
# Kernels, one set per type (numba inlines a decoder only when it sees it by name). The prange loops only
# hand out tiles of rows: LLVM vectorizes the inner loops of an ordinary njit function but not always those
# of a parfor body, so each tile's work is a function of its own.


@numba.njit(cache=True)
def _dequantize_rows_q4_0(blocks: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    n_blocks = blocks.shape[1] // 18
    half = _opaque_half(out.shape[1], n_blocks)
    for r in range(r0, r1):
        row, out_row = blocks[r], out[r]
        for b in range(n_blocks):
            _decode_q4_0(row, b * 18, out_row, b * QK, half)


@numba.njit(cache=True, parallel=True)
def dequantize_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _dequantize_rows_q4_0(blocks, out, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q4_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    # two rows at a time: two independent streams of blocks keep more loads in flight
    acc0 = np.empty(QK, np.float32)
    acc1 = np.empty(QK, np.float32)
    n_blocks = blocks.shape[1] // 18
    for r in range(r0, r1 - 1, 2):
        row0, row1 = blocks[r], blocks[r + 1]
        acc0[:] = 0
        acc1[:] = 0
        for b in range(n_blocks):
            _accumulate_q4_0(row0, b * 18, x, b * QK, acc0)
            _accumulate_q4_0(row1, b * 18, x, b * QK, acc1)
        y[r] = acc0.sum()
        y[r + 1] = acc1.sum()
    if (r1 - r0) % 2:
        acc0[:] = 0
        for b in range(n_blocks):
            _accumulate_q4_0(blocks[r1 - 1], b * 18, x, b * QK, acc0)
        y[r1 - 1] = acc0.sum()


@numba.njit(cache=True, parallel=True)
def matvec_q4_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q4_0(blocks, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q4_0_int8(
    blocks: np.ndarray, xq: np.ndarray, xd: np.ndarray, y: np.ndarray, r0: int, r1: int
) -> None:
    n_blocks = blocks.shape[1] // 18
    for r in range(r0, r1):
        prefetch_ahead(blocks, r)
        row = blocks[r]
        acc = zeros_f32x8()
        for b in range(n_blocks):
            acc = accumulate_q4_0(acc, row, b * 18, xq, b * QK, load_f16(row, b * 18) * xd[b])
        y[r] = sum_f32x8(acc)


@numba.njit(cache=True, parallel=True)
def matvec_q4_0_int8(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """matvec_q4_0 with x quantized to int8 per 32 and integer dot products (kernels.simd)."""
    xq, xd = quantize_activations(x)
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q4_0_int8(blocks, xq, xd, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matmul_tile_q4_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    weights = np.empty((r1 - r0, x.shape[1]), np.float32)
    n_blocks = blocks.shape[1] // 18
    half = _opaque_half(x.shape[1], n_blocks)
    for t in range(r1 - r0):
        for b in range(n_blocks):
            _decode_q4_0(blocks[r0 + t], b * 18, weights[t], b * QK, half)
    tile_times_tokens(weights, r1 - r0, x, y, r0)


@numba.njit(cache=True, parallel=True)
def matmul_q4_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        _matmul_tile_q4_0(blocks, x, y, tile * MATMUL_ROW_TILE, min(rows, (tile + 1) * MATMUL_ROW_TILE))


@numba.njit(cache=True, parallel=True)
def quantize_q4_0(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        x_row, row = x[r], out[r]
        for b in range(x.shape[1] // QK):
            _encode_q4_0(x_row, b * QK, row, b * 18)


@numba.njit(cache=True)
def _dequantize_rows_q4_1(blocks: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    n_blocks = blocks.shape[1] // 20
    half = _opaque_half(out.shape[1], n_blocks)
    for r in range(r0, r1):
        row, out_row = blocks[r], out[r]
        for b in range(n_blocks):
            _decode_q4_1(row, b * 20, out_row, b * QK, half)


@numba.njit(cache=True, parallel=True)
def dequantize_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _dequantize_rows_q4_1(blocks, out, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q4_1(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    # two rows at a time: two independent streams of blocks keep more loads in flight
    acc0 = np.empty(QK, np.float32)
    acc1 = np.empty(QK, np.float32)
    n_blocks = blocks.shape[1] // 20
    for r in range(r0, r1 - 1, 2):
        row0, row1 = blocks[r], blocks[r + 1]
        acc0[:] = 0
        acc1[:] = 0
        for b in range(n_blocks):
            _accumulate_q4_1(row0, b * 20, x, b * QK, acc0)
            _accumulate_q4_1(row1, b * 20, x, b * QK, acc1)
        y[r] = acc0.sum()
        y[r + 1] = acc1.sum()
    if (r1 - r0) % 2:
        acc0[:] = 0
        for b in range(n_blocks):
            _accumulate_q4_1(blocks[r1 - 1], b * 20, x, b * QK, acc0)
        y[r1 - 1] = acc0.sum()


@numba.njit(cache=True, parallel=True)
def matvec_q4_1(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q4_1(blocks, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q4_1_int8(
    blocks: np.ndarray, xq: np.ndarray, xd: np.ndarray, x_sums: np.ndarray, y: np.ndarray, r0: int, r1: int
) -> None:
    n_blocks = blocks.shape[1] // 20
    for r in range(r0, r1):
        prefetch_ahead(blocks, r)
        row = blocks[r]
        acc = zeros_f32x8()
        mins = np.float32(0)
        for b in range(n_blocks):
            acc = accumulate_q4_1(acc, row, b * 20, xq, b * QK, load_f16(row, b * 20) * xd[b])
            mins += load_f16(row, b * 20 + 2) * x_sums[b]
        y[r] = sum_f32x8(acc) + mins


@numba.njit(cache=True, parallel=True)
def matvec_q4_1_int8(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """matvec_q4_1 with x quantized to int8 per 32 and integer dot products (kernels.simd); the `+ m` terms
    multiply the sums of the quantized blocks of x."""
    xq, xd = quantize_activations(x)
    x_sums = quantized_sums(xq, xd, 32)
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q4_1_int8(blocks, xq, xd, x_sums, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matmul_tile_q4_1(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    weights = np.empty((r1 - r0, x.shape[1]), np.float32)
    n_blocks = blocks.shape[1] // 20
    half = _opaque_half(x.shape[1], n_blocks)
    for t in range(r1 - r0):
        for b in range(n_blocks):
            _decode_q4_1(blocks[r0 + t], b * 20, weights[t], b * QK, half)
    tile_times_tokens(weights, r1 - r0, x, y, r0)


@numba.njit(cache=True, parallel=True)
def matmul_q4_1(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        _matmul_tile_q4_1(blocks, x, y, tile * MATMUL_ROW_TILE, min(rows, (tile + 1) * MATMUL_ROW_TILE))


@numba.njit(cache=True, parallel=True)
def quantize_q4_1(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        x_row, row = x[r], out[r]
        for b in range(x.shape[1] // QK):
            _encode_q4_1(x_row, b * QK, row, b * 20)


@numba.njit(cache=True)
def _dequantize_rows_q5_0(blocks: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    n_blocks = blocks.shape[1] // 22
    half = _opaque_half(out.shape[1], n_blocks)
    for r in range(r0, r1):
        row, out_row = blocks[r], out[r]
        for b in range(n_blocks):
            _decode_q5_0(row, b * 22, out_row, b * QK, half)


@numba.njit(cache=True, parallel=True)
def dequantize_q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _dequantize_rows_q5_0(blocks, out, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q5_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    # two rows at a time: two independent streams of blocks keep more loads in flight
    acc0 = np.empty(QK, np.float32)
    acc1 = np.empty(QK, np.float32)
    n_blocks = blocks.shape[1] // 22
    for r in range(r0, r1 - 1, 2):
        row0, row1 = blocks[r], blocks[r + 1]
        acc0[:] = 0
        acc1[:] = 0
        for b in range(n_blocks):
            _accumulate_q5_0(row0, b * 22, x, b * QK, acc0)
            _accumulate_q5_0(row1, b * 22, x, b * QK, acc1)
        y[r] = acc0.sum()
        y[r + 1] = acc1.sum()
    if (r1 - r0) % 2:
        acc0[:] = 0
        for b in range(n_blocks):
            _accumulate_q5_0(blocks[r1 - 1], b * 22, x, b * QK, acc0)
        y[r1 - 1] = acc0.sum()


@numba.njit(cache=True, parallel=True)
def matvec_q5_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q5_0(blocks, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q5_0_int8(
    blocks: np.ndarray, xq: np.ndarray, xd: np.ndarray, y: np.ndarray, r0: int, r1: int
) -> None:
    n_blocks = blocks.shape[1] // 22
    for r in range(r0, r1):
        prefetch_ahead(blocks, r)
        row = blocks[r]
        acc = zeros_f32x8()
        for b in range(n_blocks):
            acc = accumulate_q5_0(acc, row, b * 22, xq, b * QK, load_f16(row, b * 22) * xd[b])
        y[r] = sum_f32x8(acc)


@numba.njit(cache=True, parallel=True)
def matvec_q5_0_int8(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """matvec_q5_0 with x quantized to int8 per 32 and integer dot products (kernels.simd)."""
    xq, xd = quantize_activations(x)
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q5_0_int8(blocks, xq, xd, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matmul_tile_q5_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    weights = np.empty((r1 - r0, x.shape[1]), np.float32)
    n_blocks = blocks.shape[1] // 22
    half = _opaque_half(x.shape[1], n_blocks)
    for t in range(r1 - r0):
        for b in range(n_blocks):
            _decode_q5_0(blocks[r0 + t], b * 22, weights[t], b * QK, half)
    tile_times_tokens(weights, r1 - r0, x, y, r0)


@numba.njit(cache=True, parallel=True)
def matmul_q5_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        _matmul_tile_q5_0(blocks, x, y, tile * MATMUL_ROW_TILE, min(rows, (tile + 1) * MATMUL_ROW_TILE))


@numba.njit(cache=True, parallel=True)
def quantize_q5_0(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        x_row, row = x[r], out[r]
        for b in range(x.shape[1] // QK):
            _encode_q5_0(x_row, b * QK, row, b * 22)


@numba.njit(cache=True)
def _dequantize_rows_q5_1(blocks: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    n_blocks = blocks.shape[1] // 24
    half = _opaque_half(out.shape[1], n_blocks)
    for r in range(r0, r1):
        row, out_row = blocks[r], out[r]
        for b in range(n_blocks):
            _decode_q5_1(row, b * 24, out_row, b * QK, half)


@numba.njit(cache=True, parallel=True)
def dequantize_q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _dequantize_rows_q5_1(blocks, out, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q5_1(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    # two rows at a time: two independent streams of blocks keep more loads in flight
    acc0 = np.empty(QK, np.float32)
    acc1 = np.empty(QK, np.float32)
    n_blocks = blocks.shape[1] // 24
    for r in range(r0, r1 - 1, 2):
        row0, row1 = blocks[r], blocks[r + 1]
        acc0[:] = 0
        acc1[:] = 0
        for b in range(n_blocks):
            _accumulate_q5_1(row0, b * 24, x, b * QK, acc0)
            _accumulate_q5_1(row1, b * 24, x, b * QK, acc1)
        y[r] = acc0.sum()
        y[r + 1] = acc1.sum()
    if (r1 - r0) % 2:
        acc0[:] = 0
        for b in range(n_blocks):
            _accumulate_q5_1(blocks[r1 - 1], b * 24, x, b * QK, acc0)
        y[r1 - 1] = acc0.sum()


@numba.njit(cache=True, parallel=True)
def matvec_q5_1(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q5_1(blocks, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q5_1_int8(
    blocks: np.ndarray, xq: np.ndarray, xd: np.ndarray, x_sums: np.ndarray, y: np.ndarray, r0: int, r1: int
) -> None:
    n_blocks = blocks.shape[1] // 24
    for r in range(r0, r1):
        prefetch_ahead(blocks, r)
        row = blocks[r]
        acc = zeros_f32x8()
        mins = np.float32(0)
        for b in range(n_blocks):
            acc = accumulate_q5_1(acc, row, b * 24, xq, b * QK, load_f16(row, b * 24) * xd[b])
            mins += load_f16(row, b * 24 + 2) * x_sums[b]
        y[r] = sum_f32x8(acc) + mins


@numba.njit(cache=True, parallel=True)
def matvec_q5_1_int8(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """matvec_q5_1 with x quantized to int8 per 32 and integer dot products (kernels.simd); the `+ m` terms
    multiply the sums of the quantized blocks of x."""
    xq, xd = quantize_activations(x)
    x_sums = quantized_sums(xq, xd, 32)
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q5_1_int8(blocks, xq, xd, x_sums, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matmul_tile_q5_1(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    weights = np.empty((r1 - r0, x.shape[1]), np.float32)
    n_blocks = blocks.shape[1] // 24
    half = _opaque_half(x.shape[1], n_blocks)
    for t in range(r1 - r0):
        for b in range(n_blocks):
            _decode_q5_1(blocks[r0 + t], b * 24, weights[t], b * QK, half)
    tile_times_tokens(weights, r1 - r0, x, y, r0)


@numba.njit(cache=True, parallel=True)
def matmul_q5_1(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        _matmul_tile_q5_1(blocks, x, y, tile * MATMUL_ROW_TILE, min(rows, (tile + 1) * MATMUL_ROW_TILE))


@numba.njit(cache=True, parallel=True)
def quantize_q5_1(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        x_row, row = x[r], out[r]
        for b in range(x.shape[1] // QK):
            _encode_q5_1(x_row, b * QK, row, b * 24)


@numba.njit(cache=True)
def _dequantize_rows_q8_0(blocks: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    n_blocks = blocks.shape[1] // 34
    half = _opaque_half(out.shape[1], n_blocks)
    for r in range(r0, r1):
        row, out_row = blocks[r], out[r]
        for b in range(n_blocks):
            _decode_q8_0(row, b * 34, out_row, b * QK, half)


@numba.njit(cache=True, parallel=True)
def dequantize_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _dequantize_rows_q8_0(blocks, out, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q8_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    # two rows at a time: two independent streams of blocks keep more loads in flight
    acc0 = np.empty(QK, np.float32)
    acc1 = np.empty(QK, np.float32)
    n_blocks = blocks.shape[1] // 34
    for r in range(r0, r1 - 1, 2):
        row0, row1 = blocks[r], blocks[r + 1]
        acc0[:] = 0
        acc1[:] = 0
        for b in range(n_blocks):
            _accumulate_q8_0(row0, b * 34, x, b * QK, acc0)
            _accumulate_q8_0(row1, b * 34, x, b * QK, acc1)
        y[r] = acc0.sum()
        y[r + 1] = acc1.sum()
    if (r1 - r0) % 2:
        acc0[:] = 0
        for b in range(n_blocks):
            _accumulate_q8_0(blocks[r1 - 1], b * 34, x, b * QK, acc0)
        y[r1 - 1] = acc0.sum()


@numba.njit(cache=True, parallel=True)
def matvec_q8_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q8_0(blocks, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_q8_0_int8(
    blocks: np.ndarray, xq: np.ndarray, xd: np.ndarray, y: np.ndarray, r0: int, r1: int
) -> None:
    n_blocks = blocks.shape[1] // 34
    for r in range(r0, r1):
        prefetch_ahead(blocks, r)
        row = blocks[r]
        acc = zeros_f32x8()
        for b in range(n_blocks):
            acc = accumulate_i8_32(acc, row, b * 34 + 2, xq, b * QK, load_f16(row, b * 34) * xd[b])
        y[r] = sum_f32x8(acc)


@numba.njit(cache=True, parallel=True)
def matvec_q8_0_int8(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """matvec_q8_0 with x quantized to int8 per 32 (ggml's Q8_0) and integer dot products (kernels.simd)."""
    xq, xd = quantize_activations(x)
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_q8_0_int8(blocks, xq, xd, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matmul_tile_q8_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    weights = np.empty((r1 - r0, x.shape[1]), np.float32)
    n_blocks = blocks.shape[1] // 34
    half = _opaque_half(x.shape[1], n_blocks)
    for t in range(r1 - r0):
        for b in range(n_blocks):
            _decode_q8_0(blocks[r0 + t], b * 34, weights[t], b * QK, half)
    tile_times_tokens(weights, r1 - r0, x, y, r0)


@numba.njit(cache=True, parallel=True)
def matmul_q8_0(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        _matmul_tile_q8_0(blocks, x, y, tile * MATMUL_ROW_TILE, min(rows, (tile + 1) * MATMUL_ROW_TILE))


@numba.njit(cache=True, parallel=True)
def quantize_q8_0(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        x_row, row = x[r], out[r]
        for b in range(x.shape[1] // QK):
            _encode_q8_0(x_row, b * QK, row, b * 34)


register(
    BlockKernels(
        GGMLQuantizationType.Q4_0,
        dequantize_q4_0,
        matvec_q4_0_int8 if INT8_DOT else matvec_q4_0,
        matmul_q4_0,
        quantize_q4_0,
        matvec_f32=matvec_q4_0 if INT8_DOT else None,
    )
)
register(
    BlockKernels(
        GGMLQuantizationType.Q4_1,
        dequantize_q4_1,
        matvec_q4_1_int8 if INT8_DOT else matvec_q4_1,
        matmul_q4_1,
        quantize_q4_1,
        matvec_f32=matvec_q4_1 if INT8_DOT else None,
    )
)
register(
    BlockKernels(
        GGMLQuantizationType.Q5_0,
        dequantize_q5_0,
        matvec_q5_0_int8 if INT8_DOT else matvec_q5_0,
        matmul_q5_0,
        quantize_q5_0,
        matvec_f32=matvec_q5_0 if INT8_DOT else None,
    )
)
register(
    BlockKernels(
        GGMLQuantizationType.Q5_1,
        dequantize_q5_1,
        matvec_q5_1_int8 if INT8_DOT else matvec_q5_1,
        matmul_q5_1,
        quantize_q5_1,
        matvec_f32=matvec_q5_1 if INT8_DOT else None,
    )
)
register(
    BlockKernels(
        GGMLQuantizationType.Q8_0,
        dequantize_q8_0,
        matvec_q8_0_int8 if INT8_DOT else matvec_q8_0,
        matmul_q8_0,
        quantize_q8_0,
        matvec_f32=matvec_q8_0 if INT8_DOT else None,
    )
)
