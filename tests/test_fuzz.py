"""Seeded fuzzing of what a user can feed `gpt2`: mutated GGUF files (the tiny model with the real
vocabulary), mutated Hugging Face checkpoint directories, extreme options and odd text files.

Every case runs the command in-process, under a time limit and an address-space limit, and must end with
exit code 0, or 2 and exactly one line on stderr; no traceback, no other exception, no hang, no runaway
memory, and no file left behind but a requested output. The default run is bounded (about a minute);
by hand, for example:

    GPT2_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py -q

runs that many mutated files and a quarter as many option/text cases and checkpoint cases each
(GPT2_FUZZ_CASES sets those two counts).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import struct
import tempfile
from pathlib import Path

import gguf_raw
import numpy as np
import pytest
from cli_helpers import run_cli
from gguf_raw import Tensor, Value
from synthetic import T, build_gguf
from test_convert import hf_state_dict, write_hf_dir

from gpt2cli.gguf_reader import ARRAY, SCALAR_FORMATS, STRING

FILE_EXAMPLES = int(os.environ.get("GPT2_FUZZ_EXAMPLES", "24"))
OTHER_EXAMPLES = int(os.environ.get("GPT2_FUZZ_CASES", max(FILE_EXAMPLES // 4, 6)))
CASE_SECONDS = 120  # a tiny model: anything near this is a hang
CASE_EXTRA_MEMORY = 4 << 30  # address space a case may add to the process's

TEXT = "The lighthouse stood on a rock two miles from the harbour, and for forty-one years it burned.\n"


@contextlib.contextmanager
def bounded():
    """Fails the case (TimeoutError) after CASE_SECONDS; MemoryError past CASE_EXTRA_MEMORY more bytes."""

    def timeout(signum, frame):
        raise TimeoutError(f"no answer within {CASE_SECONDS} s")

    vm_bytes = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_bytes + CASE_EXTRA_MEMORY
    resource.setrlimit(
        resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(CASE_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def files_under(directory: Path) -> set[Path]:
    return set(directory.rglob("*"))


@contextlib.contextmanager
def temp_dir_in(directory: Path):
    """The process's temporary directory is `directory` within the block (so leftovers show there)."""
    previous, tempfile.tempdir = tempfile.tempdir, str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def run_case(workdir: Path, args: list[str], output: Path | None = None) -> str | None:
    """Run `gpt2 ARGS` in `workdir`; None if it behaved, else what went wrong (with the arguments)."""
    env = {"GPT2_HOME": str(workdir / "home"), "HF_HUB_OFFLINE": "1"}
    (workdir / "home").mkdir(exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    before = files_under(workdir)
    try:
        with bounded(), temp_dir_in(workdir / "tmp"):
            code, out, err = run_cli(args, env)
    # Any exception escaping the entry point is a finding, whatever its type.
    except BaseException as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e} for {args}"
    problems = []
    if code not in (0, 2):
        problems.append(f"exit code {code}")
    if code == 2 and (not err.startswith("gpt2: error: ") or err.count("\n") != 1):
        problems.append(f"stderr is not one error line: {err[:300]!r}")
    if "Traceback" in err or "Warning" in err:
        problems.append(f"stderr: {err[:300]!r}")
    left = files_under(workdir) - before
    if code == 0 and output is not None:
        left.discard(output)
    if left:
        problems.append(f"left behind: {sorted(map(str, left))}")
    return f"{'; '.join(problems)} for {args}" if problems else None


# --- mutated GGUF files ---------------------------------------------------------------------------------


