"""Every broken input is one line naming the file and the problem, exit code 2, no traceback."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import run_cli
from synthetic import TINY, T, build_gguf, gpt2_tokenizer

from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import ModelFile
from gpt2cli.gguf_write import TensorData, write_gpt2_gguf


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
    rng = np.random.default_rng(0)
    params = {}

    def tensors():
        yield from (TensorData(n, v.astype(np.float32), T.F32) for n, v in params.items())
        # IQ4_NL: 32 weights in 18 bytes, a type no kernel here supports
        yield TensorData(
            "blk.0.ffn_up.weight", rng.integers(0, 255, (TINY.n_ff, 36), dtype=np.uint8), T.IQ4_NL
        )

    src = tmp_path / "src.gguf"
    params.update(build_gguf(src, skip=("blk.0.ffn_up.weight",)))
    write_gpt2_gguf(path, TINY, tensors(), gpt2_tokenizer(), file_type=0)
    expect_error(path, "unsupported block type IQ4_NL")


def test_output_weight_present_or_tied(tmp_path):
    path = tmp_path / "untied.gguf"
    build_gguf(path, tied=False)
    mf = ModelFile(path)
    assert not mf.tied_output and mf.weights.output is not mf.weights.token_embd
