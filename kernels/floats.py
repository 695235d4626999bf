"""Kernels for the unquantized types: F32, F16, BF16 (one weight per 4 or 2 bytes, no blocks).

F32's matmul is numpy (BLAS) on a float32 view of the bytes; its matvec is a numba loop as fast as BLAS's,
on the kernels' OpenMP threads: BLAS threads spinning beside them in a decode step fight them over the cores
(22.8 instead of ~100 tokens/s on 2 cores). F16 and BF16 are converted to f32 with exact integer arithmetic
(numba has no float16), which agrees bit for bit with gguf-py's `astype` for dequantization and
quantization; the products convert F16 with the CPU's instruction where it has one (F16C). The F16 and BF16
drivers are generated from one template into kernels.floats_drivers (kernels.specialise).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .common import f16_to_f32, n_tiles
from .simd import HAS_F16C, half_to_f32, prefetch_ahead

# Rows per parallel task; see kernels/legacy_drivers.py for the tiles and why each is a function of its own.
ROW_TILE = 64


# f16 -> f32 in matvec and matmul: one instruction per 8 or 16 weights where the CPU converts halves
f16_to_f32_for_products = half_to_f32 if HAS_F16C else f16_to_f32


def dequantize_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, blocks.view(np.float32))


@numba.njit(cache=True, nogil=True, fastmath=True)
def _matvec_rows_f32(weights: np.ndarray, x: np.ndarray, y: np.ndarray, r0: int, r1: int) -> None:
    """y[r0:r1] = weights[r0:r1] x, four rows at a time so that each load of x feeds four products (~10%
    faster than one row at a time, as fast as OpenBLAS's sgemv on one core)."""
    r = r0
    while r + 4 <= r1:
        for ahead in range(r, r + 4):
            prefetch_ahead(weights, ahead)
        w0, w1, w2, w3 = weights[r], weights[r + 1], weights[r + 2], weights[r + 3]
        a0 = a1 = a2 = a3 = np.float32(0)
        for k in range(weights.shape[1]):
            a0 += w0[k] * x[k]
            a1 += w1[k] * x[k]
            a2 += w2[k] * x[k]
            a3 += w3[k] * x[k]
        y[r], y[r + 1], y[r + 2], y[r + 3] = a0, a1, a2, a3
        r += 4
    for last in range(r, r1):
        total = np.float32(0)
        for k in range(weights.shape[1]):
            total += weights[last, k] * x[k]
        y[last] = total


@numba.njit(cache=True, nogil=True, parallel=True)
def matvec_f32(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    weights = blocks.view(np.float32)
    rows = weights.shape[0]
    for tile in prange(n_tiles(rows, ROW_TILE)):
        _matvec_rows_f32(weights, x, y, tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE))


def matmul_f32(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    np.matmul(x, blocks.view(np.float32).T, out=y)


def quantize_f32(x: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out.view(np.float32), x)
