"""How far ours and llama.cpp's logits are from exact ones on full-size files (by hand).

For each GGUF, a text's first `--tokens` tokens are run teacher-forced in three ways: exact (every tensor
dequantized by gguf-py, a float64 forward pass: tests/reference_gpt2.py), ours and llama.cpp's, each as one
prefill of all the tokens and as decoding (the first token, then one token per step). The table gives the mean
KL divergence of each runtime's softmax from the exact one over the positions, as llama-perplexity's
--kl-divergence reports it, and ours / llama.cpp's. llama.cpp runs its plain CPU path (bench_ppl's switch).

    python benchmarks/make_random_gguf.py --shape distilgpt2
    python benchmarks/bench_fidelity.py /tmp/gpt2-bench/distilgpt2.*.gguf \\
        --text ../shared/data/wikitext/wiki.test.raw [--tokens 512]

Needs llama-cpp-python (the `llama` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_ppl import plain_cpu_buffers  # noqa: E402
from reference_gpt2 import gpt2_logits  # noqa: E402
from test_fidelity import mean_kl  # noqa: E402

from gpt2cli.gguf_file import ModelFile  # noqa: E402
from gpt2cli.model import GPT2Model  # noqa: E402


def exact_params(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF by name, dequantized by gguf-py to float64, [rows, cols] as stored."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    params = {}
    for t in GGUFReader(path).tensors:
        shape = tuple(reversed(t.shape.tolist()))
        params[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
    return params


def our_logits(path: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits [n, vocab], decode logits [n - 1, vocab] of ids[1:])."""
    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config)
    prefill = model.forward(ids, model.new_cache())
    cache = model.new_cache()
    model.forward(ids[:1], cache)
    decode = np.stack([model.forward([token], cache)[0] for token in ids[1:]])
    return prefill, decode


def llama_logits(path: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    import llama_cpp

    plain_cpu_buffers(llama_cpp)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=1024, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        prefill = np.array(llm.scores[: len(ids)])
        llm.reset()
        for token in ids:
            llm.eval([token])
        decode = np.array(llm.scores[1 : len(ids)])
    finally:
        llm.close()
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--text", type=Path, required=True, help="a UTF-8 text, e.g. wiki.test.raw")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()

    print(f"mean KL from exact logits, {args.tokens} tokens of {args.text.name}")
    columns = ("prefill ours", "llama.cpp", "ratio", "decode ours", "llama.cpp", "ratio")
    print(f"{'file':<28} " + " ".join(f"{c:>12}" for c in columns))
    for path in args.files:
        mf = ModelFile(path)
        ids = mf.tokenizer.encode(args.text.read_text(encoding="utf-8")[: 20 * args.tokens])[: args.tokens]
        exact = gpt2_logits(exact_params(path), ids, mf.config.n_head, mf.config.layer_norm_eps)
        ours = our_logits(path, ids)
        theirs = llama_logits(path, ids)
        prefill = mean_kl(exact, ours[0]), mean_kl(exact, theirs[0])
        decode = mean_kl(exact[1:], ours[1]), mean_kl(exact[1:], theirs[1])
        print(
            f"{path.name:<28} {prefill[0]:>12.3e} {prefill[1]:>12.3e} {prefill[0] / prefill[1]:>12.2f}"
            f" {decode[0]:>12.3e} {decode[1]:>12.3e} {decode[0] / decode[1]:>12.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
