"""The batched int8 product (kernels.tiles) against the dequantized weights times the int8-rounded tokens,
rounded as ggml rounds them for the weights' type (Q8_0 per 32, Q8_K per 256)."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import FLOAT_TYPES, K_TYPES, LEGACY_TYPES

from gpt2cli.kernels import kernels_for, simd

QUANTIZED = (*LEGACY_TYPES, *K_TYPES)


def rounded_per_32(x: np.ndarray) -> np.ndarray:
    """f64[n, cols]: each row as simd.quantize_activations rounds it, d q per 32."""
    rows = [simd.quantize_activations(row) for row in x]
    return np.stack([np.repeat(d, 32).astype(np.float64) * q for q, d in rows])


def rounded_per_256(x: np.ndarray) -> np.ndarray:
    """f64[n, cols]: d q per 256 as ggml's quantize_row_q8_K_ref computes them in f32: the value of largest
    |x| (the first of equals) maps to -127, q = min(127, rint(x iscale)), d = 1 / iscale."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    signed_max = blocks[np.arange(len(blocks)), np.argmax(np.abs(blocks), axis=1)]
    with np.errstate(divide="ignore"):
        iscale = np.where(signed_max != 0, np.float32(-127) / signed_max, np.float32(0)).astype(np.float32)
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(127, np.rint(blocks * iscale[:, None]))
    return (d[:, None].astype(np.float64) * q).reshape(x.shape)


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
    rounded = (rounded_per_256 if qtype in K_TYPES else rounded_per_32)(x)
    expected = rounded @ dequantized.T.astype(np.float64)
    scale = np.abs(rounded) @ np.abs(dequantized.T).astype(np.float64)
    assert np.all(np.abs(y - expected) <= 1e-5 * scale)


def test_activations_per_256_round_as_ggml_q8_k():
    """Ties of rint, the sign of d (the largest |x| maps to -127) and an all-zero block, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[0, 3] = 9.0  # a positive maximum: d < 0
    x[1, 256:] = 0.0
    x[2] = np.round(rng.uniform(-126, 126, 512) * 2) / 2
    x[2, [0, 256]] = -127  # iscale 1: the halves are ties
    tiled, xd, sums, totals = simd.quantize_activation_rows(x, 4, 256)
    q = tiled[:, [simd.tile_position(k) for k in range(512)]]
    d = xd[:, ::16]
    assert q.shape == (4, 512) and xd.shape == (4, 32) and not q[3].any()
    assert np.array_equal(xd, np.repeat(d, 16, axis=1))
    assert d[0, 0] < 0 and q[0, 3] == -127 and np.array_equal(q[2], np.rint(x[2]))
    assert d[1, 1] == 0 and not q[1, 256:].any()
    np.testing.assert_array_equal(
        np.repeat(d[:3], 256, axis=1).astype(np.float64) * q[:3], rounded_per_256(x)
    )
    integer_sums = q[:3].reshape(3, 32, 16).sum(-1, dtype=np.int32).astype(np.float32)
    np.testing.assert_array_equal(sums[:3], xd[:3] * integer_sums)
    np.testing.assert_array_equal(totals[:3], integer_sums)


def test_float_types_have_no_int8_matmul():
    assert all(kernels_for(t).int8_matmul is None for t in FLOAT_TYPES)
