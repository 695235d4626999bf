"""`gpt2 quantize`: a GPT-2 checkpoint or float GGUF -> a llama.cpp-compatible GGUF of one file type.

Inputs: a registry name (its safetensors checkpoint is fetched), a local Hugging Face directory, or an
F32/F16/BF16 GGUF. Each tensor gets the block type llama-quantize would give it (quant_types), is quantized
with ggml's reference quantizers (kernels/), and is measured against its f32 values; the file is written
through a temporary name, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from rich.table import Table

from gpt2cli import registry
from gpt2cli.convert import Checkpoint, load_hf_checkpoint
from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import ModelFile
from gpt2cli.gguf_reader import TensorInfo
from gpt2cli.gguf_write import TensorPlan, exit_on_signals, write_gpt2_gguf
from gpt2cli.kernels import KERNELS
from gpt2cli.model import GPT2Model
from gpt2cli.ppl import KLDStats, ProgressCallback, compare_models, tokenize_file
from gpt2cli.quant_types import FILE_TYPES, FileType, TensorChoice, is_quantizable, tensor_type

T = GGMLQuantizationType
FLOAT_INPUTS = (T.F32, T.F16, T.BF16)
ERROR_BLOCK_BYTES = 16 << 20  # f64 rows per step of the error measurement


@dataclass(frozen=True)
class TensorReport:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: (rows, cols) for a matrix
    nbytes: int
    rel_rms_error: float  # RMS of (stored - original) / RMS of original
    wanted: GGMLQuantizationType | None  # the type a row length ruled out (llama-quantize's fallback)

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        return is_quantizable(self.name, len(self.shape))


@dataclass(frozen=True)
class QuantizeReport:
    path: Path
    file_type: FileType
    tensors: list[TensorReport]
    file_size: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        """Over the 2-D weights only: biases, norms and position_embd stay f32 in every file type."""
        mats = [t for t in self.tensors if t.is_matrix]
        return 8 * sum(t.nbytes for t in mats) / sum(t.n_weights for t in mats)

    @property
    def f16_size(self) -> int:
        """The size of the same file with every 2-D weight in F16."""
        return self.file_size + sum(2 * t.n_weights - t.nbytes for t in self.tensors if t.is_matrix)

    @property
    def fallbacks(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.wanted is not None]


def load_gguf_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """An F32/F16/BF16 GGUF as a Checkpoint; a quantized one is refused (requantizing compounds the error)."""
    mf = ModelFile(path)  # validates the config, tensor shapes and vocabulary
    shapes, loaders = {}, {}
    for info in mf.tensors.values():
        if info.qtype not in FLOAT_INPUTS:
            raise Gpt2Error(
                f"{mf.path}: tensor {info.name} is already {info.qtype.name}; quantize from an F32, F16 or "
                "BF16 file or the original checkpoint"
            )
        shapes[info.name] = info.shape
        loaders[info.name] = _gguf_loader(info, mf.data)
    # The name comes from the file's own name, never from its metadata: general.name is untrusted and
    # becomes part of the default output path.
    stem = mf.path.name.removesuffix(".gguf")
    head, _, suffix = stem.rpartition(".")
    return Checkpoint(
        name=(head if suffix.upper() in FILE_TYPES else stem).lower(),
        config=mf.config,
        shapes=shapes,
        loaders=loaders,
        tokenizer=mf.tokenizer,
        gguf_path=mf.path,
    )


def _gguf_loader(info: TensorInfo, data: np.ndarray) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        blocks = info.blocks(data)
        if info.qtype == T.F32:
            return blocks.view(np.float32).reshape(info.shape)
        if info.qtype == T.F16:
            return blocks.view(np.float16).astype(np.float32).reshape(info.shape)
        return stored_values(blocks, T.BF16, info.shape)

    return load


def load_source(spec: str) -> Checkpoint:
    """A .gguf file, a local Hugging Face directory, or a registry name (its checkpoint is downloaded)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return load_gguf_checkpoint(path)
    if spec.lower().endswith(".gguf"):
        raise Gpt2Error(f"no such file: {spec}")
    directory = registry.fetch_checkpoint(spec)
    name = None if path.is_dir() else spec
    return load_hf_checkpoint(directory, name=name)


