"""Batched Q8_0 products Y = X W^T on AMX tiles (Intel AMX-INT8: Sapphire Rapids and later).

One tdpbssd multiplies 16 rows of 32 int8 weights by 32 int8 activations of 16 tokens (8192 multiply-adds,
exact int32 sums), where a vpdpbusd does 64: the stored Q8_0 rows are the tile's first operand as they lie
in the file (tileloadd takes any row stride), and the activations, quantized per 32 as ggml's Q8_0 does
(simd._quantize_into, bit for bit), are the second, packed once per product in the layout tdpbssd reads
(4 bytes of each of 16 tokens per 64-byte row). Each 32-weight block has its own weight and activation
scale, so every block's int32 tile goes to memory and is scaled into f32 accumulators with AVX-512; that,
and the chain of load, multiply and store through the 8 tile registers, not the tile multiply, bound the
speed: measured on one core (CPU time, 512 tokens), 1.4-2.2x kernels.tiles on the 50257 x 768 head and the
layers' matrices. The result is the exact integer dot product of every block times its two scales, as
kernels.tiles computes, summed in another order.

The kernel needs the Linux permission for the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, asked once per
process in `available`); where the CPU or the kernel says no, gpt2cli uses kernels.tiles.
"""

from __future__ import annotations

import ctypes
import functools

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import layout
from .common import n_tiles, read_f16
from .simd import QK8, _quantize_into, _target_features

I8, I16, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
TILE_M = 16  # weight rows per tile
TILE_N = 16  # tokens per tile
# Each step multiplies two weight tiles by two token tiles into four results (all 8 tile registers): one
# tile's chain of load, multiply and store waits on the last, and the four overlap.
ROWS_PER_STEP = 2 * TILE_M
TOKENS_PER_STEP = 2 * TILE_N
A0, A1, B0, B1 = 4, 5, 6, 7  # tile registers; results in 0-3, C[2 m + h] = A_m B_h

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158


@functools.cache
def available() -> bool:
    """Whether this process may use AMX-INT8: the CPU numba compiles for has it and Linux grants the tile
    state (once per process; every thread then has it)."""
    if not {"amx-int8", "amx-tile", "avx512f"} <= _target_features():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _call(builder, name: str, *args: ir.Value) -> None:
    function_type = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    builder.call(cgutils.get_or_insert_function(builder.module, function_type, name), args)


def _tile(k: int) -> ir.Constant:
    return ir.Constant(I8, k)


@intrinsic
def configure_tiles(typingctx):
    """ldtilecfg on this thread: four 16 x 16 int32 results; A0, A1 16 rows of 32 weights; B0, B1 8 rows of
    4 bytes of 16 tokens."""

    def codegen(context, builder, signature, args):
        config = cgutils.alloca_once(builder, ir.ArrayType(I8, 64))
        builder.store(ir.Constant(ir.ArrayType(I8, 64), None), config)
        base = builder.bitcast(config, I8.as_pointer())

        def put(offset: int, value: int, ty: ir.IntType) -> None:
            pointer = builder.bitcast(builder.gep(base, [ir.Constant(I64, offset)]), ty.as_pointer())
            builder.store(ir.Constant(ty, value), pointer)

        put(0, 1, I8)  # palette 1
        shapes = [(c, 16, 64) for c in range(4)] + [(A0, 16, 32), (A1, 16, 32), (B0, 8, 64), (B1, 8, 64)]
        for tile, rows, row_bytes in shapes:
            put(16 + 2 * tile, row_bytes, I16)
            put(48 + tile, rows, I8)
        _call(builder, "llvm.x86.ldtilecfg", base)
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def release_tiles(typingctx):
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilerelease")
        return context.get_dummy_value()

    return types.none(), codegen


F32 = ir.FloatType()
V16F32 = ir.VectorType(F32, 16)
V16I32 = ir.VectorType(ir.IntType(32), 16)


