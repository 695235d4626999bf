"""The batched int8 product (kernels.tiles) against the dequantized weights times the int8-rounded tokens."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import FLOAT_TYPES, K_TYPES, LEGACY_TYPES

from gpt2cli.kernels import kernels_for, simd

QUANTIZED = (*LEGACY_TYPES, *K_TYPES)


def rounded(x: np.ndarray) -> np.ndarray:
    """f64[n, cols]: each row as simd.quantize_activations rounds it, d q per 32."""
    rows = [simd.quantize_activations(row) for row in x]
    return np.stack([np.repeat(d, 32).astype(np.float64) * q for q, d in rows])


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
@pytest.mark.parametrize(
    ("n", "rows", "blocks_per_row"), [(2, 1, 1), (3, 70, 3), (5, 131, 2), (9, 4, 1), (67, 65, 3)]
)
def test_int8_matmul_is_the_product_with_the_rounded_activations(qtype, n, rows, blocks_per_row):
    """Any n (padded to whole 4-token steps), rows not a multiple of the 64-row tile or the 4-row step, and
    columns not a multiple of the 64-weight step (3 legacy blocks: 96 weights)."""
    kernels = kernels_for(qtype)
    if kernels.int8_matmul is None:
        pytest.skip(f"no integer dot products for {qtype.name} on this CPU")
    cols = blocks_per_row * kernels.block_size
    rng = np.random.default_rng(n * rows)
    weights = (0.02 * rng.standard_normal((rows, cols))).astype(np.float32)
    weights[rng.random(weights.shape) < 0.01] *= 20  # outliers, as trained weights have
    blocks = np.empty((rows, kernels.row_bytes(cols)), np.uint8)
    kernels.quantize(weights, blocks)
    dequantized = np.empty_like(weights)
    kernels.dequantize(blocks, dequantized)
    x = rng.standard_normal((n, cols)).astype(np.float32) + 0.3
    y = np.empty((n, rows), np.float32)
    kernels.int8_matmul(blocks, x, y)
    expected = rounded(x) @ dequantized.T.astype(np.float64)
    scale = np.abs(rounded(x)) @ np.abs(dequantized.T).astype(np.float64)
    assert np.all(np.abs(y - expected) <= 1e-5 * scale)


def test_float_types_have_no_int8_matmul():
    assert all(kernels_for(t).int8_matmul is None for t in FLOAT_TYPES)
