"""A GGUF file as editable Python values, written back byte for byte: for building broken files in tests.

Unlike gguf-py's writer it writes whatever it is given (duplicate keys, any alignment, nested arrays,
overlapping tensors), which is the point.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2cli.gguf_reader import ARRAY, SCALAR_FORMATS, STRING

U8, U32, I32, F32, BOOL, U64, F64 = 0, 4, 5, 6, 7, 10, 12


@dataclass
class Value:
    vtype: int
    value: Any  # a scalar, a str, or for ARRAY an (element type, [items]) pair or its encoded bytes


@dataclass
class Tensor:
    name: str
    dims: list[int]  # ggml order: the fastest axis first
    raw_type: int
    offset: int  # relative to the data section


@dataclass
class RawGGUF:
    version: int
    kvs: list[tuple[str, Value]]
    tensors: list[Tensor]
    data: bytes  # the data section, from its aligned start
    alignment: int = 32
    tail: bytes = field(default=b"")  # appended after the data (for truncation-free edits, empty)

    def get(self, key: str) -> Value:
        return next(v for k, v in self.kvs if k == key)

    def set(self, key: str, value: Value) -> None:
        self.kvs = [(k, value if k == key else v) for k, v in self.kvs]

    def to_bytes(self) -> bytes:
        return assemble(
            self.version,
            [encode_kv(k, v) for k, v in self.kvs],
            [encode_tensor(t) for t in self.tensors],
            self.data + self.tail,
            self.alignment,
        )

    def write(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())


def assemble(version: int, kvs: list[bytes], tensors: list[bytes], data: bytes, alignment: int) -> bytes:
    """A file from encoded key-value pairs and tensor infos, padded to `alignment` before the data."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    return out + b"\0" * (-len(out) % alignment if alignment > 0 else 0) + data


def encode_kv(key: str, value: Value) -> bytes:
    return _string(key) + struct.pack("<I", value.vtype) + _value(value.vtype, value.value)


def encode_tensor(t: Tensor) -> bytes:
    dims = b"".join(struct.pack("<Q", d) for d in t.dims)
    return _string(t.name) + struct.pack("<I", len(t.dims)) + dims + struct.pack("<IQ", t.raw_type, t.offset)


def _string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8", errors="surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: Any) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        if isinstance(value, bytes):  # already encoded (element type, count, items)
            return value
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, item) for item in items)
    return struct.pack(SCALAR_FORMATS[vtype], value)


def parse(path: Path) -> RawGGUF:
    """A well-formed GGUF (ours) as a RawGGUF."""
    buf = Path(path).read_bytes()
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, pos)
    pos += 20

    def scalar(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = scalar("<Q")
        pos += n
        return buf[pos - n : pos].decode()

    def value(vtype: int) -> Any:
        if vtype == STRING:
            return string()
        if vtype == ARRAY:
            etype, count = scalar("<I"), scalar("<Q")
            return (etype, [value(etype) for _ in range(count)])
        return scalar(SCALAR_FORMATS[vtype])

    kvs = []
    for _ in range(n_kv):
        key = string()
        vtype = scalar("<I")
        kvs.append((key, Value(vtype, value(vtype))))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = [scalar("<Q") for _ in range(scalar("<I"))]
        tensors.append(Tensor(name, dims, scalar("<I"), scalar("<Q")))
    alignment = next((v.value for k, v in kvs if k == "general.alignment"), 32)
    start = -(-pos // alignment) * alignment
    return RawGGUF(version, kvs, tensors, buf[start:], alignment)
