"""Numba helpers shared by the block kernels: exact f16/bf16 <-> f32 conversions, little-endian reads.

Numba has no float16 on the CPU, so halves travel as their uint16 bit patterns and are converted with
integer arithmetic. Every conversion here is exact and agrees bit for bit with numpy's `astype` (round to
nearest even, subnormals and infinities included), which is what gguf-py, the oracle, uses.
"""

from __future__ import annotations

import numba
import numpy as np

# 2**-24: the weight of the last mantissa bit of an f16 subnormal.
F16_SUBNORMAL_STEP = np.float32(2.0**-24)


@numba.njit(inline="always")
def f32_from_bits(bits: np.uint32) -> np.float32:
    return np.uint32(bits).view(np.float32)


@numba.njit(inline="always")
def f32_to_bits(x: np.float32) -> np.uint32:
    return np.float32(x).view(np.uint32)


@numba.njit(inline="always")
def f16_to_f32(h: np.uint32) -> np.float32:
    """The f32 value of the f16 whose bits are the low 16 bits of `h`; branch-free so that it vectorizes."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    # normal: rebias the exponent 15 -> 127; inf/nan: all-ones exponent, mantissa kept (so NaNs stay NaNs)
    normal = ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
    special = np.uint32(0x7F800000) | (mantissa << np.uint32(13))
    bits = normal if exponent != np.uint32(31) else special
    # zero and subnormals: mantissa * 2**-24 is exact in f32
    subnormal = f32_to_bits(np.float32(mantissa) * F16_SUBNORMAL_STEP)
    bits = bits if exponent != np.uint32(0) else subnormal
    return f32_from_bits(bits | sign)


@numba.njit(inline="always")
def f32_to_f16(x: np.float32) -> np.uint16:
    """The bits of the f16 nearest to `x`, ties to even, overflow to inf: numpy's `astype(np.float16)`."""
    bits = f32_to_bits(x)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    if magnitude > np.uint32(0x7F800000):  # nan: keep the top mantissa bits, force quiet
        return np.uint16(sign | np.uint32(0x7E00) | ((magnitude >> np.uint32(13)) & np.uint32(0x3FF)))
    if magnitude >= np.uint32(0x477FF000):  # rounds to >= 65520: inf
        return np.uint16(sign | np.uint32(0x7C00))
    if magnitude < np.uint32(0x38800000):  # below 2**-14: f16 subnormal or zero
        # Scaling by 2**24 is exact and the f32 -> int rounding below is to nearest even.
        value = f32_from_bits(magnitude) * np.float32(2.0**24)
        return np.uint16(sign | np.uint32(np.rint(value)))
    # normal: round the 13 dropped mantissa bits to nearest even; a carry correctly bumps the exponent
    rounded = magnitude + np.uint32(0xFFF) + ((magnitude >> np.uint32(13)) & np.uint32(1))
    return np.uint16(sign | ((rounded - np.uint32(0x38000000)) >> np.uint32(13)))


@numba.njit(inline="always")
def bf16_to_f32(h: np.uint32) -> np.float32:
    return f32_from_bits(np.uint32(h) << np.uint32(16))


