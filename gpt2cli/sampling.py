"""Next-token choice with Hugging Face transformers' semantics (design doc section 6).

The order is HF's: repetition penalty over every id in prompt + output (also when greedy), then greedy argmax
when temperature == 0, else temperature, top-k (ties at the k-th value kept), top-p (HF's TopPLogitsWarper),
softmax, and one draw. Scores stay float32 through the warpers, as in HF, so their comparisons see the same
values; the softmax and cumulative sums run in float64.

HF draws with torch's RNG, so no numpy runtime can reproduce HF's sampled text; a seed here makes this tool's
own output reproducible run to run. For `num_return_sequences=N`, use `Sampler(config, seed).spawn(N)`: one
child sampler per sequence, independent of each other yet fixed by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpt2cli.errors import Gpt2Error

F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 50  # 0 means off
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        # `not (x >= 0)` rather than `x < 0` so that NaN is refused too.
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise Gpt2Error(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise Gpt2Error(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise Gpt2Error(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise Gpt2Error(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, context_ids: np.ndarray, penalty: float) -> np.ndarray:
    """HF's RepetitionPenaltyLogitsProcessor: a copy of logits f32[vocab] with each id of context_ids
    penalised once, score * penalty where the score is negative, score / penalty otherwise."""
    scores = logits.copy()
    if penalty != 1.0 and context_ids.size:
        # The gather reads unpenalised scores, so a repeated id is written the same value: penalised once.
        # In f64 and clipped to f32's range, so an extreme penalty (1e-40, 1e40) saturates instead of making
        # infinities or NaN (0 / a penalty that rounds to 0 in f32).
        # HF multiplies by the penalty rounded to f32 (f64 arithmetic on f32 values then rounds the same).
        with np.errstate(over="ignore", under="ignore"):
            penalty32 = float(np.float32(penalty))
        factor = penalty32 if 0 < penalty32 < np.inf else penalty
        seen = scores[context_ids].astype(np.float64)
        penalised = np.where(seen < 0, seen * factor, seen / factor)
        scores[context_ids] = np.clip(penalised, -F32_MAX, F32_MAX)
    return scores


def softmax64(scores: np.ndarray) -> np.ndarray:
    """f32[n] -> f64[n] probabilities; -inf scores get probability 0.

    The exponentials are float32, as in HF (numpy's float32 exp is also ~15x faster than its float64 one);
    the normalising sum and the cumulative sums downstream are float64, where 50257 small terms lose nothing
    that matters."""
    with np.errstate(over="ignore"):  # a saturated score minus the max is -inf: probability 0, as wanted
        z = np.exp(scores - scores.max()).astype(np.float64)
    z /= z.sum()
    return z


# Scores per group whose maximum top_k_ids takes: a vocabulary of 50257 makes 786 groups.
TOP_K_GROUP = 64


def top_k_ids(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Ids whose score is >= the k-th largest, HF's `scores < topk(scores, k)[-1]` mask inverted: ties at the
    k-th value are kept, so more than k ids can survive.

    The ids split into groups (strided: numpy takes the maxima of columns 15x faster than of short rows), the
    k-th largest of the groups' maxima is k scores that are at least it, so the k-th largest score is too:
    only the scores from there up need partitioning (about k of 50257; 2x faster than partitioning all).
    The same ids either way, so the same samples for a seed."""
    whole = scores.size // TOP_K_GROUP * TOP_K_GROUP
    maxima = scores[:whole].reshape(TOP_K_GROUP, -1).max(axis=0)
    if whole < scores.size:
        maxima = np.append(maxima, scores[whole:].max())
    if maxima.size >= top_k and not np.isnan(maxima).any():  # np.partition ranks NaN above every score
        floor = np.partition(maxima, maxima.size - top_k)[maxima.size - top_k]
        candidates = np.flatnonzero(scores >= floor)
    else:
        candidates = np.arange(scores.size)
    candidate_scores = scores[candidates]
    kth_largest = np.partition(candidate_scores, candidates.size - top_k)[candidates.size - top_k]
    return candidates[candidate_scores >= kth_largest]


def top_p_keep(scores: np.ndarray, probs: np.ndarray, top_p: float, mass_below: float = 0.0) -> np.ndarray:
    """HF's TopPLogitsWarper on candidates: positions (into scores f32[m], probs f64[m]) that survive.

    Sorted ascending, a candidate is removed when the cumulative probability up to and including it is
    <= 1 - top_p; the most probable one always stays (min_tokens_to_keep=1). `mass_below` is the total
    probability of tokens outside the candidates that all rank below them, where HF's cumulative sum starts.
    """
    ascending = np.argsort(scores)
    cumulative = mass_below + np.cumsum(probs[ascending])
    removed = cumulative <= 1.0 - top_p
    removed[-1] = False
    return ascending[~removed]


def greedy_choice(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distribution that puts everything on the highest score: (int64[1], f64[1])."""
    return np.array([scores.argmax()], dtype=np.int64), np.ones(1)


class Sampler:
    """Chooses next tokens for one sequence; holds the config and a numpy Generator seeded once.

    With seed=None the OS supplies the entropy; `seed_sequence.entropy` is then the int seed that
    reproduces the run."""

    def __init__(self, config: SamplingConfig, seed: int | np.random.SeedSequence | None = None) -> None:
        self.config = config
        self.seed_sequence = (
            seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        )
        self.rng = np.random.default_rng(self.seed_sequence)

    def spawn(self, n: int) -> list[Sampler]:
        """n independent child samplers, one per returned sequence. The children are fixed by this sampler's
        seed and by how many children it has spawned before, so a program that spawns the same way each run
        gets the same sequences each run."""
        return [Sampler(self.config, child) for child in self.seed_sequence.spawn(n)]

    def distribution(
        self, logits: np.ndarray, context_ids: np.ndarray | list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ids that can be drawn next and their probabilities: (int64[m], f64[m] summing to 1).

        logits: f32[vocab] for the next position; context_ids: the prompt and the output so far.
        """
        config = self.config
        scores = np.asarray(logits, dtype=np.float32)
        context = np.asarray(context_ids, dtype=np.int64)
        scores = apply_repetition_penalty(scores, context, config.repetition_penalty)
        if config.greedy:
            return greedy_choice(scores)
        if config.temperature != 1.0:
            penalised = scores
            with np.errstate(all="ignore"):
                scores = scores / np.float32(config.temperature)
            # A temperature so small that a score overflows (or rounds to 0 in f32) is the limit
            # temperature -> 0: greedy.
            if not np.isfinite(scores).all():
                return greedy_choice(penalised)

        vocab = scores.size
        if 0 < config.top_k < vocab:
            ids = top_k_ids(scores, config.top_k)
            mass_below = 0.0
            probs = softmax64(scores[ids])
        else:
            probs = softmax64(scores)
            if config.top_p == 1.0:
                return np.arange(vocab, dtype=np.int64), probs
            # Tokens under (1 - top_p) / vocab hold less than 1 - top_p in all and are the lowest ranked, so
            # top-p removes every one of them: only the rest needs sorting (a sort of 50257 takes ~0.8 ms).
            ids = np.flatnonzero(probs >= (1.0 - config.top_p) / vocab)
            probs = probs[ids]
            mass_below = 1.0 - probs.sum()
        if config.top_p < 1.0:
            keep = top_p_keep(scores[ids], probs, config.top_p, mass_below)
            ids, probs = ids[keep], probs[keep]
            probs = probs / probs.sum()
        return ids.astype(np.int64, copy=False), probs

    def next_token(self, logits: np.ndarray, context_ids: np.ndarray | list[int]) -> int:
        """The next token id; one uniform draw from the Generator per call, none when greedy."""
        ids, probs = self.distribution(logits, context_ids)
        if self.config.greedy:
            return int(ids[0])
        cdf = np.cumsum(probs)
        # side="right" never lands on a zero-probability id: its cdf equals its predecessor's.
        return int(ids[np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")])
