"""A Hugging Face GPT-2 checkpoint as GGUF-named f32 tensors, as llama.cpp's convert_hf_to_gguf.py maps it.

What the converter's GPT2Model does: HF names become GGUF names (`h.N.attn.c_attn` -> `blk.N.attn_qkv`, ...),
the Conv1D weights (stored (in, out)) are transposed to GGUF's (out, in), the `attn.bias` /
`attn.masked_bias` causal-mask buffers are dropped, and a tied `lm_head` is not written (readers use
token_embd). Weights are read with safetensors only: a pickle checkpoint is never opened.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import GPT2Config
from gpt2cli.tokenizer import Tokenizer

_TOP_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
# HF's Conv1D layers keep their weight as (in, out).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


@dataclass
class Checkpoint:
    """A GPT-2's tensors by GGUF name, loaded one at a time as f32 in GGUF's numpy layout, plus its vocab."""

    name: str
    config: GPT2Config
    shapes: dict[str, tuple[int, ...]]  # GGUF name -> numpy shape, in writing order
    loaders: dict[str, Callable[[], np.ndarray]]
    tokenizer: Tokenizer
    gguf_path: Path | None = None  # the file itself, when the checkpoint is an F32/F16/BF16 GGUF

    def load(self, name: str) -> np.ndarray:  # -> f32[shape]
        return self.loaders[name]()

    @property
    def tied(self) -> bool:
        return "output.weight" not in self.shapes


def gguf_name(hf_key: str) -> str | None:
    """The GGUF name of an HF GPT2LMHeadModel key (with or without `transformer.`); None for mask buffers."""
    key = hf_key.removeprefix("transformer.")
    if key.endswith(_MASK_BUFFERS):
        return None
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    parts = key.split(".")
    if len(parts) >= 4 and parts[0] == "h" and parts[1].isdigit():
        layer, module, param = parts[1], ".".join(parts[2:-1]), parts[-1]
        if module in _BLOCK_NAMES and param in ("weight", "bias"):
            return f"blk.{layer}.{_BLOCK_NAMES[module]}.{param}"
    raise Gpt2Error(f"unexpected tensor {hf_key!r} in a GPT-2 checkpoint")


def read_hf_config(path: Path) -> GPT2Config:
    try:
        hp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Gpt2Error(f"{path}: cannot read ({e})") from None
    if not isinstance(hp, dict):
        raise Gpt2Error(f"{path}: not a JSON object")
    architectures = hp.get("architectures") or ["GPT2LMHeadModel"]
    if (
        hp.get("model_type", "gpt2") != "gpt2"
        or not isinstance(architectures, list)
        or "GPT2LMHeadModel" not in architectures
    ):
        raise Gpt2Error(
            f"{path}: not a GPT-2 (model_type {hp.get('model_type')!r:.40}, {architectures!r:.80})"
        )

    def number(key: str, kind: type, default=None):
        value = hp.get(key, default)
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise Gpt2Error(
                f"{path}: hyper-parameter {key} is {value!r:.40}, not a{'n' * (kind is int)} {kind.__name__}"
            )
        return value

    n_embd = number("n_embd", int)
    config = GPT2Config(
        n_vocab=number("vocab_size", int),
        n_ctx=number("n_ctx" if hp.get("n_ctx") is not None else "n_positions", int),
        n_embd=n_embd,
        n_head=number("n_head", int),
        n_layer=number("n_layer", int),
        n_ff=number("n_inner", int) if hp.get("n_inner") is not None else 4 * n_embd,
        layer_norm_eps=number("layer_norm_epsilon", float, 1e-5),
    )
    try:
        config.check()
    except Gpt2Error as e:
        raise Gpt2Error(f"{path}: {e}") from None
    return config


def _tensor_loader(path: Path, key: str, transpose: bool) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        with safe_open(path, framework="numpy") as f:
            x = f.get_tensor(key)
        x = x.T if transpose else x
        return np.ascontiguousarray(x, dtype=np.float32)

    return load


def load_hf_checkpoint(directory: str | Path, name: str | None = None) -> Checkpoint:
    """A directory with model.safetensors, config.json, vocab.json and merges.txt (fetch_checkpoint's)."""
    directory = Path(directory)
    config = read_hf_config(directory / "config.json")
    tokenizer = Tokenizer.from_hf_dir(directory)
    weights = directory / "model.safetensors"
    try:
        with safe_open(weights, framework="numpy") as f:
            keys = list(f.keys())
            hf_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {f.get_slice(k).get_dtype() for k in keys}
    except (SafetensorError, OSError) as e:
        raise Gpt2Error(f"{weights}: not a readable safetensors file ({e})") from None
    unsupported = dtypes - {"F32", "F16"}
    if unsupported:
        raise Gpt2Error(f"{weights}: tensors of type {', '.join(sorted(unsupported))}; only F32/F16 are read")

    shapes, loaders = {}, {}
    for key in keys:
        gname = gguf_name(key)
        if gname is None:
            continue
        transpose = key.removeprefix("transformer.").split(".", 2)[-1] in _CONV1D
        shape = hf_shapes[key][::-1] if transpose else hf_shapes[key]
        if gname in shapes:
            raise Gpt2Error(f"{weights}: two tensors are {gname} (one is {key})")
        shapes[gname], loaders[gname] = shape, _tensor_loader(weights, key, transpose)
    # HF keeps lm_head tied to wte; only a genuinely separate head is written, as the converter does.
    if (
        "output.weight" in shapes
        and "token_embd.weight" in shapes
        and np.array_equal(loaders["output.weight"](), loaders["token_embd.weight"]())
    ):
        del shapes["output.weight"], loaders["output.weight"]
    try:
        config.check_tensor_shapes(shapes)
    except Gpt2Error as e:
        raise Gpt2Error(f"{weights} against config.json: {e}") from None
    if tokenizer.n_vocab != config.n_vocab:
        raise Gpt2Error(
            f"{directory}: vocab.json has {tokenizer.n_vocab} tokens, config.json {config.n_vocab}"
        )
    order = config.tensor_shapes("output.weight" not in shapes)
    return Checkpoint(
        name=(name or directory.name).lower(),
        config=config,
        shapes={n: shapes[n] for n in order},
        loaders={n: loaders[n] for n in order},
        tokenizer=tokenizer,
    )
