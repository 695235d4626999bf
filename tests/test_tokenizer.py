"""GPT-2 byte-level BPE against llama.cpp's test vectors, round trips, and streaming decode."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_reader import read_gguf
from gpt2cli.tokenizer import (
    BYTE_TO_CHAR,
    ENDOFTEXT,
    MAX_PIECE_CHARS,
    PRETOKENIZE_PATTERN,
    StreamDecoder,
    Tokenizer,
)

VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def gguf_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(tokenizer_dir / "ggml-vocab-gpt-2.gguf").metadata)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(tokenizer_dir)


@pytest.fixture
def tiny_tokenizer() -> Tokenizer:
    """All 256 byte tokens, three merges spelling " the", and an end-of-text token."""
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + ["Ġt", "he", "Ġthe", ENDOFTEXT]
    return Tokenizer(tokens, ["Ġ t", "h e", "Ġt he"], eos_id=259)


def read_llama_cpp_vectors(tokenizer_dir: Path) -> list[tuple[str, list[int]]]:
    """Inputs and ids as llama.cpp's test-tokenizer-0.cpp reads them: the newline before a separator is
    part of the separator, not of the input."""
    inputs = (tokenizer_dir / "ggml-vocab-gpt-2.gguf.inp").read_bytes().decode("utf-8")
    inputs = inputs.removesuffix(VECTOR_SEPARATOR).split(VECTOR_SEPARATOR)
    outputs = (tokenizer_dir / "ggml-vocab-gpt-2.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs)
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs, strict=True)]


@pytest.mark.parametrize("source", ["gguf_tokenizer", "hf_tokenizer"])
def test_llama_cpp_vectors(source: str, tokenizer_dir: Path, request: pytest.FixtureRequest) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(source)
    vectors = read_llama_cpp_vectors(tokenizer_dir)
    assert len(vectors) == 46
    for text, expected in vectors:
        assert tokenizer.encode(text) == expected, repr(text)
        assert tokenizer.decode(expected) == text


def test_gguf_and_openai_files_agree(gguf_tokenizer: Tokenizer, hf_tokenizer: Tokenizer) -> None:
    assert gguf_tokenizer.n_vocab == hf_tokenizer.n_vocab == 50257
    assert gguf_tokenizer.tokens == hf_tokenizer.tokens
    assert gguf_tokenizer.merges == hf_tokenizer.merges
    assert gguf_tokenizer.eos_id == hf_tokenizer.eos_id == 50256


def test_special_token(gguf_tokenizer: Tokenizer) -> None:
    text = f"a{ENDOFTEXT}b{ENDOFTEXT}"
    assert gguf_tokenizer.encode(text) == [64, 50256, 65, 50256]
    as_text = gguf_tokenizer.encode(text, allow_special=False)
    assert 50256 not in as_text
    assert gguf_tokenizer.decode(as_text) == text
    assert gguf_tokenizer.token_bytes(50256) == ENDOFTEXT.encode()


def test_known_pieces(gguf_tokenizer: Tokenizer) -> None:
    assert gguf_tokenizer.encode("Hello world") == [15496, 995]
    assert gguf_tokenizer.token_bytes(220) == b" "
    assert gguf_tokenizer.decode_bytes([12520, 248, 222]) == " 🚀".encode()
    assert gguf_tokenizer.decode([8582]) == "\ufffd"  # the first two of the rocket's four bytes


# Random text with the special token, and a near miss of it, at random places.
text_with_specials = st.lists(
    st.one_of(st.text(), st.just(ENDOFTEXT), st.just(" <|endoftext")), max_size=6
).map("".join)


@settings(max_examples=50, deadline=None)
@given(text=text_with_specials)
def test_round_trip(gguf_tokenizer: Tokenizer, text: str) -> None:
    assert gguf_tokenizer.decode(gguf_tokenizer.encode(text)) == text
    assert gguf_tokenizer.decode(gguf_tokenizer.encode(text, allow_special=False)) == text


@pytest.fixture(scope="module")
def merge_ranks(gguf_tokenizer: Tokenizer) -> dict[tuple[str, str], int]:
    splits = [(m, m.find(" ", 1)) for m in gguf_tokenizer.merges]
    return {(m[:i], m[i + 1 :]): rank for rank, (m, i) in enumerate(splits)}


def openai_bpe(ranks: dict[tuple[str, str], int], word: list[str]) -> list[str]:
    """OpenAI encoder.py's loop on strings: merge every occurrence of the best pair, then look again."""
    while len(word) > 1:
        best = min(zip(word, word[1:], strict=False), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if word[i : i + 2] == list(best):
                merged.append(best[0] + best[1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


@settings(max_examples=40, deadline=None)
@given(text=st.one_of(st.text(), st.text(alphabet="0123456789 -abcdeé😶\n", max_size=300)))
def test_matches_openai_merge_loop(
    gguf_tokenizer: Tokenizer, merge_ranks: dict[tuple[str, str], int], text: str
) -> None:
    expected = [
        gguf_tokenizer.token_to_id[token]
        for piece in PRETOKENIZE_PATTERN.findall(text)
        for token in openai_bpe(merge_ranks, [BYTE_TO_CHAR[b] for b in piece.encode()])
    ]
    assert gguf_tokenizer.encode(text, allow_special=False) == expected


@pytest.fixture(scope="module")
def llama_cpp_vocab(tokenizer_dir: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional oracle)")
    return llama_cpp.Llama(
        model_path=str(tokenizer_dir / "ggml-vocab-gpt-2.gguf"), vocab_only=True, verbose=False
    )


@settings(max_examples=50, deadline=None)
@given(text=text_with_specials)
def test_matches_llama_cpp(gguf_tokenizer: Tokenizer, llama_cpp_vocab, text: str) -> None:
    for special in (False, True):
        expected = llama_cpp_vocab.tokenize(text.encode(), add_bos=False, special=special)
        assert gguf_tokenizer.encode(text, allow_special=special) == expected


def test_long_piece(gguf_tokenizer: Tokenizer) -> None:
    digits = "".join(str(i * 7919 % 10) for i in range(20_000))
    ids = gguf_tokenizer.encode(digits)
    assert gguf_tokenizer.decode(ids) == digits
    assert len(ids) < len(digits) / 2


def test_pieces_longer_than_the_bound_are_chunked(gguf_tokenizer: Tokenizer) -> None:
    # A run without whitespace is BPE'd in MAX_PIECE_CHARS chunks: linear time, and the text round-trips.
    run = "a" * (3 * MAX_PIECE_CHARS + 5)
    chunk_ids = gguf_tokenizer.encode("a" * MAX_PIECE_CHARS)
    ids = gguf_tokenizer.encode(run)
    assert ids[: 3 * len(chunk_ids)] == 3 * chunk_ids
    assert gguf_tokenizer.decode(ids) == run


@settings(max_examples=25, deadline=None)
@given(text=st.text())
def test_stream_decoder_matches_decode(gguf_tokenizer: Tokenizer, text: str) -> None:
    stream = StreamDecoder(gguf_tokenizer)
    pieces = [stream.push(i) for i in gguf_tokenizer.encode(text)]
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text


def test_stream_decoder_holds_split_character(gguf_tokenizer: Tokenizer) -> None:
    ids = gguf_tokenizer.encode("Go 🚀!")
    assert ids == [5247, 12520, 248, 222, 0]  # " \xf0\x9f", "\x9a", "\x80": the rocket spans three tokens
    stream = StreamDecoder(gguf_tokenizer)
    assert [stream.push(i) for i in ids] == ["Go", " ", "", "🚀", "!"]
    assert stream.flush() == ""


def test_stream_decoder_flushes_unfinished_character(gguf_tokenizer: Tokenizer) -> None:
    stream = StreamDecoder(gguf_tokenizer)
    assert stream.push(8582) == ""
    assert stream.flush() == "\ufffd"
    assert stream.push(15496) == "Hello"


def test_wikitext_token_count(gguf_tokenizer: Tokenizer, shared_data: Path) -> None:
    text = (shared_data / "wikitext" / "wiki.test.raw").read_bytes().decode("utf-8").replace("\r\n", "\n")
    ids = gguf_tokenizer.encode(text)
    assert 280_000 < len(ids) < 286_000
    assert gguf_tokenizer.decode(ids) == text


def test_tiny_vocabulary_merges_by_rank(tiny_tokenizer: Tokenizer) -> None:
    assert tiny_tokenizer.encode(" the") == [258]
    assert tiny_tokenizer.encode(" th") == [256, ord("h")]
    assert tiny_tokenizer.encode(f"he{ENDOFTEXT}") == [257, 259]
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("the thé\n")) == "the thé\n"


def write_vocab_gguf(path: Path, tokenizer: Tokenizer | None = None, model: str = "gpt2") -> dict:
    writer = gguf.GGUFWriter(path, arch="gpt2")
    if tokenizer is None:
        writer.add_tokenizer_model(model)
    else:
        tokenizer.add_to_gguf(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_gguf(path).metadata


def test_gguf_fields_round_trip(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    metadata = write_vocab_gguf(tmp_path / "vocab.gguf", tiny_tokenizer)
    loaded = Tokenizer.from_gguf(metadata)
    assert loaded.tokens == tiny_tokenizer.tokens
    assert loaded.merges == tiny_tokenizer.merges
    assert loaded.eos_id == 259
    assert metadata["tokenizer.ggml.token_type"][-2:].tolist() == [1, 3]
    assert metadata["tokenizer.ggml.bos_token_id"] == 259


def test_gguf_errors(tmp_path: Path) -> None:
    with pytest.raises(Gpt2Error, match="not GPT-2"):
        Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "llama.gguf", model="llama"))
    with pytest.raises(Gpt2Error, match="lacks tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "no-tokens.gguf"))


def test_bad_vocabularies(tmp_path: Path) -> None:
    with pytest.raises(Gpt2Error, match="no vocab.json"):
        Tokenizer.from_hf_dir(tmp_path)
    byte_tokens = [BYTE_TO_CHAR[b] for b in range(256)]
    with pytest.raises(Gpt2Error, match="no token for byte"):
        Tokenizer(byte_tokens[1:], [], eos_id=0)
    with pytest.raises(Gpt2Error, match="a merge makes 'ab', which is not a vocabulary token"):
        Tokenizer(byte_tokens, ["a b"], eos_id=0).encode("ab")
