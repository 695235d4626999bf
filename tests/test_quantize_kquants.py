"""K-quant quantizers: ggml's own accuracy test, round trips through gguf-py's dequantizer, and
byte-for-byte agreement with ggml's reference quantizers (through llama-cpp-python's libggml-base)."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2cli.kernels import kquants_drivers
from gpt2cli.kernels import kquants_quantize as kq

Q = GGMLQuantizationType
QUANTIZERS = {
    Q.Q2_K: kquants_drivers.quantize_q2_k,
    Q.Q3_K: kquants_drivers.quantize_q3_k,
    Q.Q4_K: kquants_drivers.quantize_q4_k,
    Q.Q5_K: kquants_drivers.quantize_q5_k,
    Q.Q6_K: kquants_drivers.quantize_q6_k,
}
# tests/test-quantize-fns.cpp: MAX_QUANTIZATION_TOTAL_ERROR(_2BITS, _3BITS).
GGML_TOTAL_ERROR = {Q.Q2_K: 0.0075, Q.Q3_K: 0.0040, Q.Q4_K: 0.002, Q.Q5_K: 0.002, Q.Q6_K: 0.002}
# RMS error / RMS of standard Gaussian data; measured 0.296, 0.151, 0.0715, 0.0363, 0.0178.
GAUSSIAN_RELATIVE_RMSE = {Q.Q2_K: 0.31, Q.Q3_K: 0.16, Q.Q4_K: 0.075, Q.Q5_K: 0.038, Q.Q6_K: 0.019}


# SHA-256 of ggml's blocks for hashed_data(), from ggml_quantize_chunk in llama-cpp-python 0.3.36
# (ggml 0.25.3, commit 0c1e570): byte equality is checked even where llama_cpp is not installed.
GGML_DIGESTS = {
    Q.Q2_K: "5bfd36d813bac8e5da40cc0c393f2f4ea60b4f4505b0b6e3604e32a7f7bdb804",
    Q.Q3_K: "236b99d747ed9514f254f8a1a43a06bc89d346b59fa3b499a0b9e5ebce5469f9",
    Q.Q4_K: "a55a1369e0b447458be0ed0f1a08a3e223b1ecfca871d55a165536628dd99241",
    Q.Q5_K: "5886ed09eb6b4d4a3c7899ad317778fe39f94248cf702aea6ac6520155eae758",
    Q.Q6_K: "fb33d03ac62b446c4d90f5ebf9bf5e07cff526630dab37c3e40872f607fd8a37",
}


def hashed_data() -> np.ndarray:
    """f32[64, 1024] from integer hashing only (exact on every platform, unlike cos or an RNG): row
    groups with different amplitudes, every 9th row rounded to integers."""
    i = np.arange(64 * 1024, dtype=np.int64)
    h = (i * 2654435761) % 2**32
    x = ((h >> 8) % 65536 - 32768) / 8192.0 * (1 + (i // 1024) % 7)
    x = x.astype(np.float32).reshape(64, 1024)
    x[::9] = np.round(x[::9])
    return x


def quantize(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    # Stale bytes in out must not leak into the blocks.
    out = np.full((x.shape[0], x.shape[1] // block_size * type_size), 0xA5, np.uint8)
    QUANTIZERS[qtype](x, out)
    return out


def ggml_quantize_chunk():
    """ggml_quantize_chunk from llama-cpp-python's ggml; with no imatrix it runs quantize_row_*_ref."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed")
    lib_dir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml.so"):
        if (lib_dir / name).is_file():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        pytest.skip(f"no libggml-base.so or libggml.so in {lib_dir}")
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    return fn


def ggml_reference(x: np.ndarray, qtype: GGMLQuantizationType, quantize_chunk) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // block_size * type_size), np.uint8)
    quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    return out


def edge_case_rows() -> np.ndarray:
    """f32[12, 256]: blocks that exercise the zero, constant, f16 under/overflow and sign paths."""
    rng = np.random.default_rng(7)
    rows = [
        np.zeros(256),
        np.full(256, 0.7),
        np.full(256, -0.7),
        rng.random(256) + 5.0,
        -(rng.random(256) + 5.0),
        rng.standard_normal(256) * 1e-20,
        rng.standard_normal(256) * 1e-6,
        rng.standard_normal(256) * 3e4,
        rng.standard_normal(256) * 1e5,
        np.where(np.arange(256) % 16 == 0, 1.0, 0.0),
        np.concatenate([np.zeros(128), rng.standard_normal(128)]),
        rng.integers(-3, 4, 256),
    ]
    return np.array(rows, np.float32)