@intrinsic
def accumulate_blocks(
    typingctx,
    weights,
    weights_offset,
    weights_stride,
    tokens,
    tokens_offset,
    weight_scales,
    token_scales,
    scratch,
    acc,
):
    """acc f32[32, 32] += for each block b < len(weight_scales): 32 weight rows' block b (32 int8 at byte
    weights_offset + 34 b of `weights`, rows weights_stride bytes apart) times 32 tokens' block b (two
    512-byte tiles at byte tokens_offset + 1024 b of `tokens`), exact int32 dot products scaled by
    weight_scales f32[blocks, 32] and token_scales f32[blocks, 32]. The int32 results of block b go through
    scratch int32[2, 32, 32] (half b % 2, so that block b + 1's stores need not wait for block b's loads).
    acc stays in memory (L1): 64 vectors do not fit the registers."""
    arrays = (weights, tokens, weight_scales, token_scales, scratch, acc)
    if not all(isinstance(a, types.Array) for a in arrays):
        return None

    def codegen(context, builder, signature, args):
        w_type, _, _, x_type, _, ws_type, ts_type, scratch_type, acc_type = signature.args
        w_, w_offset, w_stride, x_, x_offset, ws_, ts_, scratch_, acc_ = args

        def data(ty, value) -> ir.Value:
            return builder.bitcast(context.make_array(ty)(context, builder, value).data, I8.as_pointer())

        def at(base, offset) -> ir.Value:
            return builder.gep(base, [offset])

        def const(k: int) -> ir.Value:
            return ir.Constant(I64, k)

        def load(base, offset, ty) -> ir.Value:
            return builder.load(builder.bitcast(at(base, offset), ty.as_pointer()), align=4)

        w_base, x_base = data(w_type, w_), data(x_type, x_)
        ws_base, ts_base = data(ws_type, ws_), data(ts_type, ts_)
        scratch_base, acc_base = data(scratch_type, scratch_), data(acc_type, acc_)
        shape = cgutils.unpack_tuple(builder, context.make_array(ws_type)(context, builder, ws_).shape, 2)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(V16F32, [V16F32] * 3), "llvm.fma.v16f32"
        )

        def half(b) -> ir.Value:  # block b's int32 results
            return at(
                scratch_base,
                builder.mul(builder.and_(b, const(1)), const(4 * ROWS_PER_STEP * TOKENS_PER_STEP)),
            )

        def multiply(b) -> None:  # block b's four tiles of int32 results into its half of scratch
            w_pointer = at(w_base, builder.add(w_offset, builder.mul(b, const(layout.Q8_0.bytes))))
            x_pointer = at(x_base, builder.add(x_offset, builder.mul(b, const(1024))))
            second_rows = builder.mul(w_stride, const(TILE_M))
            _call(builder, "llvm.x86.tileloadd64", _tile(A0), w_pointer, w_stride)
            _call(builder, "llvm.x86.tileloadd64", _tile(A1), at(w_pointer, second_rows), w_stride)
            _call(builder, "llvm.x86.tileloadd64", _tile(B0), x_pointer, const(64))
            _call(builder, "llvm.x86.tileloadd64", _tile(B1), at(x_pointer, const(512)), const(64))
            for m, a in enumerate((A0, A1)):
                for h, x in enumerate((B0, B1)):
                    c = 2 * m + h
                    _call(builder, "llvm.x86.tilezero", _tile(c))
                    _call(builder, "llvm.x86.tdpbssd", _tile(c), _tile(a), _tile(x))
                    out = at(half(b), const(TILE_M * 128 * m + 64 * h))
                    _call(builder, "llvm.x86.tilestored64", _tile(c), out, const(128))

        def scale(b) -> None:  # acc += block b's int32 results times their scales
            results = half(b)
            token_scales = [
                load(ts_base, builder.add(builder.mul(b, const(128)), const(64 * h)), V16F32)
                for h in range(2)
            ]
            for i in range(2 * TILE_M):
                w_scale = load(ws_base, builder.add(builder.mul(b, const(128)), const(4 * i)), F32)
                splat = builder.insert_element(
                    ir.Constant(V16F32, ir.Undefined), w_scale, ir.Constant(ir.IntType(32), 0)
                )
                splat = builder.shuffle_vector(splat, splat, ir.Constant(V16I32, None))
                for h in range(2):
                    sums = builder.sitofp(load(results, const(128 * i + 64 * h), V16I32), V16F32)
                    acc_pointer = builder.bitcast(at(acc_base, const(128 * i + 64 * h)), V16F32.as_pointer())
                    acc = builder.load(acc_pointer, align=4)
                    product = builder.fmul(splat, token_scales[h])
                    builder.store(builder.call(fma, [sums, product, acc]), acc_pointer, align=4)

        # Software-pipelined: the tiles of block b are computed while block b - 1's results, stored one
        # block earlier, are scaled (scaling straight after the stores waited on them).
        blocks = shape[0]
        multiply(const(0))
        with cgutils.for_range(builder, builder.sub(blocks, const(1))) as loop:
            b = builder.add(loop.index, const(1))
            multiply(b)
            scale(loop.index)
        scale(builder.sub(blocks, const(1)))
        return context.get_dummy_value()

    signature = types.none(
        weights,
        weights_offset,
        weights_stride,
        tokens,
        tokens_offset,
        weight_scales,
        token_scales,
        scratch,
        acc,
    )
    return signature, codegen


