"""A few tokens (2-16: sequences decoding together) times Q4_K, Q5_K or Q6_K weights on AMX tiles.

The int8 matvecs of kernels.kquants_drivers multiply each unpacked block by every token with 256-bit integer
dot products, a few instructions per 32 weights and token; one tile product here (tdpbusd, tdpbssd)
multiplies 16 rows by 16 tokens over up to 64 weights, so a product costs nearly the same for 5 tokens as
for 16: unpacking a tile of 16 rows into one byte per weight, the tile products, and scaling their exact int32
sums into f32 accumulators. The activations are quantized exactly as the matvecs quantize them (Q4_K, Q5_K
per 32: simd.quantize_tokens; Q6_K per 256 as ggml's Q8_K: simd.quantize_tokens_q8_k) and packed once per
product in the layout a tile product reads as its second operand (4 bytes of each of 16 tokens per 64-byte
row), so each token's result is its own matvec's up to the order of f32 sums.

Q4_K and Q5_K: one tile product per sub-block of 32, whose 16 x 16 sums d sc_j xd_j scales (plus the min
term -dmin m_j sums_j); for 8 tokens or fewer one per pair of sub-blocks, 8 tokens of each in the 16
columns (pack_token_pairs): half the tile products and scalings, 1.1-1.25x faster at 5 tokens. Q6_K's
sub-blocks of 16 done that way ran the 50257-row head 1.5x slower than its matvecs at 16 tokens (every
sub-block's results go through memory, tilestored then vector loads, and those round trips bound it);
instead each weight times its integer sub-block scale is split into two bytes, so that two tile products
per 64 weights sum a whole block in the tiles (see q6_k_tile). Each tile prefetches the next one's rows
(from memory for the head: 1.3-1.6x faster). Speeds: kernels.AMX_MATVECS_MIN_TOKENS.
Where the CPU or the kernel gives no AMX (kernels.amx.available), the matvecs run.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .amx import load_tile_config, release_tiles
from .common import n_tiles
from .layout import Q4_K, Q5_K, Q6_K, QK_K
from .simd import (
    V32I8,
    _bits,
    _bytes,
    _call,
    _q4_k_scales_and_mins,
    _splat_f32,
    quantize_tokens,
    quantize_tokens_q8_k,
)

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
V16F32 = ir.VectorType(F32, 16)
V16I32 = ir.VectorType(I32, 16)
V8F32 = ir.VectorType(F32, 8)
TILE_ROWS = 16  # weight rows of a tile product (its M)
TILE_TOKENS = 16  # tokens of a tile product (its N): the most a call takes
ROWS_PER_TASK = 64  # rows per parallel task: enough to amortize the tile configuration
C_TILES = (0, 1, 2, 3)  # results, in turn, so that a sub-block's product need not wait for the last's store
A_TILES = (4, 5)
B_TILES = (6, 7)


def _tile(k: int) -> ir.Constant:
    return ir.Constant(I8, k)


@intrinsic
def configure_tiles(typingctx, sub_block):
    """ldtilecfg on this thread for sub-blocks of `sub_block` (a constant) weights: C 16 x 16 int32, A 16 rows
    of sub_block bytes, B sub_block / 4 rows of 4 bytes of 16 tokens."""
    if not isinstance(sub_block, types.IntegerLiteral):
        return None
    k = sub_block.literal_value

    def codegen(context, builder, signature, args):
        shapes = [(c, TILE_ROWS, 4 * TILE_TOKENS) for c in C_TILES]
        shapes += [(a, TILE_ROWS, k) for a in A_TILES] + [(b, k // 4, 4 * TILE_TOKENS) for b in B_TILES]
        load_tile_config(builder, shapes)
        return context.get_dummy_value()

    return types.none(sub_block), codegen


class _Tile:
    """IR access to the arrays of a tile intrinsic (by name) as byte pointers, and vector loads and stores."""

    def __init__(self, context, builder, signature, args, names) -> None:
        self.builder = builder
        self.base = {}
        self.shapes = {}
        for name, ty, value in zip(names, signature.args, args, strict=True):
            if isinstance(ty, types.Array):
                array = context.make_array(ty)(context, builder, value)
                self.base[name] = builder.bitcast(array.data, I8.as_pointer())
                self.shapes[name] = cgutils.unpack_tuple(builder, array.shape, ty.ndim)

    def at(self, name: str, offset) -> ir.Value:
        offset = offset if isinstance(offset, ir.Value) else ir.Constant(I64, offset)
        return self.builder.gep(self.base[name], [offset])

    def load(self, name: str, offset, ty: ir.Type, align: int = 1) -> ir.Value:
        return self.builder.load(self.builder.bitcast(self.at(name, offset), ty.as_pointer()), align=align)

    def store(self, value: ir.Value, name: str, offset, align: int = 1) -> None:
        self.builder.store(
            value, self.builder.bitcast(self.at(name, offset), value.type.as_pointer()), align=align
        )

    def prefetch(self, name: str, offset) -> None:
        """Ask for the cache line at byte offset of name (harmless past its end: prefetches never fault)."""
        function_type = ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
        prefetch = cgutils.get_or_insert_function(self.builder.module, function_type, "llvm.prefetch.p0i8")
        self.builder.call(
            prefetch, [self.at(name, offset), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)]
        )

    def splat(self, name: str, offset) -> ir.Value:
        """<16 x f32 or i32> of the scalar at byte offset of name (a broadcast load)."""
        value = self.load(name, offset, F32, 4)
        single = self.builder.insert_element(ir.Constant(V16F32, ir.Undefined), value, ir.Constant(I32, 0))
        return self.builder.shuffle_vector(single, single, ir.Constant(V16I32, None))


def _const(k: int) -> ir.Constant:
    return ir.Constant(I64, k)


def _pipelined(builder, blocks: ir.Value, multiply, scale) -> None:
    """multiply(b) for every block b, scale(b) one block later: the products of block b run while block
    b - 1's stored results are scaled (scaling straight after the stores would wait on them)."""
    multiply(_const(0))
    with cgutils.for_range(builder, builder.sub(blocks, _const(1))) as loop:
        multiply(builder.add(loop.index, _const(1)))
        scale(loop.index)
    scale(builder.sub(blocks, _const(1)))