def default_output_path(checkpoint: Checkpoint, ft: FileType) -> Path:
    """`<model dir>/<name>.<TYPE>.gguf`, where `gpt2 generate --model name:type` looks first; the name is
    reduced to a plain file name (letters, digits, `.`, `_`, `-`; no leading dot), so it cannot leave the
    model directory."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", checkpoint.name).lstrip(".-") or "model"
    return registry.local_gguf_path(name, ft.name)


def quantize_matrix(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """f32[rows, cols] -> what GGUF stores: f32/f16 arrays, or u8[rows, row_bytes] blocks."""
    if qtype == T.F32:
        return x
    if qtype == T.F16:
        return x.astype(np.float16)
    kernels = KERNELS[qtype]
    out = np.empty((x.shape[0], kernels.row_bytes(x.shape[1])), dtype=np.uint8)
    kernels.quantize(np.ascontiguousarray(x, dtype=np.float32), out)
    return out


def stored_values(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """What a stored tensor means, as f32[shape]."""
    if qtype in (T.F32, T.F16):
        return data.astype(np.float32).reshape(shape)
    out = np.empty((data.shape[0], shape[-1]), dtype=np.float32)
    KERNELS[qtype].dequantize(np.ascontiguousarray(data), out)
    return out.reshape(shape)


def relative_rms_error(x: np.ndarray, stored: np.ndarray, qtype: GGMLQuantizationType) -> float:
    """RMS of (stored - x) / RMS of x for x f32[rows, cols] and its stored form (RMS of the error if x is 0).

    A block of rows at a time: the f64 temporaries of gpt2-xl's embedding at once would be ~2 GB."""
    rows, cols = x.shape
    step = max(1, ERROR_BLOCK_BYTES // (8 * cols))
    sum_sq = err_sq = 0.0
    for r0 in range(0, rows, step):
        block = x[r0 : r0 + step].astype(np.float64)
        err = stored_values(stored[r0 : r0 + step], qtype, block.shape) - block
        sum_sq += float(np.square(block).sum())
        err_sq += float(np.square(err).sum())
    return math.sqrt(err_sq / sum_sq) if sum_sq > 0 else math.sqrt(err_sq / x.size)


def tensor_choices(checkpoint: Checkpoint, ft: FileType, pure: bool = False) -> dict[str, TensorChoice]:
    """The block type of every tensor, as llama-quantize would choose it for file type `ft`."""
    return {
        name: tensor_type(name, shape, ft, n_layer=checkpoint.config.n_layer, tied=checkpoint.tied, pure=pure)
        for name, shape in checkpoint.shapes.items()
    }


def quantize_checkpoint(
    checkpoint: Checkpoint,
    ft: FileType,
    out_path: str | os.PathLike[str],
    *,
    pure: bool = False,
    on_tensor: Callable[[TensorReport], None] | None = None,
) -> QuantizeReport:
    """Write `checkpoint` as a GGUF of file type `ft` to `out_path` (atomically); report every tensor."""
    t0 = time.perf_counter()
    choices = tensor_choices(checkpoint, ft, pure)
    plan = [TensorPlan(name, shape, choices[name].qtype) for name, shape in checkpoint.shapes.items()]
    reports: list[TensorReport] = []

    def stored_tensors() -> Iterator[np.ndarray]:
        for t in plan:
            matrix = checkpoint.load(t.name).reshape(-1, t.shape[-1])
            stored = quantize_matrix(matrix, t.qtype)
            error = relative_rms_error(matrix, stored, t.qtype)
            report = TensorReport(t.name, t.qtype, t.shape, stored.nbytes, error, choices[t.name].wanted)
            reports.append(report)
            yield stored
            # The writer asks for the next tensor once this one is in the file: progress follows writes.
            if on_tensor is not None:
                on_tensor(report)

    out_path = Path(out_path)
    c = checkpoint
    write_gpt2_gguf(
        out_path, c.config, plan, stored_tensors(), c.tokenizer, file_type=int(ft.id), name=c.name
    )
    return QuantizeReport(
        path=out_path,
        file_type=ft,
        tensors=reports,
        file_size=out_path.stat().st_size,
        seconds=time.perf_counter() - t0,
    )


def compare_with_original(
    checkpoint: Checkpoint,
    quantized: str | os.PathLike[str],
    text_file: str | os.PathLike[str],
    *,
    ctx: int | None = None,
    max_tokens: int | None = None,
    progress: ProgressCallback | None = None,
) -> KLDStats:
    """Mean KL divergence and top-1 agreement of the quantized file against the unquantized model on a text,
    under llama-perplexity's --kl-divergence protocol. The original runs in f32: from its own GGUF when it is
    one, else from an F32 GGUF written to a temporary file by the same conversion."""
    with exit_on_signals(), tempfile.TemporaryDirectory(prefix="gpt2-quantize-") as tmp:
        base_path = checkpoint.gguf_path
        if base_path is None:
            base_path = Path(tmp) / "base.F32.gguf"
            quantize_checkpoint(checkpoint, FILE_TYPES["F32"], base_path)
        base_file, model_file = ModelFile(base_path), ModelFile(quantized)
        ids = tokenize_file(text_file, model_file.tokenizer, max_tokens=max_tokens)
        model = GPT2Model(model_file.weights, model_file.config)
        base = GPT2Model(base_file.weights, base_file.config)
        return compare_models(model, base, ids, ctx, protocol="llama", progress=progress)


def report_table(report: QuantizeReport) -> Table:
    """One row per tensor: its type (and the type its row length ruled out), shape, bytes and error."""
    table = Table("tensor", "type", "shape", "bytes", "rel. RMS error", box=None, pad_edge=False)
    for t in report.tensors:
        qtype = t.qtype.name + (f" (for {t.wanted.name})" if t.wanted else "")
        error = f"{t.rel_rms_error:.2e}" if t.rel_rms_error else "0"
        table.add_row(t.name, qtype, " x ".join(map(str, t.shape)), f"{t.nbytes:,}", error)
    return table


def summary_lines(report: QuantizeReport) -> list[str]:
    ft = report.file_type
    lines = [
        f"wrote         {report.path} ({ft.name}, general.file_type {int(ft.id)})",
        f"file size     {report.file_size / 1e6:.1f} MB, {report.file_size / report.f16_size:.3f} of F16 "
        f"({report.f16_size / 1e6:.1f} MB)",
        f"bits/weight   {report.bits_per_weight:.3f} over the 2-D weights",
        f"time          {report.seconds:.1f} s",
    ]
    if report.fallbacks:
        cols = sorted({t.shape[-1] for t in report.fallbacks})
        lines.append(
            f"fallbacks     {len(report.fallbacks)} tensors with rows of {', '.join(map(str, cols))} weights "
            "(not a multiple of 256) use a 32-weight type instead of a K type, as llama-quantize does"
        )
    return lines


def kld_lines(k: KLDStats) -> list[str]:
    return [
        f"perplexity    {k.ppl:.4f} (original {k.ppl_base:.4f}, ratio {k.ppl / k.ppl_base:.4f})",
        f"mean KLD      {k.mean_kld:.6f} +/- {k.mean_kld_uncertainty:.6f} (99%: {k.kld_99:.6f})",
        f"same top p    {100 * k.same_top:.3f}% (top-1 agreement with the original)",
    ]
