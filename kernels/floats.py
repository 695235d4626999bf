"""Kernels for the unquantized types: F32, F16, BF16 (one weight per 4 or 2 bytes, no blocks).

F32 is numpy on a float32 view of the bytes: BLAS beats anything numba would do there. F16 and BF16 are
converted to f32 with exact integer arithmetic (numba has no float16), which agrees bit for bit with
gguf-py's `astype` for dequantization and quantization.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import prange

from kernels import BlockKernels, register
from kernels.common import bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, n_tiles, tile_times_tokens

# Lanes of the matvec accumulators: a multiple of the vector width, so the row sum vectorizes.
LANES = 32
MATMUL_ROW_TILE = 16


def dequantize_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, blocks.view(np.float32))


def matvec_f32(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    np.matmul(blocks.view(np.float32), x, out=y)


def matmul_f32(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    np.matmul(x, blocks.view(np.float32).T, out=y)


def quantize_f32(x: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out.view(np.float32), x)


@numba.njit(cache=True, parallel=True)
def dequantize_f16(blocks: np.ndarray, out: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    for r in prange(halves.shape[0]):
        for k in range(halves.shape[1]):
            out[r, k] = f16_to_f32(halves[r, k])


@numba.njit(cache=True, parallel=True, fastmath=True)
def matvec_f16(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    cols = halves.shape[1]
    for r in prange(halves.shape[0]):
        row = halves[r]
        acc = np.zeros(LANES, np.float32)
        for k0 in range(0, cols - cols % LANES, LANES):
            for j in range(LANES):
                acc[j] += f16_to_f32(row[k0 + j]) * x[k0 + j]
        total = acc.sum()
        for k in range(cols - cols % LANES, cols):
            total += f16_to_f32(row[k]) * x[k]
        y[r] = total


@numba.njit(cache=True, parallel=True, fastmath=True)
def matmul_f16(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    rows, cols = halves.shape
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        r0 = tile * MATMUL_ROW_TILE
        n_rows = min(MATMUL_ROW_TILE, rows - r0)
        weights = np.empty((n_rows, cols), np.float32)
        for t in range(n_rows):
            for k in range(cols):
                weights[t, k] = f16_to_f32(halves[r0 + t, k])
        tile_times_tokens(weights, n_rows, x, y, r0)


@numba.njit(cache=True, parallel=True)
def quantize_f16(x: np.ndarray, out: np.ndarray) -> None:
    halves = out.view(np.uint16)
    for r in prange(x.shape[0]):
        for k in range(x.shape[1]):
            halves[r, k] = f32_to_f16(x[r, k])


@numba.njit(cache=True, parallel=True)
def dequantize_bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    for r in prange(halves.shape[0]):
        for k in range(halves.shape[1]):
            out[r, k] = bf16_to_f32(halves[r, k])


@numba.njit(cache=True, parallel=True, fastmath=True)
def matvec_bf16(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    cols = halves.shape[1]
    for r in prange(halves.shape[0]):
        row = halves[r]
        acc = np.zeros(LANES, np.float32)
        for k0 in range(0, cols - cols % LANES, LANES):
            for j in range(LANES):
                acc[j] += bf16_to_f32(row[k0 + j]) * x[k0 + j]
        total = acc.sum()
        for k in range(cols - cols % LANES, cols):
            total += bf16_to_f32(row[k]) * x[k]
        y[r] = total


@numba.njit(cache=True, parallel=True, fastmath=True)
def matmul_bf16(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    halves = blocks.view(np.uint16)
    rows, cols = halves.shape
    for tile in prange(n_tiles(rows, MATMUL_ROW_TILE)):
        r0 = tile * MATMUL_ROW_TILE
        n_rows = min(MATMUL_ROW_TILE, rows - r0)
        weights = np.empty((n_rows, cols), np.float32)
        for t in range(n_rows):
            for k in range(cols):
                weights[t, k] = bf16_to_f32(halves[r0 + t, k])
        tile_times_tokens(weights, n_rows, x, y, r0)


@numba.njit(cache=True, parallel=True)
def quantize_bf16(x: np.ndarray, out: np.ndarray) -> None:
    halves = out.view(np.uint16)
    for r in prange(x.shape[0]):
        for k in range(x.shape[1]):
            halves[r, k] = f32_to_bf16(x[r, k])


register(BlockKernels(GGMLQuantizationType.F32, dequantize_f32, matvec_f32, matmul_f32, quantize_f32))
register(BlockKernels(GGMLQuantizationType.F16, dequantize_f16, matvec_f16, matmul_f16, quantize_f16))
register(BlockKernels(GGMLQuantizationType.BF16, dequantize_bf16, matvec_bf16, matmul_bf16, quantize_bf16))
