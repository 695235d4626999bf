"""Batched Q8_0 products Y = X W^T on AMX tiles (Intel AMX-INT8: Sapphire Rapids and later).

One tdpbssd multiplies 16 rows of 32 int8 weights by 32 int8 activations of 16 tokens (8192 multiply-adds,
exact int32 sums), where a vpdpbusd does 64: the stored Q8_0 rows are the tile's first operand as they lie
in the file (tileloadd takes any row stride), and the activations, quantized per 32 as ggml's Q8_0 does
(simd.quantize_group, bit for bit), are the second, packed once per product in the layout tdpbssd reads
(4 bytes of each of 16 tokens per 64-byte row). Each 32-weight block has its own weight and activation
scale, so every block's int32 tile goes to memory and is scaled with AVX-512 into 16 f32 accumulators
that stay in registers for the whole row of blocks (16 weight rows x 16 tokens), then are transposed in
registers and stored straight into the output rows. The tile store and the scaling, not the tile
multiply, bound the speed. The result is the exact integer dot product of every block times its two
scales, as kernels.tiles computes, summed in another order.

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

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
TILE = 16  # weight rows and tokens per tile product
# Two of each tile (registers 0-5), block b in the pair b % 2: block b + 1's loads and multiply need not wait
# for block b's tile store to drain.
C_TILES, A_TILES, B_TILES = (0, 1), (2, 3), (4, 5)
# Weight rows per task: its 16-row panels share each token tile loaded (from L2, then L1).
TASK_ROWS = 4 * TILE

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


def load_tile_config(builder, shapes: list[tuple[int, int, int]]) -> None:
    """ldtilecfg, palette 1: each (tile register, rows, bytes per row) of shapes; the other tiles unused."""
    config = cgutils.alloca_once(builder, ir.ArrayType(I8, 64))
    builder.store(ir.Constant(ir.ArrayType(I8, 64), None), config)
    base = builder.bitcast(config, I8.as_pointer())

    def put(offset: int, value: int, ty: ir.IntType) -> None:
        pointer = builder.bitcast(builder.gep(base, [ir.Constant(I64, offset)]), ty.as_pointer())
        builder.store(ir.Constant(ty, value), pointer)

    put(0, 1, I8)  # palette 1
    for tile, rows, row_bytes in shapes:
        put(16 + 2 * tile, row_bytes, I16)
        put(48 + tile, rows, I8)
    _call(builder, "llvm.x86.ldtilecfg", base)


@intrinsic
def configure_tiles(typingctx):
    """ldtilecfg on this thread: C 16 x 16 int32 results; A 16 rows of 32 weights; B 8 rows of 4 bytes of 16
    tokens."""

    def codegen(context, builder, signature, args):
        shapes = [(c, TILE, 64) for c in C_TILES] + [(a, TILE, QK8) for a in A_TILES]
        load_tile_config(builder, shapes + [(b, QK8 // 4, 64) for b in B_TILES])
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


def _transposed(builder, rows: list[ir.Value]) -> list[ir.Value]:
    """The 16 x 16 matrix whose row j is lane j of every vector in rows (16 V16F32): four stages, stage k
    swapping bit k of the row index with bit k of the lane index by two-source shuffles."""
    rows = list(rows)
    for k in range(4):
        step = 1 << k
        for i in range(16):
            if i & step:
                continue
            a, b = rows[i], rows[i | step]
            low = [j if not j & step else 16 + j - step for j in range(16)]
            high = [j + step if not j & step else 16 + j for j in range(16)]
            rows[i] = builder.shuffle_vector(a, b, ir.Constant(V16I32, low))
            rows[i | step] = builder.shuffle_vector(a, b, ir.Constant(V16I32, high))
    return rows


@intrinsic
def panel_times_tokens(
    typingctx,
    weights,
    weights_offset,
    weights_stride,
    tokens,
    tokens_offset,
    weight_scales,
    token_scales,
    scratch,
    out,
    out_offset,
    out_stride,
):
    """16 rows of 16 f32 of `out`, row j at element out_offset + j out_stride (token j, weight rows along it)
    = the sum over blocks b < len(weight_scales) of 16 weight rows' block b
    (32 int8 at byte weights_offset + 34 b of `weights`, rows weights_stride bytes apart) times 16 tokens'
    block b (a 512-byte tile at byte tokens_offset + 512 b of `tokens`), each block's exact int32 dot
    products scaled by weight_scales f32[blocks, 16] and token_scales f32[blocks, 16]. Block b's int32
    results go through scratch int32[2, 16, 16] (half b % 2) into 16 f32 accumulators that stay in
    registers, one weight row's 16 tokens each, turned into token rows at the end."""
    arrays = (weights, tokens, weight_scales, token_scales, scratch, out)
    if not all(isinstance(a, types.Array) for a in arrays):
        return None

    def codegen(context, builder, signature, args):
        w_type, _, _, x_type, _, ws_type, ts_type, scratch_type, out_type, _, _ = signature.args
        w_, w_offset, w_stride, x_, x_offset, ws_, ts_, scratch_, out_, out_offset, out_stride = args

        def data(ty, value) -> ir.Value:
            return builder.bitcast(context.make_array(ty)(context, builder, value).data, I8.as_pointer())

        def at(base, offset) -> ir.Value:
            return builder.gep(base, [offset])

        def const(k: int) -> ir.Value:
            return ir.Constant(I64, k)

        def pointer(base, offset, ty) -> ir.Value:
            return builder.bitcast(at(base, offset), ty.as_pointer())

        w_base, x_base = data(w_type, w_), data(x_type, x_)
        ws_base, ts_base = data(ws_type, ws_), data(ts_type, ts_)
        scratch_base, out_base = data(scratch_type, scratch_), data(out_type, out_)
        shape = cgutils.unpack_tuple(builder, context.make_array(ws_type)(context, builder, ws_).shape, 2)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(V16F32, [V16F32] * 3), "llvm.fma.v16f32"
        )
        # The accumulators live in an alloca that SROA turns into registers (constant indices only).
        acc_slots = cgutils.alloca_once(builder, ir.ArrayType(V16F32, TILE))
        builder.store(ir.Constant(ir.ArrayType(V16F32, TILE), None), acc_slots)

        def acc_pointer(i: int) -> ir.Value:
            return builder.gep(acc_slots, [ir.Constant(I32, 0), ir.Constant(I32, i)])

        def multiply(b, pair: int) -> None:  # block b's int32 results into scratch half `pair`
            w_pointer = at(w_base, builder.add(w_offset, builder.mul(b, const(layout.Q8_0.bytes))))
            x_pointer = at(x_base, builder.add(x_offset, builder.mul(b, const(512))))
            c, a, x = C_TILES[pair], A_TILES[pair], B_TILES[pair]
            _call(builder, "llvm.x86.tileloadd64", _tile(a), w_pointer, w_stride)
            _call(builder, "llvm.x86.tileloadd64", _tile(x), x_pointer, const(64))
            _call(builder, "llvm.x86.tilezero", _tile(c))
            _call(builder, "llvm.x86.tdpbssd", _tile(c), _tile(a), _tile(x))

        def store(pair: int) -> None:
            c = C_TILES[pair]
            _call(builder, "llvm.x86.tilestored64", _tile(c), at(scratch_base, const(1024 * pair)), const(64))

        def scale(b, pair: int) -> None:  # the accumulators += block b's int32 results times their scales
            token_scales = builder.load(pointer(ts_base, builder.mul(b, const(64)), V16F32), align=4)
            for i in range(TILE):
                w_offset_i = builder.add(builder.mul(b, const(64)), const(4 * i))
                w_scale = builder.load(pointer(ws_base, w_offset_i, F32))
                splat = builder.insert_element(
                    ir.Constant(V16F32, ir.Undefined), w_scale, ir.Constant(I32, 0)
                )
                splat = builder.shuffle_vector(splat, splat, ir.Constant(V16I32, None))
                sums = builder.load(pointer(scratch_base, const(1024 * pair + 64 * i), V16I32), align=64)
                acc = builder.load(acc_pointer(i))
                product = builder.fmul(splat, token_scales)
                builder.store(builder.call(fma, [builder.sitofp(sums, V16F32), product, acc]), acc_pointer(i))

        # Software-pipelined two blocks a pass: block b + 1's tiles are computed while block b's results,
        # stored just before, are scaled (scaling straight after the store waited on it).
        blocks = shape[0]
        multiply(const(0), 0)
        store(0)
        pairs = builder.udiv(builder.sub(blocks, const(1)), const(2))
        with cgutils.for_range(builder, pairs) as loop:
            b = builder.mul(loop.index, const(2))
            multiply(builder.add(b, const(1)), 1)
            scale(b, 0)
            store(1)
            multiply(builder.add(b, const(2)), 0)
            scale(builder.add(b, const(1)), 1)
            store(0)
        last = builder.sub(blocks, const(1))
        with builder.if_else(builder.icmp_unsigned("==", builder.urem(blocks, const(2)), const(0))) as (
            even,
            odd,
        ):
            with even:  # blocks - 2 computed, blocks - 1 not yet
                multiply(last, 1)
                scale(builder.sub(last, const(1)), 0)
                store(1)
                scale(last, 1)
            with odd:
                scale(last, 0)
        rows = [builder.load(acc_pointer(i)) for i in range(TILE)]
        for j, row in enumerate(_transposed(builder, rows)):
            element = builder.add(out_offset, builder.mul(out_stride, const(j)))
            builder.store(row, pointer(out_base, builder.mul(element, const(4)), V16F32), align=4)
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
        out,
        out_offset,
        out_stride,
    )
    return signature, codegen


