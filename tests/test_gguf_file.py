"""Every broken input is one line naming the file and the problem, exit code 2, no traceback."""

from __future__ import annotations

import dataclasses
import struct

import gguf_raw
import numpy as np
import pytest
from cli_helpers import run_cli
from gguf_raw import RawGGUF, Value
from synthetic import TINY, T, build_gguf, gpt2_tokenizer

from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import ModelFile
from gpt2cli.gguf_reader import ARRAY, STRING, read_gguf
from gpt2cli.gguf_write import TensorPlan, write_gpt2_gguf


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "tiny.gguf"
    build_gguf(path)
    return path


def expect_error(path, pattern: str) -> None:
    with pytest.raises(Gpt2Error, match=pattern) as info:
        ModelFile(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    code, out, err = run_cli(["generate", "hi", "--model", str(path), "--max-new-tokens", "2"])
    assert code == 2
    assert err.strip().count("\n") == 0 and pattern.split("|")[0].lower() in err.lower()
    assert "Traceback" not in err + out


def test_good_file_loads(good_gguf):
    mf = ModelFile(good_gguf)
    assert mf.config.n_layer == TINY.n_layer and mf.config.n_vocab == 50257
    assert mf.tied_output and mf.weights.output is mf.weights.token_embd


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such file")


def test_not_gguf(tmp_path):
    path = tmp_path / "text.gguf"
    path.write_text("hello, not a model\n")
    expect_error(path, "not a GGUF file")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated(tmp_path, good_gguf, keep):
    data = good_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(path, "truncated")


@pytest.mark.parametrize("size", range(4000, 4009))  # inside the vocabulary: in a string or its length
def test_truncated_header(tmp_path, good_gguf, size):
    path = tmp_path / "cut.gguf"
    path.write_bytes(good_gguf.read_bytes()[:size])
    expect_error(path, "truncated or corrupt")


def test_wrong_architecture(tmp_path, good_gguf):
    data = bytearray(good_gguf.read_bytes())
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4 + 8  # value type u32, string length u64
    assert data[at : at + 4] == b"gpt2"
    data[at : at + 4] = b"gptj"
    path = tmp_path / "arch.gguf"
    path.write_bytes(bytes(data))
    expect_error(path, "architecture")


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    build_gguf(path, skip=("blk.1.ffn_up.bias",))
    expect_error(path, "missing tensor blk.1.ffn_up.bias")


def test_wrong_shape(tmp_path):
    path = tmp_path / "shape.gguf"
    build_gguf(path, shape_override={"blk.0.attn_output.weight": (TINY.n_embd, 2 * TINY.n_embd)})
    expect_error(path, "shape")


def test_unsupported_block_type(tmp_path):
    path = tmp_path / "iq.gguf"
    src = tmp_path / "src.gguf"
    params = build_gguf(src, skip=("blk.0.ffn_up.weight",))
    plan = [TensorPlan(n, v.shape, T.F32) for n, v in params.items()]
    data = [v.astype(np.float32) for v in params.values()]
    # IQ4_NL: 32 weights in 18 bytes, a type no kernel here supports
    plan.append(TensorPlan("blk.0.ffn_up.weight", (TINY.n_ff, TINY.n_embd), T.IQ4_NL))
    data.append(np.random.default_rng(0).integers(0, 255, (TINY.n_ff, 36), dtype=np.uint8))
    write_gpt2_gguf(path, TINY, plan, data, gpt2_tokenizer(), file_type=0)
    expect_error(path, "unsupported block type IQ4_NL")


def test_output_weight_present_or_tied(tmp_path):
    path = tmp_path / "untied.gguf"
    build_gguf(path, tied=False)
    mf = ModelFile(path)
    assert not mf.tied_output and mf.weights.output is not mf.weights.token_embd


# --- values behind the structure (issue 10's Low list): each was a traceback or silently accepted ---


def set_value(key: str, vtype: int, value):
    def edit(raw: RawGGUF) -> None:
        if any(k == key for k, _ in raw.kvs):
            raw.set(key, Value(vtype, value))
        else:
            raw.kvs.append((key, Value(vtype, value)))
        if key == "general.alignment" and vtype == gguf_raw.U32 and value > 0:
            raw.alignment = value

    return edit


def tensor_edit(name: str, **changes):
    def edit(raw: RawGGUF) -> None:
        for t in raw.tensors:
            if t.name == name:
                for attr, value in changes.items():
                    setattr(t, attr, value)

    return edit


def duplicate_key(raw: RawGGUF) -> None:
    raw.kvs.append(raw.kvs[1])


def duplicate_tensor(raw: RawGGUF) -> None:
    raw.tensors.append(raw.tensors[-1])


def nested_arrays(raw: RawGGUF) -> None:
    encoded = struct.pack("<IQI", gguf_raw.U32, 1, 1)
    for _ in range(990):
        encoded = struct.pack("<IQ", ARRAY, 1) + encoded
    raw.kvs.append(("x.deep", Value(ARRAY, encoded)))


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "edit, message",
    [
        (set_value("general.alignment", STRING, "32"), "general.alignment '32' is not a power of two"),
        (set_value("general.alignment", gguf_raw.F32, NAN), "general.alignment nan is not"),
        (set_value("general.alignment", gguf_raw.I32, -32), "general.alignment -32 is not"),
        (set_value("general.alignment", ARRAY, (gguf_raw.U32, [32])), "general.alignment array"),
        (set_value("general.alignment", gguf_raw.U32, 0), "general.alignment 0 is not"),
        *[
            (set_value("general.alignment", gguf_raw.U32, a), f"general.alignment {a} is not")
            for a in (3, 4, 48)
        ],
        (set_value("gpt2.context_length", gguf_raw.F32, INF), "gpt2.context_length is inf, not a int"),
        (set_value("gpt2.embedding_length", gguf_raw.F64, INF), "gpt2.embedding_length is inf"),
        (set_value("gpt2.embedding_length", STRING, "64"), "gpt2.embedding_length is '64'"),
        (set_value("gpt2.attention.head_count", gguf_raw.U32, 3), "not a multiple of the head count 3"),
        (set_value("gpt2.attention.head_count", gguf_raw.U32, 0), "n_head = 0 is not between 1"),
        (set_value("gpt2.block_count", gguf_raw.U32, 1), "unexpected tensor blk.1"),
        (
            set_value("gpt2.block_count", gguf_raw.U64, 10**9),
            "1000000000 layers expected, the tensors are of 2",
        ),
        (duplicate_key, "appears twice"),
        (duplicate_tensor, "two tensors are named"),
        (nested_arrays, "an array of value type 9"),
        (tensor_edit("blk.0.attn_norm.bias", dims=[0]), "dimension of 0"),
        (tensor_edit("token_embd.weight", dims=[]), "tensor token_embd.weight has shape"),
        (tensor_edit("token_embd.weight", dims=[64, 2**58]), "runs past the end"),
        (tensor_edit("blk.0.attn_norm.weight", raw_type=28), "overlaps tensor"),  # F64: twice the bytes
        (tensor_edit("blk.0.attn_norm.weight", offset=4), "not a multiple of 32"),
    ],
)
def test_bad_values_are_one_line(tmp_path, good_gguf, edit, message):
    raw = gguf_raw.parse(good_gguf)
    edit(raw)
    path = tmp_path / "bad.gguf"
    raw.write(path)
    expect_error(path, message)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tokenizer.ggml.eos_token_id", Value(STRING, "50256"), "eos_token_id is '50256', not an integer"),
        ("tokenizer.ggml.eos_token_id", Value(gguf_raw.F32, NAN), "eos_token_id is nan"),
        ("tokenizer.ggml.eos_token_id", Value(ARRAY, (gguf_raw.U32, [1])), "eos_token_id is array"),
        ("tokenizer.ggml.tokens", Value(ARRAY, (gguf_raw.U32, list(range(50257)))), "tokens is not an array"),
        ("tokenizer.ggml.merges", Value(ARRAY, (gguf_raw.I32, [1, 2])), "merges is not an array of strings"),
        ("tokenizer.ggml.merges", Value(STRING, "a b"), "merges is not an array of strings"),
    ],
)
def test_bad_vocabulary_values_are_one_line(tmp_path, good_gguf, key, value, message):
    raw = gguf_raw.parse(good_gguf)
    raw.set(key, value)
    path = tmp_path / "bad.gguf"
    raw.write(path)
    code, out, err = run_cli(["generate", "hi", "--model", str(path), "--max-new-tokens", "2"])
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_empty_eos_token(tmp_path, good_gguf):
    raw = gguf_raw.parse(good_gguf)
    etype, tokens = raw.get("tokenizer.ggml.tokens").value
    raw.set("tokenizer.ggml.tokens", Value(ARRAY, (etype, [*tokens[:-1], ""])))
    path = tmp_path / "bad.gguf"
    raw.write(path)
    code, _, err = run_cli(["generate", "hi", "--model", str(path), "--max-new-tokens", "2"])
    assert code == 2 and "eos token 50256 is an empty string" in err


