"""`gpt2 score` and `gpt2 embed`: packed batches against the numpy reference and transformers, word sums by
hand, shards, reading texts and bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from hf_reference import transformers_gpt2
from reference_gpt2 import hidden_states, linear
from synthetic import TINY

from gpt2cli.embed import embed_texts
from gpt2cli.errors import Gpt2Error
from gpt2cli.score import TextScore, score_texts, word_scores
from gpt2cli.texts import Shard, batches, read_texts

TEXTS = [
    "The lighthouse stood on a rock two miles from the harbour.",
    "",
    "  Café owners still sell postcards of the tower — €2 each. ",
    "x",
    "He died in the winter of 1923; the log's last entry reads only: calm sea, clear sky, lamp lit.",
    "<|endoftext|> after a separator 🙂",
]
EOT = 50256


def reference_states(params: dict[str, np.ndarray], ids: list[int]) -> list[np.ndarray]:
    return hidden_states(params, ids, TINY.n_head, TINY.layer_norm_eps)


def reference_log_probs(params: dict[str, np.ndarray], ids: list[int], bos: bool) -> np.ndarray:
    """log p(token | before) of every token of `ids` in f64, NaN for an unscored first token."""
    inputs = [EOT, *ids[:-1]] if bos else ids[:-1]
    if not inputs:
        return np.full(len(ids), np.nan)
    logits = linear(reference_states(params, inputs)[-1], params["token_embd.weight"])  # [m, vocab]
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    targets = ids if bos else ids[1:]
    scored = log_p[np.arange(len(targets)), targets]
    return scored if bos else np.concatenate([[np.nan], scored])


# --- score ---


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("batch_tokens", [1, 24, 1024])
def test_log_probs_equal_the_reference(tiny, bos, batch_tokens):
    _, params, mf, model = tiny
    scores = list(score_texts(model, mf.tokenizer, TEXTS, bos=bos, batch_tokens=batch_tokens))
    assert [s.index for s in scores] == list(range(len(TEXTS)))
    for s, text in zip(scores, TEXTS, strict=True):
        assert s.text == text and s.ids.tolist() == mf.tokenizer.encode(text)
        want = reference_log_probs(params, s.ids.tolist(), bos)
        np.testing.assert_allclose(s.log_prob, want, atol=1e-4, equal_nan=True)
        assert s.scored == (len(s.ids) if bos else max(len(s.ids) - 1, 0))
    empty = scores[1]
    assert (len(empty.ids), empty.scored, empty.total_log_prob) == (0, 0, 0.0)


def test_entropy_and_rank_equal_the_reference(tiny):
    _, params, mf, model = tiny
    (s,) = score_texts(model, mf.tokenizer, TEXTS[4:5])
    ids = s.ids.tolist()
    logits = linear(reference_states(params, [EOT, *ids[:-1]])[-1], params["token_embd.weight"])
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(s.entropy, -(np.exp(log_p) * log_p).sum(axis=1), atol=1e-4)
    want_rank = (log_p > log_p[np.arange(len(ids)), ids][:, None]).sum(axis=1)
    assert np.abs(s.rank - want_rank).max() <= 1  # f32 logits may swap a near tie


def test_packed_texts_do_not_see_each_other(tiny):
    _, _, mf, model = tiny
    alone = [list(score_texts(model, mf.tokenizer, [t]))[0].log_prob for t in TEXTS]
    packed = [s.log_prob for s in score_texts(model, mf.tokenizer, TEXTS, batch_tokens=10_000)]
    for a, b in zip(alone, packed, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=True)


def test_log_probs_equal_transformers(tiny):
    _, params, mf, model = tiny
    import torch

    hf = transformers_gpt2(params, TINY)
    for s in score_texts(model, mf.tokenizer, TEXTS):
        if not len(s.ids):
            continue
        with torch.no_grad():
            logits = hf(torch.tensor([[EOT, *s.ids.tolist()]])).logits[0, :-1]
        want = torch.log_softmax(logits, dim=-1)[torch.arange(len(s.ids)), torch.tensor(s.ids)].numpy()
        np.testing.assert_allclose(s.log_prob, want, atol=1e-4)


def fake_score(tokenizer, text: str) -> TextScore:
    """Token i has log-probability -2^i, so a word's sum names exactly which tokens it holds."""
    ids = np.array(tokenizer.encode(text))
    log_prob = -(2.0 ** np.arange(len(ids)))
    return TextScore(0, text, ids, log_prob, np.zeros(len(ids)), np.zeros(len(ids), dtype=np.int64))


