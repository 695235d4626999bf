"""Sampling against HF transformers' semantics: the warpers' math, ties, reproducibility, validation."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2cli.errors import Gpt2Error
from gpt2cli.sampling import Sampler, SamplingConfig, apply_repetition_penalty

GPT2_VOCAB = 50257


# A numpy transcription of transformers/generation/logits_process.py (RepetitionPenaltyLogitsProcessor,
# TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), float32 throughout like HF on torch.
def hf_repetition_penalty(input_ids: np.ndarray, scores: np.ndarray, penalty: float) -> np.ndarray:
    score = np.take_along_axis(scores, input_ids, 1)
    score = np.where(score < 0, score * np.float32(penalty), score / np.float32(penalty))
    scores_processed = scores.copy()
    np.put_along_axis(scores_processed, input_ids, score, 1)
    return scores_processed


def hf_top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    top_k = min(top_k, scores.shape[-1])
    kth = np.sort(scores, axis=-1)[..., ::-1][..., top_k - 1, None]
    return np.where(scores < kth, np.float32(-np.inf), scores)


def hf_top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    sorted_indices = np.argsort(scores, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(scores, sorted_indices, -1)
    cumulative_probs = np.cumsum(softmax32(sorted_logits), axis=-1, dtype=np.float32)
    sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
    sorted_indices_to_remove[..., -1:] = False
    indices_to_remove = np.zeros_like(sorted_indices_to_remove)
    np.put_along_axis(indices_to_remove, sorted_indices, sorted_indices_to_remove, -1)
    return np.where(indices_to_remove, np.float32(-np.inf), scores)


def softmax32(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hf_probs(logits: np.ndarray, context_ids: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """What HF's `generate(do_sample=True)` feeds torch.multinomial, as f32[vocab]."""
    scores = logits[None, :]
    if config.repetition_penalty != 1.0:
        scores = hf_repetition_penalty(context_ids[None, :], scores, config.repetition_penalty)
    if config.temperature != 1.0:
        scores = scores / np.float32(config.temperature)
    if config.top_k != 0:
        scores = hf_top_k(scores, config.top_k)
    if config.top_p < 1.0:
        scores = hf_top_p(scores, config.top_p)
    return softmax32(scores)[0]


def full_distribution(sampler: Sampler, logits: np.ndarray, context_ids: np.ndarray) -> np.ndarray:
    ids, probs = sampler.distribution(logits, context_ids)
    full = np.zeros(logits.size)
    full[ids] = probs
    return full


def random_logits(rng: np.random.Generator, vocab: int, scale: float = 3.0) -> np.ndarray:
    return (rng.standard_normal(vocab) * scale).astype(np.float32)


@pytest.mark.parametrize("case", range(40))
def test_distribution_matches_hf_transcription(case: int) -> None:
    rng = np.random.default_rng(case)
    vocab = GPT2_VOCAB if case % 10 == 0 else int(rng.integers(2, 3000))
    config = SamplingConfig(
        temperature=float(rng.choice([1.0, rng.uniform(0.2, 2.0)])),
        top_k=int(rng.choice([0, 1, 5, 50, vocab, vocab + 7])),
        top_p=float(rng.choice([1.0, rng.uniform(0.05, 1.0)])),
        repetition_penalty=float(rng.choice([1.0, rng.uniform(0.5, 2.0)])),
    )
    logits = random_logits(rng, vocab, scale=float(rng.uniform(0.5, 5.0)))
    context_ids = rng.integers(0, vocab, size=int(rng.integers(0, 64)))
    ours = full_distribution(Sampler(config), logits, context_ids)
    expected = hf_probs(logits, context_ids, config)
    np.testing.assert_array_equal(ours > 0, expected > 0, err_msg=str(config))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-7, err_msg=str(config))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_full_vocabulary_top_p_matches_hf_transcription(top_p: float, temperature: float) -> None:
    # top_k=0 takes the path that sorts only the tokens top-p might keep.
    rng = np.random.default_rng(int(top_p * 100 + temperature * 10))
    logits = rng.gumbel(size=GPT2_VOCAB).astype(np.float32)
    config = SamplingConfig(temperature=temperature, top_k=0, top_p=top_p, repetition_penalty=1.2)
    context_ids = rng.integers(0, GPT2_VOCAB, size=200)
    ours = full_distribution(Sampler(config), logits, context_ids)
    expected = hf_probs(logits, context_ids, config)
    assert 1 < np.count_nonzero(ours) < GPT2_VOCAB
    np.testing.assert_array_equal(ours > 0, expected > 0)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-7)


