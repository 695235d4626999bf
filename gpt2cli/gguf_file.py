"""Reading and validating a GPT-2 GGUF file without copying its weights.

Weight matrices stay memory-mapped in their stored block format; only the small f32 tensors (norms, biases,
position embeddings) are materialized.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_reader import TensorInfo, read_gguf
from gpt2cli.kernels import KERNELS, BlockKernels, kernels_for
from gpt2cli.tokenizer import Tokenizer

ARCH = "gpt2"
U32_MAX = 2**32 - 1
LAYER_TENSORS = tuple(
    f"{module}.{param}"
    for module in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
    for param in ("weight", "bias")
)
LAYER_NAME = re.compile(r"blk\.(\d+)\.")


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

    def check(self) -> None:
        """Gpt2Error naming the first hyper-parameter no GPT-2 can have (GGUF stores the sizes as u32)."""
        for key in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_ff"):
            value = getattr(self, key)
            if not 0 < value <= U32_MAX:
                raise Gpt2Error(f"hyper-parameter {key} = {value} is not between 1 and 2**32 - 1")
        if self.n_embd % self.n_head:
            raise Gpt2Error(
                f"embedding length {self.n_embd} is not a multiple of the head count {self.n_head}"
            )
        if not (math.isfinite(self.layer_norm_eps) and self.layer_norm_eps >= 0):
            raise Gpt2Error(f"layer norm epsilon {self.layer_norm_eps} is not a finite number >= 0")

    def tensor_count(self, tied: bool) -> int:
        return 4 + len(LAYER_TENSORS) * self.n_layer + (not tied)

    def tensor_shapes(self, tied: bool) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and numpy shape, in the order llama.cpp's converter writes them."""
        e, f = self.n_embd, self.n_ff
        layer = {
            "attn_norm.weight": (e,),
            "attn_norm.bias": (e,),
            "attn_qkv.weight": (3 * e, e),
            "attn_qkv.bias": (3 * e,),
            "attn_output.weight": (e, e),
            "attn_output.bias": (e,),
            "ffn_norm.weight": (e,),
            "ffn_norm.bias": (e,),
            "ffn_up.weight": (f, e),
            "ffn_up.bias": (f,),
            "ffn_down.weight": (e, f),
            "ffn_down.bias": (e,),
        }
        assert tuple(layer) == LAYER_TENSORS
        shapes = {"token_embd.weight": (self.n_vocab, e), "position_embd.weight": (self.n_ctx, e)}
        for i in range(self.n_layer):
            shapes |= {f"blk.{i}.{name}": shape for name, shape in layer.items()}
        shapes |= {"output_norm.weight": (e,), "output_norm.bias": (e,)}
        if not tied:
            shapes["output.weight"] = (self.n_vocab, e)
        return shapes

    def check_tensor_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Gpt2Error unless `shapes` (name -> numpy shape) are exactly this GPT-2's tensors, output optional.

        A config claiming far more layers than there are tensors is refused before any name is listed."""
        tied = "output.weight" not in shapes
        if self.tensor_count(tied) > 2 * len(shapes) + 16:
            layers = {int(m.group(1)) for name in shapes if (m := LAYER_NAME.match(name))}
            raise Gpt2Error(f"{self.n_layer} layers expected, the tensors are of {len(layers)}")
        expected = self.tensor_shapes(tied)
        for name, shape in expected.items():
            if name not in shapes:
                raise Gpt2Error(f"missing tensor {name}")
            if tuple(shapes[name]) != shape:
                raise Gpt2Error(f"tensor {name} has shape {tuple(shapes[name])}, expected {shape}")
        extra = [name for name in shapes if name not in expected]
        if extra:
            raise Gpt2Error(f"unexpected tensor {extra[0]} in a {self.n_layer}-layer GPT-2")


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

    def row_subset(self, rows: slice | np.ndarray) -> WeightMatrix:
        """The matrix of some of these rows (a slice: a view of the blocks; an index array: a copy)."""
        blocks = self.blocks[rows]
        return replace(self, rows=blocks.shape[0], blocks=blocks)

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
        contents = read_gguf(path)
        self.path = contents.path
        self.metadata = contents.metadata
        self.tensors = contents.tensors
        self.data = contents.data  # u8[file size], memory-mapped
        self.config = _read_config(self)
        try:
            self.config.check_tensor_shapes({name: t.shape for name, t in self.tensors.items()})
        except Gpt2Error as e:
            raise self.fail(str(e)) from None
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and len(tokens) != self.config.n_vocab:
            raise self.fail(f"token_embd has {self.config.n_vocab} rows, the vocabulary {len(tokens)} tokens")
        self.weights = _read_weights(self, self.config)

    @property
    def tied_output(self) -> bool:
        return "output.weight" not in self.tensors

    @cached_property
    def tokenizer(self) -> Tokenizer:
        try:
            return Tokenizer.from_gguf(self.metadata)
        except Gpt2Error as e:
            raise self.fail(str(e)) from None

    @property
    def qtypes(self) -> set[GGMLQuantizationType]:
        return {m.qtype for m in self.weights.matrices()}

    def fail(self, problem: str) -> Gpt2Error:
        return Gpt2Error(f"{self.path}: {problem}")


def _field(mf: ModelFile, key: str, kind: type, required: bool = True):
    """A metadata value of type `kind` (an int field takes an integer, never a bool, string or float)."""
    value = mf.metadata.get(key)
    if value is None:
        if required:
            raise mf.fail(f"missing metadata key {key}")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
        raise mf.fail(
            f"metadata key {key} is {value!r:.40}, not a {'finite ' * (kind is float)}{kind.__name__}"
        )
    return value


def _read_config(mf: ModelFile) -> GPT2Config:
    arch = _field(mf, "general.architecture", str)
    if arch != ARCH:
        raise mf.fail(f"architecture is {arch!r}, not {ARCH!r}")
    p = ARCH + "."
    n_embd = _field(mf, p + "embedding_length", int)
    token_embd = _tensor(mf, "token_embd.weight")
    if len(token_embd.shape) != 2:
        raise mf.fail(f"tensor token_embd.weight has shape {token_embd.shape}, not (vocabulary, {n_embd})")
    config = GPT2Config(
        n_vocab=token_embd.shape[0],
        n_ctx=_field(mf, p + "context_length", int),
        n_embd=n_embd,
        n_head=_field(mf, p + "attention.head_count", int),
        n_layer=_field(mf, p + "block_count", int),
        n_ff=_field(mf, p + "feed_forward_length", int, required=False) or 4 * n_embd,
        layer_norm_eps=_field(mf, p + "attention.layer_norm_epsilon", float, required=False) or 1e-5,
    )
    try:
        config.check()
    except Gpt2Error as e:
        raise mf.fail(str(e)) from None
    return config


def _tensor(mf: ModelFile, name: str) -> TensorInfo:
    tensor = mf.tensors.get(name)
    if tensor is None:
        raise mf.fail(f"missing tensor {name}")
    return tensor


def _vector(mf: ModelFile, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A small tensor (norm, bias, position embedding) as f32, whatever its stored type."""
    tensor = _tensor(mf, name)
    if tensor.qtype == GGMLQuantizationType.F32:
        return tensor.blocks(mf.data).view(np.float32).reshape(shape)
    matrix = _as_matrix(mf, tensor, (math.prod(shape[:-1]), shape[-1]))
    return matrix.dequantize().reshape(shape)


def _as_matrix(mf: ModelFile, tensor: TensorInfo, shape: tuple[int, int]) -> WeightMatrix:
    qtype = tensor.qtype
    if qtype not in KERNELS:
        raise mf.fail(f"tensor {tensor.name} has unsupported block type {qtype.name}")
    rows, cols = shape
    block_size = GGML_QUANT_SIZES[qtype][0]
    if cols % block_size:
        raise mf.fail(
            f"tensor {tensor.name}: rows of {cols} values do not fit {qtype.name} blocks of {block_size}"
        )
    return WeightMatrix(tensor.name, qtype, rows, cols, tensor.blocks(mf.data).reshape(rows, -1))


def _matrix(mf: ModelFile, name: str, shape: tuple[int, int]) -> WeightMatrix:
    return _as_matrix(mf, _tensor(mf, name), shape)


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
