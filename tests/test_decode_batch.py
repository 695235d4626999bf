"""Several sequences in one pass over the weights give the logits each gets alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import run_cli
from synthetic import TINY, TINY_K, T, build_gguf

from gpt2cli import model as model_module
from gpt2cli.errors import Gpt2Error
from gpt2cli.generate import GenerationSettings, generate
from gpt2cli.gguf_file import ModelFile
from gpt2cli.model import GPT2Model
from gpt2cli.sampling import Sampler

PROMPTS = [[464, 2068, 7586], [40, 1101, 257, 3303, 2746, 11], [50256], [1212, 318], [15496, 11, 995, 0]]
STEPS = 4
EXACT_RTOL = 1e-5  # f32 products summed in another order
INT8_RTOL = 5e-2  # the one-token path quantizes activations to int8 (tests/test_model.py: RTOL_INT8)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def load(path, exact: bool) -> GPT2Model:
    mf = ModelFile(path)
    return GPT2Model(mf.weights, mf.config, exact=exact)


def next_tokens(step: int) -> list[int]:
    return [(1000 + 37 * i + 101 * step) % 50000 for i in range(len(PROMPTS))]


def one_at_a_time(model: GPT2Model) -> list[np.ndarray]:
    """logits [STEPS, vocab] per sequence, each decoded alone after its prompt."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        cache = model.new_cache()
        model.forward(prompt, cache)
        out.append(np.stack([model.forward([next_tokens(s)[i]], cache)[0] for s in range(STEPS)]))
    return out


def batched(model: GPT2Model) -> list[np.ndarray]:
    caches = [model.new_cache() for _ in PROMPTS]
    for prompt, cache in zip(PROMPTS, caches, strict=True):
        model.forward(prompt, cache)
    steps = [model.decode_batch(next_tokens(s), caches) for s in range(STEPS)]  # [STEPS][B, vocab]
    assert [c.length for c in caches] == [len(p) + STEPS for p in PROMPTS]
    return list(np.stack(steps, axis=1))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int8"])
def test_decode_batch_equals_one_sequence_path(tmp_path, qtype, exact):
    path = tmp_path / "m.gguf"
    build_gguf(path, qtype, config=TINY_K if qtype == T.Q4_K else TINY)
    model = load(path, exact)
    rtol = EXACT_RTOL if exact else INT8_RTOL
    for alone, together in zip(one_at_a_time(model), batched(model), strict=True):
        assert rel_err(together, alone) < rtol


def test_decode_batch_through_blas_tiles(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    build_gguf(path, T.Q8_0)
    model = load(path, exact=True)
    alone = one_at_a_time(model)
    monkeypatch.setattr(model_module, "BLAS_MIN_TOKENS", 2)
    for a, b in zip(alone, batched(model), strict=True):
        assert rel_err(b, a) < EXACT_RTOL


def test_prefills_share_a_pass(tmp_path):
    path = tmp_path / "m.gguf"
    build_gguf(path, T.F32)
    model = load(path, exact=True)
    alone = [model.forward(p, model.new_cache(), logits_from=len(p) // 2) for p in PROMPTS]
    caches = [model.new_cache() for _ in PROMPTS]
    together = model.forward_batch(PROMPTS, caches, [len(p) // 2 for p in PROMPTS])
    np.testing.assert_allclose(together, np.concatenate(alone), rtol=1e-5, atol=1e-5)


def test_fork_copies_the_prompt(tmp_path):
    path = tmp_path / "m.gguf"
    build_gguf(path, T.F32)
    model = load(path, exact=True)
    cache = model.new_cache(16)
    model.forward(PROMPTS[1], cache)
    a, b = cache.fork(), cache.fork(12)
    assert b.max_len == 12 and b.length == len(PROMPTS[1])
    logits = model.decode_batch([7, 7], [a, b])
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6)
    np.testing.assert_allclose(logits[0], model.forward([7], cache)[0], rtol=1e-5, atol=1e-6)


def test_one_full_cache_fails_the_batch_before_any_change(tmp_path):
    path = tmp_path / "m.gguf"
    build_gguf(path, T.F32)
    model = load(path, exact=True)
    roomy, full = model.new_cache(), model.new_cache(4)
    model.forward([1, 2, 3, 4], full)
    with pytest.raises(Gpt2Error, match="context"):
        model.decode_batch([5, 6], [roomy, full])
    assert roomy.length == 0 and full.length == 4 and TINY.n_ctx == roomy.max_len


def test_generate_n_samples_as_each_sequence_alone(tmp_path):
    path = tmp_path / "m.gguf"
    build_gguf(path, T.Q8_0)
    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config, exact=True)
    settings = GenerationSettings(max_new_tokens=10, num_return_sequences=3, seed=5)
    results = generate(model, mf.tokenizer, PROMPTS[1], settings)
    for sampler, gen in zip(Sampler(settings.sampling, 5).spawn(3), results, strict=True):
        cache, ids = model.new_cache(), list(PROMPTS[1])
        logits = model.forward(ids, cache, logits_from=len(ids) - 1)[0]
        while len(ids) < len(PROMPTS[1]) + 10 and (token := sampler.next_token(logits, ids)) != 50256:
            ids.append(token)
            logits = model.forward([token], cache)[0]
        assert gen.token_ids == ids[len(PROMPTS[1]) :]


def test_cli_prints_every_sequence_after_its_prompt(tmp_path):
    path = tmp_path / "m.gguf"
    build_gguf(path, T.Q8_0)
    args = ["generate", "Hello", "--model", str(path), "-n", "3", "--seed", "3", "--max-new-tokens", "6"]
    code, out, _ = run_cli(args)
    code_json, out_json, _ = run_cli([*args, "--json"])
    assert code == code_json == 0
    texts = [json.loads(line)["generated_text"] for line in out_json.splitlines()]
    assert out == "\n\n".join(texts) + "\n"
