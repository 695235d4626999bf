"""The int8 product of several tokens at once (`BlockKernels.matvecs`) against one int8 matvec per token.

Each token's activations are quantized exactly as the one-token matvec quantizes them and meet the same
integer dot products and scales, so the results agree up to the order LLVM sums each token's 8 lanes in:
held to 1e-6 of the row's largest |y|.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from gpt2cli.kernels import kernels_for, simd
from gpt2cli.kernels.layout import LAYOUTS

Q = GGMLQuantizationType
INT8_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
SUMMATION_RTOL = 1e-6

pytestmark = pytest.mark.skipif(simd.INT8_DOT is None, reason="no integer dot products on this CPU")


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> np.ndarray:
    """u8[rows, row_bytes]: random bytes, the f16 fields (d, m, dmin) drawn like trained weights' scales."""
    rng = np.random.default_rng(seed)
    layout = LAYOUTS[qtype]
    n_blocks = cols // layout.weights
    blocks = rng.integers(0, 256, (rows, n_blocks, layout.bytes), dtype=np.uint8)
    for field in ("d", "m", "dmin"):
        if hasattr(layout, field):
            halves = rng.uniform(1e-4, 1e-1, (rows, n_blocks)) * rng.choice([-1, 1], (rows, n_blocks))
            at = getattr(layout, field)
            blocks[:, :, at : at + 2] = halves.astype(np.float16).view(np.uint8).reshape(rows, n_blocks, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 12, 16])
def test_matvecs_equal_one_matvec_per_token(qtype, n):
    kernels = kernels_for(qtype)
    rows, cols = 67, 512  # an odd row count: the last parallel task is short
    blocks = random_blocks(qtype, rows, cols, seed=n)
    x = np.random.default_rng(100 + n).standard_normal((n, cols)).astype(np.float32)
    y = np.empty((n, rows), np.float32)
    kernels.matvecs(blocks, x, y)
    for i in range(n):
        alone = np.empty(rows, np.float32)
        kernels.matvec(blocks, x[i], alone)
        np.testing.assert_allclose(y[i], alone, rtol=0, atol=SUMMATION_RTOL * np.abs(alone).max())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("n", [2, 5, 6, 11, 16])
def test_amx_matvecs_equal_one_matvec_per_token(qtype, n):
    from gpt2cli.kernels import amx, amx_matvecs

    if not amx.available():
        pytest.skip("no AMX tiles on this CPU or kernel")
    kernels = kernels_for(qtype)
    rows, cols = 67, 768  # 67: the last tile of 16 rows is short
    blocks = random_blocks(qtype, rows, cols, seed=n)
    x = np.random.default_rng(100 + n).standard_normal((n, cols)).astype(np.float32)
    y = np.empty((n, rows), np.float32)
    getattr(amx_matvecs, f"{qtype.name.lower()}_matvecs")(blocks, x, y)
    for i in range(n):
        alone = np.empty(rows, np.float32)
        kernels.matvec(blocks, x[i], alone)
        np.testing.assert_allclose(y[i], alone, rtol=0, atol=SUMMATION_RTOL * np.abs(alone).max())