class Mutator:
    """A valid file's parts, kept encoded so a mutation re-encodes only what it changes."""

    def __init__(self, path: Path) -> None:
        self.raw = gguf_raw.parse(path)
        self.kvs = [gguf_raw.encode_kv(k, v) for k, v in self.raw.kvs]
        self.tensors = [gguf_raw.encode_tensor(t) for t in self.raw.tensors]
        self.file = path.read_bytes()
        self.header_end = len(self.file) - len(self.raw.data)

    def mutate(self, rng: random.Random) -> bytes:
        kind = rng.choice(["bytes", "bytes", "truncate", "value", "value", "tensor", "tensor", "structure"])
        if kind == "bytes":
            data = bytearray(self.file)
            # Most flips land in the header's small fields, some in the vocabulary and the weights.
            spans = [(0, 64), (self.header_end - 4000, self.header_end), (0, len(data))]
            for _ in range(rng.choice([1, 2, 8])):
                lo, hi = rng.choice(spans)
                data[rng.randrange(lo, hi)] = rng.randrange(256)
            return bytes(data)
        if kind == "truncate":
            return self.file[: rng.randrange(len(self.file))]
        kvs, tensors, data = list(self.kvs), list(self.tensors), self.raw.data
        alignment = self.raw.alignment
        if kind == "value":
            i = rng.randrange(len(kvs))
            key = rng.choice([self.raw.kvs[i][0], "general.alignment"])
            value = random_value(rng)
            if key == "general.alignment":
                kvs.append(gguf_raw.encode_kv(key, value))
                if value.vtype in (gguf_raw.U32, gguf_raw.U64) and 0 < value.value < 1 << 16:
                    alignment = value.value
            else:
                kvs[i] = gguf_raw.encode_kv(key, value)
        elif kind == "tensor":
            i = rng.randrange(len(tensors))
            t = self.raw.tensors[i]
            field = rng.choice(["dims", "type", "offset", "name"])
            dims, raw_type, offset, name = list(t.dims), t.raw_type, t.offset, t.name
            if field == "dims":
                dims = rng.choice(
                    [[], [0], [*dims, 1], dims[:-1], [d * 2 for d in dims], [2**58, 64], [1] * 5]
                )
            elif field == "type":
                raw_type = rng.choice([0, 1, 2, 8, 12, 14, 20, 28, 30, 39, 1000])
            elif field == "offset":
                offset = rng.choice([0, offset + 1, offset + 32, len(data), 2**63, offset - 32])
            else:
                name = rng.choice(
                    [self.raw.tensors[(i + 1) % len(tensors)].name, "x", "", "blk.9.ffn_up.weight"]
                )
            tensors[i] = gguf_raw.encode_tensor(Tensor(name, dims, raw_type, max(offset, 0)))
        else:
            action = rng.choice(["dup kv", "drop kv", "dup tensor", "drop tensor", "nan", "counts"])
            if action == "dup kv":
                kvs.append(rng.choice(kvs))
            elif action == "drop kv":
                kvs.pop(rng.randrange(len(kvs)))
            elif action == "dup tensor":
                tensors.append(rng.choice(tensors))
            elif action == "drop tensor":
                tensors.pop(rng.randrange(len(tensors)))
            elif action == "nan":
                t = rng.choice(self.raw.tensors)
                poison = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf"), 3e38]))
                at = t.offset + 4 * rng.randrange(8)
                data = data[:at] + poison * 64 + data[at + 256 :]
            else:
                out = bytearray(gguf_raw.assemble(self.raw.version, kvs, tensors, data, alignment))
                field_at = rng.choice([4, 8, 16])  # version, tensor count, key count
                fmt = "<I" if field_at == 4 else "<Q"
                struct.pack_into(fmt, out, field_at, rng.choice([0, 1, 3, 2**31, 2**32 - 1]))
                return bytes(out)
        return gguf_raw.assemble(self.raw.version, kvs, tensors, data, alignment)


def random_value(rng: random.Random) -> Value:
    vtype = rng.choice([*SCALAR_FORMATS, STRING, ARRAY, ARRAY])
    if vtype == STRING:
        return Value(STRING, rng.choice(["", "gpt2", "/", "../../x", "a\0b", "\udcff", "x" * 1000]))
    if vtype == ARRAY:
        etype = rng.choice([STRING, gguf_raw.U32, gguf_raw.F32, gguf_raw.U8])
        items = ["a", "b c", ""] if etype == STRING else [0, 1, 2]
        return Value(ARRAY, (etype, items * rng.choice([0, 1, 100])))
    fmt = SCALAR_FORMATS[vtype]
    if fmt in ("<f", "<d"):
        return Value(vtype, rng.choice([0.0, -1.0, 1e-5, float("nan"), float("inf"), 3.0e38]))
    if fmt == "<?":
        return Value(vtype, rng.choice([True, False]))
    bits = struct.calcsize(fmt) * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if fmt.islower() else (0, (1 << bits) - 1)
    pool = [lo, hi, 0, 1, 3, 5, 7, 8, 48, 64, 50256, 50257, 2**40]
    return Value(vtype, rng.choice([v for v in pool if lo <= v <= hi]))