def tokens_sum(*positions: int) -> float:
    return -float(sum(2.0**i for i in positions))


def test_word_sums_by_hand(tiny):
    tok = tiny[2].tokenizer
    # Tokens: ' The' ' naïve' ' café' '-' 'owner' '\xe2\x80' '\x99' 's' ' ' ' dé' 'j' 'à' ' v' 'u' ','
    # ' (' 'un' 'bel' 'iev' 'ably' ')' ' 🙂' '!': the ’ is split across two tokens, and the second space
    # before "déjà" is a token of its own, which goes with "déjà".
    text = " The naïve café-owner\u2019s  déjà vu, (unbelievably) 🙂!"
    got = [(w.word, w.tokens, w.log_prob) for w in word_scores(fake_score(tok, text), tok)]
    assert got == [
        ("The", 1, tokens_sum(0)),
        ("naïve", 1, tokens_sum(1)),
        ("café-owner\u2019s", 6, tokens_sum(2, 3, 4, 5, 6, 7)),
        ("déjà", 4, tokens_sum(8, 9, 10, 11)),
        ("vu,", 3, tokens_sum(12, 13, 14)),
        ("(unbelievably)", 6, tokens_sum(15, 16, 17, 18, 19, 20)),
        ("🙂!", 2, tokens_sum(21, 22)),
    ]
    # Tokens: ' ' ' leading' ' spaces' ' and' ' trailing' ' ' ' ': leading whitespace goes with the first
    # word, trailing whitespace with the last, so the words sum to the text.
    text = "  leading spaces and trailing  "
    got = [(w.word, w.tokens, w.log_prob) for w in word_scores(fake_score(tok, text), tok)]
    assert got == [
        ("leading", 2, tokens_sum(0, 1)),
        ("spaces", 1, tokens_sum(2)),
        ("and", 1, tokens_sum(3)),
        ("trailing", 3, tokens_sum(4, 5, 6)),
    ]
    assert word_scores(fake_score(tok, " \n "), tok) == []


def test_words_leave_out_an_unscored_first_token(tiny):
    _, _, mf, model = tiny
    tok = mf.tokenizer
    (s,) = score_texts(model, tok, ["Hello world again"], bos=False)
    words = word_scores(s, tok)
    assert [w.word for w in words] == ["Hello", "world", "again"]
    assert words[0].log_prob == 0.0 and np.isnan(s.log_prob[0])
    assert sum(w.log_prob for w in words) == pytest.approx(s.total_log_prob, rel=1e-12)


def test_over_long_text_names_its_line(tiny):
    _, _, mf, model = tiny
    long_text = " word" * (TINY.n_ctx + 1)  # n_ctx + 1 tokens
    texts = ["short", long_text]
    with pytest.raises(Gpt2Error, match=r"line 8: 65 tokens, more than the 64 .* --truncate"):
        list(score_texts(model, mf.tokenizer, texts, first_index=6))
    # Without <|endoftext|> the last token is only a target: n_ctx + 1 tokens fit.
    assert list(score_texts(model, mf.tokenizer, texts, bos=False))[1].scored == TINY.n_ctx
    (_, cut) = score_texts(model, mf.tokenizer, texts, truncate=True)
    assert (len(cut.ids), cut.scored) == (TINY.n_ctx, TINY.n_ctx)


# --- embed ---


@pytest.mark.parametrize("layer", [0, 1, 2, None])
def test_embed_states_equal_the_reference(tiny, layer):
    _, params, mf, model = tiny
    texts = [t for t in TEXTS if t]
    for pool in ("mean", "last", "none"):
        got = list(embed_texts(model, mf.tokenizer, texts, layer=layer, pool=pool, batch_tokens=30))
        for states, text in zip(got, texts, strict=True):
            want = reference_states(params, mf.tokenizer.encode(text))[
                TINY.n_layer if layer is None else layer
            ]
            want = {"mean": want.mean(axis=0), "last": want[-1], "none": want}[pool]
            assert states.dtype == np.float32
            np.testing.assert_allclose(states, want, atol=1e-4)


