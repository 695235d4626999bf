"""kernels.ops.causal_attention against softmax attention computed in f64 with numpy."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2cli.kernels import ops


def reference_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, p0: int) -> np.ndarray:
    """f64[m, h, d]: query i (at position p0 + i) over positions 0 .. p0 + i of keys, values [h, >, d]."""
    m, n_head, d = q.shape
    seen = p0 + m
    out = np.empty((m, n_head, d))
    hidden = np.arange(seen)[None, :] > (p0 + np.arange(m))[:, None]
    for h in range(n_head):
        scores = q[:, h].astype(np.float64) @ keys[h, :seen].astype(np.float64).T / np.sqrt(d)
        scores[hidden] = -np.inf
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ values[h, :seen]
    return out


@pytest.mark.parametrize(
    ("m", "n_head", "d", "p0", "spare"),
    [
        (1, 1, 4, 0, 0),
        (7, 3, 8, 5, 3),
        (13, 2, 20, 30, 0),
        (100, 12, 64, 0, 7),
        (65, 2, 48, 63, 2),
        (2, 4, 80, 130, 5),
    ],
)
def test_causal_attention_is_softmax_attention(m, n_head, d, p0, spare):
    """Blocks of queries not a multiple of the 6-query tile, head sizes not a multiple of a vector, cached
    positions before the new ones, and cache rows past them (never read)."""
    rng = np.random.default_rng(m + d + p0)
    q = rng.standard_normal((m, n_head, d), dtype=np.float32) * 3
    keys = rng.standard_normal((n_head, p0 + m + spare, d), dtype=np.float32) * 3
    values = rng.standard_normal((n_head, p0 + m + spare, d), dtype=np.float32)
    keys[:, p0 + m :] = np.nan
    values[:, p0 + m :] = np.nan
    out = np.full((m, n_head, d), np.nan, dtype=np.float32)
    ops.causal_attention(q, keys, values, p0, out)
    np.testing.assert_allclose(out, reference_attention(q, keys, values, p0), rtol=0, atol=2e-5)


@pytest.mark.parametrize("width", [1000, 4096, 50257])
def test_fold_next_token_stats_equals_next_token_stats(width):
    """Slices of the vocabulary folded one after another (the largest logit rising in later slices, the
    target in any slice) give next_token_stats' log-probability, entropy and rank."""
    rng = np.random.default_rng(width)
    m, vocab = 7, 50257
    logits = (3 * rng.standard_normal((m, vocab))).astype(np.float32)
    logits[:, vocab // 2 :] += np.float32(4)  # the top moves up in a later slice
    targets = rng.integers(0, vocab, m)
    want = np.empty(m), np.empty(m), np.empty(m, dtype=np.int64)
    ops.next_token_stats(logits, targets, *want)
    top = np.full(m, -np.inf, dtype=np.float32)
    total, moment = np.zeros(m), np.zeros(m)
    target_logit = np.empty(m, dtype=np.float32)
    above = np.zeros(m, dtype=np.int64)
    rank_logits = logits[np.arange(m), targets]
    for v0 in range(0, vocab, width):
        part = np.ascontiguousarray(logits[:, v0 : v0 + width])
        wild = ops.fold_next_token_stats(
            part, v0, targets, rank_logits, top, total, moment, target_logit, above
        )
        assert wild == 0
    np.testing.assert_allclose(target_logit - top - np.log(total), want[0], rtol=1e-6)
    np.testing.assert_allclose(np.log(total) - moment / total, want[1], rtol=1e-6)
    np.testing.assert_array_equal(above, want[2])


def test_fold_next_token_stats_counts_logits_that_are_not_finite():
    logits = np.zeros((3, 64), dtype=np.float32)
    logits[0, 5], logits[2, 7], logits[2, 9] = np.nan, np.inf, -np.inf
    m = len(logits)
    stats = (
        np.full(m, -np.inf, np.float32),
        np.zeros(m),
        np.zeros(m),
        np.empty(m, np.float32),
        np.zeros(m, np.int64),
    )
    assert ops.fold_next_token_stats(logits, 0, np.zeros(m, np.int64), np.zeros(m, np.float32), *stats) == 3
