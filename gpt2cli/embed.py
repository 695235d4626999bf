"""`gpt2 embed`: hidden states of a layer per text, pooled over its tokens, as features for probing.

Layers count as transformers' `hidden_states`: 0 the token plus position embeddings, i the output of block
i, and the last (n_layer, the default) the final block's output after the final LayerNorm, which is
`GPT2Model`'s `last_hidden_state`. Texts are embedded alone (no <|endoftext|> before them, as
`GPT2Model(**tokenizer(text))` runs), in packed batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from gpt2cli.errors import Gpt2Error
from gpt2cli.model import GPT2Model
from gpt2cli.texts import BATCH_TOKENS, Batch, evaluate_in_batches, tokenize_texts
from gpt2cli.tokenizer import Tokenizer

POOLS = ("mean", "last", "none")


def embed_texts(
    model: GPT2Model,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    layer: int | None = None,
    pool: str = "mean",
    first_index: int = 0,
    truncate: bool = False,
    batch_tokens: int = BATCH_TOKENS,
) -> Iterator[np.ndarray]:
    """Per text, in order: f32 [e] (mean or last token; NaN for a text without tokens) or [m, e] (none)."""
    if pool not in POOLS:
        raise Gpt2Error(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    c = model.config
    if layer is not None and not 0 <= layer <= c.n_layer:  # checked before any work
        raise Gpt2Error(f"--layer must be between 0 and {c.n_layer}, got {layer}")
    ids = tokenize_texts(texts, tokenizer, c.n_ctx, first_line=first_index + 1, truncate=truncate)

    def evaluate(batch: Batch) -> list[np.ndarray]:
        hidden = model.forward_packed(batch.ids, batch.lengths, layer)  # [n, e]
        bounds = batch.bounds
        return [pooled(hidden[b:e], pool) for b, e in zip(bounds[:-1], bounds[1:], strict=True)]

    for _, states in evaluate_in_batches(ids, evaluate, batch_tokens):
        if states is None:
            states = (
                np.zeros((0, c.n_embd), np.float32)
                if pool == "none"
                else np.full(c.n_embd, np.nan, np.float32)
            )
        yield states


def pooled(states: np.ndarray, pool: str) -> np.ndarray:  # [m, e] -> [e] (mean, last) or [m, e] (none)
    if pool == "mean":
        return states.mean(axis=0, dtype=np.float64).astype(np.float32)
    return states[-1].copy() if pool == "last" else states.copy()


def check_output_path(path: str, pool: str) -> None:
    """`-o` must say what it will hold: .npy for one vector per text, .npz for one array per text."""
    suffix = ".npz" if pool == "none" else ".npy"
    if not path.endswith(suffix):
        raise Gpt2Error(f"-o for --pool {pool} must be a {suffix} file, got {path!r}")


def save_embeddings(
    path: str, embeddings: Iterable[np.ndarray], pool: str, n_embd: int, first_index: int = 0
) -> int:
    """Write f32 [texts, e] to a .npy, or with pool "none" one [m, e] array per text, named by the text's
    index, to a .npz; returns the number of texts."""
    check_output_path(path, pool)
    if pool == "none":
        arrays = {str(first_index + i): states for i, states in enumerate(embeddings)}
        np.savez(path, **arrays)
        return len(arrays)
    vectors = list(embeddings)
    np.save(path, np.stack(vectors) if vectors else np.zeros((0, n_embd), np.float32))
    return len(vectors)


def embedding_rows(embeddings: Iterable[np.ndarray], first_index: int = 0) -> Iterator[dict]:
    """JSON-ready rows; a text without tokens has no mean or last state (null) and an empty list of states."""
    for i, states in enumerate(embeddings):
        vector = None if states.ndim == 1 and np.isnan(states).all() else states.tolist()
        yield {"index": first_index + i, "embedding": vector}