@numba.njit(cache=True)
def _pack_tokens(x: np.ndarray, i0: int, i1: int, packed: np.ndarray, scales: np.ndarray) -> None:
    """Tokens i0:i1 (within one step of 32) of x f32[n, cols] quantized per 32 as ggml's Q8_0 into packed
    int8[steps, blocks, 2, 8, 64] (as tdpbssd reads its second operand: token 32 s + 16 h + j's byte k of
    block b at [s, b, h, k // 4, 4 j + k % 4]) and scales f32[steps, blocks, 32]."""
    cols = x.shape[1]
    q = np.empty(cols, np.int8)
    d = np.empty(cols // QK8, np.float32)
    for i in range(i0, i1):
        _quantize_into(x[i], q, d)
        s, t = i // TOKENS_PER_STEP, i % TOKENS_PER_STEP
        h, j = t // TILE_N, t % TILE_N
        for b in range(cols // QK8):
            scales[s, b, t] = d[b]
            for k in range(QK8):
                packed[s, b, h, k // 4, 4 * j + k % 4] = q[QK8 * b + k]


@numba.njit(cache=True, fastmath=True)
def _rows_times_tokens(blocks, r0: int, rows: int, packed, scales, n: int, y) -> None:
    """y[:n, r0:r0 + rows] for rows <= 32 weight rows of Q8_0 blocks."""
    blocks_per_row = packed.shape[1]
    row_bytes = blocks.shape[1]
    if rows < ROWS_PER_STEP:  # the last rows: a zero-padded copy to load from
        source = np.zeros((ROWS_PER_STEP, row_bytes), np.uint8)
        source[:rows] = blocks[r0 : r0 + rows]
        first = 0
    else:
        source = blocks
        first = r0
    weight_scales = np.empty((blocks_per_row, ROWS_PER_STEP), np.float32)
    for b in range(blocks_per_row):
        for i in range(ROWS_PER_STEP):
            weight_scales[b, i] = read_f16(source[first + i], b * layout.Q8_0.bytes + layout.Q8_0.d)
    scratch = np.empty((2, ROWS_PER_STEP, TOKENS_PER_STEP), np.int32)
    acc = np.empty((ROWS_PER_STEP, TOKENS_PER_STEP), np.float32)
    configure_tiles()
    offset = first * row_bytes + layout.Q8_0.qs
    for s in range(packed.shape[0]):
        acc[:] = 0
        accumulate_blocks(
            source,
            offset,
            row_bytes,
            packed,
            s * blocks_per_row * 1024,
            weight_scales,
            scales[s],
            scratch,
            acc,
        )
        t0 = s * TOKENS_PER_STEP
        for j in range(min(TOKENS_PER_STEP, n - t0)):
            for i in range(rows):
                y[t0 + j, r0 + i] = acc[i, j]
    release_tiles()


@numba.njit(cache=True, parallel=True, nogil=True)
def q8_0_matmul(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """y f32[n, rows] = x f32[n, cols] W^T, W Q8_0 blocks u8[rows, row_bytes], x quantized per 32 as ggml's
    Q8_0."""
    n, cols = x.shape
    steps = n_tiles(n, TOKENS_PER_STEP)
    packed = np.zeros((steps, cols // QK8, 2, 8, 64), np.int8)
    scales = np.zeros((steps, cols // QK8, TOKENS_PER_STEP), np.float32)
    for step in prange(steps):
        i0 = step * TOKENS_PER_STEP
        _pack_tokens(x, i0, min(n, i0 + TOKENS_PER_STEP), packed, scales)
    rows = blocks.shape[0]
    for tile in prange(n_tiles(rows, ROWS_PER_STEP)):
        r0 = tile * ROWS_PER_STEP
        _rows_times_tokens(blocks, r0, min(ROWS_PER_STEP, rows - r0), packed, scales, n, y)
