"""`gpt2 ppl`: window plans, both protocols against independent transcriptions, tokenization, KLD, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hf_reference import transformers_gpt2
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_oracle import llama_model
from reference_gpt2 import gpt2_logits
from synthetic import TINY, build_gguf

from gpt2cli import ppl
from gpt2cli import tokenizer as tokenizer_module
from gpt2cli.cli import main
from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import ModelFile
from gpt2cli.model import GPT2Model
from gpt2cli.ppl import (
    PerplexityResult,
    PplSettings,
    compare_models,
    perplexity,
    plan_windows,
    result_dict,
    token_nll,
    tokenize_file,
)

TEXT = (
    " = The Lighthouse Keeper = \n\n"
    "The lighthouse stood on a rock two miles from the harbour, and for forty-one years Thomas Hale kept\n"
    "its lamp burning. He wrote in his log every night: the wind's direction, the height of the swell,\n"
    "the ships that passed (there were 1,204 of them in 1887 alone) and, now and then, a line of verse.\n"
    "\n"
    '  When the Board replaced the oil lamp with an electric one in 1921, Hale refused to leave. "A light\n'
    "is not a machine,\" he told the inspector; it's a promise. The inspector's report calls him 'difficult\n"
    "but entirely competent'. Café owners in the village still sell postcards of the tower — €2 each.\n"
    "\n"
    "He died in the winter of 1923, and the log's last entry reads only: calm sea, clear sky, lamp lit."
)


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], GPT2Model]:
    # Same seed as `tiny`: the Q8_0 model is the F32 one quantized.
    path = tmp_path_factory.mktemp("ppl") / "tiny-q8_0.gguf"
    params = build_gguf(path, T.Q8_0)
    mf = ModelFile(path)
    return path, params, GPT2Model(mf.weights, mf.config)


@pytest.fixture(scope="module")
def text_ids(tiny) -> np.ndarray:
    return np.array(tiny[2].tokenizer.encode(TEXT))


def log_softmax(x: np.ndarray) -> np.ndarray:  # f64 [m, vocab]
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hf_recipe_ppl(params, ids: np.ndarray, max_length: int, stride: int) -> float:
    """transformers' "Perplexity of fixed-length models" loop, with GPT2LMHeadModel's loss written out."""
    seq_len = len(ids)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[begin_loc:end_loc]
        target_ids = input_ids.copy()
        target_ids[:-trg_len] = -100
        # The model shifts: logits at i predict labels at i + 1; CrossEntropyLoss averages the valid labels.
        logits = gpt2_logits(params, input_ids, TINY.n_head)[:-1]
        labels = target_ids[1:]
        valid = labels != -100
        loss = -log_softmax(logits[valid])[np.arange(valid.sum()), labels[valid]].mean()
        num_loss_tokens = int((target_ids != -100).sum()) - 1
        nll_sum += loss * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def llama_perplexity(logits_of_chunk, ids: np.ndarray, n_ctx: int) -> tuple[float, float]:
    """llama-perplexity's default loop (tools/perplexity/perplexity.cpp, `perplexity`): (ppl, uncertainty)."""
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i in range(len(ids) // n_ctx):
        chunk = ids[i * n_ctx : (i + 1) * n_ctx]
        logits = logits_of_chunk(chunk)  # [n_ctx, vocab]
        for j in range(first, n_ctx - 1):
            v = -log_softmax(logits[j].astype(np.float64))[chunk[j + 1]]
            nll += v
            nll2 += v * v
            count += 1
    nll /= count
    nll2 /= count
    value = math.exp(nll)
    return value, math.sqrt((nll2 - nll * nll) / (count - 1)) * value


# --- window plans ---


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 300), ctx=st.integers(2, 64), data=st.data())
def test_hf_windows_score_each_token_once_as_the_recipe_counts(n, ctx, data):
    stride = data.draw(st.integers(1, ctx))
    windows = plan_windows(n, PplSettings("hf", ctx, stride))
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == sorted(set(scored))
    # A window's first token is never a target, so without overlap every window start goes unscored.
    assert scored == [t for t in range(1, n) if stride < ctx or t % ctx]
    for w in windows:
        assert w.end - w.begin <= ctx and w.begin < w.score_from < w.end + 1
    # The recipe's denominator: sum of (trg_len - 1) over its windows.
    recipe_tokens, prev_end = 0, 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        recipe_tokens += end - prev_end - 1
        prev_end = end
        if end == n:
            break
    assert sum(w.weight for w in windows) == recipe_tokens


