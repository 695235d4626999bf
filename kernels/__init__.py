"""Numba kernels for GGUF block types, keyed by `gguf.GGMLQuantizationType`.

Every kernel works on a weight matrix kept in its stored form: a C-contiguous uint8 array of shape
(rows, row_bytes), one row per output unit, blocks tiling the row along the input axis.

- dequantize(blocks u8[rows, row_bytes], out f32[rows, cols]) -> None
- matvec(blocks u8[rows, row_bytes], x f32[cols], y f32[rows]) -> None          y = W x
- matmul(blocks u8[rows, row_bytes], x f32[n, cols], y f32[n, rows]) -> None    Y = X W^T
- quantize(x f32[rows, cols], out u8[rows, row_bytes]) -> None                   (None where not provided)
- int8_matmul: Y = X W^T with int8 activations for the quantized types (kernels.tiles), else None
- matvec_f32: where `matvec` quantizes the activations to int8 blocks as ggml does (faster, ~1% error in
  the logits), the same product with f32 activations; None where `matvec` is already exact f32.

A family module is imported on the first look-up of one of its types and its kernels compile (or load from
Numba's cache) on their first call, so a file only pays for the types it holds.
"""

from __future__ import annotations

import atexit
import importlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import numba
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba.core import environment, event
from numba.core.caching import FunctionCache
from numba.core.dispatcher import Dispatcher
from numba.core.registry import cpu_target
from numba.core.runtime import rtsys

Q = GGMLQuantizationType
FAMILY_OF: dict[GGMLQuantizationType, str] = {
    **dict.fromkeys((Q.F32, Q.F16, Q.BF16), "floats"),
    **dict.fromkeys((Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0), "legacy"),
    **dict.fromkeys((Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K), "kquants"),
}


@dataclass(frozen=True)
class BlockKernels:
    qtype: GGMLQuantizationType
    dequantize: Callable[..., None]
    matvec: Callable[..., None]
    matmul: Callable[..., None]
    quantize: Callable[..., None] | None = None
    matvec_f32: Callable[..., None] | None = None

    @property
    def exact_matvec(self) -> Callable[..., None]:
        return self.matvec_f32 or self.matvec

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def int8_matmul(self) -> Callable[..., None] | None:
        """int8_matmul(blocks, x f32[n, cols], y f32[n, rows]): Y = X W^T with x quantized to int8 per 32
        (kernels.tiles), or None for the float types and CPUs without integer dot products."""
        return family("tiles").int8_matmul_for(self.qtype)

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size


class KernelTable(Mapping[GGMLQuantizationType, BlockKernels]):
    """Every supported type; looking one up imports its family module, which registers the family's types."""

    def __init__(self) -> None:
        self._registered: dict[GGMLQuantizationType, BlockKernels] = {}

    def __getitem__(self, qtype: GGMLQuantizationType) -> BlockKernels:
        if qtype not in self._registered:
            family(FAMILY_OF[qtype])
        return self._registered[qtype]

    def __contains__(self, qtype: object) -> bool:
        return qtype in FAMILY_OF

    def __iter__(self) -> Iterator[GGMLQuantizationType]:
        return iter(FAMILY_OF)

    def __len__(self) -> int:
        return len(FAMILY_OF)


KERNELS = KernelTable()


def family(name: str) -> ModuleType:
    """The kernel module `name` (a family, or `tiles`), imported on first use with its cached kernels loaded
    lightly."""
    module = sys.modules.get(f"{__name__}.{name}")
    if module is None:
        module = importlib.import_module(f"{__name__}.{name}")
        load_cached_code_lightly(module)
    return module


def register(kernels: BlockKernels) -> None:
    KERNELS._registered[kernels.qtype] = kernels


def kernels_for(qtype: GGMLQuantizationType) -> BlockKernels:
    """The kernels of a block type; KeyError when the type is not supported."""
    return KERNELS[qtype]


def _cache_probe() -> None:
    """Stands for the kernels when asking Numba where it would cache them (they all live in this folder)."""


def _ensure_writable_cache() -> None:
    """Numba caches next to the sources, else in ~/.cache/numba, and refuses to define a cached function
    when neither is writable (a system-wide install run by another user, a container without HOME).
    Then compile into a temporary folder removed at exit, and say so once."""
    try:
        FunctionCache(_cache_probe)
    except RuntimeError:
        numba.config.CACHE_DIR = tempfile.mkdtemp(prefix="gpt2-numba-")
        atexit.register(shutil.rmtree, numba.config.CACHE_DIR, ignore_errors=True)
        print(
            "gpt2: note: no writable Numba cache folder (beside the package or in ~/.cache/numba): kernels "
            "are compiled for this run only; set NUMBA_CACHE_DIR to keep them",
            file=sys.stderr,
        )


def _install_numba_tables() -> None:
    """Fill Numba's typing and lowering tables, as it does before compiling, but without scipy and cffi:
    on the way Numba imports scipy (only to learn whether np.dot may call BLAS) and cffi (to type cffi
    functions), 0.3 s for two libraries the kernels never use. Both stay hidden only while the tables
    fill, and only if no other code has imported them already."""
    hidden = [name for name in ("scipy.linalg.cython_blas", "cffi") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # makes `import name` raise ImportError, which Numba expects
    try:
        cpu_target.target_context.refresh()
    finally:
        for name in hidden:
            del sys.modules[name]


class OnFirstCompile(event.Listener):
    """A listener for Numba's "numba:compile" events that calls `callback` once, at the first one."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.fired = False

    def on_start(self, _event: event.Event) -> None:
        if not self.fired:
            self.fired = True
            self.callback()

    def on_end(self, _event: event.Event) -> None:
        pass


@contextmanager
def _environments_without_imports() -> Iterator[None]:
    """While cached code loads, rebuild the environments of functions from modules not imported yet (Numba's
    own array and builtin implementations, inlined into the kernels) without importing them.

    Numba imports a function's module to give its environment the module's globals, which only object mode
    reads; the kernels are nopython code, and importing numba.np.arrayobj with its dependants costs 50-70 ms
    of a warm start. The environments keep their constants, which nopython code does use."""
    rebuild = environment._rebuild_env

    def rebuild_without_import(modname: str, consts: list, env_name: str) -> environment.Environment:
        env = environment.lookup_environment(env_name)
        if env is not None or modname in sys.modules:
            return env or rebuild(modname, consts, env_name)
        env = environment.Environment({"__name__": modname})
        env.consts[:] = consts
        env.env_name = env_name
        return env

    environment._rebuild_env = rebuild_without_import  # what unpickling the cached code calls
    try:
        yield
    finally:
        environment._rebuild_env = rebuild


class _KernelCache(FunctionCache):
    """Numba fills all its typing and lowering tables before loading cached machine code (0.15 s and 10 MB
    of a warm start), though running that code needs only its runtime (NRT); a compile fills them anyway."""

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
        with _environments_without_imports(), self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)


def load_cached_code_lightly(module) -> None:
    """Give the module's cached kernels the light loader above."""
    for value in vars(module).values():
        if isinstance(value, Dispatcher) and type(value._cache) is FunctionCache:
            value._cache.__class__ = _KernelCache


_ensure_writable_cache()
event.register("numba:compile", OnFirstCompile(_install_numba_tables))
load_cached_code_lightly(importlib.import_module(f"{__name__}.ops"))
