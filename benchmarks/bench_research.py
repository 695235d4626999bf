"""`gpt2 score` and `gpt2 embed` next to transformers on CPU torch: same weights, same sentences (by hand).

Both compute, for each of N English-like sentences (~20 tokens, generated here from a fixed grammar), the
log-probability of every token after <|endoftext|> (score), or the mean of the last hidden state (embed).
transformers runs GPT2LMHeadModel / GPT2Model in f32 with torch on `--threads` threads, in batches of
`--batch` sentences sorted by length (padding kept small, in its favour) and pre-tokenized (tokenization not
timed); ours is `score_texts` / `embed_texts` from the text (tokenization timed). The sentences are split
into `--slices` parts and the two alternate slice by slice, so other load on the machine hits them alike;
the report gives each side's median tokens/s over slices and the ratio of the medians. Both sides' numbers
are checked against each other on the first slice. `--clock cpu` times the process's CPU time instead of
the wall clock: with `--threads 1` it measures both sides' own work while other processes share the cores.

The weights are a random distilgpt2-shaped GGUF (benchmarks/make_random_gguf.py writes it under /tmp);
transformers gets the F32 file's values, ours runs the given file (Q8_0 or F32).

    python benchmarks/make_random_gguf.py --out /tmp/gpt2-bench --types Q8_0
    python benchmarks/bench_research.py --gguf /tmp/gpt2-bench/distilgpt2.Q8_0.gguf \\
        --f32 /tmp/gpt2-bench/distilgpt2.F32.gguf [--task score|embed] [--sentences 10000]

Needs the `reference` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SUBJECTS = [
    "The old man",
    "A young woman",
    "My neighbour",
    "The committee",
    "Our teacher",
    "The little dog",
    "Every student",
    "The new manager",
    "Her brother",
    "The farmer",
    "A tired nurse",
    "The band",
]
VERBS = [
    "walked to",
    "looked at",
    "talked about",
    "painted",
    "bought",
    "visited",
    "remembered",
    "cleaned",
    "wrote a letter about",
    "complained about",
    "photographed",
    "found",
]
OBJECTS = [
    "the river",
    "a small house",
    "the broken window",
    "the city library",
    "an empty station",
    "the garden behind the school",
    "a red bicycle",
    "the morning newspaper",
    "the harbour",
    "the last train",
    "a quiet village",
    "the museum",
]
CONNECTIVES = ["and then", "but later", "so she", "and he", "before they", "after we"]
ENDINGS = [
    "yesterday afternoon",
    "before the storm began",
    "with great care",
    "for the first time",
    "after a long day at work",
    "without saying a word",
    "in the middle of the night",
    "because nobody else would",
    "while the children were asleep",
    "on a cold winter morning",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """English-like sentences of about 20 GPT-2 tokens, deterministic."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS)]
        parts += [rng.choice(CONNECTIVES), rng.choice(VERBS), rng.choice(OBJECTS)]
        out.append(" ".join(parts) + ".")
    return out


def gguf_params(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of an F32 GGUF by name, [rows, cols] as stored."""
    from gguf import GGUFReader

    return {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}


class Transformers:
    """The reference side: batched, padded, f32."""

    def __init__(self, f32: Path, task: str, batch: int, tokenizer) -> None:
        import torch
        from hf_reference import transformers_gpt2

        from gpt2cli.gguf_file import ModelFile

        self.torch, self.task, self.batch, self.tokenizer = torch, task, batch, tokenizer
        config = ModelFile(f32).config
        self.model = transformers_gpt2(gguf_params(f32), config, lm_head=task == "score")

    def run(self, ids: list[list[int]]) -> list[np.ndarray]:
        torch, eot = self.torch, self.tokenizer.eos_id
        inputs = [[eot, *t] for t in ids] if self.task == "score" else ids
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        results: list[np.ndarray | None] = [None] * len(inputs)
        with torch.inference_mode():
            for b0 in range(0, len(order), self.batch):
                members = order[b0 : b0 + self.batch]
                width = max(len(inputs[i]) for i in members)
                batch = torch.full((len(members), width), eot, dtype=torch.long)
                mask = torch.zeros((len(members), width), dtype=torch.long)
                for row, i in enumerate(members):
                    batch[row, : len(inputs[i])] = torch.tensor(inputs[i])
                    mask[row, : len(inputs[i])] = 1
                out = self.model(input_ids=batch, attention_mask=mask)
                if self.task == "score":
                    log_p = torch.log_softmax(out.logits[:, :-1], dim=-1)
                    picked = log_p.gather(2, batch[:, 1:, None])[..., 0]  # [b, width - 1]
                    for row, i in enumerate(members):
                        results[i] = picked[row, : len(ids[i])].numpy().astype(np.float64)
                else:
                    states = out.last_hidden_state  # [b, width, e]
                    for row, i in enumerate(members):
                        results[i] = states[row, : len(ids[i])].mean(dim=0).numpy()
        return results


def ours(model, tokenizer, task: str, texts: list[str]) -> list[np.ndarray]:
    from gpt2cli.embed import embed_texts
    from gpt2cli.score import score_texts

    if task == "score":
        return [s.log_prob for s in score_texts(model, tokenizer, texts)]
    return list(embed_texts(model, tokenizer, texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the file ours runs (Q8_0 or F32)")
    parser.add_argument("--f32", type=Path, required=True, help="the F32 file of the same weights")
    parser.add_argument("--task", choices=["score", "embed"], default="score")
    parser.add_argument("--sentences", type=int, default=10_000)
    parser.add_argument("--slices", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="transformers' sentences per batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from gpt2cli.gguf_file import ModelFile
    from gpt2cli.model import GPT2Model

    mf = ModelFile(args.gguf)
    model = GPT2Model(mf.weights, mf.config)
    tokenizer = mf.tokenizer
    texts = sentences(args.sentences)
    ids = [tokenizer.encode(t) for t in texts]
    n_tokens = sum(len(t) for t in ids)
    print(f"{args.task}: {len(texts):,} sentences, {n_tokens:,} tokens ({n_tokens / len(texts):.1f} each)")
    print(
        f"ours: {args.gguf.name}; transformers {__import__('transformers').__version__}, torch "
        f"{torch.__version__}, {args.threads} threads, f32, batches of {args.batch}; {args.clock} clock"
    )
    reference = Transformers(args.f32, args.task, args.batch, tokenizer)
    ours(model, tokenizer, args.task, texts[:8])  # compile the kernels
    reference.run(ids[:8])

    ours_rates, reference_rates = [], []
    bounds = np.linspace(0, len(texts), args.slices + 1).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        slice_tokens = sum(len(t) for t in ids[lo:hi])
        t0 = clock()
        got = ours(model, tokenizer, args.task, texts[lo:hi])
        t1 = clock()
        want = reference.run(ids[lo:hi])
        t2 = clock()
        ours_rates.append(slice_tokens / (t1 - t0))
        reference_rates.append(slice_tokens / (t2 - t1))
        print(f"slice {k + 1}: ours {ours_rates[-1]:,.0f} tokens/s, transformers {reference_rates[-1]:,.0f}")
        if k == 0:
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want, strict=True))
            print(f"  largest difference from transformers on this slice: {diff:.2e}")
    ours_median, reference_median = statistics.median(ours_rates), statistics.median(reference_rates)
    print(
        f"median tokens/s: ours {ours_median:,.0f}, transformers {reference_median:,.0f}; "
        f"ratio {ours_median / reference_median:.2f}x"
    )


if __name__ == "__main__":
    main()
