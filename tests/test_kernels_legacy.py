"""Kernels for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 against gguf-py, the oracle.

dequantize and quantize must match gguf.quants bit for bit. matvec and matmul reorder sums (fastmath), so they
are held to |y - y_ref| <= 1e-5 * (|W| |x|) elementwise, where y_ref is computed in f64 from gguf-py's
dequantized W: a relative error of 1e-5 on the sum of the absolute products.

Where the CPU has integer dot products, the registered matvec kernels quantize x to int8 per 32 values first
(scale d_b = max |x_b| / 127, rounding to nearest) and use it for the `d q` part of each weight (the `+ m` of
Q4_1/Q5_1 multiplies the f32 sums of x): each x_j is off by at most d_b / 2, so the bound gains
sum_j |d q_j| d_b(j) / 2 <= sum_j (|w_j| + |m_j|) d_b(j) / 2, the worst case of the activation rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2cli.kernels import kernels_for, simd
from gpt2cli.kernels import legacy_drivers as drivers
from gpt2cli.kernels.layout import LAYOUTS

Q = GGMLQuantizationType
QUANTIZED = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
FLOATS = [Q.F32, Q.F16, Q.BF16]
ALL = FLOATS + QUANTIZED
# Byte offsets of the f16 fields (d, and m where there is one) inside a block.
SCALE_OFFSETS = {
    q: tuple(getattr(LAYOUTS[q], f) for f in ("d", "m") if hasattr(LAYOUTS[q], f)) for q in QUANTIZED
}
MATMUL_TOLERANCE = 1e-5

SETTINGS = settings(max_examples=25, deadline=None)
# the matvec kernels that quantize x to int8 (registered when kernels.simd has an instruction set), and the
# f32 kernels registered otherwise, which the tests hold to the f32 tolerance on every CPU
INT8_MATVEC = {q: getattr(drivers, f"int8_matvec_{q.name.lower()}") for q in QUANTIZED}
F32_MATVEC = {q: getattr(drivers, f"matvec_{q.name.lower()}") for q in QUANTIZED}
# bytes of the quantized values in a block: zeroed, a block of a _1 type dequantizes to its `m`
QUANT_RANGES = {q: (LAYOUTS[q].m + 2, LAYOUTS[q].bytes) for q in (Q.Q4_1, Q.Q5_1)}


def finite_halves(rng: np.random.Generator, shape: tuple[int, ...], exponent_bits: int) -> np.ndarray:
    """Random f16 (exponent_bits=5) or bf16 (8) bit patterns, every finite value possible, subnormals too."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    exponent_mask = np.uint16(((1 << exponent_bits) - 1) << (15 - exponent_bits))
    # an all-ones exponent (inf/nan) loses its top exponent bit
    top_bit = np.uint16(1 << 14)
    return np.where((bits & exponent_mask) == exponent_mask, bits & ~top_bit, bits)


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> np.ndarray:
    """u8[rows, row_bytes]: random bytes, with finite f16 (bf16) scales or values."""
    rng = np.random.default_rng(seed)
    kernels = kernels_for(qtype)
    if qtype == Q.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
    if qtype in (Q.F16, Q.BF16):
        return finite_halves(rng, (rows, cols), 5 if qtype == Q.F16 else 8).view(np.uint8)
    blocks = rng.integers(0, 256, size=(rows, kernels.row_bytes(cols)), dtype=np.uint8)
    per_block = blocks.reshape(rows, -1, kernels.type_size)
    for offset in SCALE_OFFSETS[qtype]:
        scales = finite_halves(rng, (rows, per_block.shape[1], 1), 5)
        per_block[:, :, offset : offset + 2] = scales.view(np.uint8)
    return blocks


def real_looking(rows: int, cols: int, seed: int) -> np.ndarray:
    """f32[rows, cols] like trained weights: per-row scales, heavy-ish tails, a few outliers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(5, size=(rows, cols)).astype(np.float32) * np.float32(0.02)
    x *= rng.uniform(0.1, 3.0, size=(rows, 1)).astype(np.float32)
    outliers = rng.random((rows, cols)) < 0.002
    x[outliers] *= 30
    return x


def awkward_rows(cols: int) -> np.ndarray:
    """f32[8, cols]: zeros, constants, exact ties for every rounding, +-max ties, tiny and huge values."""
    ramp = np.arange(cols, dtype=np.float32)
    rows = [
        np.zeros(cols),
        np.full(cols, 0.75),
        np.full(cols, -3.0),
        (ramp % 17 - 8) / 2,  # halves: ties in every quantizer's rounding
        (ramp % 255 - 127) * 0.5,  # Q8_0 ties at x * 127 / amax
        np.where(ramp % 2 == 0, 1.0, -1.0),  # +max and -max in every block: the first one wins
        (ramp % 7 - 3) * 1e-6,  # f16 scales that are subnormal
        (ramp % 5 - 2) * 1e4,  # scales near the top of f16
    ]
    return np.stack(rows).astype(np.float32)


def oracle_bytes(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's quantization as u8[rows, row_bytes] (it returns f16/f32 arrays for the float types)."""
    return np.ascontiguousarray(quants.quantize(x, qtype)).view(np.uint8).reshape(x.shape[0], -1)


