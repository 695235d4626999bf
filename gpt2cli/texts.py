"""Many short texts for `gpt2 score` and `gpt2 embed`: reading them, a shard of them, their tokens, and
packing them into batches that one forward pass evaluates."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO, TypeVar

import numpy as np

from gpt2cli.errors import Gpt2Error
from gpt2cli.tokenizer import Tokenizer

# Input tokens per forward pass: enough rows for BLAS to run near its peak and to amortize dequantizing the
# weights once per pass, few enough that the batch's activations stay small.
BATCH_TOKENS = 1024
Result = TypeVar("Result")


@dataclass(frozen=True, order=True)
class Shard:
    """Part `index` (1-based) of `count` equal contiguous parts: shards in order concatenate to one run."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, spec: str | None) -> Shard:
        if spec is None:
            return cls()
        k, sep, n = spec.partition("/")
        if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            raise Gpt2Error(f"--shard must be K/N with 1 <= K <= N, got {spec!r}")
        return cls(int(k), int(n))

    def range(self, total: int) -> range:
        """Which of `total` items (texts or windows) this shard takes."""
        return range((self.index - 1) * total // self.count, self.index * total // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE_RUN = Shard()  # every item: the default


def decode_utf8(data: bytes, name: str, errors: str = "strict") -> str:
    """`data` as text: invalid UTF-8 fails naming its line and byte ("strict") or reads as U+FFFD."""
    if errors not in ("strict", "replace"):
        raise Gpt2Error(f"--errors must be strict or replace, got {errors!r}")
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise Gpt2Error(
            f"{name}: invalid UTF-8 on line {line} at byte {e.start} "
            f"(0x{data[e.start]:02x}); --errors replace reads it as U+FFFD"
        ) from None


def read_texts(path: str, *, jsonl: bool = False, errors: str = "strict") -> list[str]:
    """One text per line of a UTF-8 file (`-` for stdin), CRLF read as LF; with `jsonl` each line is a JSON
    object whose "text" field is the text. An empty line is an empty text; a final newline ends the last
    line rather than starting an empty one."""
    name = "stdin" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as f:
            data = f.read()
    text = decode_utf8(data, name, errors)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not jsonl:
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise Gpt2Error(f"{name}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise Gpt2Error(f'{name}: line {number} has no string field "text"')
        texts.append(record["text"])
    return texts


def tokenize_texts(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    max_tokens: int,
    *,
    first_line: int = 1,
    truncate: bool = False,
) -> list[np.ndarray]:
    """Token ids (int64 [m]) of each text; a text of more than `max_tokens` is an error naming its line
    (texts[i] is line first_line + i), or with `truncate` keeps its first `max_tokens`."""
    ids = []
    for i, text in enumerate(texts):
        tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if len(tokens) > max_tokens:
            if not truncate:
                raise Gpt2Error(
                    f"line {first_line + i}: {len(tokens)} tokens, more than the {max_tokens} that fit the "
                    f"model's context; --truncate keeps the first {max_tokens}"
                )
            tokens = tokens[:max_tokens]
        ids.append(tokens)
    return ids


@dataclass(frozen=True)
class Batch:
    """Texts packed back to back for `GPT2Model.forward_packed`."""

    texts: list[int]  # which inputs, as indices into the list given to `batches`
    ids: np.ndarray  # int64 [n]: their tokens back to back
    lengths: np.ndarray  # int64 [t]: tokens of each

    @property
    def bounds(self) -> np.ndarray:  # int64 [t + 1]: text t is ids[bounds[t]:bounds[t + 1]]
        return np.concatenate([[0], np.cumsum(self.lengths)])


def batches(inputs: Sequence[np.ndarray], batch_tokens: int = BATCH_TOKENS) -> Iterator[Batch]:
    """Consecutive non-empty inputs packed into batches of about `batch_tokens` (a longer input alone)."""
    pending: list[int] = []
    size = 0
    for i, ids in enumerate(inputs):
        if len(ids) == 0:
            continue
        if pending and size + len(ids) > batch_tokens:
            yield _batch(inputs, pending)
            pending, size = [], 0
        pending.append(i)
        size += len(ids)
    if pending:
        yield _batch(inputs, pending)


def _batch(inputs: Sequence[np.ndarray], members: list[int]) -> Batch:
    return Batch(
        members,
        np.concatenate([inputs[i] for i in members]),
        np.array([len(inputs[i]) for i in members], dtype=np.int64),
    )


def evaluate_in_batches(
    inputs: Sequence[np.ndarray],
    evaluate: Callable[[Batch], Sequence[Result]],
    batch_tokens: int = BATCH_TOKENS,
) -> Iterator[tuple[int, Result | None]]:
    """(i, result) for every input in order: `evaluate` gets packed batches and returns one result per
    member; an empty input has nothing to evaluate and gets None."""
    done = 0
    for batch in batches(inputs, batch_tokens):
        for i, result in zip(batch.texts, evaluate(batch), strict=True):
            yield from ((j, None) for j in range(done, i))
            yield i, result
            done = i + 1
    yield from ((j, None) for j in range(done, len(inputs)))


def write_rows(rows: Iterable[dict], out: TextIO, as_json: bool = False) -> None:
    """Rows as TSV with a header line (quoted where a field holds a tab, newline or quote, as pandas reads
    it; NaN and None empty) or as JSON lines (NaN and None null)."""
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    for i, row in enumerate(rows):
        values = [None if isinstance(v, float) and math.isnan(v) else v for v in row.values()]
        if as_json:
            out.write(json.dumps(dict(zip(row, values, strict=True)), ensure_ascii=False) + "\n")
            continue
        if i == 0:
            writer.writerow(row)
        writer.writerow(["" if v is None else v for v in values])
