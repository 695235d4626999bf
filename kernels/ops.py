"""The transformer's f32 operations other than the weight products: layer norm and causal attention.

As numba loops they replace a dozen numpy passes each and their temporaries: one call per layer keeps
the per-token overhead of decoding small, and the prefill softmax exponentiates only the visible positions.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange


@numba.njit(cache=True, fastmath=True)
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
def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, out: np.ndarray) -> None:
    """Softmax attention of n new queries over the cached keys, each seeing positions up to its own.

    q[n, h, d] (query i sits at position p0 + i), k and v [h, >= p0 + n, d], out[n, h, d].
    """
    n, n_head, d = q.shape
    scale = np.float32(1.0 / math.sqrt(d))
    for t in prange(n * n_head):
        i, h = t // n_head, t % n_head
        seen = p0 + i + 1
        scores = np.empty(seen, dtype=np.float32)
        top = np.float32(-np.inf)
        for j in range(seen):
            s = np.float32(0)
            for c in range(d):
                s += q[i, h, c] * k[h, j, c]
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
                acc[c] += p * v[h, j, c]
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
