"""Reading and validating a GPT-2 GGUF file without copying its weights.

Weight matrices stay memory-mapped in their stored block format; only the small f32 tensors (norms, biases,
position embeddings) are materialized.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from gpt2cli.errors import Gpt2Error
from kernels import KERNELS, BlockKernels, kernels_for

ARCH = "gpt2"


@dataclass(frozen=True)
class GPT2Config:
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    n_ff: int = 3072
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class WeightMatrix:
    """A (rows, cols) weight in its stored block format: one row per output unit."""

    name: str
    qtype: GGMLQuantizationType
    rows: int
    cols: int
    blocks: np.ndarray  # u8[rows, row_bytes], memory-mapped

    @property
    def kernels(self) -> BlockKernels:
        return kernels_for(self.qtype)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def dequantize(self, out: np.ndarray | None = None) -> np.ndarray:  # -> f32[rows, cols]
        if out is None:
            out = np.empty((self.rows, self.cols), dtype=np.float32)
        self.kernels.dequantize(self.blocks, out)
        return out

    def dequantize_rows(self, ids: np.ndarray) -> np.ndarray:  # -> f32[len(ids), cols]
        out = np.empty((len(ids), self.cols), dtype=np.float32)
        self.kernels.dequantize(np.ascontiguousarray(self.blocks[ids]), out)
        return out


@dataclass(frozen=True)
class LayerWeights:
    attn_norm_w: np.ndarray  # f32[n_embd]
    attn_norm_b: np.ndarray
    attn_qkv: WeightMatrix  # (3 n_embd, n_embd)
    attn_qkv_b: np.ndarray
    attn_output: WeightMatrix  # (n_embd, n_embd)
    attn_output_b: np.ndarray
    ffn_norm_w: np.ndarray
    ffn_norm_b: np.ndarray
    ffn_up: WeightMatrix  # (n_ff, n_embd)
    ffn_up_b: np.ndarray
    ffn_down: WeightMatrix  # (n_embd, n_ff)
    ffn_down_b: np.ndarray

    def matrices(self) -> tuple[WeightMatrix, ...]:
        return (self.attn_qkv, self.attn_output, self.ffn_up, self.ffn_down)


@dataclass(frozen=True)
class GPT2Weights:
    token_embd: WeightMatrix  # (n_vocab, n_embd)
    position_embd: np.ndarray  # f32[n_ctx, n_embd]
    layers: list[LayerWeights]
    output_norm_w: np.ndarray
    output_norm_b: np.ndarray
    output: WeightMatrix  # (n_vocab, n_embd): token_embd itself when the file ties them

    def matrices(self) -> list[WeightMatrix]:
        mats = [self.token_embd] + [m for layer in self.layers for m in layer.matrices()]
        return mats if self.output is self.token_embd else [*mats, self.output]


class ModelFile:
    """An opened GPT-2 GGUF: config, weights and metadata. Raises Gpt2Error on any problem."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        self.config = _read_config(self.reader, self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._check_data_in_file()
        self.weights = _read_weights(self, self.config)

    def field(self, key: str, default: object = None) -> object:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    @property
    def tied_output(self) -> bool:
        return "output.weight" not in self.tensors

    @cached_property
    def tokenizer(self):  # -> Tokenizer
        from gpt2cli.tokenizer import Tokenizer

        return Tokenizer.from_gguf(self.reader)

    @property
    def qtypes(self) -> set[GGMLQuantizationType]:
        return {m.qtype for m in self.weights.matrices()}

    def _check_data_in_file(self) -> None:
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise Gpt2Error(f"{self.path}: truncated file (tensor {t.name} runs past the end)")

    def fail(self, problem: str) -> Gpt2Error:
        return Gpt2Error(f"{self.path}: {problem}")


