"""Writing a GPT-2 GGUF as llama.cpp's converter and llama-quantize do, atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from gpt2cli.gguf_file import ARCH, GPT2Config
from gpt2cli.tokenizer import Tokenizer

QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION


@dataclass(frozen=True)
class TensorData:
    name: str
    data: np.ndarray  # f32 values, or u8[rows, row_bytes] blocks for a quantized type
    qtype: GGMLQuantizationType


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it only when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets; a model file is as readable as any
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_gpt2_gguf(
    path: str | os.PathLike[str],
    config: GPT2Config,
    tensors: Iterable[TensorData],
    tokenizer: Tokenizer,
    *,
    file_type: int,
    name: str = "gpt2",
) -> None:
    """Write the metadata llama.cpp expects for GPT-2, then the tensors, to `path` via a temporary file."""
    with atomic_output(path) as tmp:
        writer = GGUFWriter(tmp, ARCH)
        writer.add_name(name)
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_ctx)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_ff)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_file_type(file_type)
        writer.add_quantization_version(QUANTIZATION_VERSION)
        tokenizer.add_to_gguf(writer)
        for t in tensors:
            # Blocks go in as u8[rows, row_bytes]: gguf-py derives the logical shape from raw_dtype.
            raw_dtype = None if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else t.qtype
            writer.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
