"""`gpt2 ppl --protocol lm-eval` against a transcription of lm-evaluation-harness's wikitext loop; word and
byte perplexity; shards merged into one run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from reference_gpt2 import gpt2_logits
from synthetic import TINY

from gpt2cli.errors import Gpt2Error
from gpt2cli.model import GPT2Model
from gpt2cli.ppl import (
    PplSettings,
    evaluate_plan,
    lm_eval_plan,
    perplexity,
    read_text,
    token_plan,
    wikitext_detokenize,
    wikitext_documents,
)

EOT = 50256
# WikiText's raw format: headings between " = " marks, spaces around punctuation, @-@ number separators.
WIKI = (
    " = Valkyrie ( ship ) = \n"
    " Valkyrie was a three @-@ masted barque built in 1,204 @,@ 3 days , launched at 3 @.@ 5 knots . "
    'Her captain , " Old " Tom Hale , kept the log ; it reads : calm sea ! Was it ? Yes . \n'
    " = = History = = \n"
    " The ship 's first voyage ( 1887 ) went to [ Lisbon ] and { Cádiz } — 25 ° west . N of the crew "
    "were Hale 's sons ' friends . \n"
    " = = = Later years = = = \n"
    " She was sold in 1921 for €2 @,@ 000 and broken up . \n"
    " = Thomas Hale = \n"
    " Thomas Hale ( 1850 – 1923 ) was a sailor . He kept the lighthouse for forty @-@ one years . \n"
)


def log_softmax(x: np.ndarray) -> np.ndarray:  # f64 [m, vocab]
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def lm_eval_wikitext(pages: list[str], encode, logits_of, max_length: int, prefix_token: int) -> dict:
    """lm-evaluation-harness's wikitext task on documents `pages`, written out: the request is the
    detokenized page (doc_to_target), HFLM.loglikelihood_rolling splits its tokens with
    utils.get_rolling_token_windows(context_len=1) and utils.make_disjoint_window, _loglikelihood_tokens
    runs each (context, continuation) pair, process_results pairs the log-likelihood with the words and bytes
    of the page before detokenization, and the metrics are weighted_perplexity and bits_per_byte."""

    def get_rolling_token_windows(token_list, prefix_token, max_seq_len, context_len):
        assert 1 <= context_len <= max_seq_len
        if not token_list:
            return
        pred_len = max_seq_len - context_len + 1
        predicted = 0
        first_seq_len = min(max_seq_len, len(token_list))
        yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]
        predicted += first_seq_len
        while predicted < len(token_list):
            window_pred_len = min(len(token_list) - predicted, pred_len)
            window_end = predicted + window_pred_len
            yield (
                token_list[window_end - max_seq_len - 1 : window_end - 1],
                token_list[window_end - window_pred_len : window_end],
            )
            predicted += window_pred_len

    def make_disjoint_window(pair):
        a, b = pair
        return a[: len(a) - (len(b) - 1)], b

    results = []
    for page in pages:
        loglikelihood = 0.0
        windows = map(
            make_disjoint_window,
            get_rolling_token_windows(encode(wikitext_detokenize(page)), prefix_token, max_length, 1),
        )
        for context_enc, continuation_enc in windows:
            inp = (context_enc + continuation_enc)[-(max_length + 1) :][:-1]
            contlen = len(continuation_enc)
            logits = log_softmax(logits_of(inp)[len(inp) - contlen : len(inp)])
            loglikelihood += float(logits[np.arange(contlen), continuation_enc].sum())
        words = len(re.split(r"\s+", page))
        results.append((loglikelihood, words, len(page.encode("utf-8"))))
    total = sum(r[0] for r in results)
    words = sum(r[1] for r in results)
    n_bytes = sum(r[2] for r in results)
    return {
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / n_bytes),
        "bits_per_byte": -total / n_bytes / math.log(2),
    }


def ours(model: GPT2Model, pages: list[str], tokenizer, ctx: int):
    settings = PplSettings.resolve("lm-eval", model.config.n_ctx, ctx)
    return evaluate_plan(model, lm_eval_plan(pages, tokenizer, settings), settings)


# --- documents and detokenizer, by hand ---


def test_documents_split_at_top_level_headings():
    pages = wikitext_documents(WIKI)
    assert [p.split("\n")[0] for p in pages] == [" = Valkyrie ( ship ) = ", " = Thomas Hale = "]
    assert "\n".join(pages) == WIKI
    # Text before the first heading is a document only if it is not blank; so is the final one, always.
    assert wikitext_documents(" \n = A = \n x \n") == [" = A = \n x \n"]
    assert wikitext_documents("no headings\nat all") == ["no headings\nat all"]
    assert wikitext_documents("") == [""]


def test_detokenizer_by_hand():
    assert wikitext_detokenize(" = = History = = \n The ship 's log ( 1887 ) : 3 @.@ 5 , 1 @,@ 204 . \n") == (
        " == History ==\nThe ship's log (1887): 3.5, 1,204.\n"
    )
    assert wikitext_detokenize(
        'Hale , " Old " Tom ; [ a ] { b } N of 25 ° west ! Why ? three @-@ masted'
    ) == ('Hale, "Old" Tom; [a] {b} 1 of 25°west! Why? three-masted')
    assert wikitext_detokenize("the sons ' friends") == "the sons' friends"


def test_read_text_translates_newlines_as_text_mode(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"a\r\nb\rc\n")
    assert read_text(tmp_path / "t.txt") == "a\nb\nc\n"


# --- the rolling windows against the transcription ---


@pytest.mark.parametrize("ctx", [64, 16, 5, 1])
def test_lm_eval_equals_the_harness_loop(tiny, ctx):
    _, params, mf, model = tiny
    tok = mf.tokenizer
    pages = wikitext_documents(WIKI)
    result = ours(model, pages, tok, ctx)

    def our_logits(inp: list[int]) -> np.ndarray:
        return model.forward(inp, model.new_cache()).astype(np.float64)

    # With our own logits the same computation but for the f32 exponentials of our softmax (~5e-8 per token).
    want = lm_eval_wikitext(pages, tok.encode, our_logits, ctx, EOT)
    assert result.word_perplexity == pytest.approx(want["word_perplexity"], rel=1e-7)
    assert result.byte_perplexity == pytest.approx(want["byte_perplexity"], rel=1e-7)
    assert result.bits_per_byte == pytest.approx(want["bits_per_byte"], rel=1e-7)
    # With the f64 numpy reference: equal to f32 precision.
    want = lm_eval_wikitext(pages, tok.encode, lambda inp: gpt2_logits(params, inp, TINY.n_head), ctx, EOT)
    assert result.word_perplexity == pytest.approx(want["word_perplexity"], rel=1e-4)
    assert result.bits_per_byte == pytest.approx(want["bits_per_byte"], rel=1e-4)
    n_tokens = sum(len(tok.encode(wikitext_detokenize(p))) for p in pages)
    assert result.tokens == n_tokens  # every token scored once, the first after <|endoftext|>
    assert result.words == sum(len(re.split(r"\s+", p)) for p in pages)
    assert result.scored_bytes == len(WIKI.encode()) - 1  # the pages without the newlines between them


def test_lm_eval_windows_fill_the_context(tiny):
    tok = tiny[2].tokenizer
    settings = PplSettings.resolve("lm-eval", 64, 16)
    plan = lm_eval_plan(wikitext_documents(WIKI), tok, settings)
    for w in plan.windows:
        assert w.end - 1 - w.begin <= 16 and w.end - w.score_from <= 16
    starts = [w.begin for w in plan.windows]
    assert plan.ids[starts[0]] == EOT and (plan.ids == EOT).sum() == 2  # one prefix per document


def test_lm_eval_on_wikitext_test(shared_data):
    path = shared_data / "wikitext" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    pages = wikitext_documents(read_text(path))
    assert len(pages) == 62  # the articles of the wikitext-2 test split
    assert pages[0].startswith(" = Robert Boulter = \n")


# --- word and byte perplexity of hf and llama ---


def test_hf_words_and_bytes_are_those_of_the_scored_tokens(tiny):
    _, _, mf, model = tiny
    tok = mf.tokenizer
    text = WIKI.replace(" @-@ ", "-")
    ids = np.array(tok.encode(text))
    result = perplexity(model, ids, PplSettings("hf", 32, 16), tokenizer=tok)
    # Overlapping windows score every token but the first (" =", which starts the first word).
    assert result.scored_bytes == len(text.encode()) - len(tok.token_bytes(int(ids[0])))
    assert result.words == len(text.split()) - 1
    total_nll = result.totals.nll
    assert result.word_perplexity == pytest.approx(math.exp(total_nll / result.words), rel=1e-12)
    assert result.byte_perplexity == pytest.approx(2**result.bits_per_byte, rel=1e-12)
    # llama scores the second half of each chunk only: fewer words, counted where they start.
    llama = perplexity(model, ids, PplSettings("llama", 32, 32), tokenizer=tok)
    plan = token_plan(ids, PplSettings("llama", 32, 32), tok)
    for w, n_words in zip(plan.windows, plan.words, strict=True):
        scored = tok.decode_bytes(ids[w.score_from : w.end].tolist()).decode()
        before = tok.decode_bytes(ids[w.score_from - 1 : w.score_from].tolist()).decode()
        assert n_words == len(scored.split()) - (not before[-1].isspace() and not scored[0].isspace())
    assert llama.words == sum(plan.words)


# --- shards ---


@pytest.fixture(scope="module")
def wiki_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wiki") / "wiki.txt"
    path.write_text(WIKI * 3, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "args",
    [["--protocol", "lm-eval", "--ctx", "16"], ["--ctx", "32", "--stride", "12"], ["--protocol", "llama"]],
)
def test_merged_shards_equal_one_run(tiny, wiki_file, tmp_path, args):
    base = ["ppl", str(wiki_file), "-m", str(tiny[0]), "--json", *args]
    code, out, err = run_cli(base)
    assert code == 0, err
    whole = json.loads(out)
    reports = []
    for k in (3, 1, 2):  # any order
        code, out, err = run_cli([*base, "--shard", f"{k}/3"])
        assert code == 0, err
        report = json.loads(out)
        assert report["shard"] == f"{k}/3"
        if k == 3:  # another machine keeps the model elsewhere: the file name is what must agree
            report["model"] = "/elsewhere/" + Path(report["model"]).name
        (tmp_path / f"{k}.json").write_text(json.dumps(report))
        reports.append(str(tmp_path / f"{k}.json"))
    code, out, err = run_cli(["ppl", "--merge", *reports, "--json"])
    assert code == 0, err
    merged = json.loads(out)
    for key in ("windows", "tokens", "evaluated_tokens", "words", "scored_bytes", "protocol", "ctx", "model"):
        assert merged[key] == whole[key]
    for key in ("ppl", "ppl_uncertainty", "mean_nll", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-9), key
    code, out, err = run_cli(["ppl", "--merge", *reports])
    assert code == 0 and "word ppl" in out and "merged from 3 shards" in out


def test_merge_refuses_what_is_not_one_run(tiny, wiki_file, tmp_path):
    def shard_report(k: int, n: int, *args: str) -> str:
        code, out, err = run_cli(
            ["ppl", str(wiki_file), "-m", str(tiny[0]), "--json", "--shard", f"{k}/{n}", *args]
        )
        assert code == 0, err
        path = tmp_path / f"{k}-{n}-{len(args)}.json"
        path.write_text(out)
        return str(path)

    one, two = shard_report(1, 2), shard_report(2, 2)
    not_a_report = tmp_path / "list.json"
    not_a_report.write_text("[1, 2]")
    for files, message in [
        ([one], "needs each of the shards 1/2 .. 2/2 once"),
        ([one, one, two], "needs each of the shards"),
        ([one, shard_report(2, 2, "--ctx", "16")], "ctx, stride differ"),
        ([str(wiki_file)], "not a `gpt2 ppl --json` report"),
        ([str(not_a_report)], "not a `gpt2 ppl --json` report"),
    ]:
        code, out, err = run_cli(["ppl", "--merge", *files])
        assert code == 2 and out == "" and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protocol", "lm-eval", "--max-tokens", "10"], "--max-tokens applies to --protocol hf and llama"),
        (["--protocol", "lm-eval", "--stride", "8"], "--stride applies to --protocol hf only"),
        (["--shard", "2/1"], "--shard must be K/N"),
        (["--shard", "1/2", "--kl-divergence", "X"], "cannot be sharded"),
    ],
)
def test_ppl_cli_errors(tiny, wiki_file, args, message):
    if "X" in args:
        args = [tiny[0] if a == "X" else a for a in args]
    code, out, err = run_cli(["ppl", str(wiki_file), "-m", str(tiny[0]), *map(str, args)])
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_empty_text_under_lm_eval(tiny, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(Gpt2Error, match="0 tokens"):
        lm_eval_plan(
            wikitext_documents(read_text(tmp_path / "empty.txt")),
            tiny[2].tokenizer,
            PplSettings("lm-eval", 64, 64),
        )