def test_greedy_is_argmax_and_draws_nothing() -> None:
    rng = np.random.default_rng(1)
    sampler = Sampler(SamplingConfig(temperature=0.0), seed=5)
    state = sampler.rng.bit_generator.state
    for _ in range(20):
        logits = random_logits(rng, 1000)
        assert sampler.next_token(logits, []) == int(np.argmax(logits))
    assert sampler.rng.bit_generator.state == state


def test_greedy_ignores_top_k_and_top_p() -> None:
    logits = np.array([0.0, 5.0, 1.0, 4.9], dtype=np.float32)
    sampler = Sampler(SamplingConfig(temperature=0.0, top_k=1, top_p=0.01))
    assert sampler.distribution(logits, [])[0].tolist() == [1]


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores() -> None:
    logits = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    penalised = apply_repetition_penalty(logits, np.array([0, 2, 3, 3, 3, 5]), 2.0)
    np.testing.assert_array_equal(penalised, np.array([-4.0, -1.0, 0.0, 0.5, 2.0, 1.5], dtype=np.float32))
    rewarded = apply_repetition_penalty(logits, np.array([0, 4]), 0.5)
    np.testing.assert_array_equal(rewarded, np.array([-1.0, -1.0, 0.0, 1.0, 4.0, 3.0], dtype=np.float32))
    assert logits[0] == -2.0, "the caller's logits are left alone"


def test_repetition_penalty_applies_in_greedy_mode() -> None:
    logits = np.array([0.0, 3.0, 2.0], dtype=np.float32)
    sampler = Sampler(SamplingConfig(temperature=0.0, repetition_penalty=2.0))
    assert sampler.next_token(logits, [1, 1]) == 2  # 3 / 2 = 1.5 < 2, penalised once
    assert sampler.next_token(logits, np.array([], dtype=np.int64)) == 1


def test_top_k_keeps_ties_at_the_kth_value() -> None:
    logits = np.array([1.0, 3.0, 3.0, 0.0, 3.0, 2.0], dtype=np.float32)
    ids, probs = Sampler(SamplingConfig(top_k=2)).distribution(logits, [])
    assert sorted(ids.tolist()) == [1, 2, 4]
    np.testing.assert_allclose(probs, 1 / 3)
    ids, _ = Sampler(SamplingConfig(top_k=4)).distribution(logits, [])
    assert sorted(ids.tolist()) == [1, 2, 4, 5]
    ties_below_the_top = np.array([1.0, 3.0, 2.0, 2.0, 0.0, 2.0], dtype=np.float32)
    ids, _ = Sampler(SamplingConfig(top_k=2)).distribution(ties_below_the_top, [])
    assert sorted(ids.tolist()) == [1, 2, 3, 5]


@pytest.mark.parametrize("top_k", [0, 50])
@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.01, [0]), (0.5, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3])]
)
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(top_k: int, top_p: float, kept: list[int]) -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    ids, probs = Sampler(SamplingConfig(top_k=top_k, top_p=top_p)).distribution(logits, [])
    assert sorted(ids.tolist()) == kept
    expected = np.array([0.5, 0.3, 0.15, 0.05])[kept]
    np.testing.assert_allclose(probs[np.argsort(ids)], expected / expected.sum(), rtol=1e-6)