@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    q8, f32 = directory / "tiny.Q8_0.gguf", directory / "tiny.F32.gguf"
    build_gguf(q8, T.Q8_0)
    build_gguf(f32, T.F32)
    return Mutator(q8), Mutator(f32)


def commands_for(path: Path, workdir: Path, rng: random.Random) -> tuple[list[str], Path | None]:
    text = workdir / "text.txt"
    text.write_text(TEXT * 4)
    choice = rng.choice(["generate", "generate", "ppl", "quantize"])
    if choice == "generate":
        return ["generate", "Hello", "-m", str(path), "--max-new-tokens", "3", "--seed", "1"], None
    if choice == "ppl":
        return ["ppl", str(text), "-m", str(path), "--ctx", "16", "--max-tokens", "64", "--json"], None
    output = workdir / "out.gguf"
    return ["quantize", str(path), "--type", rng.choice(["Q8_0", "Q4_0", "F16"]), "-o", str(output)], output


@pytest.mark.parametrize("seed", range(FILE_EXAMPLES))
def test_mutated_gguf(tmp_path, fuzz_sources, seed):
    rng = random.Random(seed)
    mutator = fuzz_sources[seed % 2]
    path = tmp_path / "model.gguf"
    path.write_bytes(mutator.mutate(rng))
    args, output = commands_for(path, tmp_path, rng)
    assert run_case(tmp_path, args, output) is None


# --- options and text files -----------------------------------------------------------------------------

OPTION_VALUES = {
    "--temperature": ["0", "1e-38", "1e-45", "1e38", "-1", "nan", "inf", "0.7", "x", ""],
    "--top-k": ["0", "1", "-3", "50257", "99999999999999999999", "1.5"],
    "--top-p": ["1", "0.5", "1e-30", "0", "1.5", "nan"],
    "--repetition-penalty": ["1e-40", "1e40", "1e-300", "0", "-1", "nan", "inf", "1.3"],
    "--seed": ["-1", "0", "42", "99999999999999999999999", "1e30", "x"],
    "-n": ["0", "1", "2", "-1", "1e30", "x"],
    "--max-new-tokens": ["0", "1", "5", "-1", "1e30", "99999999999999999999", ""],
    "--max-length": ["0", "1", "10", "1000000", "-5"],
}
PROMPTS = ["Hello", "", "<|endoftext|>", "\udcff", "a" * 5000, "x\0y", "🙂" * 40, "\r\n" * 30]


def random_text(rng: random.Random) -> bytes:
    kind = rng.choice(["run", "random bytes", "unicode", "crlf", "empty", "bad utf8", "special"])
    if kind == "run":
        return rng.choice([b"a", b"7", b"\0", b" ", b"'", b"\n"]) * rng.choice([10, 5000, 200_000])
    if kind == "random bytes":
        return rng.randbytes(rng.choice([1, 100, 20_000]))
    if kind == "unicode":
        return "".join(
            chr(rng.choice([rng.randrange(32, 0x250), rng.randrange(0x1F300, 0x1F600)])) for _ in range(3000)
        ).encode()
    if kind == "crlf":
        return (TEXT.replace("\n", "\r\n") + "\r").encode() * 5
    if kind == "empty":
        return b""
    if kind == "bad utf8":
        return TEXT.encode() + b"\xff\xc3" + TEXT.encode()
    return (TEXT + "<|endoftext|>").encode() * 10


