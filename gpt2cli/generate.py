"""`gpt2 generate`: prompt in, sampled continuations out, streamed as their text becomes printable."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpt2cli.errors import Gpt2Error
from gpt2cli.sampling import Sampler, SamplingConfig
from gpt2cli.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:  # the model's import loads the kernels: a command fails on its options before that
    from gpt2cli.model import GPT2Model, KVCache

# Sequences of one prompt decoded together: enough to share each pass over the weights, few enough that
# `-n 1000000` holds a bounded number of KV caches.
SEQUENCES_PER_BATCH = 16


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
        if self.seed is not None and self.seed < 0:
            raise Gpt2Error(f"--seed must be >= 0, got {self.seed}")


@dataclass
class Generation:
    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "eos", "length" or "context"
    seconds: float = 0.0


def prompt_ids(tokenizer: Tokenizer, prompt: str, settings: GenerationSettings, n_ctx: int) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do.

    A prompt that is not valid UTF-8 reaches Python with its bad bytes as lone surrogates
    (surrogateescape); it is refused, naming the first bad byte, rather than guessed at."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(prompt[e.start]) - 0xDC00
        offset = len(prompt[: e.start].encode("utf-8", errors="surrogateescape"))
        byte = f"0x{bad:02x}" if 0x80 <= bad <= 0xFF else f"U+{ord(prompt[e.start]):04X}"
        raise Gpt2Error(f"the prompt is not valid UTF-8 (byte {byte} at offset {offset})") from None
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
    batch: int = SEQUENCES_PER_BATCH,
) -> Iterator[Generation]:
    """Sample `num_return_sequences` continuations of `ids`, calling on_text(sequence, piece) as they grow.

    Up to `batch` sequences decode together, one batched step per token (model.decode_batch), so their pieces
    arrive interleaved and a sequence that stops leaves the batch. Each batch's sequences are yielded when the
    batch is done: memory grows with the batch, not with the number of sequences.
    """
    n_ctx = model.config.n_ctx
    budget = new_token_budget(len(ids), settings, n_ctx)
    wanted = settings.max_new_tokens if settings.max_new_tokens is not None else budget
    prompt_cache = model.new_cache(len(ids) + budget)
    t0 = time.perf_counter()
    prompt_logits = model.forward(ids, prompt_cache, logits_from=len(ids) - 1)  # [1, vocab]
    if on_prefill is not None:
        on_prefill(time.perf_counter() - t0)
    root = Sampler(settings.sampling, settings.seed)
    n_seq = settings.num_return_sequences
    for first in range(0, n_seq, batch):
        indices = range(first, min(first + batch, n_seq))
        # Successive spawns continue one sequence of children: the same samplers as spawn(n_seq) at once.
        samplers = dict(zip(indices, root.spawn(len(indices)), strict=True))
        last = first + batch >= n_seq  # the last batch may take the prompt's cache instead of a copy
        yield from _decode_together(
            model, tokenizer, ids, prompt_logits, prompt_cache, last, samplers, budget, wanted, on_text
        )


def _decode_together(
    model: GPT2Model,
    tokenizer: Tokenizer,
    ids: list[int],
    prompt_logits: np.ndarray,
    prompt_cache: KVCache,
    take_prompt_cache: bool,
    samplers: dict[int, Sampler],
    budget: int,
    wanted: int,
    on_text: Callable[[int, str], None] | None,
) -> list[Generation]:
    """Continue the prompt once per sampler, all sequences in one batched decoding step per token."""
    # The prompt's keys and values are computed once and copied into each sequence's cache.
    caches = {index: prompt_cache.fork() for index in list(samplers)[take_prompt_cache:]}
    if take_prompt_cache:
        caches[next(iter(samplers))] = prompt_cache
    results = {index: Generation(index, list(ids)) for index in samplers}
    decoders = {index: StreamDecoder(tokenizer) for index in samplers}
    contexts = {index: np.array(ids + [0] * budget, dtype=np.int64) for index in samplers}
    active = list(samplers)
    logits = np.repeat(prompt_logits, len(active), axis=0)  # [len(active), vocab]
    t0 = time.perf_counter()

    def emit(index: int, piece: str) -> None:
        results[index].text += piece
        if on_text is not None and piece:
            on_text(index, piece)

    for step in range(budget):
        still_active, tokens = [], []
        for row, index in enumerate(active):
            gen = results[index]
            token = samplers[index].next_token(logits[row], contexts[index][: len(ids) + step])
            if token == tokenizer.eos_id:
                gen.finish_reason = "eos"
                gen.seconds = time.perf_counter() - t0
                continue
            gen.token_ids.append(token)
            contexts[index][len(ids) + step] = token
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
    for index in results:
        emit(index, decoders[index].flush())
    return list(results.values())
