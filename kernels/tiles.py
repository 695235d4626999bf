"""Batched products Y = X W^T with int8 activations, for every quantized block type: one tile form, one
micro-kernel.

A tile of weight rows of any type is unpacked into one common form: unsigned small integers u u8[rows, cols]
and, per 16 weights, a scale and a min, so that w = scale u + min. The signed types' offsets become mins
(Q4_0: u = q, min = -8 d; Q8_0: u = q + 128, min = -128 d), so every type is the same product. The activations
are quantized to int8 per 16 values, each 16 with its own scale as the weights have (ggml rounds them per 32,
Q8_0, or per 256, Q8_K: ours are closer to exact, at no cost in the kernel), and kernels.simd.micro_kernel
multiplies 4 rows by 4 tokens at a time; the mins multiply the sums of the quantized activations per 16, as
ggml's do, so the error is
sum_k w_k (x_q - x)_k. Where the min is -zero scale (Q3_K, Q6_K, Q4_0, Q5_0, Q8_0) the offset goes into the
integer sums instead (-zero times the integer sum of the activations per 16): one FMA less per 256 weights
and (row, token), 1.2-1.3x faster on Q6_K and half the rounding error of the two f32 terms.

Both u and the quantized activations are stored with each 256 values interleaved (simd.tile_position), so
that 4 vpdpbusd leave in each 32-bit lane the exact integer dot product of one group of 16 weights, which one
conversion and one FMA scale: per 256 weights and (row, token), 5 operations on the integer port where the
earlier layout took 8 (an f32 scaling per 64 weights). Measured per core (CPU time, bench_kernels.py --int8,
the matrices of distilgpt2 and gpt2): the micro-kernel alone runs at ~100-115 G multiply-adds/s; a whole
product at 1.0-1.4x dequantize + BLAS at 512 tokens, 1.1-1.6x at 128, 1.2-2.1x at 64, and 1.0-1.3x the fused
f32 kernels at 32 (gpt2cli.model picks by batch size). Unpacking writes runs of 16-32 weights with fixed
shifts (0.15-0.3 ns a weight), then interleaves them with one shuffle per 256 bytes; it is what
makes short batches lose. pmaddubsw (AVX2 without VNNI) saturates on the 8-bit weights of Q8_0, which there
keeps its f32 path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import prange

from . import layout
from .common import n_tiles, read_f16, read_u32
from .simd import (
    INT8_DOT,
    MICRO_ROWS,
    MICRO_TOKENS,
    activation_buffers,
    bit_fields,
    interleave,
    micro_kernel,
    quantize_activation_rows_into,
)

T = GGMLQuantizationType
TILE_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1), int(T.Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(T.Q2_K), int(T.Q3_K), int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)
# Rows unpacked together: 64 x 3072 weights are 192 KiB of u and 48 KiB of scales and mins, within L2, which
# the 4-token steps then sweep over while the tokens' 4 x 3072 bytes stay in L1.
TILE_ROWS = 64
# Tokens whose activations one task quantizes (0.5-3 us each): serially, 512 x 3072 take 1.4 ms.
ACTIVATION_ROWS = 16


# ---------------------------------------------------------------------------------------------------------
# Unpackers: one row of blocks -> u[cols] in natural order, scales[cols // 16], mins[cols // 16]; layouts as
# in ggml-common.h. The weights go out 16 or 32 at a time from runs of bytes with fixed shifts, each run one
# simd.bit_fields (per weight the scalar code took 1.3-3 ns, as much as 512 tokens' products at 768 columns;
# numba's vectorized loops 0.4-0.9 ns, most of it checking for overlap on every run; bit_fields 0.15-0.3);
# simd.interleave then moves them to tile_position order.


@numba.njit(inline="always")
def _byte(row: np.ndarray, i: int) -> int:
    # one signed type for the scale arithmetic: numba promotes mixed uint8 / int64 operands to float
    return np.int64(row[i])


@numba.njit(inline="always")
def _fields(u, at: int, row, source: int, shift: int, mask: int, count: int) -> None:
    """u[at + l] = (row[source + l] >> shift) & mask for l < count (16 or 32)."""
    if count == 32:
        bit_fields(u, at, row, source, shift, mask, source, 0, 0, 0, 32)
    else:
        bit_fields(u, at, row, source, shift, mask, source, 0, 0, 0, 16)


@numba.njit(inline="always")
def _two_fields(u, at: int, row, low: tuple, high: tuple, up: int) -> None:
    """u[at + l] = low field | high field << up for l < 32, each field (source, shift, mask) taken as by
    _fields."""
    (low_at, low_shift, low_mask), (high_at, high_shift, high_mask) = low, high
    bit_fields(u, at, row, low_at, low_shift, low_mask, high_at, high_shift, high_mask, up, 32)


@numba.njit(inline="always")
def _unpack_legacy(row, u, scales, mins, block_bytes: int, qs_at: int, qh_at: int, m_at: int, zero: int):
    """Q4_0 .. Q5_1: d at 0, m at m_at (or 0: min = -zero d), fifth bits at qh_at (or 0), nibbles at qs_at."""
    for b in range(scales.shape[0] // 2):
        o = b * block_bytes
        d = read_f16(row, o)  # every legacy block starts with d
        m = read_f16(row, o + m_at) if m_at else -np.float32(zero) * d
        _fields(u, 32 * b, row, o + qs_at, 0, 15, 16)
        _fields(u, 32 * b + 16, row, o + qs_at, 4, 15, 16)
        if qh_at:
            qh = read_u32(row, o + qh_at)
            for j in range(32):
                u[32 * b + j] |= np.uint8(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
        scales[2 * b] = scales[2 * b + 1] = d
        mins[2 * b] = mins[2 * b + 1] = m


@numba.njit(inline="always")
def _unpack_q8_0(row, u, scales, mins):
    for b in range(scales.shape[0] // 2):
        o = b * layout.Q8_0.bytes
        d = read_f16(row, o + layout.Q8_0.d)
        for k in range(32):
            u[32 * b + k] = row[o + layout.Q8_0.qs + k] ^ np.uint8(0x80)  # int8 q + 128
        scales[2 * b] = scales[2 * b + 1] = d
        mins[2 * b] = mins[2 * b + 1] = np.float32(-128) * d


@numba.njit(inline="always")
def _unpack_q2_k(row, u, scales, mins):
    for b in range(scales.shape[0] // 16):
        o = b * layout.Q2_K.bytes
        d, dmin = read_f16(row, o + layout.Q2_K.d), read_f16(row, o + layout.Q2_K.dmin)
        for s in range(16):
            scales[16 * b + s] = d * np.float32(_byte(row, o + layout.Q2_K.scales + s) & 15)
            mins[16 * b + s] = -(dmin * np.float32(_byte(row, o + layout.Q2_K.scales + s) >> 4))
        for n in range(2):  # weight 128 n + 32 j + l: bits 2j, 2j + 1 of qs[32 n + l]
            for j in range(4):
                _fields(u, 256 * b + 128 * n + 32 * j, row, o + layout.Q2_K.qs + 32 * n, 2 * j, 3, 32)


@numba.njit(inline="always")
def _scale_q3_k(row, o: int, s: int) -> np.float32:
    low = (_byte(row, o + s) & 15) if s < 8 else (_byte(row, o + s - 8) >> 4)
    high = (_byte(row, o + 8 + s % 4) >> (2 * (s // 4))) & 3
    return np.float32(np.int32(low | (high << 4)) - 32)


@numba.njit(inline="always")
def _unpack_q3_k(row, u, scales, mins):
    for b in range(scales.shape[0] // 16):
        o = b * layout.Q3_K.bytes
        d = read_f16(row, o + layout.Q3_K.d)
        for s in range(16):
            scales[16 * b + s] = d * _scale_q3_k(row, o + layout.Q3_K.scales, s)
            mins[16 * b + s] = np.float32(-4) * scales[16 * b + s]
        for n in range(2):  # weight 128 n + 32 j + l: bits 2j of qs[32 n + l] - 4, plus 4 if hmask bit 4n + j
            for j in range(4):
                at = 256 * b + 128 * n + 32 * j
                low = (o + layout.Q3_K.qs + 32 * n, 2 * j, 3)
                _two_fields(u, at, row, low, (o + layout.Q3_K.hmask, 4 * n + j, 1), 2)


@numba.njit(inline="always")
def _unpack_k4(row, u, scales, mins, block_bytes: int, qh_at: int, qs_at: int):
    """Q4_K (qh_at 0) and Q5_K: sub-block j (32 weights) has nibble j % 2 of qs[32 (j // 2) + l] and, for
    Q5_K, bit j of qh[l] above it; its 6-bit scale and min are packed in the 12 bytes at 4 (ggml
    get_scale_min_k4)."""
    for b in range(scales.shape[0] // 16):
        o = b * block_bytes
        d, dmin = read_f16(row, o + layout.Q4_K.d), read_f16(row, o + layout.Q4_K.dmin)
        packed = o + layout.Q4_K.scales  # Q5_K's d, dmin and scales lie where Q4_K's do
        for j in range(8):
            if j < 4:
                sc, m = _byte(row, packed + j) & 63, _byte(row, packed + 4 + j) & 63
            else:
                sc = (_byte(row, packed + 4 + j) & 15) | ((_byte(row, packed + j - 4) >> 6) << 4)
                m = (_byte(row, packed + 4 + j) >> 4) | ((_byte(row, packed + j) >> 6) << 4)
            scales[16 * b + 2 * j] = scales[16 * b + 2 * j + 1] = d * np.float32(sc)
            mins[16 * b + 2 * j] = mins[16 * b + 2 * j + 1] = -(dmin * np.float32(m))
            if qh_at:
                nibbles = (o + qs_at + 32 * (j // 2), 4 * (j % 2), 15)
                _two_fields(u, 256 * b + 32 * j, row, nibbles, (o + qh_at, j, 1), 4)
            else:
                _fields(u, 256 * b + 32 * j, row, o + qs_at + 32 * (j // 2), 4 * (j % 2), 15, 32)


@numba.njit(inline="always")
def _unpack_q6_k(row, u, scales, mins):
    for b in range(scales.shape[0] // 16):
        o = b * layout.Q6_K.bytes
        d = read_f16(row, o + layout.Q6_K.d)
        for s in range(16):
            scales[16 * b + s] = d * np.float32(np.int8(_byte(row, o + layout.Q6_K.scales + s)))
            mins[16 * b + s] = np.float32(-32) * scales[16 * b + s]
        # weight 128 n + 32 j + l: nibble j // 2 of ql[64 n + 32 (j % 2) + l], bits 2j of qh[32 n + l] above
        for n in range(2):
            for j in range(4):
                at = 256 * b + 128 * n + 32 * j
                nibbles = (o + layout.Q6_K.ql + 64 * n + 32 * (j % 2), 4 * (j // 2), 15)
                _two_fields(u, at, row, nibbles, (o + layout.Q6_K.qh + 32 * n, 2 * j, 3), 4)


@numba.njit(cache=True)
def _unpack_rows(kind: int, blocks, r0: int, r1: int, cols: int, u, scales, mins) -> None:
    """Rows r0:r1 of `blocks` (of block type `kind`, `cols` weights a row) into u[:r1 - r0] (in tile_position
    order), scales, mins."""
    natural = np.zeros(u.shape[1], np.uint8)
    for i in range(r1 - r0):
        row, u_row, scales_row, mins_row = (
            blocks[r0 + i],
            natural,
            scales[i, : cols // 16],
            mins[i, : cols // 16],
        )
        if kind == Q4_0:
            _unpack_legacy(row, u_row, scales_row, mins_row, layout.Q4_0.bytes, layout.Q4_0.qs, 0, 0, 8)
        elif kind == Q4_1:
            _unpack_legacy(
                row, u_row, scales_row, mins_row, layout.Q4_1.bytes, layout.Q4_1.qs, 0, layout.Q4_1.m, 0
            )
        elif kind == Q5_0:
            _unpack_legacy(
                row, u_row, scales_row, mins_row, layout.Q5_0.bytes, layout.Q5_0.qs, layout.Q5_0.qh, 0, 16
            )
        elif kind == Q5_1:
            _unpack_legacy(
                row,
                u_row,
                scales_row,
                mins_row,
                layout.Q5_1.bytes,
                layout.Q5_1.qs,
                layout.Q5_1.qh,
                layout.Q5_1.m,
                0,
            )
        elif kind == Q8_0:
            _unpack_q8_0(row, u_row, scales_row, mins_row)
        elif kind == Q2_K:
            _unpack_q2_k(row, u_row, scales_row, mins_row)
        elif kind == Q3_K:
            _unpack_q3_k(row, u_row, scales_row, mins_row)
        elif kind == Q4_K:
            _unpack_k4(row, u_row, scales_row, mins_row, layout.Q4_K.bytes, 0, layout.Q4_K.qs)
        elif kind == Q5_K:
            _unpack_k4(row, u_row, scales_row, mins_row, layout.Q5_K.bytes, layout.Q5_K.qh, layout.Q5_K.qs)
        else:
            _unpack_q6_k(row, u_row, scales_row, mins_row)
        interleave(natural, u[i])


# ---------------------------------------------------------------------------------------------------------
# The product


@numba.njit(cache=True)
def _tile_times_tokens(kind: int, blocks, r0: int, r1: int, xq, xd, sums, totals, x_shape, y) -> None:
    """y[:n, r0:r1] = X W[r0:r1]^T for one tile of rows; xq, xd, sums, totals hold X padded with zeros to
    whole micro-steps of tokens and super-blocks of columns, and so is the tile."""
    n, cols = x_shape
    u = np.zeros((TILE_ROWS, xq.shape[1]), np.uint8)
    scales = np.zeros((TILE_ROWS, xq.shape[1] // 16), np.float32)
    mins = np.zeros((TILE_ROWS, xq.shape[1] // 16), np.float32)
    _unpack_rows(kind, blocks, r0, r1, cols, u, scales, mins)
    out = np.empty((xq.shape[0], TILE_ROWS), np.float32)
    for t in range(0, xq.shape[0], MICRO_TOKENS):
        for r in range(0, r1 - r0, MICRO_ROWS):
            # the types whose min is -zero scale: the offset (a constant of the micro-kernel) in the sums
            if kind == Q6_K:
                micro_kernel(u, scales, mins, r, xq, xd, sums, totals, t, out, 32)
            elif kind == Q3_K:
                micro_kernel(u, scales, mins, r, xq, xd, sums, totals, t, out, 4)
            elif kind == Q4_0:
                micro_kernel(u, scales, mins, r, xq, xd, sums, totals, t, out, 8)
            elif kind == Q5_0:
                micro_kernel(u, scales, mins, r, xq, xd, sums, totals, t, out, 16)
            elif kind == Q8_0:
                micro_kernel(u, scales, mins, r, xq, xd, sums, totals, t, out, 128)
            else:
                micro_kernel(u, scales, mins, r, xq, xd, sums, totals, t, out, 0)
    y[:, r0:r1] = out[:n, : r1 - r0]


@numba.njit(cache=True, parallel=True, nogil=True)
def int8_matmul(kind: int, blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """y f32[n, rows] = x f32[n, cols] W^T, W u8[rows, row_bytes] of block type `kind`, with x quantized to
    int8 per 16 values."""
    n, cols = x.shape
    xq, xd, sums, totals = activation_buffers(n, cols, MICRO_TOKENS)
    for chunk in prange(n_tiles(n, ACTIVATION_ROWS)):
        r0 = chunk * ACTIVATION_ROWS
        quantize_activation_rows_into(x, xq, xd, sums, totals, r0, min(n, r0 + ACTIVATION_ROWS))
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, TILE_ROWS)):
        r0 = tile * TILE_ROWS
        _tile_times_tokens(kind, blocks, r0, min(rows, r0 + TILE_ROWS), xq, xd, sums, totals, x.shape, y)


def int8_matmul_for(qtype: GGMLQuantizationType) -> Callable[..., None] | None:
    """int8_matmul for one block type, or None for the float types and where the CPU lacks the instructions
    (or, Q8_0 on AVX2 alone, they would saturate)."""
    if qtype not in TILE_TYPES or INT8_DOT is None or (qtype == T.Q8_0 and INT8_DOT != "vnni"):
        return None
    return functools.partial(int8_matmul, int(qtype))
