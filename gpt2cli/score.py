"""`gpt2 score`: how surprising each token, word and text is to the model.

Each text is scored on its own, starting after `<|endoftext|>` (as GPT-2 saw document starts in training) so
that its first token is scored too; without it the first token has nothing to be predicted from. Texts are
packed into batches evaluated by one `forward_packed` call, each attending only to itself.

Log-probabilities are natural logs (as torch's log_softmax); surprisal and entropy are in bits, as in
psycholinguistics. A word is a whitespace-delimited piece of the text, and its score is the sum over the
tokens in it (minicons' word scores); a token of whitespace only belongs to the word after it (GPT-2 writes
the space before a word into the word's first token), or to the last word when no word follows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gpt2cli.errors import Gpt2Error
from gpt2cli.kernels import ops
from gpt2cli.model import GPT2Model
from gpt2cli.texts import BATCH_TOKENS, Batch, evaluate_in_batches, tokenize_texts
from gpt2cli.tokenizer import Tokenizer

LN2 = math.log(2)
# Rows of hidden states whose logits are computed together, a slice of HEAD_COLUMNS tokens of the
# vocabulary at a time when the head multiplies int8 activations: [512, 2048] f32 is 4 MB, where all of a
# row's 50257 logits were 103 MB, allocated (page faults) and read back from memory by the statistics. On
# float weights (BLAS) the head stays one product: 25 slices took ~20% more CPU time with numpy's BLAS on
# two threads (its threads' waits between calls).
HEAD_ROWS = 512
HEAD_COLUMNS = 2048


@dataclass(frozen=True)
class TextScore:
    index: int  # the text's position in the input (0-based; line index + 1 in messages)
    text: str
    ids: np.ndarray  # int64 [m]
    log_prob: np.ndarray  # f64 [m], nats; NaN for a token not scored (the first without <|endoftext|>)
    entropy: np.ndarray  # f64 [m], nats: of the distribution that predicted each token
    rank: np.ndarray  # int64 [m]: 0 if it was the most likely token; -1 if not scored

    @property
    def scored(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.log_prob)))

    @property
    def total_log_prob(self) -> float:
        return float(np.nansum(self.log_prob))


def next_token_stats(
    model: GPT2Model, hidden: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probability, entropy, rank) of each target [m] from the final hidden states [m, e] before it.

    The rank counts strictly larger logits (0 for the most likely token). The head runs a slice of the
    vocabulary at a time, folded into running statistics (ops.fold_next_token_stats); the rank compares
    with the target's logit computed first, by the same kernels (the diagonal of the product with the
    targets' rows).
    """
    m = len(targets)
    log_prob, entropy = np.empty(m), np.empty(m)
    rank = np.empty(m, dtype=np.int64)
    output = model.w.output
    for r0 in range(0, m, HEAD_ROWS):
        rows = slice(r0, min(r0 + HEAD_ROWS, m))
        states, wanted = hidden[rows], targets[rows]  # [r, e], [r]
        rank_logits = np.ascontiguousarray(np.diagonal(model.linear(states, output.row_subset(wanted))))
        r = len(wanted)
        top = np.full(r, -np.inf, dtype=np.float32)
        total, moment = np.zeros(r), np.zeros(r)
        target_logit = np.empty(r, dtype=np.float32)
        above = np.zeros(r, dtype=np.int64)
        int8 = not model.exact and output.kernels.int8_matmul is not None
        columns = HEAD_COLUMNS if int8 else output.rows
        for v0 in range(0, output.rows, columns):
            logits = model.linear(states, output.row_subset(slice(v0, v0 + columns)))  # [r, c]
            stats = (top, total, moment, target_logit, above)
            if ops.fold_next_token_stats(logits, v0, wanted, rank_logits, *stats):
                raise Gpt2Error("the model's logits are not finite")
        log_total = np.log(total)
        log_prob[rows] = target_logit - top - log_total
        entropy[rows] = log_total - moment / total
        rank[rows] = above
    return log_prob, entropy, rank


