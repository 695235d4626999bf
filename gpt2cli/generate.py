"""`gpt2 generate`: prompt in, sampled continuations out, streamed as their text becomes printable."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gpt2cli.errors import Gpt2Error
from gpt2cli.model import GPT2Model
from gpt2cli.sampling import Sampler, SamplingConfig
from gpt2cli.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class GenerationSettings:
    """HF's meanings: max_new_tokens counts generated tokens and wins over max_length (prompt + generated)."""

    max_new_tokens: int | None = 50
    max_length: int | None = None
    num_return_sequences: int = 1
    seed: int | None = None
    truncate_prompt: bool = False  # keep the prompt's tail when it does not fit the context
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self) -> None:  # SamplingConfig validates itself on construction
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise Gpt2Error(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise Gpt2Error(f"--max-length must be >= 1, got {self.max_length}")
        if self.num_return_sequences < 1:
            raise Gpt2Error(f"--num-return-sequences must be >= 1, got {self.num_return_sequences}")


@dataclass
class Generation:
    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "eos", "length" or "context"
    seconds: float = 0.0


def prompt_ids(tokenizer: Tokenizer, prompt: str, settings: GenerationSettings, n_ctx: int) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    if len(ids) < n_ctx:
        return ids
    if not settings.truncate_prompt:
        raise Gpt2Error(
            f"the prompt is {len(ids)} tokens, the model's context is {n_ctx}: "
            "shorten it or pass --truncate-prompt to keep its tail"
        )
    room = min(settings.max_new_tokens or 0, n_ctx // 2)
    return ids[-(n_ctx - max(room, 1)) :]


def new_token_budget(n_prompt: int, settings: GenerationSettings, n_ctx: int) -> int:
    if settings.max_new_tokens is not None:
        wanted = settings.max_new_tokens
    elif settings.max_length is not None:
        wanted = max(0, settings.max_length - n_prompt)
    else:
        wanted = n_ctx
    return min(wanted, n_ctx - n_prompt)


def generate(
    model: GPT2Model,
    tokenizer: Tokenizer,
    ids: list[int],
    settings: GenerationSettings,
    on_text: Callable[[int, str], None] | None = None,
    on_prefill: Callable[[float], None] | None = None,
) -> list[Generation]:
    """Sample `num_return_sequences` continuations of `ids`, calling on_text(sequence, piece) as they grow.

    The sequences decode together, one batched step per token (model.decode_batch), so their pieces
    arrive interleaved; a sequence that stops leaves the batch.
    """
    n_ctx = model.config.n_ctx
    budget = new_token_budget(len(ids), settings, n_ctx)
    wanted = settings.max_new_tokens if settings.max_new_tokens is not None else budget
    cache = model.new_cache(len(ids) + budget)
    t0 = time.perf_counter()
    prompt_logits = model.forward(ids, cache, logits_from=len(ids) - 1)  # [1, vocab]
    if on_prefill is not None:
        on_prefill(time.perf_counter() - t0)
    n_seq = settings.num_return_sequences
    samplers = Sampler(settings.sampling, settings.seed).spawn(n_seq)
    # The prompt's keys and values are computed once and copied into each sequence's cache.
    caches = [cache] + [cache.fork() for _ in range(n_seq - 1)]
    results = [Generation(index, list(ids)) for index in range(n_seq)]
    decoders = [StreamDecoder(tokenizer) for _ in range(n_seq)]
    contexts = np.array([ids + [0] * budget] * n_seq, dtype=np.int64)  # [n_seq, prompt + budget]
    active = list(range(n_seq))
    logits = np.repeat(prompt_logits, n_seq, axis=0)  # [len(active), vocab]
    t0 = time.perf_counter()

    def emit(index: int, piece: str) -> None:
        results[index].text += piece
        if on_text is not None and piece:
            on_text(index, piece)

    for step in range(budget):
        still_active, tokens = [], []
        for row, index in enumerate(active):
            gen = results[index]
            token = samplers[index].next_token(logits[row], contexts[index, : len(ids) + step])
            if token == tokenizer.eos_id:
                gen.finish_reason = "eos"
                gen.seconds = time.perf_counter() - t0
                continue
            gen.token_ids.append(token)
            contexts[index, len(ids) + step] = token
            emit(index, decoders[index].push(token))
            still_active.append(index)
            tokens.append(token)
        active = still_active
        if not active or step + 1 == budget:
            break
        logits = model.decode_batch(tokens, [caches[index] for index in active])
    for index in active:
        results[index].finish_reason = "context" if budget < wanted else "length"
        results[index].seconds = time.perf_counter() - t0
    for index in range(n_seq):
        emit(index, decoders[index].flush())
    return results
