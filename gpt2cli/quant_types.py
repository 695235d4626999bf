"""llama.cpp's file types and llama-quantize's choice of a block type for each GPT-2 tensor.

The per-tensor rules follow `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp, restricted to what
a GPT-2 can meet (one dense model, no grouped-query attention, no experts, no importance matrix):

- only 2-D tensors whose name ends in "weight" are quantized, never norms or position_embd;
- a tied token_embd (no output.weight) takes the output rule: Q8_0 under Q8_0, else Q6_K;
- attn_qkv counts as attn_v; it, ffn_down and attn_output get more bits in the mixes (`_mixed_type`);
- a row whose length the chosen block does not divide falls back to a 32-weight type (`fallback_type`).

Layers are counted in layer order, as llama-quantize visits tensors sorted by block number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from gpt2cli.errors import Gpt2Error

T = GGMLQuantizationType


@dataclass(frozen=True)
class FileType:
    """One of llama-quantize's file types: its name, its `general.file_type` id and its default block type."""

    name: str
    id: LlamaFileType
    default: GGMLQuantizationType

    @property
    def is_quantized(self) -> bool:  # ggml_is_quantized: the mixes only apply to block types
        return self.default not in (T.F32, T.F16, T.BF16)


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F32", LlamaFileType.ALL_F32, T.F32),
        FileType("F16", LlamaFileType.MOSTLY_F16, T.F16),
        FileType("BF16", LlamaFileType.MOSTLY_BF16, T.BF16),
        FileType("Q4_0", LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
        FileType("Q4_1", LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
        FileType("Q5_0", LlamaFileType.MOSTLY_Q5_0, T.Q5_0),
        FileType("Q5_1", LlamaFileType.MOSTLY_Q5_1, T.Q5_1),
        FileType("Q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
        FileType("Q2_K", LlamaFileType.MOSTLY_Q2_K, T.Q2_K),
        FileType("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, T.Q3_K),
        FileType("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, T.Q3_K),
        FileType("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, T.Q3_K),
        FileType("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, T.Q4_K),
        FileType("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
        FileType("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, T.Q5_K),
        FileType("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
        FileType("Q6_K", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
    )
}

# `--bits N`: the file type llama.cpp users reach for at that size.
BITS = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}

# tensor_type_fallback: 256-weight K blocks -> a 32-weight type of at least as many bits.
_FALLBACKS = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

_LAYER = re.compile(r"blk\.(\d+)\.")


def file_type(name: str) -> FileType:
    """A file type by llama.cpp's name, case-insensitive (q4_k_m -> Q4_K_M)."""
    ft = FILE_TYPES.get(name.strip().upper())
    if ft is None:
        raise Gpt2Error(f"unknown type {name!r}; choose one of {', '.join(FILE_TYPES)}")
    return ft


def file_type_for_bits(bits: int) -> FileType:
    if bits not in BITS:
        raise Gpt2Error(f"--bits must be one of {', '.join(map(str, BITS))}, not {bits}")
    return FILE_TYPES[BITS[bits]]


def is_quantizable(name: str, ndim: int) -> bool:
    """llama-quantize's tensor_allows_quantization for the tensors a GPT-2 has."""
    return (
        ndim >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and name != "position_embd.weight"
    )


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The first and last eighth of the layers, and every third one between them."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _mixed_type(name: str, ft: FileType, n_layer: int, tied: bool, cols: int) -> GGMLQuantizationType:
    f = ft.name
    new_type = ft.default
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if cols % GGML_QUANT_SIZES[new_type][0]:
            return T.Q8_0
        return T.Q8_0 if new_type == T.Q8_0 else T.Q6_K
    match = _LAYER.match(name)
    if match is None:  # an untied token_embd keeps the default under every non-IQ type
        return new_type
    i = int(match.group(1))
    if name.endswith("attn_qkv.weight"):
        if f == "Q2_K":
            return T.Q3_K
        if f == "Q3_K_M":
            return T.Q5_K if i < 2 else T.Q4_K
        if f == "Q3_K_L":
            return T.Q5_K
        if f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layer):
            return T.Q6_K
        if f == "Q4_K_S" and i < 4:
            return T.Q5_K
    elif name.endswith("ffn_down.weight"):
        if f == "Q2_K":
            return T.Q3_K
        if f == "Q3_K_M":
            return T.Q5_K if i < n_layer // 16 else T.Q4_K
        if f == "Q3_K_L":
            return T.Q5_K
        if f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layer):
            return T.Q6_K
        if f == "Q4_K_S" and i < n_layer // 8:
            return T.Q5_K
    elif name.endswith("attn_output.weight"):
        if f == "Q2_K":
            return T.Q3_K
        if f == "Q3_K_M":
            return T.Q4_K
        if f == "Q3_K_L":
            return T.Q5_K
    return new_type


def fallback_type(qtype: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    """The type llama-quantize uses when `qtype`'s blocks do not divide a row of `cols` weights."""
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    if qtype not in _FALLBACKS:
        raise Gpt2Error(f"rows of {cols} weights do not fit {qtype.name} blocks and it has no fallback")
    fallback = _FALLBACKS[qtype]
    return fallback if cols % GGML_QUANT_SIZES[fallback][0] == 0 else T.F16


@dataclass(frozen=True)
class TensorChoice:
    qtype: GGMLQuantizationType
    wanted: GGMLQuantizationType | None = None  # the K type the row length ruled out, when it fell back


def tensor_type(
    name: str, shape: tuple[int, ...], ft: FileType, *, n_layer: int, tied: bool, pure: bool = False
) -> TensorChoice:
    """The block type of tensor `name` (numpy shape, rows last-but-one) in a file of type `ft`."""
    if not is_quantizable(name, len(shape)):
        return TensorChoice(T.F32)
    if not ft.is_quantized:
        return TensorChoice(ft.default)
    cols = shape[-1]
    wanted = ft.default if pure else _mixed_type(name, ft, n_layer, tied, cols)
    qtype = fallback_type(wanted, cols)
    return TensorChoice(qtype, wanted if qtype != wanted else None)