@settings(max_examples=50, deadline=None)
@given(ctx=st.integers(3, 64), data=st.data())
def test_llama_chunks_score_their_second_half(ctx, data):
    n = data.draw(st.integers(ctx, 400))
    windows = plan_windows(n, PplSettings("llama", ctx, ctx))
    assert len(windows) == n // ctx
    for i, w in enumerate(windows):
        assert (w.begin, w.end) == (i * ctx, (i + 1) * ctx)
        assert list(range(w.score_from, w.end)) == list(range(w.begin + ctx // 2 + 1, w.end))
        assert w.weight == ctx - ctx // 2 - 1


def test_too_little_text_is_one_line_error():
    with pytest.raises(Gpt2Error, match="at least 2"):
        plan_windows(1, PplSettings("hf", 16, 8))
    with pytest.raises(Gpt2Error, match="one full chunk"):
        plan_windows(31, PplSettings("llama", 32, 32))
    # hf with fewer tokens than ctx: one shorter window.
    assert plan_windows(10, PplSettings("hf", 64, 32)) == [ppl.Window(0, 10, 1, 9)]


@pytest.mark.parametrize(
    ("protocol", "ctx", "stride", "problem"),
    [
        ("hf", 65, None, "--ctx must be between 2"),
        ("hf", 1, None, "--ctx must be between 2"),
        ("hf", 32, 0, "--stride must be between 1"),
        ("hf", 32, 33, "--stride must be between 1"),
        ("llama", 2, None, "--ctx must be between 3"),
        ("llama", 32, 16, "--stride applies to --protocol hf"),
        ("xl", None, None, "--protocol must be one of"),
    ],
)
def test_bad_settings(protocol, ctx, stride, problem):
    with pytest.raises(Gpt2Error, match=problem):
        PplSettings.resolve(protocol, 64, ctx, stride)


def test_default_settings():
    assert PplSettings.resolve("hf", 1024) == PplSettings("hf", 1024, 512)
    assert PplSettings.resolve("llama", 1024) == PplSettings("llama", 512, 512)
    assert PplSettings.resolve("llama", 64) == PplSettings("llama", 64, 64)


# --- numbers ---


def test_token_nll_is_stable_for_huge_logits():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((130, 1000)) * 30 + 1e4).astype(np.float32)
    targets = rng.integers(0, 1000, 130)
    got = token_nll(logits, targets)
    assert np.isfinite(got).all()
    want = -log_softmax(logits.astype(np.float64))[np.arange(130), targets]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("ctx", "stride"), [(64, 64), (64, 32), (32, 12), (20, 7), (64, 1000)])
def test_hf_equals_the_transformers_recipe(tiny, text_ids, ctx, stride):
    _, params, _, model = tiny
    stride = min(stride, ctx)
    result = perplexity(model, text_ids, PplSettings("hf", ctx, stride))
    assert result.ppl == pytest.approx(hf_recipe_ppl(params, text_ids, ctx, stride), rel=1e-4)


def test_hf_shorter_text_than_ctx_is_one_window(tiny, text_ids):
    _, params, _, model = tiny
    ids = text_ids[:40]
    result = perplexity(model, ids, PplSettings("hf", 64, 32))
    assert (result.windows, result.tokens) == (1, 39)
    assert result.ppl == pytest.approx(hf_recipe_ppl(params, ids, 64, 32), rel=1e-4)


