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
    from gpt2cli.model import GPT2Model


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
) -> Iterator[Generation]:
    """Sample `num_return_sequences` continuations of `ids`, calling on_text(sequence, piece) as they grow,
    and yield each when it is complete: memory does not grow with the number of sequences."""
    n_ctx = model.config.n_ctx
    budget = new_token_budget(len(ids), settings, n_ctx)
    wanted = settings.max_new_tokens if settings.max_new_tokens is not None else budget
    cache = model.new_cache(len(ids) + budget)
    t0 = time.perf_counter()
    prompt_logits = model.forward(ids, cache, logits_from=len(ids) - 1)[0]
    if on_prefill is not None:
        on_prefill(time.perf_counter() - t0)
    root = Sampler(settings.sampling, settings.seed)
    for index in range(settings.num_return_sequences):
        # Spawning one child at a time gives the children spawn(n) would, without n of them at once.
        [sampler] = root.spawn(1)
        gen = Generation(index, list(ids))
        decoder = StreamDecoder(tokenizer)
        cache.length = len(ids)  # the prompt's keys and values are shared by every sequence
        context = np.array(ids + [0] * budget, dtype=np.int64)
        logits = prompt_logits
        t0 = time.perf_counter()
        for step in range(budget):
            token = sampler.next_token(logits, context[: len(ids) + step])
            if token == tokenizer.eos_id:
                gen.finish_reason = "eos"
                break
            gen.token_ids.append(token)
            context[len(ids) + step] = token
            piece = decoder.push(token)
            gen.text += piece
            if on_text is not None and piece:
                on_text(index, piece)
            if step + 1 < budget:
                logits = model.forward([token], cache)[0]
        else:
            gen.finish_reason = "context" if budget < wanted else "length"
        tail = decoder.flush()
        gen.text += tail
        if on_text is not None and tail:
            on_text(index, tail)
        gen.seconds = time.perf_counter() - t0
        yield gen