@pytest.mark.parametrize("seed", range(OTHER_EXAMPLES))
def test_options_and_text(tmp_path, fuzz_sources, seed):
    rng = random.Random(10_000 + seed)
    model = tmp_path / "tiny.gguf"
    model.write_bytes(fuzz_sources[0].file)
    if rng.random() < 0.5:
        args = ["generate", rng.choice(PROMPTS), "-m", str(model), "--max-new-tokens", "4"]
        for option in rng.sample(sorted(OPTION_VALUES), rng.randrange(1, 4)):
            args += [option, rng.choice(OPTION_VALUES[option])]
        args += rng.choice([[], ["--json"], ["--truncate-prompt"], ["--exact"]])
    else:
        text = tmp_path / "text.txt"
        text.write_bytes(random_text(rng))
        target = rng.choice([str(text), str(text), str(tmp_path), str(tmp_path / "missing.txt"), "/dev/zero"])
        args = ["ppl", target, "-m", str(model), "--max-tokens", rng.choice(["300", "2", "1", "0", "-4"])]
        args += rng.choice([[], ["--ctx", "16"], ["--ctx", "1"], ["--ctx", "100000"], ["--stride", "0"]])
        args += rng.choice([[], ["--protocol", "llama", "--ctx", "16"], ["--protocol", "x"], ["--json"]])
        args += rng.choice([[], ["--errors", "replace"], ["--errors", "ignore"]])
    assert run_case(tmp_path, args) is None


# --- Hugging Face checkpoint directories ----------------------------------------------------------------

JSON_VALUES = [-1, 0, 3, 10**9, 2**40, 1.5, float("inf"), "x", None, [], {}, True]


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz-hf") / "tiny"
    write_hf_dir(directory, hf_state_dict())
    return directory


@pytest.mark.parametrize("seed", range(OTHER_EXAMPLES))
def test_mutated_checkpoint(tmp_path, hf_source, seed):
    rng = random.Random(20_000 + seed)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for path in hf_source.iterdir():
        (directory / path.name).symlink_to(path)
    target = rng.choice(["config.json", "config.json", "vocab.json", "merges.txt", "model.safetensors"])
    original = (hf_source / target).read_bytes()
    (directory / target).unlink()
    if target == "config.json":
        config = json.loads(original)
        for _ in range(rng.randrange(1, 3)):
            key = rng.choice(sorted(config))
            if rng.random() < 0.2:
                del config[key]
            else:
                config[key] = rng.choice(JSON_VALUES)
        content = json.dumps(rng.choice([config, config, config, [1, 2], "x"])).encode()
    elif target == "model.safetensors":
        data = bytearray(original)
        (header_len,) = struct.unpack_from("<Q", data)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.choice([1, 4])):
                data[rng.randrange(8, min(len(data), 8 + header_len + 64))] = rng.randrange(256)
        if rng.random() < 0.3:  # NaN weights
            data[-4096:] = np.full(1024, np.nan, dtype=np.float32).tobytes()
        content = bytes(data)
    else:
        cut = rng.randrange(len(original))
        content = rng.choice([original[:cut], original[:cut] + b"\xff\xfe" + original[cut:], b"[1, 2]", b""])
    (directory / target).write_bytes(content)
    output = tmp_path / "out.gguf"
    args = ["quantize", str(directory), "--type", rng.choice(["Q8_0", "Q4_K_M", "F16"]), "-o", str(output)]
    if rng.random() < 0.2:
        text = tmp_path / "text.txt"
        text.write_text(TEXT * 4)
        args += ["--eval", str(text), "--eval-tokens", "64"]
    assert run_case(tmp_path, args, output) is None


def test_fuzz_sources_are_valid(fuzz_sources, hf_source, tmp_path):
    # The mutations start from files the command accepts.
    for mutator in fuzz_sources:
        assert mutator.file == gguf_raw.assemble(
            mutator.raw.version, mutator.kvs, mutator.tensors, mutator.raw.data, mutator.raw.alignment
        )
    code, _, err = run_cli(["quantize", str(hf_source), "--type", "Q8_0", "-o", str(tmp_path / "o.gguf")])
    assert code == 0, err