def test_top_p_keeps_one_token_even_when_it_alone_exceeds_p() -> None:
    logits = np.zeros(GPT2_VOCAB, dtype=np.float32)
    logits[123] = 20.0
    ids, probs = Sampler(SamplingConfig(top_k=0, top_p=1e-9)).distribution(logits, [])
    assert ids.tolist() == [123]
    assert probs.tolist() == [1.0]


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 3.0])
def test_temperature_divides_the_logits(temperature: float) -> None:
    logits = random_logits(np.random.default_rng(2), 300)
    ids, probs = Sampler(SamplingConfig(temperature=temperature, top_k=0)).distribution(logits, [])
    assert ids.tolist() == list(range(300))
    scaled = logits.astype(np.float64) / temperature
    expected = np.exp(scaled - scaled.max())
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-5)


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    rng = np.random.default_rng(3)
    steps = [(random_logits(rng, 2000, scale=1.0), rng.integers(0, 2000, 10)) for _ in range(50)]
    config = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3)

    def run(seed: int) -> list[int]:
        sampler = Sampler(config, seed=seed)
        return [sampler.next_token(logits, context) for logits, context in steps]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_an_unseeded_sampler_reports_the_seed_that_reproduces_it() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    config = SamplingConfig(top_k=0)
    unseeded = Sampler(config)
    reseeded = Sampler(config, seed=unseeded.seed_sequence.entropy)
    assert [unseeded.next_token(logits, []) for _ in range(20)] == [
        reseeded.next_token(logits, []) for _ in range(20)
    ]


def test_spawned_samplers_are_reproducible_and_independent() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    config = SamplingConfig(top_k=0)

    def sequences(seed: int, n: int) -> list[list[int]]:
        return [[child.next_token(logits, []) for _ in range(30)] for child in Sampler(config, seed).spawn(n)]

    first = sequences(7, 4)
    assert first == sequences(7, 4)
    assert len({tuple(seq) for seq in first}) == 4
    assert sequences(7, 2) == first[:2], "child i does not depend on how many siblings it has"


def test_top_k_two_draws_only_those_two_ids() -> None:
    logits = random_logits(np.random.default_rng(4), GPT2_VOCAB, scale=0.5)
    top_two = set(np.argsort(logits)[-2:].tolist())
    sampler = Sampler(SamplingConfig(top_k=2), seed=0)
    drawn = [sampler.next_token(logits, []) for _ in range(300)]
    assert set(drawn) == top_two


def test_draw_frequencies_follow_the_distribution() -> None:
    probs = np.array([0.05, 0.6, 0.0, 0.25, 0.1])
    with np.errstate(divide="ignore"):
        logits = np.log(probs).astype(np.float32)
    sampler = Sampler(SamplingConfig(top_k=0), seed=11)
    counts = np.bincount([sampler.next_token(logits, []) for _ in range(20000)], minlength=5)
    assert counts[2] == 0
    np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.015)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
    ],
)
def test_out_of_range_settings_raise_one_line_errors(field: str, value: float) -> None:
    with pytest.raises(Gpt2Error, match=field) as raised:
        SamplingConfig(**{field: value})
    assert "\n" not in str(raised.value)


def test_defaults_are_hf_defaults() -> None:
    assert SamplingConfig() == SamplingConfig(temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)


@pytest.mark.parametrize("penalty", [1e-40, 1e-50, 1e38, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-38])
def test_extreme_penalties_and_temperatures_stay_finite(penalty: float, temperature: float) -> None:
    # Was: "zero-size array to reduction operation maximum" and IndexError under --top-k 0 / --top-p.
    logits = np.array([-3.0, 0.0, 2.0, 5.0, 1.0], dtype=np.float32)
    for top_k, top_p in ((50, 1.0), (0, 1.0), (0, 0.9), (2, 0.5)):
        config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
        ids, probs = Sampler(config, seed=1).distribution(logits, [0, 1, 2, 3])
        assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)
        assert 0 <= Sampler(config, seed=1).next_token(logits, [0, 1, 2, 3]) < logits.size


def test_tiny_temperature_is_greedy() -> None:
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    for temperature in (1e-38, 1e-45, 1e-300):
        sampler = Sampler(SamplingConfig(temperature=temperature, top_k=0), seed=2)
        assert [sampler.next_token(logits, []) for _ in range(10)] == [1] * 10