def dequantize(blocks: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> np.ndarray:
    out = np.empty((blocks.shape[0], cols), dtype=np.float32)
    kernels_for(qtype).dequantize(blocks, out)
    return out


def quantize(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    kernels = kernels_for(qtype)
    out = np.empty((x.shape[0], kernels.row_bytes(x.shape[1])), dtype=np.uint8)
    kernels.quantize(x, out)
    return out


def columns(qtype: GGMLQuantizationType, n_blocks: int) -> int:
    # the float types have no blocks: any width, including ones that are no multiple of the vector width
    return n_blocks * 32 + (7 if qtype in FLOATS else 0)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@SETTINGS
@given(rows=st.integers(1, 9), n_blocks=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_dequantize_random_blocks_is_bit_exact(qtype: Q, rows: int, n_blocks: int, seed: int):
    cols = columns(qtype, n_blocks)
    blocks = random_blocks(qtype, rows, cols, seed)
    expected = quants.dequantize(blocks, qtype)
    np.testing.assert_array_equal(dequantize(blocks, qtype, cols).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_dequantize_quantized_weights_is_bit_exact(qtype: GGMLQuantizationType):
    x = np.concatenate([real_looking(61, 256, seed=1), awkward_rows(256)])
    blocks = oracle_bytes(x, qtype)
    expected = quants.dequantize(blocks, qtype)
    np.testing.assert_array_equal(dequantize(blocks, qtype, 256).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@SETTINGS
@given(
    rows=st.integers(1, 9),
    n_blocks=st.integers(1, 6),
    scale=st.sampled_from([1e-6, 0.02, 1.0, 300.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_is_bit_exact(qtype: Q, rows: int, n_blocks: int, scale: float, seed: int):
    cols = columns(qtype, n_blocks)
    x = real_looking(rows, cols, seed) * np.float32(scale / 0.02)
    np.testing.assert_array_equal(quantize(x, qtype), oracle_bytes(x, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_quantize_zeros_ties_and_extremes_is_bit_exact(qtype: GGMLQuantizationType):
    x = awkward_rows(256)
    np.testing.assert_array_equal(quantize(x, qtype), oracle_bytes(x, qtype))


def test_quantize_f16_rounds_like_numpy_at_the_edges():
    # ties between adjacent halves, the overflow threshold, subnormals and their ties
    halves = np.arange(0, 0x7C00, 37, dtype=np.uint16).view(np.float16).astype(np.float64)
    midpoints = (halves[:-1] + halves[1:]) / 2
    edges = [65504, 65519.99, 65520, 1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-26, 1e-9]
    values = np.concatenate([halves, midpoints, edges, -midpoints, [-65520.0, -(2.0**-25)]])
    x = values[: values.size // 32 * 32].astype(np.float32).reshape(-1, 32)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(quantize(x, Q.F16), oracle_bytes(x, Q.F16))


def reference_products(blocks: np.ndarray, qtype: GGMLQuantizationType, x: np.ndarray):
    """(X W^T in f64, |X| |W|^T): the exact product of the dequantized weights and its error scale."""
    w = quants.dequantize(blocks, qtype).astype(np.float64)
    return x.astype(np.float64) @ w.T, np.abs(x.astype(np.float64)) @ np.abs(w).T


def activation_rounding_bound(blocks: np.ndarray, qtype: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    """f64[rows]: sum_j (|w_j| + |m_j|) d(j) / 2, d(j) = max |x| / 127 over the 32-block of x_j, with 1e-4 of
    slack for the f32 rounding of d and of x / d."""
    step = np.repeat(np.abs(x.astype(np.float64)).reshape(-1, 32).max(axis=1) / 127, 32)
    magnitudes = np.abs(quants.dequantize(blocks, qtype).astype(np.float64))
    if qtype in QUANT_RANGES:
        start, stop = QUANT_RANGES[qtype]
        per_block = blocks.reshape(blocks.shape[0], -1, kernels_for(qtype).type_size).copy()
        per_block[:, :, start:stop] = 0
        magnitudes += np.abs(quants.dequantize(per_block.reshape(blocks.shape), qtype))
    return magnitudes @ (step / 2 * (1 + 1e-4))


def int8_activations(qtype: GGMLQuantizationType) -> bool:
    return simd.INT8_DOT is not None and qtype in INT8_MATVEC


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@SETTINGS
@given(rows=st.integers(1, 40), n_blocks=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_matvec_matches_dequantized_product(qtype: GGMLQuantizationType, rows: int, n_blocks: int, seed: int):
    cols = columns(qtype, n_blocks)
    blocks = oracle_bytes(real_looking(rows, cols, seed), qtype)
    x = np.random.default_rng(seed).standard_normal(cols, dtype=np.float32)
    y = np.empty(rows, dtype=np.float32)
    kernels_for(qtype).matvec(blocks, x, y)
    expected, scale = reference_products(blocks, qtype, x)
    tolerance = MATMUL_TOLERANCE * scale
    if int8_activations(qtype):
        tolerance += activation_rounding_bound(blocks, qtype, x)
    assert np.all(np.abs(y - expected) <= tolerance)


@pytest.mark.parametrize("qtype", list(F32_MATVEC), ids=lambda q: q.name)
@SETTINGS
@given(rows=st.integers(1, 40), n_blocks=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_f32_fallback_matvec_matches_dequantized_product(qtype: Q, rows: int, n_blocks: int, seed: int):
    blocks = oracle_bytes(real_looking(rows, n_blocks * 32, seed), qtype)
    x = np.random.default_rng(seed).standard_normal(n_blocks * 32, dtype=np.float32)
    y = np.empty(rows, dtype=np.float32)
    F32_MATVEC[qtype](blocks, x, y)
    expected, scale = reference_products(blocks, qtype, x)
    assert np.all(np.abs(y - expected) <= MATMUL_TOLERANCE * scale)


@pytest.mark.parametrize("qtype", list(INT8_MATVEC), ids=lambda q: q.name)
def test_int8_matvec_is_registered_where_supported(qtype: GGMLQuantizationType):
    expected = INT8_MATVEC[qtype] if simd.INT8_DOT else F32_MATVEC[qtype]
    assert kernels_for(qtype).matvec is expected


@pytest.mark.parametrize("qtype", list(INT8_MATVEC), ids=lambda q: q.name)
def test_int8_matvec_on_zeros_ties_and_extremes(qtype: GGMLQuantizationType):
    if simd.INT8_DOT is None:
        pytest.skip("no int8 dot product instructions on this CPU")
    blocks = oracle_bytes(np.concatenate([real_looking(8, 256, seed=2), awkward_rows(256)]), qtype)
    for x in awkward_rows(256):
        y = np.empty(blocks.shape[0], dtype=np.float32)
        INT8_MATVEC[qtype](blocks, x, y)
        expected, scale = reference_products(blocks, qtype, x)
        tolerance = MATMUL_TOLERANCE * scale + activation_rounding_bound(blocks, qtype, x)
        assert np.all(np.abs(y - expected) <= tolerance)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@SETTINGS
@given(
    n=st.integers(1, 11), rows=st.integers(1, 40), n_blocks=st.integers(1, 8), seed=st.integers(0, 2**32 - 1)
)
def test_matmul_matches_dequantized_product(
    qtype: GGMLQuantizationType, n: int, rows: int, n_blocks: int, seed: int
):
    cols = columns(qtype, n_blocks)
    blocks = oracle_bytes(real_looking(rows, cols, seed), qtype)
    x = np.random.default_rng(seed).standard_normal((n, cols), dtype=np.float32)
    y = np.empty((n, rows), dtype=np.float32)
    kernels_for(qtype).matmul(blocks, x, y)
    expected, scale = reference_products(blocks, qtype, x)
    assert np.all(np.abs(y - expected) <= MATMUL_TOLERANCE * scale)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_registered_with_all_four_kernels(qtype: GGMLQuantizationType):
    kernels = kernels_for(qtype)
    assert kernels.qtype == qtype
    assert None not in (kernels.dequantize, kernels.matvec, kernels.matmul, kernels.quantize)


@SETTINGS
@given(
    n_blocks=st.integers(1, 8),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e30]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_activations_rounds_to_nearest(n_blocks: int, scale: float, seed: int):
    x = np.random.default_rng(seed).standard_normal(n_blocks * 32).astype(np.float32) * np.float32(scale)
    x[:32] = awkward_rows(32)[seed % 8]
    q, d = simd.quantize_activations(x)
    step = np.abs(x).reshape(-1, 32).max(axis=1) / np.float32(127)
    np.testing.assert_allclose(d, step, rtol=1e-6)
    assert np.all(np.abs(q.astype(np.int32)) <= 127)
    error = np.abs(x.astype(np.float64) - np.repeat(d, 32).astype(np.float64) * q)
    assert np.all(error <= np.repeat(d, 32).astype(np.float64) / 2 * (1 + 1e-4))
