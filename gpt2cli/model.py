"""The GPT-2 forward pass on the CPU: prefill and decoding of one or more sequences, each with its KV cache.

A single token multiplies straight from the stored blocks (`matvec`, int8 activations unless exact); a batch
of 2 to MATVECS_MAX_TOKENS on quantized weights (several sequences decoding together) takes the int8 matvec
of all its tokens at once (`matvecs`, each row of blocks read once), and one of up to MATVEC_MAX_TOKENS on
float weights one matvec per token. A longer batch on quantized weights quantizes its activations to int8
and takes integer dot products (`int8_matmul`, kernels.tiles). Float weights and exact mode compute in f32:
short batches with the fused block kernels (`matmul`), long ones through numpy's BLAS (F32 weights straight
from the mapped file, the other types a dequantized tile of rows at a time in scratch), whichever was
measured faster for that size.
Several sequences run as one batch, with attention per sequence against its own cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from gguf import GGMLQuantizationType

from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import GPT2Config, GPT2Weights, LayerWeights, WeightMatrix
from gpt2cli.kernels import ops

# Batches at least this long dequantize into scratch and use BLAS: the fused kernels win at 8 tokens, tie
# near 64 and lose by 1.4x at 512 (benchmarks/bench_kernels.py --matmul).
BLAS_MIN_TOKENS = 64
# Up to this many tokens (a few sequences decoding together) take one int8 matvec each: a whole distilgpt2
# step of 2 / 5 / 8 tokens took 0.3x / 0.8x / 1.1-1.3x the time of the fused f32 kernels (Q4_K_M, Q8_0).
MATVEC_MAX_TOKENS = 6
# Up to this many tokens on quantized weights take the int8 matvec of several tokens at once (`matvecs`): a
# distilgpt2 Q4_K_M decode step of 2 / 5 / 8 / 16 sequences took 1.29x / 1.75x / 1.55x / 1.22x less CPU time
# (one thread) than one int8 matvec per token (2-6) or the fused f32 kernels (8, 16); generate's batches
# (SEQUENCES_PER_BATCH) are at most 16.
MATVECS_MAX_TOKENS = 16
# GELU of this many rows (a decode step's) stays on one thread: waking the other costs more than the work.
GELU_SERIAL_MAX_ROWS = 6
# Scratch for one dequantized tile of a weight matrix: bounds the extra memory of a BLAS prefill.
SCRATCH_BYTES = 16 << 20


class KVCache:
    """Keys and values of every layer for the positions seen so far."""

    def __init__(self, config: GPT2Config, max_len: int | None = None) -> None:
        self.config = config
        self.max_len = config.n_ctx if max_len is None else min(max_len, config.n_ctx)
        shape = (config.n_layer, config.n_head, self.max_len, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def fork(self, max_len: int | None = None) -> KVCache:
        """A new cache starting with a copy of this one's positions: a prompt shared by several samples."""
        other = KVCache(self.config, self.max_len if max_len is None else max_len)
        if other.max_len < self.length:
            raise ValueError(f"a cache of {other.max_len} positions cannot hold {self.length}")
        other.k[:, :, : self.length] = self.k[:, :, : self.length]
        other.v[:, :, : self.length] = self.v[:, :, : self.length]
        other.length = self.length
        return other


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:  # [n, e] -> [n, e]
    out = np.empty_like(x)
    ops.layer_norm(x, w, b, eps, out)
    return out


def gelu(x: np.ndarray) -> np.ndarray:  # [n, f] -> [n, f], in place
    if x.shape[0] <= GELU_SERIAL_MAX_ROWS:
        ops.gelu_serial(x)
    else:
        ops.gelu(x)
    return x