def test_more_embedding_rows_than_tokens(tmp_path):
    # Was: IndexError once a sampled id was past the vocabulary.
    path = tmp_path / "rows.gguf"
    build_gguf(path, config=dataclasses.replace(TINY, n_vocab=50300))
    expect_error(path, "token_embd has 50300 rows, the vocabulary 50257 tokens")


def test_numeric_arrays_stay_compact(good_gguf):
    # Was: .tolist(), ~9.5x the array's bytes in Python integers.
    types = read_gguf(good_gguf).metadata["tokenizer.ggml.token_type"]
    assert isinstance(types, np.ndarray) and types.dtype == np.int32 and len(types) == 50257


@pytest.mark.parametrize("odd", ["a\0b", "", "\0", "é\0ü"])
def test_string_arrays_read_exactly(tmp_path, good_gguf, odd):
    # The vocabulary is decoded all at once, split at NULs standing in for the length fields; strings that
    # hold NULs themselves or are empty must come back as written.
    raw = gguf_raw.parse(good_gguf)
    strings = ["x", odd, "Ġthe", odd, "y"]
    raw.kvs.append(("test.strings", Value(ARRAY, (STRING, strings))))
    path = tmp_path / "strings.gguf"
    raw.write(path)
    assert read_gguf(path).metadata["test.strings"] == strings