@pytest.mark.parametrize("qtype", list(QUANTIZERS))
def test_ggml_total_quantization_error(qtype):
    n = 4096
    x = (0.1 + 2 * np.cos(np.arange(n, dtype=np.float32))).astype(np.float32)
    y = dequantize(quantize(x.reshape(1, n), qtype), qtype).reshape(n)
    diff = x.astype(np.float64) - y.astype(np.float64)
    assert np.sqrt(np.sum(diff * diff)) / n < GGML_TOTAL_ERROR[qtype]


@pytest.mark.parametrize("qtype", list(QUANTIZERS))
def test_gaussian_round_trip(qtype):
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    y = dequantize(quantize(x, qtype), qtype)
    assert y.shape == x.shape
    assert np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)) < GAUSSIAN_RELATIVE_RMSE[qtype]


@pytest.mark.parametrize("qtype", list(QUANTIZERS))
def test_zero_rows_decode_to_zero(qtype):
    x = np.zeros((3, 512), np.float32)
    assert not np.any(dequantize(quantize(x, qtype), qtype))


def test_fp32_to_fp16_rounds_like_ieee():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    # Halfway cases between f16 neighbours (normal and subnormal), overflow and underflow edges.
    halves = np.arange(0, 2**15, 7, dtype=np.uint32)
    ties = (halves.view(np.float16).astype(np.float32).view(np.uint32) | (1 << 12)).astype(np.uint32)
    special = np.array([65504, 65519.99, 65520, 1e-8, 2.98e-8, 2.99e-8, 6e-8, 0.0, -0.0], np.float32)
    values = np.concatenate([bits.view(np.float32), ties.view(np.float32), special, -special])
    values = values[np.isfinite(values)]
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    got = np.array([kq.fp32_to_fp16(v) for v in values])
    np.testing.assert_array_equal(got, expected)
    assert kq.fp32_to_fp16(np.float32(np.nan)) == 0x7E00
    assert all(kq.fp16_to_fp32(h) == np.uint16(h).view(np.float16) for h in expected)


def test_nearest_int_rounds_half_to_even():
    values = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.49, 2.51, 4194303.0, -4194303.0, 1e-30], np.float32)
    values = np.concatenate([values, np.random.default_rng(4).uniform(-100, 100, 1000).astype(np.float32)])
    np.testing.assert_array_equal([kq.nearest_int(v) for v in values], np.rint(values).astype(np.int64))


@pytest.mark.parametrize("qtype", list(QUANTIZERS))
def test_bytes_match_recorded_ggml_digest(qtype):
    assert hashlib.sha256(quantize(hashed_data(), qtype).tobytes()).hexdigest() == GGML_DIGESTS[qtype]


@pytest.mark.parametrize("qtype", list(QUANTIZERS))
def test_bytes_match_ggml_reference(qtype):
    quantize_chunk = ggml_quantize_chunk()
    rng = np.random.default_rng(1)
    datasets = [
        rng.standard_normal((32, 1024)),
        rng.standard_normal((32, 512)) * np.exp(rng.uniform(-12, 4, (32, 1))),
        rng.standard_t(2, (16, 768)),
        rng.standard_normal((16, 512)) * (rng.random((16, 512)) < 0.05),
        edge_case_rows(),
        hashed_data(),
    ]
    for x in datasets:
        x = x.astype(np.float32)
        np.testing.assert_array_equal(quantize(x, qtype), ggml_reference(x, qtype, quantize_chunk))


@settings(max_examples=30, deadline=None)
@given(
    qtype=st.sampled_from(list(QUANTIZERS)),
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-10, 6),
    offset=st.floats(-2, 2),
    nonzero_fraction=st.floats(0.02, 1.0),
)
def test_bytes_match_ggml_reference_property(qtype, seed, log_scale, offset, nonzero_fraction):
    quantize_chunk = ggml_quantize_chunk()
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 512)) + offset) * (rng.random((4, 512)) < nonzero_fraction)
    x = (x * 10.0**log_scale).astype(np.float32)
    np.testing.assert_array_equal(quantize(x, qtype), ggml_reference(x, qtype, quantize_chunk))