def score_texts(
    model: GPT2Model,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    first_index: int = 0,
    bos: bool = True,
    truncate: bool = False,
    batch_tokens: int = BATCH_TOKENS,
) -> Iterator[TextScore]:
    """Scores of `texts` (texts[i] has index first_index + i), in order, evaluated in packed batches.

    Raises Gpt2Error for a text longer than the context unless `truncate` (then its first tokens count).
    """
    eot = np.array([tokenizer.eos_id], dtype=np.int64)
    max_tokens = model.config.n_ctx + (0 if bos else 1)  # the last token is only a target
    ids = tokenize_texts(texts, tokenizer, max_tokens, first_line=first_index + 1, truncate=truncate)
    # Text i is scored by running inputs[i] and comparing with targets[i], position by position.
    inputs = [np.concatenate([eot, t[:-1]]) if bos and len(t) else t[:-1] for t in ids]
    targets = [t if bos else t[1:] for t in ids]

    def evaluate(batch: Batch) -> list[tuple[np.ndarray, ...]]:
        hidden = model.forward_packed(batch.ids, batch.lengths)  # [n, e]
        stats = next_token_stats(model, hidden, np.concatenate([targets[i] for i in batch.texts]))
        bounds = batch.bounds
        return [tuple(s[b:e] for s in stats) for b, e in zip(bounds[:-1], bounds[1:], strict=True)]

    for i, stats in evaluate_in_batches(inputs, evaluate, batch_tokens):
        yield _text_score(first_index + i, texts[i], ids[i], bos, stats)


def _text_score(index: int, text: str, ids: np.ndarray, bos: bool, stats: tuple | None) -> TextScore:
    """Spread the stats of the scored positions over all the text's tokens, NaN / -1 where unscored."""
    log_prob, entropy = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
    rank = np.full(len(ids), -1, dtype=np.int64)
    if stats is not None:
        first = 0 if bos else 1
        log_prob[first:], entropy[first:], rank[first:] = stats
    return TextScore(index, text, ids, log_prob, entropy, rank)


@dataclass(frozen=True)
class WordScore:
    word: str  # as written in the text
    tokens: int
    log_prob: float  # nats: sum over its scored tokens


def word_scores(score: TextScore, tokenizer: Tokenizer) -> list[WordScore]:
    """The text's whitespace-delimited words with their tokens' summed log-probabilities; every token of the
    text counts in exactly one word (whitespace goes with the next word), so the words sum to the text."""
    text = score.text
    words = list(re.finditer(r"\S+", text))
    if not words:
        return []
    char_bytes = np.cumsum([0] + [len(ch.encode("utf-8")) for ch in text])  # [len(text) + 1]
    word_end = char_bytes[[w.end() for w in words]]  # byte offsets
    token_lengths = np.array([len(tokenizer.token_bytes(int(t))) for t in score.ids], dtype=np.int64)
    token_begin = np.cumsum(token_lengths) - token_lengths
    # The first word ending after a token begins holds the token's first non-space byte or follows it.
    word_of_token = np.minimum(np.searchsorted(word_end, token_begin, side="right"), len(words) - 1)
    out = []
    for w, match in enumerate(words):
        mine = word_of_token == w
        if mine.any():
            out.append(WordScore(match.group(), int(mine.sum()), float(np.nansum(score.log_prob[mine]))))
    return out


def _bits(nats: float) -> float:
    return -nats / LN2


def text_row(score: TextScore) -> dict:
    scored = score.scored
    total = score.total_log_prob
    return {
        "index": score.index,
        "tokens": len(score.ids),
        "scored": scored,
        "logprob": total,
        "surprisal_bits": _bits(total / scored) if scored else math.nan,
        "ppl": math.exp(-total / scored) if scored else math.nan,
        "text": score.text,
    }


def token_rows(score: TextScore, tokenizer: Tokenizer) -> Iterator[dict]:
    for position, token in enumerate(score.ids):
        log_prob = float(score.log_prob[position])
        yield {
            "index": score.index,
            "position": position,
            "token_id": int(token),
            "token": tokenizer.token_bytes(int(token)).decode("utf-8", errors="backslashreplace"),
            "logprob": log_prob,
            "surprisal_bits": _bits(log_prob),
            "entropy_bits": float(score.entropy[position]) / LN2,
            "rank": int(score.rank[position]) if score.rank[position] >= 0 else None,
        }


def word_rows(score: TextScore, tokenizer: Tokenizer) -> Iterator[dict]:
    for position, word in enumerate(word_scores(score, tokenizer)):
        yield {
            "index": score.index,
            "word_index": position,
            "word": word.word,
            "tokens": word.tokens,
            "logprob": word.log_prob,
            "surprisal_bits": _bits(word.log_prob),
        }