def test_embed_empty_text(tiny):
    _, _, mf, model = tiny
    mean, last, none = (
        list(embed_texts(model, mf.tokenizer, [""], pool=p))[0] for p in ("mean", "last", "none")
    )
    assert np.isnan(mean).all() and np.isnan(last).all() and mean.shape == (TINY.n_embd,)
    assert none.shape == (0, TINY.n_embd)


def test_embed_states_equal_transformers(tiny):
    _, params, mf, model = tiny
    import torch

    hf = transformers_gpt2(params, TINY, lm_head=False)
    text = TEXTS[4]
    with torch.no_grad():
        out = hf(torch.tensor([mf.tokenizer.encode(text)]), output_hidden_states=True)
    assert len(out.hidden_states) == TINY.n_layer + 1
    np.testing.assert_allclose(out.hidden_states[-1].numpy(), out.last_hidden_state.numpy())
    for layer, want in enumerate(out.hidden_states):
        (got,) = embed_texts(model, mf.tokenizer, [text], layer=layer, pool="none")
        np.testing.assert_allclose(got, want[0].numpy(), atol=1e-4)


# --- texts, batches, shards ---


def test_batches_pack_consecutive_texts():
    inputs = [np.arange(n) for n in (3, 0, 4, 5, 9, 1)]
    got = [(b.texts, b.lengths.tolist()) for b in batches(inputs, batch_tokens=8)]
    assert got == [([0, 2], [3, 4]), ([3], [5]), ([4], [9]), ([5], [1])]


@pytest.mark.parametrize(("total", "count"), [(10, 3), (2, 5), (0, 2), (7, 1)])
def test_shards_split_in_order(total, count):
    parts = [Shard(k, count).range(total) for k in range(1, count + 1)]
    assert [i for part in parts for i in part] == list(range(total))


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2"])
def test_bad_shard_spec(spec):
    with pytest.raises(Gpt2Error, match="--shard must be K/N"):
        Shard.parse(spec)


def test_read_texts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\r\n\r\ntwo\nthree")
    assert read_texts(str(path)) == ["one", "", "two", "three"]
    path.write_bytes(b"one\n\n")
    assert read_texts(str(path)) == ["one", ""]
    path.write_bytes(b'{"text": "a"}\n{"text": "", "id": 3}\n')
    assert read_texts(str(path), jsonl=True) == ["a", ""]


@pytest.mark.parametrize(
    ("data", "jsonl", "message"),
    [
        (b"ok\nbad \xff here\n", False, r"invalid UTF-8 on line 2 at byte 7 \(0xff\)"),
        (b'{"text": "a"}\nnot json\n', True, "line 2 is not JSON"),
        (b'{"text": "a"}\n{"txt": "b"}\n', True, 'line 2 has no string field "text"'),
        (b'{"text": "a"}\n\n', True, "line 2 is not JSON"),
    ],
)
def test_bad_texts(tmp_path, data, jsonl, message):
    path = tmp_path / "t.txt"
    path.write_bytes(data)
    with pytest.raises(Gpt2Error, match=message):
        read_texts(str(path), jsonl=jsonl)


# --- command line ---


@pytest.fixture
def texts_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def read_tsv(out: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(out), delimiter="\t"))


