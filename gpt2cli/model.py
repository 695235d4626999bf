"""The GPT-2 forward pass on the CPU: batched prefill and a one-token decode step sharing a KV cache.

A single token multiplies straight from the stored blocks (`matvec`). A batch of up to INT8_MAX_TOKENS on
quantized weights quantizes its activations to int8 as ggml does and takes integer dot products
(`int8_matmul`, kernels.tiles). Float weights, exact mode and longer batches compute in f32: a batch either
uses the fused block kernels (`matmul`) or, for long batches, dequantizes a tile of rows at a time into
scratch and lets numpy's BLAS do the product, whichever was measured faster for that batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import GPT2Config, GPT2Weights, LayerWeights, WeightMatrix
from kernels import ops

# Batches at least this long dequantize into scratch and use BLAS: the fused kernels win at 8 tokens, tie
# near 64 and lose by 1.4x at 512 (benchmarks/bench_kernels.py --matmul).
BLAS_MIN_TOKENS = 64
# Batches shorter than this on quantized weights use int8 activations. Measured per core (CPU time, a
# 3072 x 768 matrix) against the better f32 path: 0.75x at 8 tokens, 1.0x at 32, 1.05-1.2x at 64-128 and
# 0.75-0.8x at 512, where BLAS's f32 FMAs outrun the f32 scaling that every 64-weight integer dot product of
# a tile needs.
INT8_MAX_TOKENS = 256
# Scratch for one dequantized tile of a weight matrix: bounds the extra memory of a BLAS prefill.
SCRATCH_BYTES = 16 << 20


class KVCache:
    """Keys and values of every layer for the positions seen so far."""

    def __init__(self, config: GPT2Config, max_len: int | None = None) -> None:
        self.max_len = config.n_ctx if max_len is None else min(max_len, config.n_ctx)
        shape = (config.n_layer, config.n_head, self.max_len, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.length = 0

    def reset(self) -> None:
        self.length = 0


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:  # [n, e] -> [n, e]
    out = np.empty_like(x)
    ops.layer_norm(x, w, b, eps, out)
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    """HF's gelu_new (GPT-2's tanh form), in place: numpy's tanh is vectorized, numba's is not."""
    inner = x * x
    inner *= x
    inner *= np.float32(0.044715)
    inner += x
    inner *= np.float32(0.7978845608028654)  # sqrt(2 / pi)
    np.tanh(inner, out=inner)
    inner += 1
    x *= inner
    x *= np.float32(0.5)
    return x


class GPT2Model:
    """exact: f32 activations, as transformers computes, instead of ggml's int8 ones (faster)."""

    def __init__(self, weights: GPT2Weights, config: GPT2Config, exact: bool = False) -> None:
        self.w = weights
        self.config = config
        self.exact = exact
        self._scratch = np.empty(SCRATCH_BYTES // 4, dtype=np.float32)

    def int8_batches(self, n: int) -> bool:
        """Whether a batch of n > 1 tokens multiplies quantized weights with int8 activations."""
        return not self.exact and n < INT8_MAX_TOKENS

    def batch_compute(self, n: int) -> str:
        """What batches of n > 1 tokens compute with, for reports."""
        matrices = [self.w.output] + [
            m for lw in self.w.layers for m in (lw.attn_qkv, lw.attn_output, lw.ffn_up, lw.ffn_down)
        ]
        if self.exact:
            return "f32 (exact)"
        if all(m.kernels.int8_matmul is None for m in matrices):
            return "f32 (float weights)"
        if self.int8_batches(n):
            return "int8 activations on quantized weights (llama.cpp-style)"
        return f"f32 (batches of {INT8_MAX_TOKENS}+ tokens)"

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, max_len)

    def linear(self, x: np.ndarray, w: WeightMatrix, b: np.ndarray | None = None) -> np.ndarray:
        """[n, cols] -> [n, rows]: x W^T + b, W read from its blocks."""
        n = x.shape[0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((n, w.rows), dtype=np.float32)
        if n == 1:
            matvec = w.kernels.exact_matvec if self.exact else w.kernels.matvec
            matvec(w.blocks, x[0], y[0])
        elif self.int8_batches(n) and w.kernels.int8_matmul is not None:
            w.kernels.int8_matmul(w.blocks, x, y)
        elif n < BLAS_MIN_TOKENS:
            w.kernels.matmul(w.blocks, x, y)
        else:
            tile_rows = max(1, min(w.rows, self._scratch.size // w.cols))
            for r0 in range(0, w.rows, tile_rows):
                r1 = min(r0 + tile_rows, w.rows)
                tile = self._scratch[: (r1 - r0) * w.cols].reshape(r1 - r0, w.cols)
                w.kernels.dequantize(w.blocks[r0:r1], tile)
                np.matmul(x, tile.T, out=y[:, r0:r1])
        if b is not None:
            y += b
        return y

    def attention(self, x: np.ndarray, layer: int, lw: LayerWeights, cache: KVCache) -> np.ndarray:
        """[n, e] -> [n, e]: causal self-attention over the cached positions and these n."""
        c = self.config
        n, p0 = x.shape[0], cache.length
        qkv = self.linear(x, lw.attn_qkv, lw.attn_qkv_b)  # [n, 3e]
        q, k, v = (
            qkv[:, i * c.n_embd : (i + 1) * c.n_embd].reshape(n, c.n_head, c.head_dim) for i in range(3)
        )
        cache.k[layer, :, p0 : p0 + n] = k.transpose(1, 0, 2)
        cache.v[layer, :, p0 : p0 + n] = v.transpose(1, 0, 2)
        if n == 1:  # one query: a fused loop beats BLAS calls on a single row
            out = np.empty((n, c.n_head, c.head_dim), dtype=np.float32)
            ops.causal_attention(np.ascontiguousarray(q), cache.k[layer], cache.v[layer], p0, out)
        else:
            keys = cache.k[layer, :, : p0 + n]  # [h, p0+n, hd]
            scores = np.matmul(q.transpose(1, 0, 2), keys.transpose(0, 2, 1))  # [h, n, p0+n]
            ops.causal_softmax(scores, p0, 1.0 / np.sqrt(c.head_dim))
            out = np.matmul(scores, cache.v[layer, :, : p0 + n]).transpose(1, 0, 2)  # [n, h, hd]
        return self.linear(out.reshape(n, c.n_embd), lw.attn_output, lw.attn_output_b)

    def mlp(self, x: np.ndarray, lw: LayerWeights) -> np.ndarray:  # [n, e] -> [n, e]
        return self.linear(gelu(self.linear(x, lw.ffn_up, lw.ffn_up_b)), lw.ffn_down, lw.ffn_down_b)

    def forward(self, ids: Sequence[int] | np.ndarray, cache: KVCache, logits_from: int = 0) -> np.ndarray:
        """Run n new tokens after the cached ones; logits [n - logits_from, vocab] of the later positions.

        Scoring only some positions (the last one when generating, the scored half of a perplexity chunk)
        skips most of the output head, the largest matrix of the small models.
        """
        c, w = self.config, self.w
        ids = np.asarray(ids, dtype=np.int64)
        n, p0 = len(ids), cache.length
        if n == 0:
            raise ValueError("forward needs at least one token")
        if p0 + n > cache.max_len:
            raise Gpt2Error(f"{p0 + n} tokens do not fit the context of {cache.max_len}")
        if ids.min() < 0 or ids.max() >= c.n_vocab:
            raise Gpt2Error(f"token id out of range for a vocabulary of {c.n_vocab}")
        x = w.token_embd.dequantize_rows(ids) + w.position_embd[p0 : p0 + n]  # [n, e]
        for i, lw in enumerate(w.layers):
            x = x + self.attention(
                layer_norm(x, lw.attn_norm_w, lw.attn_norm_b, c.layer_norm_eps), i, lw, cache
            )
            x = x + self.mlp(layer_norm(x, lw.ffn_norm_w, lw.ffn_norm_b, c.layer_norm_eps), lw)
        cache.length = p0 + n
        x = x[min(logits_from, n - 1) :]
        return self.linear(layer_norm(x, w.output_norm_w, w.output_norm_b, c.layer_norm_eps), w.output)