def _prefetch_next_tile(builder, tile: _Tile, start: ir.Value, row_bytes: ir.Value, block_bytes: int) -> None:
    """Prefetch the block 16 rows below the one at byte `start`: the next tile's, which the hardware
    prefetcher would not fetch in time (a tile reads 16 rows at once, from memory for the large matrices)."""
    below = builder.add(start, builder.mul(row_bytes, _const(TILE_ROWS)))
    for line in range(0, block_bytes + 63, 64):
        tile.prefetch("blocks", builder.add(below, _const(line)))


def _tile_products(builder, tile: _Tile, b, half, paired: bool) -> None:
    """Block b's tile products: its weights at abuf (16 rows of 64 bytes for each pair of sub-blocks) times
    the packed tokens, each product's int32 results to cbuf[half][i] (16 x 16): one product per sub-block
    of 32 (i < 8), or `paired` (8 tokens or fewer) one per pair of them (i < 4), whose second operand holds
    8 tokens of each sub-block (pack_token_pairs)."""
    products, width = (4, 64) if paired else (8, 32)
    for i in range(products):
        c, a, x = C_TILES[i % 4], A_TILES[i % 2], B_TILES[i % 2]
        column = builder.add(builder.mul(b, _const(QK_K)), _const(width * i))
        _call(builder, "llvm.x86.tilezero", ir.VoidType(), _tile(c))
        a_at = tile.at("abuf", 1024 * (i // 2) + 32 * (i % 2) if width == 32 else 1024 * i)
        _call(builder, "llvm.x86.tileloadd64", ir.VoidType(), _tile(a), a_at, _const(64))
        x_at = tile.at("packed", builder.mul(column, _const(TILE_TOKENS)))  # 4 tokens' bytes per 4 weights
        _call(builder, "llvm.x86.tileloadd64", ir.VoidType(), _tile(x), x_at, _const(4 * TILE_TOKENS))
        _call(builder, "llvm.x86.tdpbusd", ir.VoidType(), _tile(c), _tile(a), _tile(x))
        c_at = tile.at("cbuf", builder.add(builder.mul(half, _const(1024 * 8)), _const(1024 * i)))
        _call(builder, "llvm.x86.tilestored64", ir.VoidType(), _tile(c), c_at, _const(4 * TILE_TOKENS))


K4_NAMES = ("blocks", "first", "packed", "xd", "sums", "abuf", "fbuf", "cbuf", "acc")


def _k4_tile_intrinsic(layout, paired: bool):
    """The tile intrinsic of Q4_K or Q5_K (8 sub-blocks of 32 per block; Q5_K: bit j of qh[k] the fifth bit
    of sub-block j's weight k):

    acc f32[16, 16] = rows first .. first + 15 of blocks u8[rows, row_bytes] times 16 tokens: packed
    int8[cols // 4, 64] (pack_tokens), xd and sums f32[cols // 32, 16] (the tokens' scales and the sums of
    their quantized values d q per 32, token-minor), as the matvec: sum_j d sc_j xd_j dot(q_j, xq_j) -
    dmin m_j sums_j. Scratch: abuf u8[8 * 16 * 32], fbuf f32[2 * 2 * 16 * 8], cbuf int32[2 * 8 * 16 * 16]."""
    has_qh = hasattr(layout, "qh")

    @intrinsic
    def tile_product(typingctx, blocks, first, packed, xd, sums, abuf, fbuf, cbuf, acc):
        arrays = (blocks, packed, xd, sums, abuf, fbuf, cbuf, acc)
        if not all(isinstance(a, types.Array) for a in arrays):
            return None

        def codegen(context, builder, signature, args):
            tile = _Tile(context, builder, signature, args, K4_NAMES)
            row_bytes = tile.shapes["blocks"][1]
            first_row = args[1]
            accumulators = [cgutils.alloca_once_value(builder, ir.Constant(V16F32, None)) for _ in range(16)]

            def fbuf_at(half, kind: int, r: int, j: int = 0) -> ir.Value:  # f32 [half][scale, min][row][j]
                return builder.add(builder.mul(half, _const(4 * 256)), _const(4 * (128 * kind + 8 * r + j)))

            def unpack_and_multiply(b) -> None:
                """Block b of the 16 rows: d sc_j and -dmin m_j to fbuf[b % 2], the weights of sub-block j
                to abuf[j] (16 rows of 32 bytes), then the tile products."""
                half = builder.and_(b, _const(1))
                for r in range(TILE_ROWS):
                    row = builder.mul(builder.add(first_row, _const(r)), row_bytes)
                    start = builder.add(row, builder.mul(b, _const(layout.bytes)))

                    def load(at: int, ty: ir.Type, start: ir.Value = start) -> ir.Value:
                        return tile.load("blocks", builder.add(start, _const(at)), ty)

                    _prefetch_next_tile(builder, tile, start, row_bytes, layout.bytes)
                    d = builder.fpext(load(layout.d, ir.HalfType()), F32)
                    minus_dmin = builder.fneg(builder.fpext(load(layout.dmin, ir.HalfType()), F32))
                    scales, mins = _q4_k_scales_and_mins(builder, load(layout.scales, ir.VectorType(I8, 16)))
                    scales = builder.fmul(builder.uitofp(scales, V8F32), _splat_f32(builder, d))
                    tile.store(scales, "fbuf", fbuf_at(half, 0, r), 4)
                    minus_mins = builder.fmul(builder.uitofp(mins, V8F32), _splat_f32(builder, minus_dmin))
                    tile.store(minus_mins, "fbuf", fbuf_at(half, 1, r), 4)
                    for j in range(8):
                        nibbles = _bits(builder, load(layout.qs + 32 * (j // 2), V32I8), 4 * (j % 2), 15)
                        if has_qh:
                            fifth = builder.shl(
                                _bits(builder, load(layout.qh, V32I8), j, 1), _bytes([4] * 32)
                            )
                            nibbles = builder.or_(nibbles, fifth)
                        tile.store(nibbles, "abuf", 1024 * (j // 2) + 64 * r + 32 * (j % 2))
                _tile_products(builder, tile, b, half, paired)

            def scale(b) -> None:
                """acc[r] += block b's sums of each sub-block j times d sc_j xd_j, plus -dmin m_j sums_j
                (paired: lanes 8 s + t hold sub-block 2i + s of token t)."""
                half = builder.and_(b, _const(1))
                products = 4 if paired else 8
                for i in range(products):
                    group = builder.mul(builder.add(builder.mul(b, _const(products)), _const(i)), _const(64))
                    x_scales = tile.load("xd", group, V16F32, 4)
                    x_sums = tile.load("sums", group, V16F32, 4)
                    for r in range(TILE_ROWS):
                        c_at = builder.add(builder.mul(half, _const(1024 * 8)), _const(1024 * i + 64 * r))
                        sums = builder.sitofp(tile.load("cbuf", c_at, V16I32, 4), V16F32)
                        if paired:
                            lanes = ir.Constant(V16I32, [2 * i] * 8 + [2 * i + 1] * 8)
                            row_scales = tile.load("fbuf", fbuf_at(half, 0, r), V8F32, 4)
                            row_scale = builder.shuffle_vector(row_scales, row_scales, lanes)
                            row_mins = tile.load("fbuf", fbuf_at(half, 1, r), V8F32, 4)
                            row_min = builder.shuffle_vector(row_mins, row_mins, lanes)
                        else:
                            row_scale = tile.splat("fbuf", fbuf_at(half, 0, r, i))
                            row_min = tile.splat("fbuf", fbuf_at(half, 1, r, i))
                        acc = builder.load(accumulators[r])
                        acc = _call(
                            builder, "llvm.fma.v16f32", V16F32, sums, builder.fmul(row_scale, x_scales), acc
                        )
                        acc = _call(builder, "llvm.fma.v16f32", V16F32, row_min, x_sums, acc)
                        builder.store(acc, accumulators[r])

            _pipelined(builder, builder.udiv(row_bytes, _const(layout.bytes)), unpack_and_multiply, scale)
            for r in range(TILE_ROWS):
                tile.store(builder.load(accumulators[r]), "acc", 64 * r, 4)
            return context.get_dummy_value()

        return types.none(blocks, first, packed, xd, sums, abuf, fbuf, cbuf, acc), codegen

    return tile_product


q4_k_tile = _k4_tile_intrinsic(Q4_K, paired=False)
q5_k_tile = _k4_tile_intrinsic(Q5_K, paired=False)
q4_k_pairs_tile = _k4_tile_intrinsic(Q4_K, paired=True)
q5_k_pairs_tile = _k4_tile_intrinsic(Q5_K, paired=True)


Q6_K_NAMES = ("blocks", "first", "packed", "xd", "abuf", "fbuf", "cbuf", "acc")
V32I16 = ir.VectorType(I16, 32)


@intrinsic
def q6_k_tile(typingctx, blocks, first, packed, xd, abuf, fbuf, cbuf, acc):
    """acc f32[16, 16] = rows first .. first + 15 of Q6_K blocks u8[rows, row_bytes] times 16 tokens: packed
    int8[cols // 4, 64] (pack_tokens of the tokens quantized per 256, as ggml's Q8_K), xd f32[cols // 256, 16]
    (their scales, token-minor).

    Each weight times its sub-block's integer scale, w = (q - 32) sc (|w| <= 4096), splits into
    w = 128 hi + lo, hi signed and lo in 0 .. 127, both bytes: two tile products (tdpbssd, tdpbusd) per 64
    weights then sum the whole block's 16 sub-blocks inside the tiles, and 128 hi + lo is the exact int32
    sum_i sc_i dot(q_i - 32, xq_i) of the matvec, which one f32 multiply by d xd scales. Scratch:
    abuf int8[4 * 2 * 16 * 64], fbuf f32[2 * 16], cbuf int32[2 * 2 * 16 * 16]."""
    arrays = (blocks, packed, xd, abuf, fbuf, cbuf, acc)
    if not all(isinstance(a, types.Array) for a in arrays):
        return None

    def codegen(context, builder, signature, args):
        tile = _Tile(context, builder, signature, args, Q6_K_NAMES)
        row_bytes = tile.shapes["blocks"][1]
        first_row = args[1]
        accumulators = [cgutils.alloca_once_value(builder, ir.Constant(V16F32, None)) for _ in range(16)]
        byte_vector = ir.VectorType(I8, 32)

        def unpack_and_multiply(b) -> None:
            """Block b of the 16 rows: d to fbuf[b % 2], hi and lo of the 64 weights of chunk k to abuf[k]
            (16 rows of 64 bytes each), then the tile products, their sums to cbuf[b % 2]."""
            half = builder.and_(b, _const(1))
            for r in range(TILE_ROWS):
                row = builder.mul(builder.add(first_row, _const(r)), row_bytes)
                start = builder.add(row, builder.mul(b, _const(Q6_K.bytes)))

                def load(at: int, ty: ir.Type, start: ir.Value = start) -> ir.Value:
                    return tile.load("blocks", builder.add(start, _const(at)), ty)

                _prefetch_next_tile(builder, tile, start, row_bytes, Q6_K.bytes)
                d = builder.fpext(load(Q6_K.d, ir.HalfType()), F32)
                tile.store(d, "fbuf", builder.add(builder.mul(half, _const(64)), _const(4 * r)), 4)
                scales = builder.sext(load(Q6_K.scales, ir.VectorType(I8, 16)), ir.VectorType(I16, 16))
                for c in range(8):  # weights 32c .. 32c + 31: sub-blocks 2c and 2c + 1
                    h, j = divmod(c, 4)
                    low = _bits(builder, load(Q6_K.ql + 64 * h + 32 * (j % 2), byte_vector), 4 * (j // 2), 15)
                    high = _bits(builder, load(Q6_K.qh + 32 * h, byte_vector), 2 * j, 3)
                    q = builder.sub(builder.or_(low, builder.shl(high, _bytes([4] * 32))), _bytes([32] * 32))
                    sub_block_scales = builder.shuffle_vector(
                        scales, scales, ir.Constant(ir.VectorType(I32, 32), [2 * c] * 16 + [2 * c + 1] * 16)
                    )
                    w = builder.mul(builder.sext(q, V32I16), sub_block_scales)
                    hi = builder.trunc(builder.ashr(w, ir.Constant(V32I16, [7] * 32)), byte_vector)
                    lo = builder.trunc(builder.and_(w, ir.Constant(V32I16, [127] * 32)), byte_vector)
                    at = 2048 * (c // 2) + 64 * r + 32 * (c % 2)
                    tile.store(hi, "abuf", at)
                    tile.store(lo, "abuf", at + 1024)
            c_hi, c_lo = 0, 1
            _call(builder, "llvm.x86.tilezero", ir.VoidType(), _tile(c_hi))
            _call(builder, "llvm.x86.tilezero", ir.VoidType(), _tile(c_lo))
            for k in range(4):
                a_hi, a_lo, x = (2, 3, 6) if k % 2 == 0 else (4, 5, 7)
                stride = _const(64)
                _call(
                    builder,
                    "llvm.x86.tileloadd64",
                    ir.VoidType(),
                    _tile(a_hi),
                    tile.at("abuf", 2048 * k),
                    stride,
                )
                a_lo_at = tile.at("abuf", 2048 * k + 1024)
                _call(builder, "llvm.x86.tileloadd64", ir.VoidType(), _tile(a_lo), a_lo_at, stride)
                column = builder.add(builder.mul(b, _const(QK_K)), _const(64 * k))
                x_at = tile.at("packed", builder.mul(column, _const(TILE_TOKENS)))
                _call(builder, "llvm.x86.tileloadd64", ir.VoidType(), _tile(x), x_at, stride)
                _call(builder, "llvm.x86.tdpbssd", ir.VoidType(), _tile(c_hi), _tile(a_hi), _tile(x))
                _call(builder, "llvm.x86.tdpbusd", ir.VoidType(), _tile(c_lo), _tile(a_lo), _tile(x))
            for i, c in enumerate((c_hi, c_lo)):
                c_at = tile.at("cbuf", builder.add(builder.mul(half, _const(2048)), _const(1024 * i)))
                _call(builder, "llvm.x86.tilestored64", ir.VoidType(), _tile(c), c_at, _const(64))

        def scale(b) -> None:
            """acc[r] += f32(128 hi + lo) d xd of block b."""
            half = builder.and_(b, _const(1))
            x_scales = tile.load("xd", builder.mul(b, _const(64)), V16F32, 4)
            for r in range(TILE_ROWS):
                c_at = builder.add(builder.mul(half, _const(2048)), _const(64 * r))
                hi = tile.load("cbuf", c_at, V16I32, 4)
                lo = tile.load("cbuf", builder.add(c_at, _const(1024)), V16I32, 4)
                total = builder.add(builder.shl(hi, ir.Constant(V16I32, [7] * 16)), lo)
                d = tile.splat("fbuf", builder.add(builder.mul(half, _const(64)), _const(4 * r)))
                acc = builder.load(accumulators[r])
                acc = _call(
                    builder,
                    "llvm.fma.v16f32",
                    V16F32,
                    builder.sitofp(total, V16F32),
                    builder.fmul(d, x_scales),
                    acc,
                )
                builder.store(acc, accumulators[r])

        _pipelined(builder, builder.udiv(row_bytes, _const(Q6_K.bytes)), unpack_and_multiply, scale)
        for r in range(TILE_ROWS):
            tile.store(builder.load(accumulators[r]), "acc", 64 * r, 4)
        return context.get_dummy_value()

    return types.none(blocks, first, packed, xd, abuf, fbuf, cbuf, acc), codegen


@numba.njit(cache=True, nogil=True)
def pack_tokens(q: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens quantized to q int8[n, cols] with scales d f32[n, cols // g] -> (packed int8[cols // 4, 64]:
    token t's value k at [k // 4, 4 t + k % 4], as a tile product reads its second operand; d token-minor
    f32[cols // g, 16]), the tokens past n zero."""
    n, cols = q.shape
    packed = np.zeros((cols // 4, 4 * TILE_TOKENS), np.int8)
    for t in range(n):
        for k in range(cols):
            packed[k // 4, 4 * t + k % 4] = q[t, k]
    return packed, _token_minor(d)


@numba.njit(cache=True, nogil=True)
def pack_token_pairs(
    q: np.ndarray, d: np.ndarray, sums: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For 8 tokens or fewer: a tile product per pair of sub-blocks of 32, 8 tokens of each. q int8[n, cols],
    d and sums f32[n, cols // 32] -> (packed int8[cols // 4, 64]: token t's value k at
    [k // 4, 4 (8 s + t) + k % 4], s = k // 32 % 2 its sub-block in the pair, zero at the other sub-block's
    columns; d and sums f32[cols // 64, 16], token t's of sub-block 2c + s at [c, 8 s + t])."""
    n, cols = q.shape
    packed = np.zeros((cols // 4, 4 * TILE_TOKENS), np.int8)
    pair_d = np.zeros((cols // 64, TILE_TOKENS), np.float32)
    pair_sums = np.zeros((cols // 64, TILE_TOKENS), np.float32)
    for t in range(n):
        for k in range(cols):
            packed[k // 4, 4 * (8 * (k // 32 % 2) + t) + k % 4] = q[t, k]
        for g in range(cols // 32):
            pair_d[g // 2, 8 * (g % 2) + t] = d[t, g]
            pair_sums[g // 2, 8 * (g % 2) + t] = sums[t, g]
    return packed, pair_d, pair_sums


@numba.njit(cache=True, nogil=True)
def _token_minor(values: np.ndarray) -> np.ndarray:
    out = np.zeros((values.shape[1], TILE_TOKENS), np.float32)
    for t in range(values.shape[0]):
        out[:, t] = values[t]
    return out


@numba.njit(cache=True, nogil=True)
def _tile_source(blocks: np.ndarray, r0: int, r1: int) -> tuple[np.ndarray, int]:
    """(array, first row) holding rows r0 .. r0 + 15: blocks, or for the last rows a zero-padded copy."""
    if r1 - r0 == TILE_ROWS:
        return blocks, r0
    source = np.zeros((TILE_ROWS, blocks.shape[1]), np.uint8)
    source[: r1 - r0] = blocks[r0:r1]
    return source, 0


@numba.njit(cache=True, nogil=True)
def _store_tile(acc: np.ndarray, n: int, y: np.ndarray, r0: int, r1: int) -> None:
    for t in range(n):
        for i in range(r1 - r0):
            y[t, r0 + i] = acc[i, t]


@numba.njit(cache=True, nogil=True)
def _store_pairs_tile(acc: np.ndarray, n: int, y: np.ndarray, r0: int, r1: int) -> None:
    """y from acc[row, 8 s + t], the sums over the even (s = 0) and odd sub-blocks of token t."""
    for t in range(n):
        for i in range(r1 - r0):
            y[t, r0 + i] = acc[i, t] + acc[i, 8 + t]


@numba.njit(cache=True, nogil=True)
def _k4_rows(blocks, r0: int, r1: int, packed, xd, sums, n: int, y, fifth_bit: bool) -> None:
    """y[:n, r0:r1] of Q4_K (Q5_K if fifth_bit) rows, 16 at a time; 8 tokens or fewer in pairs of
    sub-blocks (pack_token_pairs)."""
    paired = n <= TILE_TOKENS // 2
    if paired:
        configure_tiles(64)
    else:
        configure_tiles(32)
    abuf = np.empty(4 * TILE_ROWS * 64, np.uint8)
    fbuf = np.empty(2 * 2 * TILE_ROWS * 8, np.float32)
    cbuf = np.empty(2 * 8 * TILE_ROWS * TILE_TOKENS, np.int32)
    acc = np.empty((TILE_ROWS, TILE_TOKENS), np.float32)
    for t0 in range(r0, r1, TILE_ROWS):
        t1 = min(r1, t0 + TILE_ROWS)
        source, first = _tile_source(blocks, t0, t1)
        if paired:
            if fifth_bit:
                q5_k_pairs_tile(source, first, packed, xd, sums, abuf, fbuf, cbuf, acc)
            else:
                q4_k_pairs_tile(source, first, packed, xd, sums, abuf, fbuf, cbuf, acc)
            _store_pairs_tile(acc, n, y, t0, t1)
        else:
            if fifth_bit:
                q5_k_tile(source, first, packed, xd, sums, abuf, fbuf, cbuf, acc)
            else:
                q4_k_tile(source, first, packed, xd, sums, abuf, fbuf, cbuf, acc)
            _store_tile(acc, n, y, t0, t1)
    release_tiles()


@numba.njit(cache=True, nogil=True)
def _k4_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x f32[n, cols] quantized per 32 as the int8 matvec does (simd.quantize_tokens), packed for _k4_rows."""
    xq, d, sums = quantize_tokens(x, 32)
    if x.shape[0] <= TILE_TOKENS // 2:
        return pack_token_pairs(xq, d, sums)
    packed, xd = pack_tokens(xq, d)
    return packed, xd, _token_minor(sums)


@numba.njit(cache=True, nogil=True, parallel=True)
def q4_k_matvecs(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """y f32[n, rows] = x f32[n, cols] W^T for n <= 16, W Q4_K blocks u8[rows, row_bytes], x quantized per
    32 as the int8 matvec does (simd.quantize_tokens)."""
    packed, xd, sums = _k4_tokens(x)
    rows = blocks.shape[0]
    for task in prange(n_tiles(rows, ROWS_PER_TASK)):
        r0 = task * ROWS_PER_TASK
        _k4_rows(blocks, r0, min(rows, r0 + ROWS_PER_TASK), packed, xd, sums, x.shape[0], y, False)


@numba.njit(cache=True, nogil=True, parallel=True)
def q5_k_matvecs(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """As q4_k_matvecs, W Q5_K blocks."""
    packed, xd, sums = _k4_tokens(x)
    rows = blocks.shape[0]
    for task in prange(n_tiles(rows, ROWS_PER_TASK)):
        r0 = task * ROWS_PER_TASK
        _k4_rows(blocks, r0, min(rows, r0 + ROWS_PER_TASK), packed, xd, sums, x.shape[0], y, True)


@numba.njit(cache=True, nogil=True)
def _q6_k_rows(blocks, r0: int, r1: int, packed, xd, n: int, y) -> None:
    """y[:n, r0:r1] of Q6_K rows, 16 at a time."""
    configure_tiles(64)
    abuf = np.empty(4 * 2 * TILE_ROWS * 64, np.int8)
    fbuf = np.empty(2 * TILE_ROWS, np.float32)
    cbuf = np.empty(2 * 2 * TILE_ROWS * TILE_TOKENS, np.int32)
    acc = np.empty((TILE_ROWS, TILE_TOKENS), np.float32)
    for t0 in range(r0, r1, TILE_ROWS):
        t1 = min(r1, t0 + TILE_ROWS)
        source, first = _tile_source(blocks, t0, t1)
        q6_k_tile(source, first, packed, xd, abuf, fbuf, cbuf, acc)
        _store_tile(acc, n, y, t0, t1)
    release_tiles()


@numba.njit(cache=True, nogil=True, parallel=True)
def q6_k_matvecs(blocks: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """y f32[n, rows] = x f32[n, cols] W^T for n <= 16, W Q6_K blocks u8[rows, row_bytes], x quantized per
    256 as the int8 matvec does (simd.quantize_tokens_q8_k)."""
    xq, d, _ = quantize_tokens_q8_k(x)
    packed, xd = pack_tokens(xq, d)
    rows = blocks.shape[0]
    for task in prange(n_tiles(rows, ROWS_PER_TASK)):
        r0 = task * ROWS_PER_TASK
        _q6_k_rows(blocks, r0, min(rows, r0 + ROWS_PER_TASK), packed, xd, x.shape[0], y)
