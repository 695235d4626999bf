"""The transformer's f32 operations other than the weight products: layer norm and causal attention.

As numba loops they replace a dozen numpy passes each and their temporaries: one call per layer keeps
the per-token overhead of decoding small, and the prefill softmax exponentiates only the visible positions.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange


# numpy's error model: a zero variance with eps 0 gives inf, which the logits check reports, not a
# ZeroDivisionError from inside the kernel (prange bodies already use it).
@numba.njit(cache=True, fastmath=True, error_model="numpy")
def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[n, e] = (x - mean) / sqrt(var + eps) * w + b, row by row. On one thread: a decode step's single
    row takes ~1 us, less than waking the other thread (2-3 us idle, up to a time slice on a busy machine)."""
    n, e = x.shape
    for i in range(n):
        row = x[i]
        mean = np.float32(0)
        for c in range(e):
            mean += row[c]
        mean /= e
        var = np.float32(0)
        for c in range(e):
            dev = row[c] - mean
            var += dev * dev
        inv = np.float32(1) / np.sqrt(var / e + np.float32(eps))
        for c in range(e):
            out[i, c] = (row[c] - mean) * inv * w[c] + b[c]


@numba.njit(cache=True, parallel=True, fastmath=True)
def decode_attention(q: np.ndarray, keys, values, positions: np.ndarray, layer: int, out: np.ndarray) -> None:
    """One new query for each of B sequences over that sequence's own cache, in one parallel loop.

    q[B, h, d] (query i sits at positions[i]); keys[i] and values[i] [layers, h, > positions[i], d] (typed
    lists: the caches differ in length); out[B, h, d].
    """
    b, n_head, d = q.shape
    scale = np.float32(1.0 / math.sqrt(d))
    for t in prange(b * n_head):
        i, h = t // n_head, t % n_head
        k, v = keys[i][layer, h], values[i][layer, h]
        seen = positions[i] + 1
        scores = np.empty(seen, dtype=np.float32)
        top = np.float32(-np.inf)
        for j in range(seen):
            s = np.float32(0)
            for c in range(d):
                s += q[i, h, c] * k[j, c]
            s *= scale
            scores[j] = s
            top = max(top, s)
        total = np.float32(0)
        for j in range(seen):
            e = np.exp(scores[j] - top)
            scores[j] = e
            total += e
        acc = np.zeros(d, dtype=np.float32)
        for j in range(seen):
            p = scores[j]
            for c in range(d):
                acc[c] += p * v[j, c]
        inv = np.float32(1) / total
        for c in range(d):
            out[i, h, c] = acc[c] * inv


@numba.njit(cache=True, parallel=True, fastmath=True)
def causal_softmax(scores: np.ndarray, p0: int, scale: float) -> None:
    """In place over scores[h, n, p0 + n] of raw q.k products: scale, hide the future, softmax each row."""
    n_head, n, _ = scores.shape
    for t in prange(n_head * n):
        h, i = t // n, t % n
        row = scores[h, i]
        seen = p0 + i + 1
        top = np.float32(-np.inf)
        for j in range(seen):
            row[j] *= np.float32(scale)
            top = max(top, row[j])
        total = np.float32(0)
        for j in range(seen):
            e = np.exp(row[j] - top)
            row[j] = e
            total += e
        inv = np.float32(1) / total
        for j in range(seen):
            row[j] *= inv
        row[seen:] = 0


@numba.njit(cache=True, parallel=True, fastmath=True)
def segment_attention(qkv: np.ndarray, first: np.ndarray, out: np.ndarray) -> None:
    """Causal softmax attention of texts packed back to back, none across texts, in one parallel call.

    qkv[n, 3, h, d] holds each token's query, key and value; token i sees tokens first[i] .. i (first[i] is
    where its text starts); out[n, h, d]. Short texts make per-text BLAS calls cost more than their work.
    """
    n, _, n_head, d = qkv.shape
    scale = np.float32(1.0 / math.sqrt(d))
    for t in prange(n * n_head):
        i, h = t // n_head, t % n_head
        lo = first[i]
        scores = np.empty(i + 1 - lo, dtype=np.float32)
        top = np.float32(-np.inf)
        for j in range(lo, i + 1):
            s = np.float32(0)
            for c in range(d):
                s += qkv[i, 0, h, c] * qkv[j, 1, h, c]
            s *= scale
            scores[j - lo] = s
            top = max(top, s)
        total = np.float32(0)
        for j in range(len(scores)):
            e = np.exp(scores[j] - top)
            scores[j] = e
            total += e
        acc = np.zeros(d, dtype=np.float32)
        for j in range(lo, i + 1):
            p = scores[j - lo]
            for c in range(d):
                acc[c] += p * qkv[j, 2, h, c]
        inv = np.float32(1) / total
        for c in range(d):
            out[i, h, c] = acc[c] * inv
