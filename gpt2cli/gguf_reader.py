"""A fast GGUF reader: metadata as Python values, tensors as memory-mapped numpy views.

gguf-py's GGUFReader builds a numpy view per string, which costs about two seconds on GPT-2's 100k vocabulary
and merge strings; reading the header sequentially with `struct` takes a few tens of milliseconds and keeps
start-up under a second.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gpt2cli.errors import Gpt2Error

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types -> struct format of one scalar
SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9
LENGTH = struct.Struct("<Q")  # of a string


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: the slowest axis first (ggml's dims reversed)
    offset: int  # absolute, in the file
    nbytes: int

    def blocks(self, data: np.ndarray) -> np.ndarray:
        """The stored bytes as u8[rows, row_bytes] (a 1-D tensor is one row); a view, no copy."""
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return data[self.offset : self.offset + self.nbytes].reshape(rows, self.nbytes // rows)


@dataclass(frozen=True)
class GGUFContents:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # u8[file size], memory-mapped


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise Gpt2Error(f"{self.path}: truncated or corrupt GGUF header")
        self.pos = start + n
        return start

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise Gpt2Error(f"{self.path}: corrupt GGUF (a string is not UTF-8)") from None

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (the vocabulary's 100k): one loop over the lengths, then one decode and
        one split of all the text, each string behind a NUL in place of its length field (1.4x faster than a
        slice, a decode and an append per string)."""
        buf, start, end = self.buf, self.pos, len(self.buf)
        read_length = LENGTH.unpack_from
        fields = [0] * count  # where each length field starts
        pos = start
        try:
            for i in range(count):
                fields[i] = pos
                (n,) = read_length(buf, pos)
                pos += 8 + n
        except struct.error:  # a length runs past the end
            pos = end + 1
        if pos > end:
            raise Gpt2Error(f"{self.path}: truncated or corrupt GGUF header")
        text = np.frombuffer(buf, dtype=np.uint8, count=pos - start, offset=start).copy()
        field = np.asarray(fields, dtype=np.int64) - start
        text[field + 7] = 0
        keep = np.ones(len(text), dtype=bool)
        keep[(field[:, None] + np.arange(7)).ravel()] = False
        try:
            strings = text[keep].tobytes().decode("utf-8").split("\0")[1:]
        except UnicodeDecodeError:
            raise Gpt2Error(f"{self.path}: corrupt GGUF (a string is not UTF-8)") from None
        self.pos = pos
        if len(strings) != count:  # a string holds a NUL itself
            return self._strings_one_by_one(start, count)
        return strings

    def _strings_one_by_one(self, start: int, count: int) -> list[str]:
        self.pos = start
        return [self.string() for _ in range(count)]

    def value(self, vtype: int) -> Any:
        """A scalar, a string, a list of strings or a numeric array (a read-only numpy view of the file, not
        a list: a list of Python numbers takes ~9x the bytes). Arrays of arrays are refused, as llama.cpp
        does."""
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == STRING:
                if count > len(self.buf) // 8:  # each string takes at least its 8-byte length
                    raise Gpt2Error(f"{self.path}: truncated or corrupt GGUF header")
                return self.strings(count)
            if etype not in SCALAR_FORMATS:
                raise Gpt2Error(f"{self.path}: corrupt GGUF (an array of value type {etype})")
            fmt = SCALAR_FORMATS[etype]
            start = self.take(count * struct.calcsize(fmt))
            return np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=start)
        if vtype not in SCALAR_FORMATS:
            raise Gpt2Error(f"{self.path}: corrupt GGUF (unknown value type {vtype})")
        return self.scalar(SCALAR_FORMATS[vtype])


def read_gguf(path: str | Path) -> GGUFContents:
    """Parse a GGUF file's header; Gpt2Error with one line on anything missing, truncated or corrupt."""
    path = Path(path)
    if not path.exists():
        raise Gpt2Error(f"{path}: no such file")
    if not path.is_file():
        raise Gpt2Error(f"{path}: not a file")
    size = path.stat().st_size
    if size < 24:
        raise Gpt2Error(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != MAGIC:
        raise Gpt2Error(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    cur = _Cursor(buf, path)
    cur.take(4)
    version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
    if version not in (2, 3):
        raise Gpt2Error(f"{path}: unsupported GGUF version {version}")
    if n_tensors > size or n_kv > size:
        raise Gpt2Error(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in metadata:
            raise Gpt2Error(f"{path}: corrupt GGUF (metadata key {key} appears twice)")
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = {}
    for _ in range(n_tensors):
        name = cur.string()
        if name in infos:
            raise Gpt2Error(f"{path}: corrupt GGUF (two tensors are named {name})")
        n_dims = cur.scalar("<I")
        if n_dims > 4:
            raise Gpt2Error(f"{path}: corrupt GGUF (tensor {name} has {n_dims} dimensions)")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        raw_type, offset = cur.scalar("<I"), cur.scalar("<Q")
        infos[name] = (dims, raw_type, offset)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    # llama.cpp wants a power of two, gguf-py a multiple of 8.
    if type(alignment) is not int or alignment < 8 or alignment & (alignment - 1):
        raise Gpt2Error(f"{path}: general.alignment {alignment!r:.40} is not a power of two >= 8")
    data_start = -(-cur.pos // alignment) * alignment
    data = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for name, (dims, raw_type, offset) in infos.items():
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise Gpt2Error(f"{path}: tensor {name} has unknown block type {raw_type}") from None
        if 0 in dims:
            raise Gpt2Error(f"{path}: tensor {name} has a dimension of 0 ({dims})")
        if offset % alignment:
            raise Gpt2Error(f"{path}: tensor {name}'s offset {offset} is not a multiple of {alignment}")
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)  # Python integers: a product cannot wrap
        if n % block_size:
            raise Gpt2Error(f"{path}: tensor {name} of {n} values does not fit {qtype.name} blocks")
        info = TensorInfo(
            name, qtype, tuple(reversed(dims)), data_start + offset, n // block_size * type_size
        )
        if info.offset + info.nbytes > size:
            raise Gpt2Error(f"{path}: truncated file (tensor {name} runs past the end)")
        tensors[name] = info
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for t, following in zip(by_offset, by_offset[1:], strict=False):
        if t.offset + t.nbytes > following.offset:
            raise Gpt2Error(f"{path}: corrupt GGUF (tensor {t.name} overlaps tensor {following.name})")
    return GGUFContents(path, version, metadata, tensors, data)
