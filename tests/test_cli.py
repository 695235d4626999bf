"""`gpt2 generate` and `gpt2 models` end to end through the entry point."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import run_cli
from synthetic import T, build_gguf

from gpt2cli.generate import GenerationSettings
from gpt2cli.generate import generate as run_generate
from gpt2cli.gguf_file import ModelFile
from gpt2cli.gguf_reader import read_gguf
from gpt2cli.model import GPT2Model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    build_gguf(path, T.Q8_0)
    return path


def generate(path, *args: str) -> tuple[int, str, str]:
    return run_cli(["generate", "Hello, I'm a language model", "--model", str(path), *args])


def test_generate_streams_prompt_and_continuation(tiny_gguf):
    code, out, err = generate(tiny_gguf, "--seed", "42", "--max-new-tokens", "8")
    assert code == 0, err
    assert out.startswith("Hello, I'm a language model") and len(out) > len("Hello, I'm a language model")


def test_seed_makes_output_identical(tiny_gguf):
    first = generate(tiny_gguf, "--seed", "7", "--max-new-tokens", "12")
    second = generate(tiny_gguf, "--seed", "7", "--max-new-tokens", "12")
    other = generate(tiny_gguf, "--seed", "8", "--max-new-tokens", "12")
    assert first == second
    assert first[1] != other[1]


def test_json_one_object_per_sequence(tiny_gguf):
    code, out, err = generate(tiny_gguf, "--seed", "1", "--max-new-tokens", "5", "-n", "3", "--json")
    assert code == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["index"] for o in objects] == [0, 1, 2]
    for o in objects:
        assert o["prompt_tokens"] == 7 and o["generated_tokens"] <= 5
        assert o["generated_text"] == o["prompt"] + o["text"]
    assert len({tuple(o["token_ids"]) for o in objects}) > 1  # independent samples


def test_greedy_is_deterministic_without_seed(tiny_gguf):
    a = generate(tiny_gguf, "--temperature", "0", "--max-new-tokens", "6", "--json")
    b = generate(tiny_gguf, "--temperature", "0", "--max-new-tokens", "6", "--json")
    assert a == b and a[0] == 0


def test_max_length_counts_the_prompt(tiny_gguf):
    code, out, _ = generate(tiny_gguf, "--temperature", "0", "--max-length", "10", "--json")
    obj = json.loads(out)
    assert code == 0 and obj["prompt_tokens"] + obj["generated_tokens"] <= 10


def test_verbose_reports_speeds_on_stderr(tiny_gguf):
    code, out, err = generate(tiny_gguf, "--max-new-tokens", "3", "--verbose", "--json")
    assert code == 0
    assert "tokens/s" in err and "tokens/s" not in out


def test_prompt_longer_than_context(tiny_gguf):
    long_prompt = "word " * 200  # 200 tokens, the tiny model's context is 64
    code, _, err = run_cli(["generate", long_prompt, "--model", str(tiny_gguf)])
    assert code == 2 and "context" in err and err.count("\n") == 1
    code, out, err = run_cli(
        [
            "generate",
            long_prompt,
            "--model",
            str(tiny_gguf),
            "--truncate-prompt",
            "--max-new-tokens",
            "4",
            "--json",
        ]
    )
    assert code == 0, err
    obj = json.loads(out)
    assert obj["prompt_tokens"] + obj["generated_tokens"] <= 64


@pytest.mark.parametrize(
    "option",
    [
        ["--temperature", "-1"],
        ["--top-p", "1.5"],
        ["--top-k", "-3"],
        ["--repetition-penalty", "0"],
        ["--max-new-tokens", "-1"],
        ["--num-return-sequences", "0"],
        ["--max-new-tokens", "many"],
        ["--seed", "-1"],
        ["-n", "1e30"],
    ],
)
def test_out_of_range_options(tiny_gguf, option):
    code, out, err = generate(tiny_gguf, *option)
    assert code == 2
    assert err.startswith("gpt2: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_unknown_model_name():
    code, _, err = run_cli(["generate", "hi", "--model", "gpt5"])
    assert code == 2 and "gpt5" in err and err.count("\n") == 1


def test_empty_prompt_starts_from_endoftext(tiny_gguf):
    code, out, err = run_cli(["generate", "", "--model", str(tiny_gguf), "--max-new-tokens", "3", "--json"])
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == 1


def test_sequences_are_generated_in_bounded_batches(tiny_gguf):
    # Was: -n 1000000000 held every sequence (and a sampler per sequence) before printing any.
    mf = ModelFile(tiny_gguf)
    settings = GenerationSettings(max_new_tokens=2, num_return_sequences=10**30, seed=3)
    sequences = run_generate(GPT2Model(mf.weights, mf.config), mf.tokenizer, [464], settings)
    first_two = list(itertools.islice(sequences, 2))
    spawned = GenerationSettings(max_new_tokens=2, num_return_sequences=2, seed=3)
    assert [g.token_ids for g in first_two] == [
        g.token_ids for g in run_generate(GPT2Model(mf.weights, mf.config), mf.tokenizer, [464], spawned)
    ]


@pytest.mark.parametrize(
    "prompt, byte", [("Hello \udcff", "0xff at offset 6"), ("caf\udce9", "0xe9 at offset 3")]
)
def test_prompt_that_is_not_utf8(tiny_gguf, prompt, byte):
    # Was: UnicodeEncodeError. Python hands undecodable argv bytes over as lone surrogates.
    code, _, err = run_cli(["generate", prompt, "--model", str(tiny_gguf)])
    assert code == 2 and err == f"gpt2: error: the prompt is not valid UTF-8 (byte {byte})\n"


@pytest.fixture(scope="module")
def nan_gguf(tmp_path_factory):
    """An F32 model whose final norm weights are NaN: every logit is NaN."""
    path = tmp_path_factory.mktemp("nan") / "nan.F32.gguf"
    build_gguf(path, T.F32)
    info = read_gguf(path).tensors["output_norm.weight"]
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(np.full(info.shape, np.nan, dtype=np.float32).tobytes())
    return path


def test_logits_that_are_not_finite_are_one_line(nan_gguf, tmp_path):
    # Was: "zero-size array to reduction operation maximum" in sampling, NaN perplexities.
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    runs = [
        ["generate", "Hello", "--model", str(nan_gguf)],
        ["generate", "Hello", "--model", str(nan_gguf), "--top-k", "0", "--top-p", "0.5"],
        ["ppl", str(text), "--model", str(nan_gguf), "--json"],
        [
            "quantize",
            str(nan_gguf),
            "-o",
            str(tmp_path / "q.gguf"),
            "--eval",
            str(text),
            "--eval-tokens",
            "100",
        ],
    ]
    for args in runs:
        code, _, err = run_cli(args)
        assert (code, err) == (2, "gpt2: error: the model's logits are not finite\n"), args


def gpt2_subprocess(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpt2cli", *args], stderr=subprocess.PIPE, **kwargs)


def test_broken_pipe_ends_quietly(tiny_gguf):
    # Was: exit code 1 from click; now the status of a process killed by SIGPIPE, and no message.
    process = gpt2_subprocess(
        "generate",
        "Hello",
        "-m",
        str(tiny_gguf),
        "-n",
        "50",
        "--max-new-tokens",
        "20",
        stdout=subprocess.PIPE,
    )
    process.stdout.read(5)
    process.stdout.close()
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == b""


def test_closed_stdout_is_one_line(tiny_gguf):
    # Was: AttributeError on sys.stdout being None.
    process = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m gpt2cli generate Hello -m "{tiny_gguf}" >&-'],
        stderr=subprocess.PIPE,
        timeout=120,
        check=False,
    )
    assert (process.returncode, process.stderr) == (2, b"gpt2: error: standard output is closed\n")