@numba.njit(cache=True)
def _pack_tokens(x: np.ndarray, i0: int, i1: int, packed: np.ndarray, scales: np.ndarray) -> None:
    """Tokens i0:i1 (within one tile of 16) of x f32[n, cols] quantized per 32 as ggml's Q8_0 into packed
    int8[tiles, blocks, 8, 64] (as tdpbssd reads its second operand: token 16 s + j's byte k of block b at
    [s, b, k // 4, 4 j + k % 4]) and scales f32[tiles, blocks, 16]. The tile's tokens are quantized first,
    then moved 4 bytes at a time, each 64-byte row of `packed` written whole."""
    cols = x.shape[1]
    s = i0 // TILE
    q = np.zeros((TILE, cols), np.int8)  # tokens past i1: zero
    d = np.zeros((TILE, cols // QK8), np.float32)
    for i in range(i0, i1):
        _quantize_into(x[i], q[i - i0], d[i - i0])
    words = q.view(np.int32)  # [16, cols // 4]
    packed_words = packed.view(np.int32)  # [tiles, blocks, 8, 16]
    for b in range(cols // QK8):
        for j in range(TILE):
            scales[s, b, j] = d[j, b]
        for r in range(QK8 // 4):
            for j in range(TILE):
                packed_words[s, b, r, j] = words[j, QK8 // 4 * b + r]


@numba.njit(cache=True, fastmath=True)
def _rows_times_tokens(blocks, r0: int, rows: int, packed, scales, n: int, y) -> None:
    """y[:n, r0:r0 + rows] for rows <= TASK_ROWS weight rows of Q8_0 blocks: each tile of tokens against
    every 16-row panel in turn, so that it is loaded from L2 once."""
    blocks_per_row = packed.shape[1]
    row_bytes = blocks.shape[1]
    panels = (rows + TILE - 1) // TILE
    if rows < panels * TILE:  # the last rows: a zero-padded copy to load from
        source = np.zeros((panels * TILE, row_bytes), np.uint8)
        source[:rows] = blocks[r0 : r0 + rows]
        first = 0
    else:
        source = blocks
        first = r0
    weight_scales = np.empty((panels, blocks_per_row, TILE), np.float32)
    for p in range(panels):
        for b in range(blocks_per_row):
            for i in range(TILE):
                weight_scales[p, b, i] = read_f16(
                    source[first + TILE * p + i], b * layout.Q8_0.bytes + layout.Q8_0.d
                )
    scratch = np.empty((2, TILE, TILE), np.int32)
    out = np.empty((TILE, TILE), np.float32)
    configure_tiles()
    for s in range(packed.shape[0]):
        t0 = s * TILE
        tokens = min(TILE, n - t0)
        for p in range(panels):
            c0 = TILE * p
            width = min(TILE, rows - c0)
            whole = tokens == TILE and width == TILE  # straight into y, else through `out`
            panel_times_tokens(
                source,
                (first + c0) * row_bytes + layout.Q8_0.qs,
                row_bytes,
                packed,
                s * blocks_per_row * 512,
                weight_scales[p],
                scales[s],
                scratch,
                y if whole else out,
                t0 * y.shape[1] + r0 + c0 if whole else 0,
                y.shape[1] if whole else TILE,
            )
            if not whole:
                for j in range(tokens):
                    for i in range(width):
                        y[t0 + j, r0 + c0 + i] = out[j, i]
    release_tiles()


@numba.njit(cache=True, parallel=True, nogil=True)
def q8_0_matmul(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """y f32[n, rows] = x f32[n, cols] W^T, W Q8_0 blocks u8[rows, row_bytes], x quantized per 32 as ggml's
    Q8_0."""
    n, cols = x.shape
    steps = n_tiles(n, TILE)
    packed = np.zeros((steps, cols // QK8, QK8 // 4, 64), np.int8)
    scales = np.zeros((steps, cols // QK8, TILE), np.float32)
    for step in prange(steps):
        i0 = step * TILE
        _pack_tokens(x, i0, min(n, i0 + TILE), packed, scales)
    rows = blocks.shape[0]
    for task in prange(n_tiles(rows, TASK_ROWS)):
        r0 = task * TASK_ROWS
        _rows_times_tokens(blocks, r0, min(TASK_ROWS, rows - r0), packed, scales, n, y)
