"""Hugging Face GPT-2 checkpoints -> GGUF as llama.cpp's converter does it: names, Conv1D transposes, no
mask buffers, a tied head left out, the vocabulary; and pickle checkpoints refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference_gpt2 import gpt2_logits
from safetensors.numpy import save_file
from synthetic import TINY, gpt2_vocab

from gpt2cli import quantize as quantize_module
from gpt2cli.convert import gguf_name, load_hf_checkpoint
from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import ModelFile
from gpt2cli.gguf_reader import read_gguf
from gpt2cli.model import GPT2Model
from gpt2cli.quant_types import file_type
from gpt2cli.quantize import default_output_path, load_source, quantize_checkpoint

IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256, 40]


def hf_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A random GPT2LMHeadModel state dict in HF's layout: Conv1D weights (in, out), the mask buffers kept."""
    rng = np.random.default_rng(seed)
    c = TINY
    e, f = c.n_embd, c.n_ff

    def normal(*shape, scale=0.05):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    sd = {"wte.weight": normal(c.n_vocab, e, scale=0.1), "wpe.weight": normal(c.n_ctx, e, scale=0.1)}
    for i in range(c.n_layer):
        p = f"h.{i}."
        sd |= {
            p + "ln_1.weight": 1 + normal(e, scale=0.1),
            p + "ln_1.bias": normal(e),
            p + "attn.bias": np.tril(np.ones((c.n_ctx, c.n_ctx), dtype=np.float32))[None, None],
            p + "attn.masked_bias": np.array(-1e4, dtype=np.float32),
            p + "attn.c_attn.weight": normal(e, 3 * e),
            p + "attn.c_attn.bias": normal(3 * e),
            p + "attn.c_proj.weight": normal(e, e),
            p + "attn.c_proj.bias": normal(e),
            p + "ln_2.weight": 1 + normal(e, scale=0.1),
            p + "ln_2.bias": normal(e),
            p + "mlp.c_fc.weight": normal(e, f),
            p + "mlp.c_fc.bias": normal(f),
            p + "mlp.c_proj.weight": normal(f, e),
            p + "mlp.c_proj.bias": normal(e),
        }
    sd |= {"ln_f.weight": 1 + normal(e, scale=0.1), "ln_f.bias": normal(e)}
    return sd


