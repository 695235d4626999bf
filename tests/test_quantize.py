"""`gpt2 quantize`: llama-quantize's type choices, the written file, and llama.cpp compatibility both ways."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import signal

import numpy as np
import pytest
from cli_helpers import run_cli
from gguf import GGMLQuantizationType, quants
from llama_oracle import import_llama_cpp, llama_model
from reference_gpt2 import gpt2_logits
from synthetic import TINY, TINY_K, build_gguf

from gpt2cli.convert import Checkpoint
from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import GPT2Config, ModelFile
from gpt2cli.gguf_reader import read_gguf
from gpt2cli.model import GPT2Model
from gpt2cli.quant_types import (
    BITS,
    FILE_TYPES,
    fallback_type,
    file_type,
    file_type_for_bits,
    tensor_type,
    use_more_bits,
)
from gpt2cli.quantize import (
    default_output_path,
    load_source,
    quantize_checkpoint,
    tensor_choices,
)

T = GGMLQuantizationType
IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256, 40, 1101, 257, 3303, 2746]
GPT2_XL = GPT2Config(n_embd=1600, n_head=25, n_layer=48, n_ff=6400)
# Loose bounds on max |logit error| / max |logit| against the f32 model, for random tiny weights.
F32_DRIFT = {"Q4_K_M": 0.3, "Q2_K": 1.0}


def gpt2_shapes(c: GPT2Config, tied: bool = True) -> dict[str, tuple[int, ...]]:
    e, f = c.n_embd, c.n_ff
    shapes = {"token_embd.weight": (c.n_vocab, e), "position_embd.weight": (c.n_ctx, e)}
    for i in range(c.n_layer):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (e,),
            p + "attn_qkv.weight": (3 * e, e),
            p + "attn_qkv.bias": (3 * e,),
            p + "attn_output.weight": (e, e),
            p + "ffn_up.weight": (f, e),
            p + "ffn_down.weight": (e, f),
        }
    shapes["output_norm.weight"] = (e,)
    if not tied:
        shapes["output.weight"] = (c.n_vocab, e)
    return shapes


def choose(c: GPT2Config, ftype: str, tied: bool = True, pure: bool = False) -> dict[str, T]:
    ft = file_type(ftype)
    return {
        n: tensor_type(n, s, ft, n_layer=c.n_layer, tied=tied, pure=pure).qtype
        for n, s in gpt2_shapes(c, tied).items()
    }


def file_values(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF in f64, decoded by gguf-py (the oracle)."""
    contents = read_gguf(path)
    values = {}
    for info in contents.tensors.values():
        blocks = info.blocks(contents.data)
        if info.qtype == T.F32:
            x = blocks.view(np.float32)
        elif info.qtype == T.F16:
            x = blocks.view(np.float16)
        else:
            x = quants.dequantize(blocks, info.qtype)
        values[info.name] = x.astype(np.float64).reshape(info.shape)
    return values


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def our_logits(path) -> np.ndarray:
    """f32 products (exact mode): what the file's values give, free of the int8 activations' rounding."""
    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config, exact=True)
    return model.forward(IDS, model.new_cache())


@functools.cache
def source_checkpoint(path) -> Checkpoint:
    return load_source(str(path))


@pytest.fixture(scope="module")
def tiny_k_f32(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny-k.F32.gguf"
    build_gguf(path, config=TINY_K)
    return path


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    """Rows of 64 weights: no K-quant fits, every K type falls back."""
    path = tmp_path_factory.mktemp("src") / "tiny.F32.gguf"
    build_gguf(path, config=TINY)
    return path


# --- llama-quantize's choices ------------------------------------------------------------------------------


def test_file_type_names_ids_and_bits():
    assert file_type("q4_k_m").name == "Q4_K_M"
    assert int(file_type("Q4_K_M").id) == 15
    assert {n: int(ft.id) for n, ft in FILE_TYPES.items() if n in ("F16", "Q8_0", "Q2_K", "Q6_K")} == {
        "F16": 1,
        "Q8_0": 7,
        "Q2_K": 10,
        "Q6_K": 18,
    }
    assert [file_type_for_bits(b).name for b in BITS] == [
        "Q2_K",
        "Q3_K_M",
        "Q4_K_M",
        "Q5_K_M",
        "Q6_K",
        "Q8_0",
    ]
    with pytest.raises(Gpt2Error, match="unknown type"):
        file_type("Q4_K_X")
    with pytest.raises(Gpt2Error, match="--bits"):
        file_type_for_bits(7)


def test_use_more_bits_layers():
    assert [i for i in range(12) if use_more_bits(i, 12)] == [0, 3, 6, 9, 10, 11]
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]