def _open_reader(path: Path) -> GGUFReader:
    if not path.exists():
        raise Gpt2Error(f"{path}: no such file")
    if not path.is_file():
        raise Gpt2Error(f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise Gpt2Error(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        return GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, OverflowError, MemoryError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Gpt2Error(f"{path}: corrupt or truncated GGUF ({detail})") from None


def _field(reader: GGUFReader, path: Path, key: str, kind: type, required: bool = True):
    field = reader.get_field(key)
    if field is None:
        if required:
            raise Gpt2Error(f"{path}: missing metadata key {key}")
        return None
    try:
        return kind(field.contents())
    except (TypeError, ValueError, IndexError):
        raise Gpt2Error(f"{path}: metadata key {key} has an unexpected value") from None


def _read_config(reader: GGUFReader, path: Path) -> GPT2Config:
    arch = _field(reader, path, "general.architecture", str)
    if arch != ARCH:
        raise Gpt2Error(f"{path}: architecture is {arch!r}, not {ARCH!r}")
    n_embd = _field(reader, path, "gpt2.embedding_length", int)
    n_head = _field(reader, path, "gpt2.attention.head_count", int)
    config = GPT2Config(
        n_vocab=0,  # from token_embd below
        n_ctx=_field(reader, path, "gpt2.context_length", int),
        n_embd=n_embd,
        n_head=n_head,
        n_layer=_field(reader, path, "gpt2.block_count", int),
        n_ff=_field(reader, path, "gpt2.feed_forward_length", int, required=False) or 4 * n_embd,
        layer_norm_eps=_field(reader, path, "gpt2.attention.layer_norm_epsilon", float, required=False)
        or 1e-5,
    )
    for key, value in (
        ("n_embd", n_embd),
        ("n_head", n_head),
        ("n_layer", config.n_layer),
        ("n_ctx", config.n_ctx),
    ):
        if value <= 0:
            raise Gpt2Error(f"{path}: hyper-parameter {key} = {value} is not positive")
    if n_embd % n_head:
        raise Gpt2Error(f"{path}: embedding length {n_embd} is not a multiple of the head count {n_head}")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise Gpt2Error(f"{path}: missing tensor token_embd.weight")
    return GPT2Config(**{**config.__dict__, "n_vocab": int(embd.shape[-1])})


def _shape(tensor) -> tuple[int, ...]:  # numpy order, as GGUFReader reports tensor.data for float types
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _tensor(mf: ModelFile, name: str):
    tensor = mf.tensors.get(name)
    if tensor is None:
        raise mf.fail(f"missing tensor {name}")
    return tensor


def _vector(mf: ModelFile, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A small tensor (norm, bias, position embedding) as f32, whatever its stored type."""
    tensor = _tensor(mf, name)
    if _shape(tensor) != shape:
        raise mf.fail(f"tensor {name} has shape {_shape(tensor)}, expected {shape}")
    if tensor.tensor_type == GGMLQuantizationType.F32:
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    matrix = _as_matrix(mf, tensor, (math.prod(shape[:-1]), shape[-1]))
    return matrix.dequantize().reshape(shape)


def _as_matrix(mf: ModelFile, tensor, shape: tuple[int, int]) -> WeightMatrix:
    qtype = tensor.tensor_type
    if qtype not in KERNELS:
        raise mf.fail(f"tensor {tensor.name} has unsupported block type {qtype.name}")
    rows, cols = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block_size:
        raise mf.fail(f"tensor {tensor.name}: rows of {cols} do not fit {qtype.name} blocks of {block_size}")
    blocks = np.asarray(tensor.data).view(np.uint8).reshape(rows, cols // block_size * type_size)
    return WeightMatrix(tensor.name, qtype, rows, cols, blocks)


def _matrix(mf: ModelFile, name: str, shape: tuple[int, int]) -> WeightMatrix:
    tensor = _tensor(mf, name)
    if _shape(tensor) != shape:
        raise mf.fail(f"tensor {name} has shape {_shape(tensor)}, expected {shape}")
    return _as_matrix(mf, tensor, shape)


def _read_weights(mf: ModelFile, c: GPT2Config) -> GPT2Weights:
    e, f = c.n_embd, c.n_ff

    def layer(i: int) -> LayerWeights:
        p = f"blk.{i}."
        return LayerWeights(
            attn_norm_w=_vector(mf, p + "attn_norm.weight", (e,)),
            attn_norm_b=_vector(mf, p + "attn_norm.bias", (e,)),
            attn_qkv=_matrix(mf, p + "attn_qkv.weight", (3 * e, e)),
            attn_qkv_b=_vector(mf, p + "attn_qkv.bias", (3 * e,)),
            attn_output=_matrix(mf, p + "attn_output.weight", (e, e)),
            attn_output_b=_vector(mf, p + "attn_output.bias", (e,)),
            ffn_norm_w=_vector(mf, p + "ffn_norm.weight", (e,)),
            ffn_norm_b=_vector(mf, p + "ffn_norm.bias", (e,)),
            ffn_up=_matrix(mf, p + "ffn_up.weight", (f, e)),
            ffn_up_b=_vector(mf, p + "ffn_up.bias", (f,)),
            ffn_down=_matrix(mf, p + "ffn_down.weight", (e, f)),
            ffn_down_b=_vector(mf, p + "ffn_down.bias", (e,)),
        )

    token_embd = _matrix(mf, "token_embd.weight", (c.n_vocab, e))
    output = _matrix(mf, "output.weight", (c.n_vocab, e)) if "output.weight" in mf.tensors else token_embd
    return GPT2Weights(
        token_embd=token_embd,
        position_embd=_vector(mf, "position_embd.weight", (c.n_ctx, e)),
        layers=[layer(i) for i in range(c.n_layer)],
        output_norm_w=_vector(mf, "output_norm.weight", (e,)),
        output_norm_b=_vector(mf, "output_norm.bias", (e,)),
        output=output,
    )
