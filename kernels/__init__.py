"""Numba kernels for GGUF block types, keyed by `gguf.GGMLQuantizationType`.

Every kernel works on a weight matrix kept in its stored form: a C-contiguous uint8 array of shape
(rows, row_bytes), one row per output unit, blocks tiling the row along the input axis.

- dequantize(blocks u8[rows, row_bytes], out f32[rows, cols]) -> None
- matvec(blocks u8[rows, row_bytes], x f32[cols], y f32[rows]) -> None          y = W x
- matmul(blocks u8[rows, row_bytes], x f32[n, cols], y f32[n, rows]) -> None    Y = X W^T
- quantize(x f32[rows, cols], out u8[rows, row_bytes]) -> None                   (None where not provided)
- int8_matmul: Y = X W^T with int8 activations for the quantized types (kernels.tiles), else None
- matvec_f32: where `matvec` quantizes the activations to int8 blocks as ggml does (faster, ~1% error in
  the logits), the same product with f32 activations; None where `matvec` is already exact f32.

Kernels compile lazily on first call (`cache=True`), so a file only pays for the types it holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# The kernels' OpenMP threads spin for a while after each parallel loop; by default long enough to take the
# core from numpy's BLAS threads during a prefill (1.0k vs 1.3-1.8k tokens/s for 512 tokens here), while
# decoding, whose parallel loops come back to back, needs some spinning to wake fast. Read once at start-up.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")


@dataclass(frozen=True)
class BlockKernels:
    qtype: GGMLQuantizationType
    dequantize: Callable[..., None]
    matvec: Callable[..., None]
    matmul: Callable[..., None]
    quantize: Callable[..., None] | None = None
    matvec_f32: Callable[..., None] | None = None

    @property
    def exact_matvec(self) -> Callable[..., None]:
        return self.matvec_f32 or self.matvec

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def int8_matmul(self) -> Callable[..., None] | None:
        """int8_matmul(blocks, x f32[n, cols], y f32[n, rows]): Y = X W^T with x quantized to int8 per 32
        (kernels.tiles), or None for the float types and CPUs without integer dot products."""
        return tiles.int8_matmul_for(self.qtype)

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size


KERNELS: dict[GGMLQuantizationType, BlockKernels] = {}


def register(kernels: BlockKernels) -> None:
    KERNELS[kernels.qtype] = kernels


def kernels_for(qtype: GGMLQuantizationType) -> BlockKernels:
    """The kernels of a block type; KeyError when the type is not supported."""
    return KERNELS[qtype]


# The family modules register their types on import.
from kernels import floats, kquants, legacy, tiles  # noqa: E402, F401