def test_q4_k_m_mix_for_gpt2():
    types = choose(GPT2Config(), "Q4_K_M")
    assert types["token_embd.weight"] == T.Q6_K  # tied: the output rule
    more = {0, 3, 6, 9, 10, 11}
    for i in range(12):
        assert types[f"blk.{i}.attn_qkv.weight"] == (T.Q6_K if i in more else T.Q4_K)
        assert types[f"blk.{i}.ffn_down.weight"] == (T.Q6_K if i in more else T.Q4_K)
        assert types[f"blk.{i}.attn_output.weight"] == T.Q4_K
        assert types[f"blk.{i}.ffn_up.weight"] == T.Q4_K
        assert types[f"blk.{i}.attn_qkv.bias"] == T.F32
        assert types[f"blk.{i}.attn_norm.weight"] == T.F32
    assert types["position_embd.weight"] == T.F32


@pytest.mark.parametrize(
    ("ftype", "qkv0", "qkv4", "down0", "down4", "attn_out", "up"),
    [
        ("Q2_K", T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K, T.Q2_K),
        ("Q3_K_S", T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K, T.Q3_K),
        ("Q3_K_M", T.Q5_K, T.Q4_K, T.Q5_K, T.Q4_K, T.Q4_K, T.Q3_K),
        ("Q3_K_L", T.Q5_K, T.Q5_K, T.Q5_K, T.Q5_K, T.Q5_K, T.Q3_K),
        ("Q4_K_S", T.Q5_K, T.Q4_K, T.Q5_K, T.Q4_K, T.Q4_K, T.Q4_K),
        ("Q5_K_M", T.Q6_K, T.Q5_K, T.Q6_K, T.Q5_K, T.Q5_K, T.Q5_K),
        ("Q4_0", T.Q4_0, T.Q4_0, T.Q4_0, T.Q4_0, T.Q4_0, T.Q4_0),
    ],
)
def test_mixes_by_file_type(ftype, qkv0, qkv4, down0, down4, attn_out, up):
    # gpt2-medium: 24 layers, use_more_bits on 0-2, 5, 8, ..., 21-23; n/16 = 1, n/8 = 3.
    types = choose(GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_ff=4096), ftype)
    assert types["blk.0.attn_qkv.weight"] == qkv0
    assert types["blk.4.attn_qkv.weight"] == qkv4
    assert types["blk.0.ffn_down.weight"] == down0
    assert types["blk.4.ffn_down.weight"] == down4
    assert types["blk.4.attn_output.weight"] == attn_out
    assert types["blk.4.ffn_up.weight"] == up
    assert types["token_embd.weight"] == T.Q6_K


def test_q8_0_and_float_types():
    assert set(choose(GPT2Config(), "Q8_0").values()) == {T.Q8_0, T.F32}
    assert set(choose(GPT2Config(), "F16").values()) == {T.F16, T.F32}
    assert set(choose(GPT2Config(), "BF16").values()) == {T.BF16, T.F32}


def test_untied_output_and_pure():
    types = choose(GPT2Config(n_layer=2), "Q4_K_M", tied=False)
    assert types["output.weight"] == T.Q6_K
    assert types["token_embd.weight"] == T.Q4_K  # an untied embedding keeps the default
    shapes = gpt2_shapes(GPT2Config(n_layer=2))
    pure = choose(GPT2Config(n_layer=2), "Q4_K_M", pure=True)
    assert {pure[n] for n, s in shapes.items() if len(s) == 2 and n != "position_embd.weight"} == {T.Q4_K}


