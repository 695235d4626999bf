"""Greedy text equals llama.cpp's on the same GGUF (optional oracle: llama-cpp-python)."""

from __future__ import annotations

import numpy as np
import pytest
from llama_oracle import llama_model
from synthetic import T, build_gguf

from gpt2cli.gguf_file import ModelFile
from gpt2cli.model import GPT2Model

STEPS = 20


def our_greedy(path, ids: list[int]) -> list[int]:
    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config)
    cache = model.new_cache()
    logits = model.forward(ids, cache, logits_from=len(ids) - 1)[0]
    out = []
    for _ in range(STEPS):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]], cache)[0]
    return out


def llama_greedy(path, ids: list[int]) -> list[int]:
    with llama_model(path, n_ctx=64, logits_all=True) as llm:
        llm.eval(ids)
        out = []
        for _ in range(STEPS):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
    return out


# Float weights only: on quantized weights ggml also quantizes the activations to 8 bits, and a random tiny
# model's near-ties then part the two texts after a few tokens (their logits are compared in test_quantize).
@pytest.mark.parametrize("qtype", [T.F32, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "output.weight"])
def test_greedy_continuation_equals_llama_cpp(tmp_path, qtype, tied):
    path = tmp_path / "m.gguf"
    build_gguf(path, qtype, tied=tied, seed=3)
    ids = ModelFile(path).tokenizer.encode("Hello, I'm a language model")
    assert our_greedy(path, ids) == llama_greedy(path, ids)
