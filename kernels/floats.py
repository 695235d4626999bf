"""Kernels for the unquantized types: F32, F16, BF16 (one weight per 4 or 2 bytes, no blocks).

F32's matmul is numpy (BLAS) on a float32 view of the bytes; its matvec is a numba loop as fast as BLAS's,
on the kernels' OpenMP threads: BLAS threads spinning beside them in a decode step fight them over the cores
(22.8 instead of ~100 tokens/s on 2 cores). F16 and BF16 are
converted to f32 with exact integer arithmetic (numba has no float16), which agrees bit for bit with
gguf-py's `astype` for dequantization and quantization.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import prange

from kernels import BlockKernels, register
from kernels.common import (
    bf16_to_f32,
    f16_to_f32,
    f32_from_bits,
    f32_to_bf16,
    f32_to_bits,
    f32_to_f16,
    n_tiles,
    tile_times_tokens,
)

# Rows per parallel task; see kernels/legacy.py for the tiles and why each is a function of its own.
ROW_TILE = 64
MATMUL_ROW_TILE = 16
F16_REBIAS = np.float32(2.0**112)


@numba.njit(inline="always")
def _f16_to_f32_for_products(h: np.uint16) -> np.float32:
    """f16 -> f32 in four vector operations, for matvec/matmul only: rebias the exponent by a multiplication
    (exact, subnormals included, unless the CPU flushes denormals); infinities and NaNs come out finite."""
    h = np.uint32(h)
    magnitude = f32_from_bits((h & np.uint32(0x7FFF)) << np.uint32(13)) * F16_REBIAS
    return f32_from_bits(f32_to_bits(magnitude) | ((h & np.uint32(0x8000)) << np.uint32(16)))


def dequantize_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, blocks.view(np.float32))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_f32(weights: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    for r in range(r0, r1):
        row = weights[r]
        total = np.float32(0)
        for k in range(weights.shape[1]):
            total += row[k] * x[k]
        y[r] = total


@numba.njit(cache=True, parallel=True)
def matvec_f32(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    weights = blocks.view(np.float32)
    rows = weights.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_f32(weights, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


def matmul_f32(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    np.matmul(x, blocks.view(np.float32).T, out=y)


def quantize_f32(x: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out.view(np.float32), x)


@numba.njit(cache=True)
def _dequantize_rows_f16(halves: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    for r in range(r0, r1):
        for k in range(halves.shape[1]):
            out[r, k] = f16_to_f32(halves[r, k])


@numba.njit(cache=True, parallel=True)
def dequantize_f16(blocks: np.ndarray, out: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    rows = halves.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _dequantize_rows_f16(halves, out, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_f16(halves: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    cols = halves.shape[1]
    for r in range(r0, r1):
        row = halves[r]
        total = np.float32(0)
        for k in range(cols):
            total += _f16_to_f32_for_products(row[k]) * x[k]
        y[r] = total


@numba.njit(cache=True, parallel=True)
def matvec_f16(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    rows = halves.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_f16(halves, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matmul_tile_f16(halves: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    weights = np.empty((r1 - r0, halves.shape[1]), np.float32)
    for t in range(r1 - r0):
        for k in range(halves.shape[1]):
            weights[t, k] = _f16_to_f32_for_products(halves[r0 + t, k])
    tile_times_tokens(weights, r1 - r0, x, y, r0)


@numba.njit(cache=True, parallel=True)
def matmul_f16(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    rows = halves.shape[0]
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        _matmul_tile_f16(halves, x, y, tile * MATMUL_ROW_TILE, min(rows, (tile + 1) * MATMUL_ROW_TILE))


@numba.njit(cache=True, parallel=True)
def quantize_f16(x: np.ndarray, out: np.ndarray) -> None:
    halves = out.view(np.uint16)
    for r in prange(x.shape[0]):
        for k in range(x.shape[1]):
            halves[r, k] = f32_to_f16(x[r, k])


@numba.njit(cache=True)
def _dequantize_rows_bf16(halves: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    for r in range(r0, r1):
        for k in range(halves.shape[1]):
            out[r, k] = bf16_to_f32(halves[r, k])


@numba.njit(cache=True, parallel=True)
def dequantize_bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    rows = halves.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _dequantize_rows_bf16(halves, out, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matvec_rows_bf16(halves: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    cols = halves.shape[1]
    for r in range(r0, r1):
        row = halves[r]
        total = np.float32(0)
        for k in range(cols):
            total += bf16_to_f32(row[k]) * x[k]
        y[r] = total


@numba.njit(cache=True, parallel=True)
def matvec_bf16(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    rows = halves.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_bf16(halves, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


@numba.njit(cache=True, fastmath=True)
def _matmul_tile_bf16(halves: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    weights = np.empty((r1 - r0, halves.shape[1]), np.float32)
    for t in range(r1 - r0):
        for k in range(halves.shape[1]):
            weights[t, k] = bf16_to_f32(halves[r0 + t, k])
    tile_times_tokens(weights, r1 - r0, x, y, r0)


@numba.njit(cache=True, parallel=True)
def matmul_bf16(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    rows = halves.shape[0]
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        _matmul_tile_bf16(halves, x, y, tile * MATMUL_ROW_TILE, min(rows, (tile + 1) * MATMUL_ROW_TILE))


@numba.njit(cache=True, parallel=True)
def quantize_bf16(x: np.ndarray, out: np.ndarray) -> None:
    halves = out.view(np.uint16)
    for r in prange(x.shape[0]):
        for k in range(x.shape[1]):
            halves[r, k] = f32_to_bf16(x[r, k])


register(BlockKernels(GGMLQuantizationType.F32, dequantize_f32, matvec_f32, matmul_f32, quantize_f32))
register(BlockKernels(GGMLQuantizationType.F16, dequantize_f16, matvec_f16, matmul_f16, quantize_f16))
register(BlockKernels(GGMLQuantizationType.BF16, dequantize_bf16, matvec_bf16, matmul_bf16, quantize_bf16))