def test_gpt2_xl_rows_fall_back():
    ft = file_type("Q4_K_M")
    types = choose(GPT2_XL, "Q4_K_M")
    assert types["token_embd.weight"] == T.Q8_0
    assert types["blk.0.attn_qkv.weight"] == T.Q8_0  # Q6_K wanted
    assert types["blk.7.attn_qkv.weight"] == T.Q5_0  # Q4_K wanted
    assert types["blk.1.ffn_up.weight"] == T.Q5_0
    assert types["blk.7.ffn_down.weight"] == T.Q4_K  # rows of 6400 = 25 blocks of 256
    choice = tensor_type("blk.1.ffn_up.weight", (6400, 1600), ft, n_layer=48, tied=True)
    assert choice.wanted == T.Q4_K
    assert choose(GPT2_XL, "Q2_K")["blk.1.ffn_up.weight"] == T.Q4_0
    assert choose(GPT2_XL, "Q5_K_M")["blk.1.ffn_up.weight"] == T.Q5_1
    assert fallback_type(T.Q6_K, 40) == T.F16  # not even 32 divides the row
    with pytest.raises(Gpt2Error, match="no fallback"):  # llama-quantize throws here too
        fallback_type(T.Q8_0, 40)


# --- the written file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K"])
def test_quantized_file_loads_and_matches_its_values(tmp_path, tiny_k_f32, ftype):
    ckpt = source_checkpoint(tiny_k_f32)
    out = tmp_path / "q.gguf"
    report = quantize_checkpoint(ckpt, file_type(ftype), out)

    contents = read_gguf(out)
    assert contents.metadata["general.file_type"] == int(file_type(ftype).id)
    assert contents.metadata["general.quantization_version"] == 2
    assert "output.weight" not in contents.tensors
    choices = tensor_choices(ckpt, file_type(ftype))
    assert {n: i.qtype for n, i in contents.tensors.items()} == {n: c.qtype for n, c in choices.items()}
    assert [(r.name, r.qtype) for r in report.tensors] == [(n, c.qtype) for n, c in choices.items()]

    values = file_values(out)
    logits = our_logits(out)
    assert rel_err(logits, gpt2_logits(values, IDS, TINY_K.n_head)) < 1e-4
    assert rel_err(logits, gpt2_logits(file_values(tiny_k_f32), IDS, TINY_K.n_head)) < F32_DRIFT[ftype]

    by_name = {r.name: r for r in report.tensors}
    assert by_name["blk.0.attn_norm.weight"].rel_rms_error == 0
    assert 0 < by_name["blk.0.ffn_up.weight"].rel_rms_error < 0.5
    assert report.file_size == out.stat().st_size
    assert report.f16_size > report.file_size


def test_fallbacks_are_reported(tmp_path, tiny_f32):
    report = quantize_checkpoint(source_checkpoint(tiny_f32), file_type("Q4_K_M"), tmp_path / "q.gguf")
    wanted = {r.name: (r.wanted, r.qtype) for r in report.fallbacks}
    assert wanted["blk.0.ffn_up.weight"] == (T.Q4_K, T.Q5_0)
    assert "blk.0.ffn_down.weight" not in wanted  # rows of 256
    assert report.bits_per_weight > 5