def reference_params(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights under GGUF names, each Conv1D (in, out) weight as the (out, in) a Linear holds."""
    p = {
        "token_embd.weight": sd["wte.weight"],
        "position_embd.weight": sd["wpe.weight"],
        "output_norm.weight": sd["ln_f.weight"],
        "output_norm.bias": sd["ln_f.bias"],
    }
    for i in range(TINY.n_layer):
        h, b = f"h.{i}.", f"blk.{i}."
        for hf, gg in (
            ("ln_1", "attn_norm"),
            ("attn.c_attn", "attn_qkv"),
            ("attn.c_proj", "attn_output"),
            ("ln_2", "ffn_norm"),
            ("mlp.c_fc", "ffn_up"),
            ("mlp.c_proj", "ffn_down"),
        ):
            w = sd[f"{h}{hf}.weight"]
            p[f"{b}{gg}.weight"] = w.T if w.ndim == 2 else w
            p[f"{b}{gg}.bias"] = sd[f"{h}{hf}.bias"]
    if "lm_head.weight" in sd:
        p["output.weight"] = sd["lm_head.weight"]
    return {k: v.astype(np.float64) for k, v in p.items()}


def write_hf_dir(directory, sd: dict[str, np.ndarray], *, prefix: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    c = TINY
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "n_positions": c.n_ctx,
        "n_ctx": c.n_ctx,
        "vocab_size": c.n_vocab,
        "layer_norm_epsilon": 1e-5,
    }
    (directory / "config.json").write_text(json.dumps(config))
    save_file(
        {(k if k.startswith("lm_head") else prefix + k): v for k, v in sd.items()},
        directory / "model.safetensors",
    )
    tokens, merges = gpt2_vocab()
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def logits_of(path) -> np.ndarray:
    mf = ModelFile(path)
    model = GPT2Model(mf.weights, mf.config)
    return model.forward(IDS, model.new_cache())


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize(
    ("prefix", "dtype", "tied_head"),
    [("", np.float32, False), ("transformer.", np.float32, True), ("", np.float16, False)],
)
def test_hf_checkpoint_converts_and_runs_like_the_reference(tmp_path, prefix, dtype, tied_head):
    sd = {k: v.astype(dtype) for k, v in hf_state_dict().items()}
    if tied_head:  # distilgpt2-style files also store lm_head, equal to wte
        sd["lm_head.weight"] = sd["wte.weight"]
    write_hf_dir(tmp_path / "hf", sd, prefix=prefix)
    ckpt = load_hf_checkpoint(tmp_path / "hf")
    assert ckpt.tied and ckpt.config == TINY
    out = tmp_path / "tiny.F32.gguf"
    quantize_checkpoint(ckpt, file_type("F32"), out)

    contents = read_gguf(out)
    assert not any("attn.bias" in n or "masked_bias" in n for n in contents.tensors)
    assert "output.weight" not in contents.tensors
    assert contents.tensors["blk.0.attn_qkv.weight"].shape == (3 * TINY.n_embd, TINY.n_embd)
    assert contents.tensors["blk.0.ffn_down.weight"].shape == (TINY.n_embd, TINY.n_ff)
    meta = contents.metadata
    assert meta["general.architecture"] == "gpt2"
    assert meta["general.file_type"] == 0
    assert meta["general.quantization_version"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == gpt2_vocab()[0]
    assert meta["tokenizer.ggml.merges"] == gpt2_vocab()[1]
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.bos_token_id"] == 50256

    ref = gpt2_logits(reference_params({k: v.astype(np.float32) for k, v in sd.items()}), IDS, TINY.n_head)
    assert rel_err(logits_of(out), ref) < 1e-4


def test_untied_lm_head_is_written(tmp_path):
    sd = hf_state_dict()
    sd["lm_head.weight"] = np.ascontiguousarray(sd["wte.weight"][:, ::-1])
    write_hf_dir(tmp_path / "hf", sd)
    ckpt = load_hf_checkpoint(tmp_path / "hf")
    assert not ckpt.tied
    out = tmp_path / "m.gguf"
    quantize_checkpoint(ckpt, file_type("F32"), out)
    assert rel_err(logits_of(out), gpt2_logits(reference_params(sd), IDS, TINY.n_head)) < 1e-4


def test_registry_name_goes_through_fetch_checkpoint(tmp_path, monkeypatch):
    write_hf_dir(tmp_path / "snapshot", hf_state_dict())
    monkeypatch.setattr(quantize_module.registry, "fetch_checkpoint", lambda name: tmp_path / "snapshot")
    monkeypatch.setenv("GPT2_HOME", str(tmp_path / "models"))
    ckpt = load_source("distilgpt2")
    assert ckpt.name == "distilgpt2"
    assert default_output_path(ckpt, file_type("q4_k_m")) == tmp_path / "models" / "distilgpt2.Q4_K_M.gguf"


def test_pickle_only_checkpoint_refused(tmp_path):
    d = tmp_path / "hf"
    write_hf_dir(d, hf_state_dict())
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(Gpt2Error, match="pickle"):
        load_source(str(d))


def test_names_and_bad_checkpoints(tmp_path):
    assert gguf_name("transformer.h.3.mlp.c_proj.weight") == "blk.3.ffn_down.weight"
    assert gguf_name("h.0.attn.c_attn.bias") == "blk.0.attn_qkv.bias"
    assert gguf_name("wte.weight") == "token_embd.weight"
    assert gguf_name("h.0.attn.masked_bias") is None
    with pytest.raises(Gpt2Error, match="unexpected tensor"):
        gguf_name("h.0.attn.q_proj.weight")

    sd = hf_state_dict()
    del sd["h.1.mlp.c_fc.bias"]
    write_hf_dir(tmp_path / "missing", sd)
    with pytest.raises(Gpt2Error, match="missing tensor blk.1.ffn_up.bias"):
        load_hf_checkpoint(tmp_path / "missing")

    sd = hf_state_dict()
    sd["h.0.attn.c_attn.weight"] = np.ascontiguousarray(sd["h.0.attn.c_attn.weight"].T)  # not Conv1D layout
    write_hf_dir(tmp_path / "transposed", sd)
    with pytest.raises(Gpt2Error, match=r"tensor blk.0.attn_qkv.weight has shape \(64, 192\)"):
        load_hf_checkpoint(tmp_path / "transposed")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    write_hf_dir(directory, hf_state_dict())
    return directory


def broken_copy(hf_dir, tmp_path, **files: str | bytes):
    """A copy of `hf_dir` with some files replaced (str or bytes contents)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in hf_dir.iterdir():
        (broken / path.name).symlink_to(path)
    for name, content in files.items():
        (broken / name.replace("_", ".")).unlink()
        target = broken / name.replace("_", ".")
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return broken


def edited_config(hf_dir, **changes) -> str:
    return json.dumps(json.loads((hf_dir / "config.json").read_text()) | changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_layer": 1_000_000_000}, "1000000000 layers expected, the tensors are of 2"),
        ({"n_layer": 1}, "unexpected tensor blk.1"),
        ({"n_head": 0}, "n_head = 0 is not between 1"),
        ({"n_head": 3}, "not a multiple of the head count 3"),
        ({"n_head": -1}, "n_head = -1 is not between 1"),
        ({"n_head": 2**40}, "n_head = 1099511627776 is not between 1"),
        ({"n_head": "4"}, "n_head is '4', not an int"),
        ({"n_embd": 64.0}, "n_embd is 64.0, not an int"),
        ({"layer_norm_epsilon": "x"}, "layer_norm_epsilon is 'x', not a float"),
        ({"architectures": 1.5}, "not a GPT-2"),  # found by the fuzzer: a TypeError
    ],
)
def test_config_is_checked_against_the_tensors(hf_dir, tmp_path, changes, message):
    # Was: n_layer 1e9 allocated until killed, n_head 0 or 3 were written, -1 or 2**40 a struct.error.
    broken = broken_copy(hf_dir, tmp_path, config_json=edited_config(hf_dir, **changes))
    with pytest.raises(Gpt2Error, match=message):
        load_hf_checkpoint(broken)


def test_every_layer_is_checked(tmp_path):
    # Was: only layer 0's shapes were compared with the config.
    sd = hf_state_dict()
    sd["h.1.ln_1.weight"] = sd["h.1.ln_1.weight"][:10]
    write_hf_dir(tmp_path / "ln", sd)
    with pytest.raises(Gpt2Error, match=r"tensor blk.1.attn_norm.weight has shape \(10,\), expected \(64,\)"):
        load_hf_checkpoint(tmp_path / "ln")


@pytest.mark.parametrize(
    "files, message",
    [
        ({"vocab_json": "{not json"}, "cannot read the vocabulary"),
        ({"vocab_json": "[1, 2]"}, "not a JSON object of token -> integer id"),
        ({"merges_txt": b"#version: 0.2\n\xff\xfe\n"}, "cannot read the vocabulary"),
        ({"config_json": "[1, 2]"}, "config.json: not a JSON object"),
        ({"config_json": "{"}, "config.json: cannot read"),
    ],
)
def test_malformed_hf_files(hf_dir, tmp_path, files, message):
    with pytest.raises(Gpt2Error, match=message):
        load_hf_checkpoint(broken_copy(hf_dir, tmp_path, **files))
