"""K-quant kernels against gguf-py: dequantize bit for bit, matvec/matmul within a stated tolerance.

Blocks are random bytes with finite f16 scales (gguf-py has no K-quant quantizer): every bit pattern of the
quantized fields is valid, so random bytes cover the format; the f16 fields are drawn from all finite halves
(zero, subnormal, negative, up to 65504) and from the magnitudes real GPT-2 weights give (1e-4 .. 1e-1).

Tolerance of matvec/matmul: |y - y_exact| <= 1e-4 * sum_k (|w_k| + |min_k|) |x_k| per output, where y_exact
is the f64 product of gguf-py's dequantized weights and min_k the `dmin * m` part of w_k (summation order
differs from a plain dot product, and the `- dmin * m` terms are applied through per-sub-block sums of x).

Where the CPU has integer dot products, the registered matvec kernels quantize x to int8 per 32 values
(scale d_b = max |x_b| / 127, rounding to nearest) and use it for the `d * sc * q` part of each weight, whose
magnitude is at most |w_k| + |min_k| (and Q2_K for its `- dmin * m` part too): the bound gains
sum_k (|w_k| + |min_k|) d_b(k) / 2, the worst case of the activation rounding.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2cli.kernels import kernels_for, simd
from gpt2cli.kernels import kquants_drivers as drivers
from gpt2cli.kernels.layout import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from gpt2cli.kernels.specialise import INT8_TYPES

# byte offsets of the f16 fields (d, dmin) inside each block, and of the quantized values (zeroed to isolate
# the `- dmin * m` part of each weight)
F16_OFFSETS = {
    layout.qtype: tuple(getattr(layout, f) for f in ("d", "dmin") if hasattr(layout, f))
    for layout in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
}
QUANT_RANGES = {
    Q2_K.qtype: ((Q2_K.qs, Q2_K.d),),
    Q4_K.qtype: ((Q4_K.qs, Q4_K.bytes),),
    Q5_K.qtype: ((Q5_K.qh, Q5_K.bytes),),
}
QTYPES = list(F16_OFFSETS)
RTOL = 1e-4
# the matvec kernels registered instead of matvec_<type> when kernels.simd has an instruction set
INT8_MATVEC = {q: getattr(drivers, f"int8_matvec_{q.name.lower()}") for q in QTYPES}


def make_blocks(
    qtype: GGMLQuantizationType, rows: int, n_blocks: int, seed: int, realistic: bool
) -> np.ndarray:
    """u8[rows, n_blocks * type_size]: random block bytes with finite f16 scale fields."""
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (rows, n_blocks, type_size), dtype=np.uint8)
    for offset in F16_OFFSETS[qtype]:
        if realistic:
            halves = (
                rng.uniform(1e-4, 1e-1, (rows, n_blocks)) * rng.choice([-1, 1], (rows, n_blocks))
            ).astype(np.float16)
        else:
            bits = rng.integers(0, 1 << 16, (rows, n_blocks), dtype=np.uint16)
            bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # inf/nan exponent -> a finite one
            halves = bits.view(np.float16)
        blocks[:, :, offset : offset + 2] = halves.view(np.uint8).reshape(rows, n_blocks, 2)
    return blocks.reshape(rows, n_blocks * type_size)


def kernels_of(qtype: GGMLQuantizationType):
    name = qtype.name.lower()
    return (
        getattr(drivers, f"dequantize_{name}"),
        getattr(drivers, f"matvec_{name}"),
        getattr(drivers, f"matmul_{name}"),
    )


def weight_magnitudes(qtype: GGMLQuantizationType, blocks: np.ndarray) -> np.ndarray:
    """f64[rows, cols]: |w| + |dmin * m|, the scale of each weight's terms before they cancel."""
    weights = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    magnitudes = np.abs(weights)
    if qtype in QUANT_RANGES:
        no_quants = blocks.reshape(blocks.shape[0], -1, GGML_QUANT_SIZES[qtype][1]).copy()
        for start, stop in QUANT_RANGES[qtype]:
            no_quants[:, :, start:stop] = 0
        mins = gguf.quants.dequantize(no_quants.reshape(blocks.shape), qtype)
        magnitudes += np.abs(mins)
    return magnitudes