def test_interrupted_run_leaves_nothing(tmp_path, tiny_f32):
    ckpt = source_checkpoint(tiny_f32)

    def interrupt(report):
        if report.name.startswith("blk.1"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(ckpt, file_type("Q8_0"), tmp_path / "q.gguf", on_tensor=interrupt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_terminated_run_leaves_nothing(tmp_path, tiny_f32, signum):
    # Was: SIGTERM and SIGHUP left .OUT.xxxx.part files (issue 10).
    before = signal.getsignal(signum)
    if before is signal.SIG_IGN:
        pytest.skip(f"{signum.name} is ignored in this process (nohup), as quantize then leaves it")
    ckpt = source_checkpoint(tiny_f32)
    written = []

    def terminate(report):
        written.append(report.name)
        if report.name.startswith("blk.1"):
            os.kill(os.getpid(), signum)

    with pytest.raises(SystemExit) as exit_info:
        quantize_checkpoint(ckpt, file_type("Q8_0"), tmp_path / "q.gguf", on_tensor=terminate)
    assert exit_info.value.code == 128 + signum
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signum) == before


def test_progress_follows_the_writes(tmp_path, tiny_f32):
    ckpt = source_checkpoint(tiny_f32)
    sizes = []

    def on_tensor(report):
        (part,) = tmp_path.glob("*.part")
        sizes.append(part.stat().st_size)

    quantize_checkpoint(ckpt, file_type("Q8_0"), tmp_path / "q.gguf", on_tensor=on_tensor)
    assert len(sizes) == len(ckpt.shapes) and sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sizes[-1] == (tmp_path / "q.gguf").stat().st_size


def test_stale_parts_of_dead_runs_are_removed(tmp_path, tiny_f32):
    # A SIGKILLed run cannot clean up; the next run removes its file if its process is gone.
    dead_pid = 2**22 + 12345  # above the default pid_max (2**22): never a live process
    stale = tmp_path / f".q.gguf.{dead_pid}.abcd.part"
    alive = tmp_path / f".q.gguf.{os.getpid()}.efgh.part"
    other = tmp_path / ".other.gguf.1.part"
    for path in (stale, alive, other):
        path.write_bytes(b"x")
    quantize_checkpoint(source_checkpoint(tiny_f32), file_type("Q8_0"), tmp_path / "q.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "q.gguf"])


def test_write_errors_name_the_output(tmp_path, tiny_f32):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "q.gguf"
    code, _, err = run_cli(["quantize", str(tiny_f32), "-o", str(out)])
    assert code == 2 and err.startswith(f"gpt2: error: {out}: cannot write") and ".part" not in err


def test_empty_type_is_refused(tmp_path, tiny_f32):
    code, _, err = run_cli(["quantize", str(tiny_f32), "--type", "", "-o", str(tmp_path / "q.gguf")])
    assert code == 2 and "unknown type ''" in err
    assert list(tmp_path.iterdir()) == []


def test_quantized_input_refused(tmp_path, tiny_f32):
    ckpt = source_checkpoint(tiny_f32)
    path = tmp_path / "tiny.Q8_0.gguf"
    quantize_checkpoint(ckpt, file_type("Q8_0"), path)
    with pytest.raises(Gpt2Error, match="already Q8_0"):
        load_source(str(path))


@pytest.mark.parametrize("ftype", ["F16", "BF16"])
def test_half_precision_files_are_inputs(tmp_path, tiny_f32, ftype):
    half = tmp_path / f"tiny.{ftype}.gguf"
    quantize_checkpoint(source_checkpoint(tiny_f32), file_type(ftype), half)
    ckpt = load_source(str(half))
    original = source_checkpoint(tiny_f32).load("blk.0.ffn_up.weight")
    assert rel_err(ckpt.load("blk.0.ffn_up.weight"), original) < 1e-2
    report = quantize_checkpoint(ckpt, file_type("Q8_0"), tmp_path / "q.gguf")
    assert {r.qtype for r in report.tensors} == {T.Q8_0, T.F32}


def test_default_output_path(tmp_path, monkeypatch, tiny_f32):
    monkeypatch.setenv("GPT2_HOME", str(tmp_path))
    ckpt = source_checkpoint(tiny_f32)
    assert ckpt.name == "tiny"  # the file's name without its type
    assert default_output_path(ckpt, file_type("q4_k_m")) == tmp_path / "tiny.Q4_K_M.gguf"


@pytest.mark.parametrize(
    "name, file_name",
    [("/", "model"), ("../../x", "x"), ("/etc/passwd", "etc-passwd"), ("a\0b", "a-b"), (".hidden", "hidden")],
)
def test_default_output_path_is_a_plain_file_name(tmp_path, monkeypatch, tiny_f32, name, file_name):
    monkeypatch.setenv("GPT2_HOME", str(tmp_path))
    ckpt = dataclasses.replace(source_checkpoint(tiny_f32), name=name)
    assert default_output_path(ckpt, file_type("q8_0")) == tmp_path / f"{file_name}.Q8_0.gguf"


def test_general_name_never_becomes_the_output_path(tmp_path, monkeypatch):
    # Was: general.name "../../x" wrote outside the model directory (issue 10).
    monkeypatch.setenv("GPT2_HOME", str(tmp_path / "home"))
    src = tmp_path / "src" / "evil.F32.gguf"
    src.parent.mkdir()
    build_gguf(src, config=TINY, name="../../x")
    code, _, err = run_cli(["quantize", str(src), "--type", "Q8_0"])
    assert code == 0, err
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["evil.Q8_0.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "src"]


# --- llama.cpp compatibility, both ways ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return import_llama_cpp()


def llama_quantize(llama_cpp, src, dst, ftype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(ftype).id)
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def llama_logits(path) -> np.ndarray:
    with llama_model(path, logits_all=True, n_ctx=64) as llm:
        llm.eval(IDS)
        return np.array(llm.scores[: len(IDS)], dtype=np.float64)


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_our_file_runs_in_llama_cpp(tmp_path, llama_cpp, tiny_k_f32, ftype):
    out = tmp_path / "ours.gguf"
    quantize_checkpoint(source_checkpoint(tiny_k_f32), file_type(ftype), out)
    # ggml quantizes the activations to 8 bits in its quantized matmuls: close, not equal.
    assert rel_err(llama_logits(out), our_logits(out)) < 0.05


@pytest.mark.parametrize("source", ["tiny_k_f32", "tiny_f32"])  # tiny: rows of 64, every K type falls back
@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_same_types_as_llama_quantize(tmp_path, request, llama_cpp, source, ftype):
    src = request.getfixturevalue(source)
    theirs = tmp_path / "llama.gguf"
    llama_quantize(llama_cpp, src, theirs, ftype)
    contents = read_gguf(theirs)
    assert contents.metadata["general.file_type"] == int(file_type(ftype).id)
    ours = tensor_choices(source_checkpoint(src), file_type(ftype))
    assert {n: i.qtype for n, i in contents.tensors.items()} == {n: c.qtype for n, c in ours.items()}


@pytest.mark.parametrize(
    ("source", "ftype"),
    [
        ("tiny_k_f32", f)
        for f in ("BF16", "Q4_0", "Q4_1", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M")
    ]
    + [("tiny_f32", "Q4_K_M")],
)
def test_same_bytes_as_llama_quantize(tmp_path, request, llama_cpp, source, ftype):
    """Without an importance matrix ggml's quantizers are deterministic: the tensors agree bit for bit."""
    src = request.getfixturevalue(source)
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    llama_quantize(llama_cpp, src, theirs, ftype)
    quantize_checkpoint(source_checkpoint(src), file_type(ftype), ours)
    a, b = read_gguf(theirs), read_gguf(ours)
    for name, info in a.tensors.items():
        assert info.qtype == b.tensors[name].qtype, name
        assert np.array_equal(info.blocks(a.data), b.tensors[name].blocks(b.data)), name


def test_llama_quantize_output_runs_in_ours(tmp_path, llama_cpp, tiny_k_f32):
    out = tmp_path / "llama.Q4_K_M.gguf"
    llama_quantize(llama_cpp, tiny_k_f32, out, "Q4_K_M")
    logits = our_logits(out)
    assert rel_err(logits, gpt2_logits(file_values(out), IDS, TINY_K.n_head)) < 1e-4
    assert rel_err(logits, gpt2_logits(file_values(tiny_k_f32), IDS, TINY_K.n_head)) < F32_DRIFT["Q4_K_M"]


# --- the command --------------------------------------------------------------------------------------------


def test_cli_quantize_to_model_dir_with_eval(tmp_path, tiny_f32):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    env = {"GPT2_HOME": str(tmp_path / "models")}
    code, out, err = run_cli(
        ["quantize", str(tiny_f32), "--bits", "4", "--eval", str(text), "--eval-tokens", "200"], env
    )
    assert code == 0, err
    path = tmp_path / "models" / "tiny.Q4_K_M.gguf"
    assert ModelFile(path).config.n_embd == TINY.n_embd
    assert "blk.1.ffn_up.weight" in out and "Q5_0 (for Q4_K)" in out
    assert f"wrote         {path} (Q4_K_M, general.file_type 15)" in out
    assert "fallbacks     6 tensors with rows of 64 weights" in out
    assert "mean KLD" in out and "same top p" in out


def test_cli_quantize_errors(tmp_path, tiny_f32):
    code, _, err = run_cli(["quantize", str(tiny_f32), "--bits", "7"])
    assert code == 2 and "gpt2: error: --bits must be one of 2, 3, 4, 5, 6, 8" in err
    code, _, err = run_cli(["quantize", str(tiny_f32), "--type", "q4_k_x", "-o", str(tmp_path / "x.gguf")])
    assert code == 2 and "unknown type 'q4_k_x'" in err
    code, _, err = run_cli(["quantize", str(tmp_path / "missing.gguf")])
    assert code == 2 and "no such file" in err
    assert list(tmp_path.iterdir()) == []