def test_cli_score_tsv_json_and_shards(tiny, texts_file):
    _, _, mf, model = tiny
    code, out, err = run_cli(["score", str(texts_file), "-m", str(tiny[0])])
    assert code == 0, err
    rows = read_tsv(out)
    want = list(score_texts(model, mf.tokenizer, TEXTS))
    assert [r["text"] for r in rows] == TEXTS
    assert [int(r["tokens"]) for r in rows] == [len(s.ids) for s in want]
    assert float(rows[0]["logprob"]) == pytest.approx(want[0].total_log_prob, rel=1e-9)
    assert rows[1]["ppl"] == "" and rows[1]["logprob"] == "0.0"
    code, out, err = run_cli(["score", str(texts_file), "-m", str(tiny[0]), "--tokens", "--json"])
    assert code == 0, err
    tokens = [json.loads(line) for line in out.splitlines()]
    assert len(tokens) == sum(len(s.ids) for s in want)
    assert {
        "index",
        "position",
        "token_id",
        "token",
        "logprob",
        "surprisal_bits",
        "entropy_bits",
        "rank",
    } == set(tokens[0])
    pieces = []
    for k in (1, 2, 3):
        code, out, err = run_cli(
            ["score", str(texts_file), "-m", str(tiny[0]), "--words", "--shard", f"{k}/3"]
        )
        assert code == 0, err
        pieces += read_tsv(out)
    code, out, err = run_cli(["score", str(texts_file), "-m", str(tiny[0]), "--words"])
    whole = read_tsv(out)
    # Batches differ between shards, so the sums' rounding may: equal to f32 precision.
    assert [(r["index"], r["word"]) for r in pieces] == [(r["index"], r["word"]) for r in whole]
    np.testing.assert_allclose(
        [float(r["logprob"]) for r in pieces], [float(r["logprob"]) for r in whole], rtol=1e-6
    )


def test_cli_score_reads_stdin(tiny):
    code, out, err = run_cli(["score", "-", "-m", str(tiny[0]), "--json"], input="one\n\ntwo words\n")
    assert code == 0, err
    assert [json.loads(line)["tokens"] for line in out.splitlines()] == [1, 0, 2]


def test_cli_embed_files(tiny, texts_file, tmp_path):
    _, _, mf, model = tiny
    code, _, err = run_cli(["embed", str(texts_file), "-m", str(tiny[0]), "-o", str(tmp_path / "e.npy")])
    assert code == 0, err
    matrix = np.load(tmp_path / "e.npy")
    assert matrix.shape == (len(TEXTS), TINY.n_embd) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, np.stack(list(embed_texts(model, mf.tokenizer, TEXTS))))
    args = ["embed", str(texts_file), "-m", str(tiny[0]), "--pool", "none", "--layer", "1", "--shard", "2/2"]
    code, _, err = run_cli([*args, "-o", str(tmp_path / "e.npz")])
    assert code == 0, err
    arrays = np.load(tmp_path / "e.npz")
    assert sorted(arrays, key=int) == ["3", "4", "5"]
    assert arrays["3"].shape == (1, TINY.n_embd)
    code, out, err = run_cli(["embed", str(texts_file), "-m", str(tiny[0]), "--pool", "last"])
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[1] == {"index": 1, "embedding": None} and len(rows[0]["embedding"]) == TINY.n_embd


@pytest.mark.parametrize(
    ("args", "content", "message"),
    [
        (["score", "--tokens", "--words"], b"a\n", "give --tokens or --words, not both"),
        (["score"], b"a\n" + b" word" * 70 + b"\n", "line 2: 70 tokens"),
        (["score", "--jsonl"], b"not json\n", "line 1 is not JSON"),
        (["score"], b"caf\xe9\n", "invalid UTF-8 on line 1 at byte 3"),
        (["score", "--shard", "3/2"], b"a\n", "--shard must be K/N"),
        (["embed", "--layer", "3"], b"a\n", "--layer must be between 0 and 2"),
        (["embed", "--pool", "max"], b"a\n", "--pool must be one of"),
        (["embed", "-o", "x.npz"], b"a\n", "-o for --pool mean must be a .npy file"),
        (["embed", "--pool", "none", "-o", "x.npy"], b"a\n", "must be a .npz file"),
    ],
)
def test_cli_errors_are_one_line(tiny, tmp_path, args, content, message):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    code, out, err = run_cli([args[0], str(path), "-m", str(tiny[0]), *args[1:]])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpt2: error: ") and message in err


def test_cli_replace_and_truncate(tiny, tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"caf\xe9\n" + b" word" * 70 + b"\n")
    code, out, err = run_cli(["score", str(path), "-m", str(tiny[0]), "--errors", "replace", "--truncate"])
    assert code == 0, err
    rows = read_tsv(out)
    assert rows[0]["text"] == "caf\ufffd" and rows[1]["tokens"] == str(TINY.n_ctx)