def activation_rounding_bound(
    qtype: GGMLQuantizationType, magnitudes: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """f64[..., rows]: sum_k magnitudes_k d(k) / 2, d(k) = max |x| / 127 over the block of x_k that the
    type's int8 matvec quantizes together (32 values, or 256 as ggml's Q8_K), with 1e-4 of slack for the f32
    rounding of d and of x / d."""
    size = 256 if any(t.per_256 and t.name == qtype.name.lower() for t in INT8_TYPES) else 32
    blocks = np.abs(x.astype(np.float64)).reshape(*x.shape[:-1], -1, size)
    step = np.repeat(blocks.max(axis=-1) / 127, size, axis=-1)
    return (step / 2 * (1 + 1e-4)) @ magnitudes.T


def int8_activations(qtype: GGMLQuantizationType) -> bool:
    return simd.INT8_DOT is not None and qtype in INT8_MATVEC


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_registered(qtype: GGMLQuantizationType) -> None:
    kernels = kernels_for(qtype)
    dequantize, matvec, matmul = kernels_of(qtype)
    if int8_activations(qtype):
        matvec = INT8_MATVEC[qtype]
    assert (kernels.dequantize, kernels.matvec, kernels.matmul) == (dequantize, matvec, matmul)
    assert kernels.quantize is getattr(drivers, f"quantize_{qtype.name.lower()}")


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_blocks_of_real_looking_weights(qtype: GGMLQuantizationType) -> None:
    """Blocks made by the K-quant quantizer from GPT-2-like weights (normal, std 0.02, a few outliers)."""
    rng = np.random.default_rng(3)
    weights = (rng.standard_normal((67, 768)) * 0.02).astype(np.float32)
    weights[rng.random(weights.shape) < 0.001] *= 30
    kernels = kernels_for(qtype)
    blocks = np.empty((67, kernels.row_bytes(768)), np.uint8)
    kernels.quantize(weights, blocks)
    out = np.empty_like(weights)
    kernels.dequantize(blocks, out)
    assert np.array_equal(out, gguf.quants.dequantize(blocks, qtype))

    x = rng.standard_normal((5, 768)).astype(np.float32)
    expected = x.astype(np.float64) @ out.T.astype(np.float64)
    magnitudes = weight_magnitudes(qtype, blocks)
    tolerance = RTOL * (np.abs(x).astype(np.float64) @ magnitudes.T)
    y = np.empty(67, np.float32)
    kernels.matvec(blocks, x[0], y)
    matvec_tolerance = tolerance[0]
    if int8_activations(qtype):
        matvec_tolerance = matvec_tolerance + activation_rounding_bound(qtype, magnitudes, x[0])
    assert np.all(np.abs(y - expected[0]) <= matvec_tolerance)
    product = np.empty((5, 67), np.float32)
    kernels.matmul(blocks, x, product)
    assert np.all(np.abs(product - expected) <= tolerance)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 20),
    n_blocks=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    realistic=st.booleans(),
)
def test_dequantize_bit_exact(
    qtype: GGMLQuantizationType, rows: int, n_blocks: int, seed: int, realistic: bool
):
    blocks = make_blocks(qtype, rows, n_blocks, seed, realistic)
    dequantize, _, _ = kernels_of(qtype)
    out = np.empty((rows, n_blocks * 256), np.float32)
    dequantize(blocks, out)
    expected = gguf.quants.dequantize(blocks, qtype)
    assert out.dtype == expected.dtype
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantize_gpt2_shape(qtype: GGMLQuantizationType) -> None:
    blocks = make_blocks(qtype, 300, 3, seed=7, realistic=True)
    dequantize, _, _ = kernels_of(qtype)
    out = np.empty((300, 768), np.float32)
    dequantize(blocks, out)
    assert np.array_equal(out, gguf.quants.dequantize(blocks, qtype))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 70),
    n_blocks=st.integers(1, 4),
    n_tokens=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
    realistic=st.booleans(),
)
def test_matvec_matmul_match_dequantized(
    qtype: GGMLQuantizationType, rows: int, n_blocks: int, n_tokens: int, seed: int, realistic: bool
):
    blocks = make_blocks(qtype, rows, n_blocks, seed, realistic)
    _, matvec, matmul = kernels_of(qtype)
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, n_blocks * 256)).astype(np.float32)
    weights = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    expected = x.astype(np.float64) @ weights.T
    tolerance = RTOL * (np.abs(x).astype(np.float64) @ weight_magnitudes(qtype, blocks).T) + 1e-30

    y = np.empty(rows, np.float32)
    matvec(blocks, x[0], y)
    assert np.all(np.abs(y - expected[0]) <= tolerance[0])

    out = np.empty((n_tokens, rows), np.float32)
    matmul(blocks, x, out)
    assert np.all(np.abs(out - expected) <= tolerance)


@pytest.mark.parametrize("qtype", list(INT8_MATVEC), ids=lambda q: q.name)
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 70),
    n_blocks=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    realistic=st.booleans(),
    x_scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_int8_matvec_within_activation_rounding(
    qtype: GGMLQuantizationType, rows: int, n_blocks: int, seed: int, realistic: bool, x_scale: float
):
    if simd.INT8_DOT is None:
        pytest.skip("no int8 dot product instructions on this CPU")
    blocks = make_blocks(qtype, rows, n_blocks, seed, realistic)
    rng = np.random.default_rng(seed + 1)
    x = (rng.standard_t(4, n_blocks * 256) * x_scale).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = 0  # blocks with zeros, some possibly all zero
    magnitudes = weight_magnitudes(qtype, blocks)
    expected = gguf.quants.dequantize(blocks, qtype).astype(np.float64) @ x.astype(np.float64)
    rounding = activation_rounding_bound(qtype, magnitudes, x)
    tolerance = RTOL * (magnitudes @ np.abs(x).astype(np.float64)) + rounding
    y = np.empty(rows, np.float32)
    INT8_MATVEC[qtype](blocks, x, y)
    assert np.all(np.abs(y - expected) <= tolerance + 1e-30)


@pytest.mark.parametrize("qtype", list(INT8_MATVEC), ids=lambda q: q.name)
def test_int8_matvec_exact_on_int8_activations(qtype: GGMLQuantizationType) -> None:
    """x already integers with 127 in every 32-block: quantizing it loses nothing, so only the f32 tolerance
    remains (a wrong bit field or scale would not hide in the activation rounding)."""
    if simd.INT8_DOT is None:
        pytest.skip("no int8 dot product instructions on this CPU")
    blocks = make_blocks(qtype, 37, 3, seed=7, realistic=True)
    x = np.random.default_rng(3).integers(-127, 128, 3 * 256).astype(np.float32)
    x[::32] = 127
    expected = gguf.quants.dequantize(blocks, qtype).astype(np.float64) @ x.astype(np.float64)
    y = np.empty(37, np.float32)
    INT8_MATVEC[qtype](blocks, x, y)
    tolerance = RTOL * (weight_magnitudes(qtype, blocks) @ np.abs(x).astype(np.float64))
    assert np.all(np.abs(y - expected) <= tolerance)