def test_llama_equals_llama_perplexity_loop(tiny, text_ids):
    _, params, _, model = tiny
    want, want_uncertainty = llama_perplexity(lambda c: gpt2_logits(params, c, TINY.n_head), text_ids, 32)
    result = perplexity(model, text_ids, PplSettings("llama", 32, 32))
    assert result.tokens == (len(text_ids) // 32) * 15
    assert result.ppl == pytest.approx(want, rel=1e-4)
    assert result.ppl_uncertainty == pytest.approx(want_uncertainty, rel=1e-3)
    assert result.mean_nll == pytest.approx(math.log(want), rel=1e-5)


def test_bits_per_byte_counts_the_scored_tokens_bytes(tiny, text_ids):
    _, _, mf, model = tiny
    tok = mf.tokenizer
    result = perplexity(model, text_ids, PplSettings("hf", 32, 16), tokenizer=tok)
    # Overlapping windows score every token but the first.
    assert result.scored_bytes == len(TEXT.encode()) - len(tok.token_bytes(int(text_ids[0])))
    total_nll_bits = result.mean_nll * result.tokens / math.log(2)
    assert result.bits_per_byte == pytest.approx(total_nll_bits / result.scored_bytes, rel=1e-3)


def test_kld_of_a_model_with_itself_is_zero(tiny, text_ids):
    model = tiny[3]
    stats = compare_models(model, model, text_ids, ctx=32, protocol="llama")
    assert stats.mean_kld == pytest.approx(0, abs=1e-9)
    assert stats.same_top == 1.0
    assert stats.mean_delta_p == 0.0
    assert stats.ppl == stats.ppl_base


@pytest.mark.parametrize(("protocol", "stride"), [("llama", None), ("hf", 12)])
def test_kld_matches_numpy_on_reference_logits(tiny, tiny_q8, text_ids, protocol, stride):
    _, params, _, model = tiny
    _, q8_params, q8_model = tiny_q8
    q8_model = GPT2Model(q8_model.w, q8_model.config, exact=True)  # f32 products, as the reference's
    settings_ = PplSettings.resolve(protocol, 64, 32, stride)
    klds, same, delta_p = [], [], []
    for w in plan_windows(len(text_ids), settings_):
        window = text_ids[w.begin : w.end - 1]
        rows = slice(w.score_from - 1 - w.begin, None)
        log_p = log_softmax(gpt2_logits(q8_params, window, TINY.n_head)[rows])
        log_p_base = log_softmax(gpt2_logits(params, window, TINY.n_head)[rows])
        targets = text_ids[w.score_from : w.end]
        klds += list((np.exp(log_p_base) * (log_p_base - log_p)).sum(axis=1))
        same += list(log_p.argmax(axis=1) == log_p_base.argmax(axis=1))
        picked = np.arange(len(targets)), targets
        delta_p += list(np.exp(log_p[picked]) - np.exp(log_p_base[picked]))
    stats = compare_models(q8_model, model, text_ids, 32, stride, protocol)
    assert stats.tokens == len(klds)
    assert 0 < stats.mean_kld == pytest.approx(np.mean(klds), rel=1e-3)
    assert stats.kld_99 == pytest.approx(np.percentile(klds, 99), rel=1e-3)
    assert stats.same_top == pytest.approx(np.mean(same), abs=1.5 / len(same))
    assert stats.mean_delta_p == pytest.approx(np.mean(delta_p), rel=1e-2, abs=1e-9)
    assert stats.ppl_base == pytest.approx(perplexity(model, text_ids, settings_).ppl, rel=1e-6)


# --- optional oracles ---


def test_hf_equals_transformers(tiny, text_ids):
    _, params, _, model = tiny
    hf = transformers_gpt2(params, TINY)
    import torch

    encodings = torch.tensor(text_ids)[None]
    for max_length, stride in [(64, 32), (32, 12)]:
        nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
        seq_len = encodings.size(1)
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = encodings[:, begin_loc:end_loc]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                neg_log_likelihood = hf(input_ids, labels=target_ids).loss
            num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
            nll_sum += neg_log_likelihood.item() * num_loss_tokens
            n_tokens += num_loss_tokens
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
        result = perplexity(model, text_ids, PplSettings("hf", max_length, stride))
        assert result.ppl == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-4)


def test_llama_protocol_equals_llama_cpp(tiny, text_ids):
    path, _, _, model = tiny
    n_ctx = 32
    with llama_model(path, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2) as llm:

        def llama_logits(chunk: np.ndarray) -> np.ndarray:
            llm.reset()  # and llama_cpp clears the KV cache before evaluating from position 0
            llm.eval(chunk.tolist())
            return np.array(llm.scores[: len(chunk)])

        want, _ = llama_perplexity(llama_logits, text_ids, n_ctx)
    assert perplexity(model, text_ids, PplSettings("llama", n_ctx, n_ctx)).ppl == pytest.approx(
        want, rel=5e-3
    )