class GPT2Model:
    """exact: f32 activations, as transformers computes, instead of ggml's int8 ones (faster)."""

    def __init__(self, weights: GPT2Weights, config: GPT2Config, exact: bool = False) -> None:
        self.w = weights
        self.config = config
        self.exact = exact
        self._scratch = np.empty(SCRATCH_BYTES // 4, dtype=np.float32)

    def batch_compute(self) -> str:
        """What batches of several tokens compute with, for reports."""
        matrices = [self.w.output] + [
            m for lw in self.w.layers for m in (lw.attn_qkv, lw.attn_output, lw.ffn_up, lw.ffn_down)
        ]
        if self.exact:
            return "f32 (exact)"
        if all(m.kernels.int8_matmul is None for m in matrices):
            return "f32 (float weights)"
        return "int8 activations on quantized weights (llama.cpp-style)"

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, max_len)

    def linear(self, x: np.ndarray, w: WeightMatrix, b: np.ndarray | None = None) -> np.ndarray:
        """[n, cols] -> [n, rows]: x W^T + b, W read from its blocks."""
        n = x.shape[0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((n, w.rows), dtype=np.float32)
        if 1 < n <= MATVECS_MAX_TOKENS and not self.exact and w.kernels.matvecs is not None:
            w.kernels.matvecs_for(n)(w.blocks, x, y)
        elif n == 1 or (n <= MATVEC_MAX_TOKENS and not self.exact):
            matvec = w.kernels.exact_matvec if self.exact else w.kernels.matvec
            for i in range(n):
                matvec(w.blocks, x[i], y[i])
        elif not self.exact and w.kernels.int8_matmul is not None:
            # per core 1.1-4.3x the fused f32 kernels at 17-31 tokens (one thread, CPU time, the 2304 x 768
            # and 768 x 3072 matrices of Q4_K, Q6_K, Q8_0, Q4_0, Q5_1, Q3_K; Q5_1 the least), 1.2-2.1x
            # dequantize + BLAS at 64, 0.9-1.3x at 512 (benchmarks/bench_kernels.py --int8)
            w.kernels.int8_matmul(w.blocks, x, y)
        elif n < BLAS_MIN_TOKENS:
            w.kernels.matmul(w.blocks, x, y)
        elif w.qtype == GGMLQuantizationType.F32:  # BLAS straight from the mapped file
            np.matmul(x, w.blocks.view(np.float32).T, out=y)
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

    def attention(
        self,
        x: np.ndarray,
        layer: int,
        lw: LayerWeights,
        caches: Sequence[KVCache],
        spans: list[tuple[int, int]],
        decoding: tuple[Sequence[np.ndarray], Sequence[np.ndarray], np.ndarray] | None,
    ) -> np.ndarray:
        """[n, e] -> [n, e]: causal self-attention, each sequence over its own cached positions and new ones.

        The rows of x are the sequences' new tokens back to back: caches[i]'s are x[r0 : r0 + m], (r0, m) =
        spans[i]. The products with the weights take all n rows at once. `decoding` (one token per
        sequence): the caches' keys and values (typed lists, or one cache's arrays with a leading axis of
        1) and their lengths, for ops.decode_attention.
        """
        c = self.config
        n = x.shape[0]
        qkv = self.linear(x, lw.attn_qkv, lw.attn_qkv_b)  # [n, 3e]
        q, k, v = (
            qkv[:, i * c.n_embd : (i + 1) * c.n_embd].reshape(n, c.n_head, c.head_dim) for i in range(3)
        )
        out = np.empty((n, c.n_head, c.head_dim), dtype=np.float32)
        for cache, (r0, m) in zip(caches, spans, strict=True):
            cache.k[layer, :, cache.length : cache.length + m] = k[r0 : r0 + m].transpose(1, 0, 2)
            cache.v[layer, :, cache.length : cache.length + m] = v[r0 : r0 + m].transpose(1, 0, 2)
        if decoding is not None:  # every sequence's one query in one parallel loop
            ops.decode_attention(np.ascontiguousarray(q), *decoding, layer, out)
        else:
            for cache, (r0, m) in zip(caches, spans, strict=True):
                queries = np.ascontiguousarray(q[r0 : r0 + m])  # [m, h, d]
                ops.causal_attention(queries, cache.k[layer], cache.v[layer], cache.length, out[r0 : r0 + m])
        return self.linear(out.reshape(n, c.n_embd), lw.attn_output, lw.attn_output_b)

    def mlp(self, x: np.ndarray, lw: LayerWeights) -> np.ndarray:  # [n, e] -> [n, e]
        return self.linear(gelu(self.linear(x, lw.ffn_up, lw.ffn_up_b)), lw.ffn_down, lw.ffn_down_b)

    def forward(self, ids: Sequence[int] | np.ndarray, cache: KVCache, logits_from: int = 0) -> np.ndarray:
        """Run n new tokens after the cached ones; logits [n - logits_from, vocab] of the later positions.

        Scoring only some positions (the last one when generating, the scored half of a perplexity chunk)
        skips most of the output head, the largest matrix of the small models.
        """
        return self.forward_batch([ids], [cache], [logits_from])

    def decode_batch(self, tokens: Sequence[int] | np.ndarray, caches: Sequence[KVCache]) -> np.ndarray:
        """One new token for each of B independent sequences: logits [B, vocab] of their next positions."""
        return self.forward_batch([[token] for token in tokens], caches)

    def forward_batch(
        self,
        sequences: Sequence[Sequence[int] | np.ndarray],
        caches: Sequence[KVCache],
        logits_from: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Run each sequence's new tokens after its own cached ones, all in one pass over the weights.

        Returns the logits of sequence i's new positions from logits_from[i] on (default: all of them), the
        sequences' rows back to back: [sum of (n_i - logits_from[i]), vocab].
        """
        c, w = self.config, self.w
        if len(sequences) != len(caches) or not sequences:
            raise ValueError("forward_batch needs one cache per sequence and at least one sequence")
        ids = [np.asarray(seq, dtype=np.int64) for seq in sequences]
        spans, r0 = [], 0
        for seq, cache in zip(ids, caches, strict=True):
            if len(seq) == 0:
                raise ValueError("forward needs at least one token per sequence")
            if cache.length + len(seq) > cache.max_len:
                raise Gpt2Error(f"{cache.length + len(seq)} tokens do not fit the context of {cache.max_len}")
            if seq.min() < 0 or seq.max() >= c.n_vocab:
                raise Gpt2Error(f"token id out of range for a vocabulary of {c.n_vocab}")
            spans.append((r0, len(seq)))
            r0 += len(seq)
        positions = np.concatenate(
            [np.arange(cache.length, cache.length + len(seq)) for seq, cache in zip(ids, caches, strict=True)]
        )
        x = w.token_embd.dequantize_rows(np.concatenate(ids)) + w.position_embd[positions]  # [n, e]
        decoding = None
        if len(positions) == len(caches):  # built once per step: a typed list costs ~50 us
            if len(caches) == 1:  # a view, not a typed list: building one compiles for ~1 s in every process
                keys, values = caches[0].k[None], caches[0].v[None]
            else:
                from numba.typed import List as TypedList

                keys, values = TypedList(c.k for c in caches), TypedList(c.v for c in caches)
            decoding = (keys, values, positions)
        for i, lw in enumerate(w.layers):
            x = x + self.attention(
                layer_norm(x, lw.attn_norm_w, lw.attn_norm_b, c.layer_norm_eps),
                i,
                lw,
                caches,
                spans,
                decoding,
            )
            x = x + self.mlp(layer_norm(x, lw.ffn_norm_w, lw.ffn_norm_b, c.layer_norm_eps), lw)
        for seq, cache in zip(ids, caches, strict=True):
            cache.length += len(seq)
        starts = logits_from or [0] * len(ids)
        scored = np.concatenate(
            [np.arange(r0 + min(s, m - 1), r0 + m) for (r0, m), s in zip(spans, starts, strict=True)]
        )
        x = x[scored]
        return self.head(layer_norm(x, w.output_norm_w, w.output_norm_b, c.layer_norm_eps))

    def segment_attention(self, x: np.ndarray, lw: LayerWeights, first: np.ndarray) -> np.ndarray:
        """[n, e] -> [n, e]: causal self-attention of texts packed back to back, token i seeing only its
        own text from first[i] on."""
        c = self.config
        n = x.shape[0]
        qkv = self.linear(x, lw.attn_qkv, lw.attn_qkv_b).reshape(n, 3, c.n_head, c.head_dim)
        out = np.empty((n, c.n_head, c.head_dim), dtype=np.float32)
        ops.segment_attention(qkv, first, out)
        return self.linear(out.reshape(n, c.n_embd), lw.attn_output, lw.attn_output_b)

    def forward_packed(
        self, ids: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray, layer: int | None = None
    ) -> np.ndarray:
        """Hidden states [n, e] of several texts in one pass, each text attending only to itself.

        ids [n] are the texts' tokens back to back, lengths [t] (summing to n) how many each has; positions
        restart at 0 for every text, so each gets the states it would get alone. `layer` counts as
        transformers' `hidden_states`: 0 the embeddings, i the output of block i, n_layer (the default)
        the last block's output after the final LayerNorm, which `head` turns into logits.
        """
        c, w = self.config, self.w
        ids = np.asarray(ids, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        layer = c.n_layer if layer is None else layer
        if not 0 <= layer <= c.n_layer:
            raise ValueError(f"layer must be between 0 and {c.n_layer}, got {layer}")
        if lengths.sum() != len(ids) or (lengths < 1).any():
            raise ValueError("lengths must be positive and sum to len(ids)")
        if lengths.max() > c.n_ctx:
            raise Gpt2Error(f"{lengths.max()} tokens do not fit the context of {c.n_ctx}")
        if ids.min() < 0 or ids.max() >= c.n_vocab:
            raise Gpt2Error(f"token id out of range for a vocabulary of {c.n_vocab}")
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [n]: where each token's text starts
        positions = np.arange(len(ids)) - first  # [n]
        x = w.token_embd.dequantize_rows(ids) + w.position_embd[positions]  # [n, e]
        for lw in w.layers[:layer]:
            x = x + self.segment_attention(
                layer_norm(x, lw.attn_norm_w, lw.attn_norm_b, c.layer_norm_eps), lw, first
            )
            x = x + self.mlp(layer_norm(x, lw.ffn_norm_w, lw.ffn_norm_b, c.layer_norm_eps), lw)
        if layer < c.n_layer:
            return x
        return layer_norm(x, w.output_norm_w, w.output_norm_b, c.layer_norm_eps)

    def head(self, hidden: np.ndarray) -> np.ndarray:  # final hidden states [n, e] -> logits [n, vocab]
        logits = self.linear(hidden, self.w.output)
        if not np.isfinite(logits).all():  # NaN or infinity in the weights: nothing downstream can use them
            raise Gpt2Error("the model's logits are not finite")
        return logits
