"""The transformer's f32 operations other than the weight products: layer norm, causal attention and the
statistics of the next-token distribution.

As numba loops they replace a dozen numpy passes each and their temporaries: one call per layer keeps
the per-token overhead of decoding small, and the prefill softmax exponentiates only the visible positions.
Softmax exponentials go through `exp_nonpositive`, a polynomial LLVM vectorizes: numba has no vector libm
here (no SVML), so `np.exp` in a loop is one scalar call per element.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .simd import F32_LANES, TILE_ROWS_F32, f32_tile_product, prefix_max

LOG2E = np.float32(1.4426950408889634)
# ln 2 split in two (Cody-Waite) so that x - n ln 2 stays exact for |n| <= 127.
LN2_HIGH = np.float32(0.693359375)
LN2_LOW = np.float32(-2.12194440e-4)


@numba.njit(inline="always", fastmath=True)
def exp_nonpositive(x: np.float32) -> np.float32:
    """e**x for x <= 0 (a softmax's shifted scores), within 3e-7 relative (Cephes' expf polynomial);
    below -87 it is ~1e-38 rather than a subnormal."""
    x = max(x, np.float32(-87.0))
    # x = n ln 2 + r, |r| <= ln 2 / 2: n rounded by truncating (toward 0) x log2(e) - 1/2 <= 0, where
    # np.floor would be a call that stops LLVM from vectorizing the caller's loop
    n_int = np.int32(x * LOG2E - np.float32(0.5))
    n = np.float32(n_int)
    r = x - n * LN2_HIGH - n * LN2_LOW
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    two_to_n = np.int32((n_int + np.int32(127)) << np.int32(23)).view(np.float32)
    return (p * r * r + r + np.float32(1)) * two_to_n


# numpy's error model: a zero variance with eps 0 gives inf, which the logits check reports, not a
# ZeroDivisionError from inside the kernel (prange bodies already use it).
@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
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


@numba.njit(inline="always")
def _gelu_in_place(row: np.ndarray) -> None:
    """HF's gelu_new (GPT-2's tanh form), 0.5 x (1 + tanh u), written as x sigmoid(2 u) so that the one
    exponential is of a non-positive number."""
    for j in range(row.shape[0]):
        v = row[j]
        u = np.float32(0.7978845608028654) * (v + np.float32(0.044715) * v * v * v)  # sqrt(2 / pi) (...)
        e = exp_nonpositive(np.float32(-2) * abs(u))
        row[j] = v / (np.float32(1) + e) if u >= 0 else v * e / (np.float32(1) + e)


# error_model="numpy" lets LLVM vectorize the division (no zero check raising ZeroDivisionError)
@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True, error_model="numpy")
def gelu(x: np.ndarray) -> None:
    """In place over x f32[n, f], the rows shared out over the threads."""
    for i in prange(x.shape[0]):
        _gelu_in_place(x[i])


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def gelu_serial(x: np.ndarray) -> None:
    """gelu on this thread alone: for a decode step's few rows waking the others costs more than the work,
    most of all when another process keeps them busy."""
    for i in range(x.shape[0]):
        _gelu_in_place(x[i])


@numba.njit(inline="always")
def _attend(scores: np.ndarray, top: np.float32, values: np.ndarray, out: np.ndarray) -> None:
    """out[d] = softmax(scores[seen]) @ values[seen, d], top the largest score (the callers find it while
    they compute the scores); the scores are overwritten by their exponentials."""
    total = np.float32(0)
    for j in range(scores.shape[0]):
        e = exp_nonpositive(scores[j] - top)
        scores[j] = e
        total += e
    acc = np.zeros(out.shape[0], dtype=np.float32)
    whole = scores.shape[0] // 4 * 4
    for j in range(0, whole, 4):  # four positions a pass: a quarter of the accumulators' loads and stores
        p0, p1, p2, p3 = scores[j], scores[j + 1], scores[j + 2], scores[j + 3]
        v0, v1, v2, v3 = values[j], values[j + 1], values[j + 2], values[j + 3]
        for c in range(out.shape[0]):
            acc[c] += p0 * v0[c] + p1 * v1[c] + p2 * v2[c] + p3 * v3[c]
    for j in range(whole, scores.shape[0]):
        p = scores[j]
        for c in range(out.shape[0]):
            acc[c] += p * values[j, c]
    inv = np.float32(1) / total
    for c in range(out.shape[0]):
        out[c] = acc[c] * inv


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
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
        _attend(scores, top, v, out[i, h])


@numba.njit(inline="always")
def _tile_vectors(a: np.ndarray, b: np.ndarray, c: np.ndarray, depth: int, b_col: int, c_col: int, n: int):
    """f32_tile_product of n (1 to 4) vectors of columns."""
    if n == 4:
        f32_tile_product(a, b, c, depth, b_col, c_col, 4)
    elif n == 3:
        f32_tile_product(a, b, c, depth, b_col, c_col, 3)
    elif n == 2:
        f32_tile_product(a, b, c, depth, b_col, c_col, 2)
    else:
        f32_tile_product(a, b, c, depth, b_col, c_col, 1)


@numba.njit(inline="always")
def _round_up(k: int, multiple: int) -> int:
    return (k + multiple - 1) // multiple * multiple


# Positions per panel of transposed keys: as many as one f32_tile_product takes (its 4 vectors).
PANEL = 4 * F32_LANES


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, p0: int, out: np.ndarray) -> None:
    """Softmax attention of m new queries q[m, h, d] at positions p0 .. p0 + m - 1 over the keys and values
    before and at them: keys, values [h, >= p0 + m, d] (a layer of the cache); out[m, h, d].

    One task per head and block of TILE_ROWS_F32 queries: the block's scores against the positions its
    last query sees, then their softmax-weighted values, both as simd.f32_tile_product (register tiles:
    each key or value loaded serves the whole block); the positions a query does not see get probability
    0. The keys are first transposed into panels of PANEL positions, each [d, PANEL] contiguous, so that a
    tile's columns are positions and its rows of keys stream in order.
    """
    m, n_head, d = q.shape
    seen = p0 + m
    panels = (seen + PANEL - 1) // PANEL
    keys_t = np.empty((n_head, panels, d, PANEL), dtype=np.float32)
    # values padded to whole vectors: a copy only where d is not a multiple of F32_LANES
    d_padded = _round_up(d, F32_LANES)
    values_padded = np.zeros((n_head if d_padded != d else 0, seen, d_padded), dtype=np.float32)
    for h in prange(n_head):
        keys_t[h, panels - 1] = 0  # past the last position: finite, never counted
        for j in range(seen):
            for c in range(d):
                keys_t[h, j // PANEL, c, j % PANEL] = keys[h, j, c]
        if d_padded != d:
            values_padded[h, :, :d] = values[h, :seen]
    scale = np.float32(1.0 / math.sqrt(d))
    blocks = (m + TILE_ROWS_F32 - 1) // TILE_ROWS_F32
    for task in prange(n_head * blocks):
        h, i0 = task // blocks, task % blocks * TILE_ROWS_F32
        rows = min(TILE_ROWS_F32, m - i0)
        depth = p0 + i0 + rows  # the positions the block's last query sees
        queries = np.zeros((TILE_ROWS_F32, d), dtype=np.float32)
        for r in range(rows):
            for c in range(d):
                queries[r, c] = q[i0 + r, h, c] * scale
        scores = np.empty((TILE_ROWS_F32, panels * PANEL), dtype=np.float32)
        for p in range((depth + PANEL - 1) // PANEL):
            vectors = min(4, (depth - p * PANEL + F32_LANES - 1) // F32_LANES)
            _tile_vectors(queries, keys_t[h, p], scores, d, 0, p * PANEL, vectors)
        totals = np.zeros(TILE_ROWS_F32, dtype=np.float32)
        for r in range(rows):
            visible = p0 + i0 + r + 1
            top = prefix_max(scores[r], visible)
            total = np.float32(0)
            for j in range(visible):
                e = exp_nonpositive(scores[r, j] - top)
                scores[r, j] = e
                total += e
            scores[r, visible:depth] = 0
            totals[r] = total
        scores[rows:, :depth] = 0
        weighted = np.empty((TILE_ROWS_F32, d_padded), dtype=np.float32)
        value_rows = values_padded[h] if d_padded != d else values[h]
        for c0 in range(0, d_padded, PANEL):
            _tile_vectors(scores, value_rows, weighted, depth, c0, c0, min(4, (d_padded - c0) // F32_LANES))
        for r in range(rows):
            inv = np.float32(1) / totals[r]
            for c in range(d):
                out[i0 + r, h, c] = weighted[r, c] * inv


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
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
            e = exp_nonpositive(scores[j] - top)
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


@numba.njit(inline="always")
def _row_max(row: np.ndarray) -> np.float32:
    """The largest of row f32[k] (k >= 1): 16 running maxima that LLVM turns into one vector, where a
    single running max() stays scalar."""
    lanes = np.full(16, row[0], dtype=np.float32)
    whole = row.shape[0] // 16 * 16
    for j0 in range(0, whole, 16):
        for k in range(16):
            v = row[j0 + k]
            lanes[k] = v if v > lanes[k] else lanes[k]
    top = row[0]
    for k in range(16):
        top = lanes[k] if lanes[k] > top else top
    for j in range(whole, row.shape[0]):
        top = row[j] if row[j] > top else top
    return top


# Logits per f32 partial sum in next_token_stats: summed straight into f64 the loop vectorized narrower
# (f32 -> f64 conversions); a partial sum of 256 positive terms is exact to ~1e-6 relative, far inside the
# 1e-4 the tests hold log-probabilities to. With _row_max and the rank counted in a loop of its own (an
# integer sum in the exponentials' loop narrowed it too): 1.55x less CPU time (512 x 50257, one thread).
STATS_CHUNK = 256


@numba.njit(inline="always", fastmath=True)
def _shifted_exp_sums(row: np.ndarray, top: np.float32) -> tuple[float, float]:
    """(sum of e**s, sum of e**s s) over s = row f32[k] - top (top >= max(row)), in f64 over f32 partial
    sums of STATS_CHUNK terms."""
    total, moment = 0.0, 0.0
    for c0 in range(0, row.shape[0], STATS_CHUNK):
        part_total, part_moment = np.float32(0), np.float32(0)
        for j in range(c0, min(c0 + STATS_CHUNK, row.shape[0])):
            shifted = row[j] - top
            e = exp_nonpositive(shifted)
            part_total += e
            part_moment += e * shifted
        total += part_total
        moment += part_moment
    return total, moment


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def next_token_stats(
    logits: np.ndarray, targets: np.ndarray, log_prob: np.ndarray, entropy: np.ndarray, rank: np.ndarray
) -> None:
    """Per row of logits f32[m, vocab] and its target token: log softmax at the target (log_prob f64[m]),
    the entropy of the softmax in nats (entropy f64[m]) and how many logits exceed the target's (rank
    int64[m]). Three vectorized passes over each row where numpy needs six; the sums in f64 over f32 partial
    sums of STATS_CHUNK logits."""
    m, vocab = logits.shape
    for i in prange(m):
        row = logits[i]
        target = row[targets[i]]
        top = _row_max(row)
        above = np.int32(0)
        # moment: sum of e**s s, s the shifted logits: H = log total - moment / total
        total, moment = _shifted_exp_sums(row, top)
        for j in range(vocab):
            above += np.int32(row[j] > target)
        log_total = math.log(total)
        log_prob[i] = target - top - log_total
        entropy[i] = log_total - moment / total
        rank[i] = above


# The exponent bits of an f32: all set in an infinity or a NaN (tested on the bits: fastmath lets LLVM
# assume that no float is either).
F32_EXPONENT = np.uint32(0x7F800000)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def fold_next_token_stats(
    logits: np.ndarray,
    v0: int,
    targets: np.ndarray,
    rank_logits: np.ndarray,
    top: np.ndarray,
    total: np.ndarray,
    moment: np.ndarray,
    target_logit: np.ndarray,
    above: np.ndarray,
) -> int:
    """next_token_stats a slice of the vocabulary at a time: fold the logits f32[m, c] of tokens v0 .. v0 + c
    - 1 into each row's running statistics, so that the whole [m, vocab] never exists. Per row: top f32[m]
    the largest logit so far (-inf before the first slice), total f64[m] the sum of e**(l - top), moment
    f64[m] the sum of e**(l - top) (l - top) (both rescaled when top rises), target_logit f32[m] the
    target's logit (from the slice that holds it), above int64[m] the logits other than the target's larger
    than rank_logits f32[m] (the target's logit computed apart: the slices before the target's need it).
    Returns the number of logits that are not finite."""
    m, c = logits.shape
    bits = logits.view(np.uint32)
    wild = 0
    for i in prange(m):
        row = logits[i]
        new_top = max(top[i], _row_max(row))
        if total[i] > 0:
            shift = float(top[i]) - float(new_top)  # <= 0
            factor = math.exp(shift)
            moment[i] = factor * (moment[i] + shift * total[i])
            total[i] *= factor
        top[i] = new_top
        slice_total, slice_moment = _shifted_exp_sums(row, new_top)
        total[i] += slice_total
        moment[i] += slice_moment
        count = np.int32(0)
        odd = np.int32(0)
        threshold = rank_logits[i]
        for j in range(c):
            count += np.int32(row[j] > threshold)
            odd += np.int32(bits[i, j] & F32_EXPONENT == F32_EXPONENT)
        t = targets[i] - v0
        if 0 <= t < c:
            target_logit[i] = row[t]
            count -= np.int32(row[t] > threshold)
        above[i] += count
        wild += odd
    return wild