# --- text files ---


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[2].tokenizer


TRICKY_PIECES = [
    "a",
    "word",
    " ",
    "  ",
    "\n",
    "\r\n",
    "\r",
    "\t",
    "é",
    "€",
    "🙂",
    "'s",
    "12",
    ".",
    "<|endoftext|>",
]


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.sampled_from(TRICKY_PIECES), max_size=60), block=st.integers(1, 16))
def test_streamed_tokenization_equals_whole_text(
    tmp_path_factory, tokenizer, monkeypatch_block, pieces, block
):
    text = "".join(pieces)
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_bytes(text.encode())
    monkeypatch_block(block)
    ids = tokenize_file(path, tokenizer)
    assert ids.tolist() == tokenizer.encode(text.replace("\r\n", "\n"))


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.sampled_from([*TRICKY_PIECES, "aaaaaaa", "'", "1234567", "       "]), max_size=40),
    block=st.integers(1, 16),
)
def test_streamed_runs_without_whitespace_equal_whole_text(
    tmp_path_factory, tokenizer, monkeypatch_block, pieces, block
):
    # With 4-character chunks, the cuts inside whitespace-free runs are exercised on short texts.
    text = "".join(pieces).replace(" ", "")
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_bytes(text.encode())
    monkeypatch_block(block)
    original = tokenizer_module.MAX_PIECE_CHARS
    tokenizer_module.MAX_PIECE_CHARS = 4
    try:
        assert tokenize_file(path, tokenizer).tolist() == tokenizer.encode(text.replace("\r\n", "\n"))
    finally:
        tokenizer_module.MAX_PIECE_CHARS = original


@pytest.mark.parametrize("byte", [b"\0", b"a", b"7"])
def test_text_without_whitespace_stops_at_max_tokens(tmp_path, tokenizer, byte):
    # Was: read until a space that never comes, then one BPE piece of the whole file (issue 10).
    path = tmp_path / "run.txt"
    path.write_bytes(byte * (8 << 20))
    assert len(tokenize_file(path, tokenizer, max_tokens=100)) == 100


def test_dev_zero_stops_at_max_tokens(tokenizer):
    assert len(tokenize_file("/dev/zero", tokenizer, max_tokens=100)) == 100


@pytest.fixture(scope="module")
def monkeypatch_block():
    """Sets ppl.READ_BLOCK_BYTES for the module's tests (hypothesis cannot use function-scoped fixtures)."""
    original = ppl.READ_BLOCK_BYTES

    def set_block(n: int) -> None:
        ppl.READ_BLOCK_BYTES = n

    yield set_block
    ppl.READ_BLOCK_BYTES = original


