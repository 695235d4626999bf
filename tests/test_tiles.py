"""The batched int8 products against the dequantized weights times the int8-rounded tokens: kernels.tiles
rounds them per 16 values as ggml's Q8_0 rounds 32, kernels.amx (Q8_0 where the CPU grants AMX) per 32."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import FLOAT_TYPES, K_TYPES, LEGACY_TYPES, T

from gpt2cli.kernels import family, kernels_for, simd

QUANTIZED = (*LEGACY_TYPES, *K_TYPES)


def rounded(x: np.ndarray, size: int) -> np.ndarray:
    """f64[n, cols]: d q per `size` values, computed in f32 as ggml's quantize_row_q8_0 computes them per 32:
    d = max|x| / 127, q = rint(x (127 / max|x|)), 0 for an all-zero group."""
    groups = x.reshape(-1, size).astype(np.float32)
    amax = np.abs(groups).max(axis=1)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(groups * inverse[:, None])
    d = (amax / np.float32(127)).astype(np.float32)
    return (d[:, None].astype(np.float64) * q).reshape(x.shape)


SHAPES = [(2, 1, 1), (3, 70, 3), (5, 131, 2), (9, 4, 1), (67, 65, 3)]


def check_product(qtype, product, rounding: int, n: int, rows: int, blocks_per_row: int) -> None:
    """Any n (padded to whole 4-token steps), rows not a multiple of the 64-row tile or the 4-row step, and
    columns not a multiple of the 64-weight step (3 legacy blocks: 96 weights)."""
    kernels = kernels_for(qtype)
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
    product(blocks, x, y)
    x_rounded = rounded(x, rounding)
    expected = x_rounded @ dequantized.T.astype(np.float64)
    scale = np.abs(x_rounded) @ np.abs(dequantized.T).astype(np.float64)
    assert np.all(np.abs(y - expected) <= 1e-5 * scale)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
@pytest.mark.parametrize(("n", "rows", "blocks_per_row"), SHAPES)
def test_tiles_are_the_product_with_activations_rounded_per_16(qtype, n, rows, blocks_per_row):
    product = family("tiles").int8_matmul_for(qtype)
    if product is None:
        pytest.skip(f"no integer dot products for {qtype.name} on this CPU")
    check_product(qtype, product, 16, n, rows, blocks_per_row)


@pytest.mark.parametrize(("n", "rows", "blocks_per_row"), SHAPES)
def test_amx_is_the_product_with_activations_rounded_per_32(n, rows, blocks_per_row):
    amx = family("amx")
    if not amx.available():
        pytest.skip("no AMX tiles on this CPU (or Linux did not grant them)")
    check_product(T.Q8_0, amx.q8_0_matmul, 32, n, rows, blocks_per_row)


def test_activations_round_per_16():
    """Ties of rint, an all-zero group and the padding to whole tokens and super-blocks, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[1, 256:272] = 0.0
    x[2] = np.round(rng.uniform(-126, 126, 512) * 2) / 2
    x[2, ::16] = 127  # 127 / max is 1: the halves are ties
    tiled, xd, sums, totals = simd.quantize_activation_rows(x, 4)
    q = tiled[:, [simd.tile_position(k) for k in range(512)]]
    assert q.shape == (4, 512) and xd.shape == (4, 32) and not q[3].any() and not xd[3].any()
    assert xd[1, 16] == 0 and not q[1, 256:272].any()
    assert np.array_equal(q[2], np.rint(x[2]))
    np.testing.assert_array_equal(np.repeat(xd[:3], 16, axis=1).astype(np.float64) * q[:3], rounded(x, 16))
    integer_sums = q[:3].reshape(3, 32, 16).sum(-1, dtype=np.int32)
    np.testing.assert_array_equal(sums[:3], xd[:3] * integer_sums.astype(np.float32))
    np.testing.assert_array_equal(totals[:3], integer_sums)


def test_float_types_have_no_int8_matmul():
    assert all(kernels_for(t).int8_matmul is None for t in FLOAT_TYPES)


def test_activations_round_per_32_as_ggml_q8_0():
    """simd.quantize_activations (the matvecs' and AMX's rounding) against ggml's formula: q bit for bit
    (ties of rint, an all-zero block), d within an ulp (compiled with fastmath, amax / 127 may be a multiply
    by the reciprocal)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4096).astype(np.float32)
    x[32:64] = 0.0
    x[64:96] = np.round(rng.uniform(-126, 126, 32) * 2) / 2
    x[64] = 127  # 127 / max is 1: the halves are ties
    q, d = simd.quantize_activations(x)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    np.testing.assert_array_equal(q, np.rint(x.reshape(-1, 32) * inverse[:, None]).reshape(-1))
    np.testing.assert_allclose(d, amax / np.float32(127), rtol=2**-23, atol=0)
    assert not q[32:64].any() and d[1] == 0 and np.array_equal(q[64:96], np.rint(x[64:96]))
