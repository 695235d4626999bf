"""Writing a GPT-2 GGUF as llama.cpp's converter and llama-quantize do, atomically."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from gpt2cli.errors import Gpt2Error
from gpt2cli.gguf_file import ARCH, GPT2Config
from gpt2cli.tokenizer import Tokenizer

QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to be written: its name, the numpy shape of its values and its stored type."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block_size * type_size


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit(128 + signal) instead of killing the process,
    so `finally` clauses (a temporary file's removal) run; the previous handlers come back afterwards.
    Outside the main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # A signal the process was started to ignore (SIGHUP under nohup) stays ignored.
    present = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    catchable = [sig for sig in present if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, handle) for sig in catchable}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _part_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_parts(path: Path) -> None:
    """Delete temporary files of `path` left by runs that were killed (SIGKILL, power loss): their names
    carry the writer's process id, and only those whose process is gone are removed."""
    prefix = _part_prefix(path)
    for part in path.parent.glob(glob.escape(prefix) + "*.part"):
        pid = part.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                part.unlink()
        except (PermissionError, OverflowError):  # alive under another user, or not a process id
            pass


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it only when the block completes; removed on any
    exception, Ctrl-C, SIGTERM or SIGHUP. A failure to write names `path`, not the temporary file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(path)
        fd, tmp = tempfile.mkstemp(
            prefix=f"{_part_prefix(path)}{os.getpid()}.", suffix=".part", dir=path.parent
        )
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for secrets; a model file is as readable as any
        with exit_on_signals():
            yield Path(tmp)
            os.replace(tmp, path)
    except OSError as e:
        if e.filename not in (None, tmp, str(path), str(path.parent)):
            raise
        raise Gpt2Error(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_gpt2_gguf(
    path: str | os.PathLike[str],
    config: GPT2Config,
    plan: Sequence[TensorPlan],
    data: Iterable[np.ndarray],
    tokenizer: Tokenizer,
    *,
    file_type: int,
    name: str = "gpt2",
) -> None:
    """Write the metadata llama.cpp expects for GPT-2, then the tensors, to `path` via a temporary file.

    The header and tensor table go first, from `plan`; `data` then yields each tensor's stored bytes in plan
    order (f32/f16 values, or u8[rows, row_bytes] blocks) and each is written before the next is asked
    for, so memory holds one tensor at a time."""
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
        for t in plan:
            # With a raw type and a dtype other than u8, gguf-py takes the shape as the logical one.
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, stored in zip(plan, data, strict=True):
            if stored.nbytes != t.nbytes:
                raise ValueError(f"{t.name}: {stored.nbytes} bytes for a {t.qtype.name} tensor of {t.nbytes}")
            writer.write_tensor_data(np.ascontiguousarray(stored))
        writer.close()