def test_crlf_empty_lines_and_no_final_newline(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(ppl, "READ_BLOCK_BYTES", 5)
    text = TEXT.replace("\n", "\r\n")
    assert not text.endswith("\n") and "\r\n\r\n" in text
    (tmp_path / "t.txt").write_bytes(text.encode())
    ids = tokenize_file(tmp_path / "t.txt", tokenizer)
    assert tokenizer.decode(ids.tolist()) == TEXT
    assert tokenize_file(tmp_path / "t.txt", tokenizer, max_tokens=17).tolist() == ids[:17].tolist()


def test_invalid_utf8_names_the_byte_offset(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(ppl, "READ_BLOCK_BYTES", 4)
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 ok\xff and more text")
    with pytest.raises(Gpt2Error, match=r"invalid UTF-8 at byte 8 \(0xff\)"):
        tokenize_file(tmp_path / "bad.txt", tokenizer)
    ids = tokenize_file(tmp_path / "bad.txt", tokenizer, errors="replace")
    assert tokenizer.decode(ids.tolist()) == "café ok\ufffd and more text"


# --- command line ---


def run_ppl(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["ppl", *args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.replace("\n", "\r\n").encode())
    return path


def test_cli_report(capsys, tiny, text_file):
    code, out, err = run_ppl(capsys, str(text_file), "-m", str(tiny[0]), "--ctx", "32", "--stride", "16")
    assert code == 0, err
    assert "protocol      hf (transformers' fixed-length recipe: windows of 32 tokens every 16" in out
    for label in ("perplexity", "+/-", "mean NLL", "bits per byte", "tokens/s"):
        assert label in out


def test_cli_json(capsys, tiny, tiny_q8, text_file, text_ids):
    args = [str(text_file), "-m", str(tiny_q8[0]), "--protocol", "llama", "--ctx", "32", "--json"]
    code, out, err = run_ppl(capsys, *args, "--kl-divergence", str(tiny[0]), "--max-tokens", "100")
    assert code == 0, err
    got = json.loads(out)
    want = perplexity(tiny_q8[2], text_ids[:100], PplSettings("llama", 32, 32))
    assert (got["protocol"], got["ctx"], got["tokens"], got["windows"]) == ("llama", 32, 45, 3)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-9)
    assert got["kl_divergence"]["mean_kld"] > 0 and 0 < got["kl_divergence"]["same_top"] <= 1
    assert got["compute"] == "int8 activations on quantized weights (llama.cpp-style)"


@pytest.mark.parametrize(
    ("model", "flags", "compute"),
    [
        ("tiny_q8", [], "int8 activations on quantized weights (llama.cpp-style)"),
        ("tiny_q8", ["--exact"], "f32 (exact)"),
        ("tiny", [], "f32 (float weights)"),
    ],
)
def test_cli_says_which_compute_it_used(capsys, request, text_file, model, flags, compute):
    path = request.getfixturevalue(model)[0]
    code, out, err = run_ppl(capsys, str(text_file), "-m", str(path), "--ctx", "32", *flags)
    assert code == 0, err
    assert f"compute       {compute}" in out


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (b"", [], "the text has 0 tokens"),
        (b"abc \xe9 def", [], "invalid UTF-8 at byte 4 (0xe9)"),
        (TEXT.encode(), ["--ctx", "1000"], "--ctx must be between 2 and the model's context 64"),
        (TEXT.encode(), ["--stride", "0"], "--stride must be between 1"),
        (b"only a few words", ["--protocol", "llama"], "needs at least one full chunk"),
        (TEXT.encode(), ["--errors", "ignore"], "--errors must be strict or replace"),
    ],
)
def test_cli_errors_are_one_line(capsys, tiny, tmp_path, content, args, message):
    (tmp_path / "t.txt").write_bytes(content)
    code, out, err = run_ppl(capsys, str(tmp_path / "t.txt"), "-m", str(tiny[0]), *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpt2: error: ") and message in err


def test_cli_missing_file(capsys, tiny, tmp_path):
    code, _, err = run_ppl(capsys, str(tmp_path / "absent.txt"), "-m", str(tiny[0]))
    assert code == 2 and "absent.txt" in err and err.count("\n") == 1


def test_cli_replace_reads_invalid_utf8(capsys, tiny, tmp_path):
    (tmp_path / "t.txt").write_bytes(b"abc \xe9 def and some more words to score")
    code, out, err = run_ppl(capsys, str(tmp_path / "t.txt"), "-m", str(tiny[0]), "--errors", "replace")
    assert code == 0, err
    assert "note          the text has" in out


@pytest.mark.parametrize("data", [b"\r\r\n", b"a\r\nb\r\r\n\r\nc\r", b"x\r"])
@pytest.mark.parametrize("block", [1, 2, 3, 64])
def test_lone_carriage_returns_beside_crlf(tmp_path, tokenizer, monkeypatch, data, block):
    # Every character goes through the CRLF replacement once: "\r\r\n" is "\r\n", not "\n".
    monkeypatch.setattr(ppl, "READ_BLOCK_BYTES", block)
    path = tmp_path / "t.txt"
    path.write_bytes(data)
    assert tokenize_file(path, tokenizer).tolist() == tokenizer.encode(data.decode().replace("\r\n", "\n"))


def test_json_report_has_no_bare_nan():
    # Was: a bare NaN in --json output, which is not JSON.
    nan = math.nan
    result = PerplexityResult(PplSettings("hf", 16, 8), 1, 1, 2, nan, nan, nan, nan, 0, nan, "f32 (exact)")
    report = result_dict(result)
    json.dumps(report, allow_nan=False)
    assert report["ppl"] is None and report["mean_nll"] is None and report["seconds"] is None