@numba.njit(inline="always")
def f32_to_bf16(x: np.float32) -> np.uint16:
    """ggml_compute_fp32_to_bf16: NaNs forced quiet, otherwise round to nearest even."""
    bits = f32_to_bits(x)
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((bits >> np.uint32(16)) | np.uint32(64))
    # in 64 bits like gguf-py, so values that round past the largest finite bf16 become inf, not wrap
    rounded = np.uint64(bits) + np.uint64(0x7FFF) + np.uint64((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16(rounded >> np.uint64(16))


@numba.njit(inline="always")
def read_u16(row: np.ndarray, offset: int) -> np.uint32:
    """The little-endian uint16 at `row[offset:offset + 2]`, widened to uint32."""
    return np.uint32(row[offset]) | (np.uint32(row[offset + 1]) << np.uint32(8))


@numba.njit(inline="always")
def read_f16(row: np.ndarray, offset: int) -> np.float32:
    return f16_to_f32(read_u16(row, offset))


@numba.njit(inline="always")
def read_u32(row: np.ndarray, offset: int) -> np.uint32:
    return (
        np.uint32(row[offset])
        | (np.uint32(row[offset + 1]) << np.uint32(8))
        | (np.uint32(row[offset + 2]) << np.uint32(16))
        | (np.uint32(row[offset + 3]) << np.uint32(24))
    )


@numba.njit(inline="always")
def write_u16(row: np.ndarray, offset: int, value: np.uint16) -> None:
    row[offset] = np.uint8(value & np.uint16(0xFF))
    row[offset + 1] = np.uint8(value >> np.uint16(8))


# ---------------------------------------------------------------------------------------------------------
# Matmul building blocks: the fused kernels dequantize a tile of rows, then multiply it with every token.


@numba.njit(inline="always")
def _dot(a: np.ndarray, b: np.ndarray) -> np.float32:
    s = np.float32(0)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@numba.njit(inline="always")
def _tokens_times_rows_4x4(x: np.ndarray, i: int, tile: np.ndarray, t: int, y: np.ndarray, r0: int) -> None:
    """y[i:i + 4, r0 + t:r0 + t + 4] = x[i:i + 4] tile[t:t + 4]^T: 16 sums in registers, so each pair of
    loads feeds 16 / 8 products instead of one."""
    x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
    w0, w1, w2, w3 = tile[t], tile[t + 1], tile[t + 2], tile[t + 3]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0)
    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0)
    for k in range(x.shape[1]):
        p0, p1, p2, p3 = x0[k], x1[k], x2[k], x3[k]
        a0 += p0 * w0[k]
        a1 += p1 * w0[k]
        a2 += p2 * w0[k]
        a3 += p3 * w0[k]
        b0 += p0 * w1[k]
        b1 += p1 * w1[k]
        b2 += p2 * w1[k]
        b3 += p3 * w1[k]
        c0 += p0 * w2[k]
        c1 += p1 * w2[k]
        c2 += p2 * w2[k]
        c3 += p3 * w2[k]
        d0 += p0 * w3[k]
        d1 += p1 * w3[k]
        d2 += p2 * w3[k]
        d3 += p3 * w3[k]
    c = r0 + t
    y[i, c], y[i + 1, c], y[i + 2, c], y[i + 3, c] = a0, a1, a2, a3
    y[i, c + 1], y[i + 1, c + 1], y[i + 2, c + 1], y[i + 3, c + 1] = b0, b1, b2, b3
    y[i, c + 2], y[i + 1, c + 2], y[i + 2, c + 2], y[i + 3, c + 2] = c0, c1, c2, c3
    y[i, c + 3], y[i + 1, c + 3], y[i + 2, c + 3], y[i + 3, c + 3] = d0, d1, d2, d3


@numba.njit(inline="always")
def tile_times_tokens(tile: np.ndarray, n_rows: int, x: np.ndarray, y: np.ndarray, r0: int) -> None:
    """y[:, r0:r0 + n_rows] = x tile[:n_rows]^T, in 4 x 4 blocks of (tokens, rows), then the edges."""
    n = x.shape[0]
    n_quads, row_quads = n - n % 4, n_rows - n_rows % 4
    for i in range(0, n_quads, 4):
        for t in range(0, row_quads, 4):
            _tokens_times_rows_4x4(x, i, tile, t, y, r0)
    for i in range(n):
        for t in range(row_quads if i < n_quads else 0, n_rows):
            y[i, r0 + t] = _dot(x[i], tile[t])


@numba.njit(inline="always")
def n_tiles(rows: int, tile: int) -> int:
    return (rows + tile - 1) // tile
