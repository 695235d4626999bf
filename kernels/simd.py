"""Integer dot products for matvec and the batched product (kernels.tiles): int8 activations, integer weights.

LLVM makes no vpdpbusd / pmaddubsw out of numba's integer loops, so the dot products are written in LLVM IR
here (numba intrinsics, compatible with `cache=True`). Each 32 weights and 32 int8 activations make one
integer dot product in 8 lanes of 4 products; the lanes, converted to f32 and times the weight and
activation scales, go to an 8-lane f32 accumulator per token that numba carries as a value (f32x8xN for a
group of N tokens), so a row ends with one horizontal sum per token. Measured on one core against the f32
kernels: 2.4x (Q8_0, ~24 GB/s) to 3-4x (4/5/6-bit types, 13-20 GB/s). Several tokens share each unpacked
block (kernels.*_drivers int8_matvecs): about 1.35x the one-token speed per token in groups of 4 on one core,
the dot product, its conversion and the scaled add being per token (so decode is compute-, not memory-bound
here: a 768 x 768 matrix in L2 ran no faster per byte than the 50257-row head from memory).

Products of unsigned and signed bytes are what the hardware multiplies (vpdpbusd, pmaddubsw), so signed
weights use the sign trick: dot(w, x) = dot(|w|, sign(w) x), with |w| <= 128 read as unsigned and x in
[-127, 127] (pmaddubsw then never saturates: 2 * 128 * 127 < 2**15). Weights stored as unsigned u plus a
power-of-two zero offset (Q4_0, Q5_0, Q3_K) skip it: dot(u - zero, x) = dot(u, x) - zero sum(x), the
second term per lane of 4 from the token's lane sums, which start the integer dot product.

`INT8_DOT` names the instruction set the intrinsics lower to on the target numba compiles for (AVX-512 VNNI,
AVX-VNNI, or AVX2's pmaddubsw + pmaddwd), or is None when it has none of them: the kernel modules then
register their f32 matvec kernels instead.

Activations are quantized like ggml's Q8_0, per 32 values: d = max|x| / 127, q = rint(x / d), so that
|x - d q| <= d / 2 (up to f32 rounding); the batched product (micro_kernel) quantizes them the same way per 16
values (quantize_activation_rows), closer to exact at no cost there. The matvec of Q6_K quantizes them as
ggml's Q8_K does, per 256 values, bit for bit (quantize_tokens_q8_k): one activation scale per block lets its
sub-block scales multiply in integers (pmaddubsw + vpdpwssd into one i32 sum per block and token, one
conversion and FMA per block, as ggml's Q6_K x Q8_K), fewer instructions per token than a conversion and FMA
per 16 weights (one thread: 50257 x 768, 1 token 1.26x faster, 5 tokens 1.5x), with llama.cpp's decoding KL
from exact logits (tests/test_fidelity.py).
Q4_K and Q5_K, whose sub-blocks are 32 wide, keep activations per 32: as fast, and closer to exact.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

from .layout import Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QK_K

QK8 = 32

I1, I8, I16, I32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32)
V32I8 = ir.VectorType(I8, 32)
V16I16 = ir.VectorType(I16, 16)
V8I32 = ir.VectorType(I32, 8)
F32 = ir.FloatType()
V8F32 = ir.VectorType(F32, 8)


def _target_features() -> set[str]:
    """The CPU features numba compiles for: the host's, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say so."""
    if config.CPU_FEATURES is not None:
        return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    if config.CPU_NAME not in (None, "host"):
        return set()  # a named CPU without a feature list: its features are unknown here
    return {name for name, enabled in llvm.get_host_cpu_features().items() if enabled}


def _int8_dot_kind(features: set[str]) -> str | None:
    # f16c: block scales are converted with vcvtph2ps; fma: the f32 accumulation
    if not {"avx2", "f16c", "fma"} <= features:
        return None
    if {"avx512vnni", "avx512vl"} <= features or "avxvnni" in features:
        return "vnni"
    return "avx2"


INT8_DOT = _int8_dot_kind(_target_features())
# Numba's LLVM parses inline assembly only with the native assembly parser, which it does not initialize.
llvm.initialize_native_asmparser()
# vpdpwssd of ymm registers (AT&T operand order: b, a, acc), VEX-encoded where AVX-VNNI has it
VPDPWSSD = ("{vex} " if "avxvnni" in _target_features() else "") + "vpdpwssd $3, $2, $0"
# 512-bit integer dot products (AVX-512 VNNI): the batched product takes 64 weights per instruction.
WIDE_DOT = INT8_DOT == "vnni" and {"avx512vnni", "avx512bw"} <= _target_features()
HAS_F16C = "f16c" in _target_features()
# AVX-512's mask registers for 32 byte lanes: Q5_0's and Q5_1's 32 fifth bits select in one move (kmovd)
MASK_REGISTERS = {"avx512bw", "avx512vl"} <= _target_features()


# ---------------------------------------------------------------------------------------------------------
# IR helpers


def _pointer(context, builder, array_type, array, offset) -> ir.Value:
    """i8* to array.data + offset bytes."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(builder.bitcast(data, I8.as_pointer()), [offset])


def _load(builder, pointer: ir.Value, vector_type: ir.VectorType) -> ir.Value:
    return builder.load(builder.bitcast(pointer, vector_type.as_pointer()), align=1)


def _call(builder, name: str, return_type: ir.Type, *args: ir.Value) -> ir.Value:
    function_type = ir.FunctionType(return_type, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, function_type, name), args)


def _dot_u8_s8(builder, unsigned: ir.Value, signed: ir.Value, start: ir.Value | None = None) -> ir.Value:
    """<32 x i8> u8, <32 x i8> s8 -> <8 x i32>: lane i sums the products of bytes 4i .. 4i + 3, plus lane i
    of `start` (<8 x i32>, default zero)."""
    if INT8_DOT == "vnni":
        start = ir.Constant(V8I32, None) if start is None else start
        a, b = builder.bitcast(unsigned, V8I32), builder.bitcast(signed, V8I32)
        return _call(builder, "llvm.x86.avx512.vpdpbusd.256", V8I32, start, a, b)
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, unsigned, signed)
    ones = ir.Constant(V16I16, [1] * 16)
    lanes = _call(builder, "llvm.x86.avx2.pmadd.wd", V8I32, pairs, ones)
    return lanes if start is None else builder.add(start, lanes)


def _dot_offset_u8_s8(builder, block, unsigned: ir.Value, j: int, column: ir.Value, zero: int) -> ir.Value:
    """<8 x i32>: dot(unsigned - zero, x) per lane of 4 bytes, x the 32 activations of token j from
    `column`, exactly as the sign trick gives it, in fewer instructions: dot(u, x) - zero sum(x), the
    second term per lane from the token's lane sums (quantize_tokens_lane_sums), which start the integer
    dot product. zero is a power of two, u in [0, 2 zero) (pmaddubsw cannot saturate)."""
    minus_sums = block.token("sums", j, builder.udiv(column, block.constant(4)), V8I32)
    start = builder.shl(minus_sums, ir.Constant(V8I32, [zero.bit_length() - 1] * 8))
    return _dot_u8_s8(builder, unsigned, block.token("xq", j, column, V32I8), start)


def _dot_s8_s8(builder, weights: ir.Value, x: ir.Value) -> ir.Value:
    """<32 x i8> s8 (|w| <= 128), <32 x i8> s8 in [-127, 127] -> <8 x i32>, by the sign trick."""
    magnitudes = _call(builder, "llvm.abs.v32i8", V32I8, weights, ir.Constant(I1, 0))
    signed_x = _call(builder, "llvm.x86.avx2.psign.b", V32I8, x, weights)
    return _dot_u8_s8(builder, magnitudes, signed_x)


def _pair_sums(builder, unsigned: ir.Value, signed: ir.Value) -> ir.Value:
    """<32 x i8> u8, <32 x i8> s8 -> <16 x i16>: lane i sums the products of bytes 2i and 2i + 1 (pmaddubsw,
    which saturates: the callers keep 2 |u| |s| <= 2 * 63 * 127 < 2**15)."""
    return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, unsigned, signed)


def _dot_i16(builder, acc: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
    """acc <8 x i32> plus, in lane i, a[2i] b[2i] + a[2i + 1] b[2i + 1] (<16 x i16> each): one vpdpwssd.

    As inline assembly: LLVM's machine combiner splits the intrinsic into vpmaddwd + vpaddd wherever that
    shortens a chain of them, one more instruction for the ports that multiply."""
    if INT8_DOT == "vnni":
        a, b = builder.bitcast(a, V8I32), builder.bitcast(b, V8I32)
        function_type = ir.FunctionType(V8I32, [V8I32, V8I32, V8I32])
        return builder.asm(function_type, VPDPWSSD, "=x,0,x,x", [acc, a, b], side_effect=False)
    return builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", V8I32, a, b))


def _bytes(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(I8, len(values)), values)


def _pick(builder, bytes_: ir.Value, indices: list[int]) -> ir.Value:
    return builder.shuffle_vector(bytes_, bytes_, ir.Constant(ir.VectorType(I32, len(indices)), indices))


def _bits(builder, bytes_: ir.Value, shifts: list[int] | int, mask: int) -> ir.Value:
    """(bytes >> shift) & mask per byte of a <n x i8>: one shift for all, or one per byte."""
    n = bytes_.type.count
    shifts = [shifts] * n if isinstance(shifts, int) else shifts
    return builder.and_(builder.lshr(bytes_, _bytes(shifts)), _bytes([mask] * n))


def _is_byte_array(t) -> bool:
    return isinstance(t, types.Array) and t.dtype in (types.uint8, types.int8) and t.layout == "C"


# ---------------------------------------------------------------------------------------------------------
# Accumulators that numba carries between the intrinsics: for each of a group of tokens, 8 f32 lanes, each
# the running sum of its lane's integer dot products times their scales, so a row needs one horizontal sum
# per token, not one per 32 weights. A group of tokens shares each unpacked block of weights; the tokens'
# sums are independent chains of adds, which hides the latency that bounds a single token's chain.


class AccumulatorsType(types.Type):
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        super().__init__(name=f"f32x8x{tokens}")


@register_model(AccumulatorsType)
class AccumulatorsModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, ir.ArrayType(V8F32, fe_type.tokens))


def _accumulate(builder, acc: ir.Value, lanes: ir.Value, scales: ir.Value) -> ir.Value:
    """acc + f32(lanes) * scales, one fused multiply-add."""
    return _call(builder, "llvm.fma.v8f32", V8F32, builder.sitofp(lanes, V8F32), scales, acc)


def _splat_f32(builder, value: ir.Value, lanes: int = 8) -> ir.Value:
    vector_type = ir.VectorType(F32, lanes)
    single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(single, single, ir.Constant(ir.VectorType(I32, lanes), None))


@intrinsic
def zero_accumulators(typingctx, tokens):
    """Accumulators of `tokens` (a constant) tokens, all zero."""
    if not isinstance(tokens, types.IntegerLiteral):
        return None
    acc = AccumulatorsType(tokens.literal_value)

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.ArrayType(V8F32, acc.tokens), None)

    return acc(tokens), codegen


@intrinsic
def store_sums(typingctx, acc, y, t, r):
    """y[t + j, r] = the sum of token j's 8 lanes (in any order), for each token j of the accumulators."""
    if not (isinstance(acc, AccumulatorsType) and isinstance(y, types.Array) and y.ndim == 2):
        return None

    def codegen(context, builder, signature, args):
        acc_, y_, t_, r_ = args
        y_type = signature.args[1]
        y_array = context.make_array(y_type)(context, builder, y_)
        reduce_type = ir.FunctionType(F32, [F32, V8F32])
        reduce = cgutils.get_or_insert_function(builder.module, reduce_type, "llvm.vector.reduce.fadd.v8f32")
        for j in range(acc.tokens):
            lanes = builder.extract_value(acc_, j)
            total = builder.call(reduce, [ir.Constant(F32, 0.0), lanes], fastmath=("reassoc",))
            token = builder.add(t_, ir.Constant(t_.type, j))
            builder.store(total, cgutils.get_item_pointer(context, builder, y_type, y_array, [token, r_]))
        return context.get_dummy_value()

    return types.none(acc, y, t, r), codegen


# ---------------------------------------------------------------------------------------------------------
# Intrinsics. Offsets are in bytes (elements of the C-contiguous uint8 / int8 arrays), nothing is
# bounds-checked.


@intrinsic
def half_to_f32(typingctx, bits):
    """The f32 value of the f16 whose bits are `bits` (uint16), exact; in a loop LLVM vectorizes it into
    vcvtph2ps, 1.7x faster than the integer conversion for F16 matvec. Use it where HAS_F16C only (elsewhere
    LLVM calls a runtime function numba may not link)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), F32)

    return types.float32(bits), codegen


# ---------------------------------------------------------------------------------------------------------
# Per-block integer dot products, one signature for every block type:
#
#     acc = accumulate_<type>(acc, row, xq, xd, x_sums, b, t)
#
# adds, for each token j of the accumulators, block b of the weight row `row` (u8[row_bytes]) times the
# activations of token t + j: xq int8[n, cols] and xd f32[n, cols // 32] (x quantized per 32, as ggml's Q8_0),
# x_sums f32[n, cols // size] the sums of the quantized activations per `size` values (the sums_size of
# kernels.specialise; Q8_0 ignores them), or for the types stored with a zero offset (Q4_0, Q5_0, Q3_K)
# minus the sums of each 4 (quantize_tokens_lane_sums, int32[n, cols // 4]), or, for Q6_K,
# quantize_tokens_q8_k's xd f32[n, cols // 256] and integer bsums int16[n, cols // 16] (ggml's Q8_K), which
# let the sub-block scales apply in integers. The block's weights are unpacked once for all the tokens, and
# each token gets exactly the operations of a group of one, so its sums do not depend on the group.


class _Block:
    """IR access to block b of a row and to the activations of tokens t, t + 1, ... (see above)."""

    def __init__(self, context, builder, signature, args, block_bytes: int) -> None:
        self.context, self.builder = context, builder
        row_type, xq_type, xd_type, sums_type = signature.args[1:5]
        _, row, xq, xd, sums, b, t = args
        self.i64 = b.type
        self.row_type, self.row = row_type, row
        self.offset = builder.mul(b, ir.Constant(self.i64, block_bytes))
        self.b, self.t = b, t
        self.arrays = {
            "xq": (xq_type, context.make_array(xq_type)(context, builder, xq)),
            "xd": (xd_type, context.make_array(xd_type)(context, builder, xd)),
            "sums": (sums_type, context.make_array(sums_type)(context, builder, sums)),
        }

    def constant(self, k: int) -> ir.Value:
        return ir.Constant(self.i64, k)

    def load(self, at: int, value_type: ir.Type) -> ir.Value:
        """The block's bytes from `at` as a value_type (a vector of bytes or a half)."""
        offset = self.builder.add(self.offset, self.constant(at))
        pointer = _pointer(self.context, self.builder, self.row_type, self.row, offset)
        return self.builder.load(self.builder.bitcast(pointer, value_type.as_pointer()), align=1)

    def half(self, at: int) -> ir.Value:
        """The f16 at `at`, as f32 (vcvtph2ps: exact)."""
        return self.builder.fpext(self.load(at, ir.HalfType()), F32)

    def token(self, name: str, j: int, column: ir.Value, value_type: ir.Type) -> ir.Value:
        """activations `name`[t + j, column:] as a value_type."""
        array_type, array = self.arrays[name]
        token = self.builder.add(self.t, self.constant(j))
        element = cgutils.get_item_pointer(self.context, self.builder, array_type, array, [token, column])
        align = 1 if name == "xq" else 4
        return self.builder.load(self.builder.bitcast(element, value_type.as_pointer()), align=align)

    def block_times(self, k: int) -> ir.Value:
        """b k: the column of the block's first value, in units of 1 / k of a block."""
        return self.builder.mul(self.b, self.constant(k))


def _block_intrinsic(codegen_for_block):
    """An intrinsic with the signature above from codegen(block: _Block, tokens, acc) -> acc."""

    @intrinsic
    def accumulate(typingctx, acc, row, xq, xd, x_sums, b, t):
        arrays_ok = _is_byte_array(row) and _is_byte_array(xq) and xq.ndim == 2
        if not (isinstance(acc, AccumulatorsType) and arrays_ok and xd.ndim == 2 and x_sums.ndim == 2):
            return None

        def codegen(context, builder, signature, args):
            return codegen_for_block(context, builder, signature, args, acc.tokens)

        return acc(acc, row, xq, xd, x_sums, b, t), codegen

    return accumulate


def _legacy_block_intrinsic(layout, zero: int = 0):
    """The intrinsic for one 32-weight block of a legacy type: d (q - zero) . x, plus m times the sum of
    the quantized x for the types with a min. Q8_0's bytes are signed weights; the 4/5-bit types' qs byte j
    holds weight j (low nibble) and j + 16 (high), and bit j of the little-endian u32 qh is weight j's fifth
    bit. The types with a zero (Q4_0, Q5_0) take the lane sums of quantize_tokens_lane_sums as x_sums."""
    has_m, has_qh = hasattr(layout, "m"), hasattr(layout, "qh")
    signed_bytes = layout is Q8_0

    def codegen(context, builder, signature, args, tokens: int):
        block = _Block(context, builder, signature, args, layout.bytes)
        if signed_bytes:
            q = block.load(layout.qs, V32I8)
        else:
            v16i8 = ir.VectorType(I8, 16)
            packed = block.load(layout.qs, v16i8)
            low = builder.and_(packed, ir.Constant(v16i8, [15] * 16))
            high = builder.lshr(packed, ir.Constant(v16i8, [4] * 16))
            q = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        if has_qh and MASK_REGISTERS:  # the 32 bits straight into a mask register
            is_set = builder.bitcast(block.load(layout.qh, I32), ir.VectorType(I1, 32))
            q = builder.or_(
                q, builder.select(is_set, ir.Constant(V32I8, [16] * 32), ir.Constant(V32I8, None))
            )
        elif has_qh:
            # byte j of the 4 qh bytes to lanes 8j .. 8j + 7, then each lane tests its own bit
            bits = block.load(layout.qh, ir.VectorType(I8, 4))
            spread = builder.shuffle_vector(
                bits, bits, ir.Constant(ir.VectorType(I32, 32), [k // 8 for k in range(32)])
            )
            masks = ir.Constant(V32I8, [1 << (k % 8) for k in range(32)])
            is_set = builder.icmp_unsigned("!=", builder.and_(spread, masks), ir.Constant(V32I8, None))
            q = builder.or_(
                q, builder.select(is_set, ir.Constant(V32I8, [16] * 32), ir.Constant(V32I8, None))
            )
        d = block.half(layout.d)
        m = block.half(layout.m) if has_m else None
        acc = args[0]
        for j in range(tokens):
            column = block.block_times(32)
            if zero:
                lanes = _dot_offset_u8_s8(builder, block, q, j, column, zero)
            else:
                xs = block.token("xq", j, column, V32I8)
                lanes = _dot_s8_s8(builder, q, xs) if signed_bytes else _dot_u8_s8(builder, q, xs)
            scale = builder.fmul(d, block.token("xd", j, block.b, F32))
            value = _accumulate(builder, builder.extract_value(acc, j), lanes, _splat_f32(builder, scale))
            if has_m:
                # the `+ m` term into lane 0: m times the sum of the quantized block of x
                minimum = builder.fmul(m, block.token("sums", j, block.b, F32))
                value = builder.fadd(value, builder.insert_element(ir.Constant(V8F32, None), minimum, I32(0)))
            acc = builder.insert_value(acc, value, j)
        return acc

    return _block_intrinsic(codegen)


accumulate_q4_0 = _legacy_block_intrinsic(Q4_0, zero=8)
accumulate_q4_1 = _legacy_block_intrinsic(Q4_1)
accumulate_q5_0 = _legacy_block_intrinsic(Q5_0, zero=16)
accumulate_q5_1 = _legacy_block_intrinsic(Q5_1)
accumulate_q8_0 = _legacy_block_intrinsic(Q8_0)


def _q4_k_scales_and_mins(builder, packed: ir.Value) -> tuple[ir.Value, ir.Value]:
    """The 12 bytes b of a Q4_K block's scales (in a <16 x i8>) -> (scales, mins) as <8 x i16>: ggml's
    get_scale_min_k4, b[j] & 63 and b[j + 4] & 63 for j < 4, else the low or high nibble of b[j + 4] with
    the top two bits of b[j - 4] or b[j] above it."""

    def pick(indices: list[int]) -> ir.Value:
        return builder.shuffle_vector(packed, packed, ir.Constant(ir.VectorType(I32, 8), indices))

    def constant(values: list[int]) -> ir.Value:
        return ir.Constant(ir.VectorType(I8, 8), values)

    first = [True] * 4 + [False] * 4
    mask = ir.Constant(ir.VectorType(I1, 8), first)
    low_scale = pick([0, 1, 2, 3, 8, 9, 10, 11])
    low_min = pick([4, 5, 6, 7, 8, 9, 10, 11])
    top_scale = builder.shl(
        builder.lshr(pick([0, 0, 0, 0, 0, 1, 2, 3]), constant([6] * 8)), constant([4] * 8)
    )
    top_min = builder.shl(builder.lshr(pick([0, 0, 0, 0, 4, 5, 6, 7]), constant([6] * 8)), constant([4] * 8))
    scales = builder.select(
        mask,
        builder.and_(low_scale, constant([63] * 8)),
        builder.or_(builder.and_(low_scale, constant([15] * 8)), top_scale),
    )
    mins = builder.select(
        mask,
        builder.and_(low_min, constant([63] * 8)),
        builder.or_(builder.lshr(low_min, constant([4] * 8)), top_min),
    )
    as_i16 = ir.VectorType(I16, 8)
    return builder.zext(scales, as_i16), builder.zext(mins, as_i16)


def _spread(builder, values: ir.Value, indices: list[int]) -> ir.Value:
    """<16 x i16> whose lane i is values[indices[i]]."""
    return builder.shuffle_vector(values, values, ir.Constant(ir.VectorType(I32, 16), indices))


def _scaled_block_sum(builder, block, t: int, products: list[tuple[ir.Value, ir.Value]]) -> ir.Value:
    """<8 x i32> sum over the block's 8 chunks c of 32 weights of scale_c . (w_c x_c), the weights' integer
    sub-block scales applied in i16 lanes (pmaddubsw then vpdpwssd, as ggml's AVX2 kernels): products holds
    (u8 weights <32 x i8>, the scale of each pair of them <16 x i16>) per chunk, x the quantized activations
    of token t at the block's columns."""
    # even and odd chunks into separate sums: two chains of dependent vpdpwssd
    sums = [ir.Constant(V8I32, None), ir.Constant(V8I32, None)]
    for c, (weights, scales) in enumerate(products):
        column = builder.add(block.block_times(QK_K), block.constant(32 * c))
        pairs = _pair_sums(builder, weights, block.token("xq", t, column, V32I8))
        sums[c % 2] = _dot_i16(builder, sums[c % 2], pairs, scales)
    return builder.add(sums[0], sums[1])


def _k4_block_intrinsic(layout):
    """The intrinsic for one Q4_K or Q5_K block (256 weights, 8 sub-blocks of 32) with activations quantized
    per 32: sum_j d sc_j xd[8b + j] dot(q_j, xq_j) - dmin m_j x_sums[8b + j] (sums per 32). Rounding the
    activations per 32 rather than per 256 (ggml's Q8_K) halves decoding's KL from exact logits on Q4_K_M,
    and one token costs no more (3072 x 768, one thread: 105 us, 115 per 256). Sub-block j: nibble j % 2 of
    qs[32 (j // 2) + k], and for Q5_K bit j of qh[k] as the fifth bit."""
    has_qh = hasattr(layout, "qh")

    def codegen(context, builder, signature, args, tokens: int):
        block = _Block(context, builder, signature, args, layout.bytes)
        d, dmin = block.half(layout.d), block.half(layout.dmin)
        scales, mins = _q4_k_scales_and_mins(builder, block.load(layout.scales, ir.VectorType(I8, 16)))
        scales = builder.fmul(builder.uitofp(scales, V8F32), _splat_f32(builder, d))
        minus_mins = builder.fmul(builder.uitofp(mins, V8F32), _splat_f32(builder, builder.fneg(dmin)))
        weights = []
        for j in range(8):
            nibbles = _bits(builder, block.load(layout.qs + 32 * (j // 2), V32I8), 4 * (j % 2), 15)
            if has_qh:
                fifth = builder.shl(_bits(builder, block.load(layout.qh, V32I8), j, 1), _bytes([4] * 32))
                nibbles = builder.or_(nibbles, fifth)
            weights.append(nibbles)
        first = block.block_times(8)
        acc = args[0]
        for t in range(tokens):
            token_scales = builder.fmul(scales, block.token("xd", t, first, V8F32))
            # sub-blocks of low and high nibbles into separate sums: two chains of dependent adds
            partial = [ir.Constant(V8F32, None), ir.Constant(V8F32, None)]
            for j in range(8):
                column = builder.add(block.block_times(QK_K), block.constant(32 * j))
                lanes = _dot_u8_s8(builder, weights[j], block.token("xq", t, column, V32I8))
                scale = builder.shuffle_vector(
                    token_scales, token_scales, ir.Constant(ir.VectorType(I32, 8), [j] * 8)
                )
                partial[j % 2] = _accumulate(builder, partial[j % 2], lanes, scale)
            sums = block.token("sums", t, first, V8F32)
            total = _call(
                builder, "llvm.fma.v8f32", V8F32, minus_mins, sums, builder.fadd(partial[0], partial[1])
            )
            acc = builder.insert_value(acc, builder.fadd(builder.extract_value(acc, t), total), t)
        return acc

    return _block_intrinsic(codegen)


accumulate_q4_k = _k4_block_intrinsic(Q4_K)
accumulate_q5_k = _k4_block_intrinsic(Q5_K)


def _q6_k_block_intrinsic():
    """The intrinsic for one Q6_K block (16 sub-blocks of 16) with activations quantized per 256 (Q8_K):
    d xd sum_i sc_i dot(q_i - 32, xq_i), exact in integers as sum_i sc_i dot(q_i, xq_i) - 32 sum_i sc_i
    bsums_i, so the 6-bit q (<= 63) multiply unsigned, with no sign trick per token. Chunk c = 4h + j
    (weights 32c .. 32c + 31, sub-blocks 2c and 2c + 1): nibble j // 2 of ql[64h + 32 (j % 2) + k] below
    bits 2j, 2j + 1 of qh[32h + k]."""

    def codegen(context, builder, signature, args, tokens: int):
        block = _Block(context, builder, signature, args, Q6_K.bytes)
        d = block.half(Q6_K.d)
        scales = builder.sext(block.load(Q6_K.scales, ir.VectorType(I8, 16)), V16I16)  # signed
        products = []
        for c in range(8):
            h, j = divmod(c, 4)
            low = _bits(builder, block.load(Q6_K.ql + 64 * h + 32 * (j % 2), V32I8), 4 * (j // 2), 15)
            high = _bits(builder, block.load(Q6_K.qh + 32 * h, V32I8), 2 * j, 3)
            weights = builder.or_(low, builder.shl(high, _bytes([4] * 32)))
            # pair lanes 0-7 hold weights 0-15 (sub-block 2c), lanes 8-15 weights 16-31 (sub-block 2c + 1)
            products.append((weights, _spread(builder, scales, [2 * c] * 8 + [2 * c + 1] * 8)))
        acc = args[0]
        for t in range(tokens):
            total = _scaled_block_sum(builder, block, t, products)
            bsums = block.token("sums", t, block.block_times(16), V16I16)
            offsets = _call(builder, "llvm.x86.avx2.pmadd.wd", V8I32, bsums, scales)
            total = builder.sub(total, builder.shl(offsets, ir.Constant(V8I32, [5] * 8)))
            xd = block.token("xd", t, block.b, F32)
            value = _accumulate(
                builder, builder.extract_value(acc, t), total, _splat_f32(builder, builder.fmul(d, xd))
            )
            acc = builder.insert_value(acc, value, t)
        return acc

    return _block_intrinsic(codegen)


accumulate_q6_k = _q6_k_block_intrinsic()


def _k16_block_intrinsic(layout, integer_scales, chunk_weights, zero: int = 0, integer_mins=None):
    """The intrinsic for one block of a K-quant with 16 sub-blocks of 16 weights (Q2_K, Q3_K):
    sum_i d sc_i xd[8b + i // 2] dot(q_i, xq_i), and for Q2_K (integer_mins given) - dmin sum_i m_i
    x_sums[16b + i] (sums per 16, as ggml's bsums); Q3_K (zero given) takes the lane sums of
    quantize_tokens_lane_sums as x_sums.

    Chunk c holds weights 32c .. 32c + 31, sub-blocks 2c and 2c + 1. The callbacks get the IR builder and
    `bytes_at(k, type)`, a load of the block's bytes from k:
    - integer_scales(builder, bytes_at, h) -> <8 x i8> signed scales of sub-blocks 8h .. 8h + 7;
    - chunk_weights(builder, bytes_at, c) -> <32 x i8> the weights of chunk c plus `zero`, unsigned;
    - integer_mins(builder, bytes_at, h) -> <8 x i8> unsigned mins of sub-blocks 8h .. 8h + 7."""

    def codegen(context, builder, signature, args, tokens: int):
        block = _Block(context, builder, signature, args, layout.bytes)
        d = block.half(layout.d)
        sub_block_scales = [
            builder.fmul(
                builder.sitofp(integer_scales(builder, block.load, h), V8F32), _splat_f32(builder, d)
            )
            for h in range(2)
        ]
        weights = [chunk_weights(builder, block.load, c) for c in range(8)]
        if integer_mins is not None:
            minus_dmin = _splat_f32(builder, builder.fneg(block.half(layout.dmin)))
            minus_mins = [
                builder.fmul(builder.uitofp(integer_mins(builder, block.load, h), V8F32), minus_dmin)
                for h in range(2)
            ]
        first = block.block_times(8)
        acc = args[0]
        for t in range(tokens):
            xd_vector = block.token("xd", t, first, V8F32)
            # sub-block i (16 weights) lies in x block i // 2: scale_i = d sc_i xd[i // 2], in two 8-lane
            # halves (16-lane vectors make LLVM use zmm registers, at half the speed)
            scales = []
            for h in range(2):
                xd_pairs = builder.shuffle_vector(
                    xd_vector,
                    xd_vector,
                    ir.Constant(ir.VectorType(I32, 8), [4 * h + i // 2 for i in range(8)]),
                )
                scales.append(builder.fmul(sub_block_scales[h], xd_pairs))
            # even and odd chunks into separate sums: two chains of dependent adds
            partial = [ir.Constant(V8F32, None), ir.Constant(V8F32, None)]
            for c in range(8):
                h, j = divmod(c, 4)
                column = builder.add(block.block_times(QK_K), block.constant(32 * c))
                if zero:
                    lanes = _dot_offset_u8_s8(builder, block, weights[c], t, column, zero)
                else:
                    lanes = _dot_u8_s8(builder, weights[c], block.token("xq", t, column, V32I8))
                # lanes 0-3 hold weights 0-15 (sub-block 2c), lanes 4-7 weights 16-31 (sub-block 2c + 1)
                pick = ir.Constant(ir.VectorType(I32, 8), [2 * j] * 4 + [2 * j + 1] * 4)
                partial[c % 2] = _accumulate(
                    builder, partial[c % 2], lanes, builder.shuffle_vector(scales[h], scales[h], pick)
                )
            total = builder.fadd(partial[0], partial[1])
            if integer_mins is not None:
                for h in range(2):
                    at = builder.add(block.block_times(16), block.constant(8 * h))
                    sums = block.token("sums", t, at, V8F32)
                    total = _call(builder, "llvm.fma.v8f32", V8F32, minus_mins[h], sums, total)
            acc = builder.insert_value(acc, builder.fadd(builder.extract_value(acc, t), total), t)
        return acc

    return _block_intrinsic(codegen)


def _q2_k_scales(builder, bytes_at, h: int) -> ir.Value:
    return _bits(builder, bytes_at(Q2_K.scales + 8 * h, ir.VectorType(I8, 8)), 0, 15)


def _q2_k_mins(builder, bytes_at, h: int) -> ir.Value:
    return _bits(builder, bytes_at(Q2_K.scales + 8 * h, ir.VectorType(I8, 8)), 4, 15)


def _q2_k_weights(builder, bytes_at, c: int) -> ir.Value:
    """Chunk c = 4h + j of Q2_K: the 2-bit fields j of qs[32h .. 32h + 31], unsigned."""
    return _bits(builder, bytes_at(Q2_K.qs + 32 * (c // 4), V32I8), 2 * (c % 4), 3)


accumulate_q2_k = _k16_block_intrinsic(
    Q2_K, integer_scales=_q2_k_scales, chunk_weights=_q2_k_weights, integer_mins=_q2_k_mins
)


def _q3_k_scales(builder, bytes_at, h: int) -> ir.Value:
    """Q3_K's 6-bit scales of sub-blocks 8h + i, minus 32: the low 4 bits in nibble h of scales[i], the high 2
    in bits 4h + 2 (i // 4) of scales[8 + i % 4]."""
    low = _bits(builder, bytes_at(Q3_K.scales, ir.VectorType(I8, 8)), 4 * h, 15)
    high_bytes = _pick(builder, bytes_at(Q3_K.scales + 8, ir.VectorType(I8, 4)), [0, 1, 2, 3] * 2)
    high = _bits(builder, high_bytes, [4 * h] * 4 + [4 * h + 2] * 4, 3)
    scales = builder.or_(low, builder.shl(high, _bytes([4] * 8)))
    return builder.sub(scales, _bytes([32] * 8))


def _q3_k_weights(builder, bytes_at, c: int) -> ir.Value:
    """Chunk c = 4h + j of Q3_K plus 4: the 2-bit fields j of qs[32h .. 32h + 31], plus 4 where bit c of
    hmask is set (the weights are these minus 4)."""
    low = _bits(builder, bytes_at(Q3_K.qs + 32 * (c // 4), V32I8), 2 * (c % 4), 3)
    high = builder.shl(_bits(builder, bytes_at(Q3_K.hmask, V32I8), c, 1), _bytes([2] * 32))
    return builder.or_(low, high)


accumulate_q3_k = _k16_block_intrinsic(Q3_K, integer_scales=_q3_k_scales, chunk_weights=_q3_k_weights, zero=4)


# ---------------------------------------------------------------------------------------------------------
# Prefetching: a matvec streams its weights once, row after row; asking for the bytes a few KiB ahead keeps
# more loads in flight than the hardware prefetcher does here (one core: Q8_0 5.9 -> 9.4 GB/s, Q4_K 5.2 ->
# 7.5, F16 6.9 -> 10.0 on a 50257-row matrix).

PREFETCH_BYTES = 4096
CACHE_LINE = 64


@intrinsic
def _prefetch(typingctx, array, byte_offset):
    """Prefetch the cache line at array.data + byte_offset into all cache levels; an address past the
    array is harmless (prefetches never fault)."""
    if not (isinstance(array, types.Array) and array.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.gep(builder.bitcast(data, I8.as_pointer()), [args[1]])
        read, locality, data_cache = ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)
        function_type = ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
        prefetch = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0i8")
        builder.call(prefetch, [address, read, locality, data_cache])
        return context.get_dummy_value()

    return types.void(array, byte_offset), codegen


@numba.njit(inline="always")
def prefetch_ahead(rows: np.ndarray, r: int) -> None:
    """Prefetch the bytes PREFETCH_BYTES past row r of a C-contiguous 2-D array, one row's worth."""
    row_bytes = rows.shape[1] * rows.itemsize
    start = r * row_bytes + PREFETCH_BYTES
    for line in range(0, row_bytes, CACHE_LINE):
        _prefetch(rows, start + line)


# ---------------------------------------------------------------------------------------------------------
# The batched product's micro-kernel (kernels.tiles): one tile form for every block type, unsigned weights
# u u8[rows, cols] with a scale and a min per 16 weights, w = scale u + min, times activations x = xd xq (xd
# per 32 or 256 as ggml quantizes them for the type, kept per 16). Each 256 weights are stored interleaved
# (tile_position): lane i (4 bytes) of the 4 64-byte steps holds weights 16i .. 16i + 15, so that 4 vpdpbusd
# accumulate in lane i the exact integer dot product of group i, which one conversion and one FMA then scale
# by scale_r[i] xd_t[i]; the min terms (min_r[i] times sums_t[i], the sums of the quantized activations) take
# one more FMA. Per 256 weights and (row, token) cell: 4 vpdpbusd + 1 vcvtdq2ps, which share port 0 on
# Intel cores, and 3 f32 operations, which go to port 5: ~100-115 G multiply-adds/s on one core here, the
# tile in cache. Measured first, the scheme of ggml's AVX2 kernels (vpmaddubsw + vpdpwssd against integer
# sub-block scales, one f32 scaling per 256) ran no faster: every 512-bit integer multiply issues on port 0
# alone, and it needs 2 of them per 64 weights, as did the earlier vpdpbusd + conversion per 64 (and LLVM
# splits the vpdpwssd intrinsic into vpmaddwd + vpaddd, 3).

MICRO_ROWS = 4
MICRO_TOKENS = 4
MICRO_STEP = 64
GROUP = 16  # weights per scale and min
SUPER_BLOCK = 256  # weights per interleaved run: 16 lanes of 16
V64I8 = ir.VectorType(I8, 64)
V16I32 = ir.VectorType(I32, 16)
V16F32 = ir.VectorType(F32, 16)


@numba.njit(inline="always")
def tile_position(k: int) -> int:
    """Where weight (or activation) k of a row sits in the tile's interleaved order."""
    o = k % SUPER_BLOCK
    return k - o + MICRO_STEP * (o % GROUP // 4) + 4 * (o // GROUP) + o % 4


@intrinsic
def interleave(typingctx, natural, u):
    """u[tile_position(k)] = natural[k] for k < len(u), a multiple of SUPER_BLOCK (1-D contiguous byte
    arrays): per 256 bytes one load, one shuffle of 64 words of 4 bytes and one store."""
    if not (_is_byte_array(natural) and _is_byte_array(u)):
        return None

    def codegen(context, builder, signature, args):
        (natural_type, u_type), (natural_, u_) = signature.args, args
        length = cgutils.unpack_tuple(builder, context.make_array(u_type)(context, builder, u_).shape, 1)[0]
        words = ir.VectorType(I32, SUPER_BLOCK // 4)
        sources = [0] * words.count  # the row's word that each word of the tile takes
        for word in range(words.count):
            sources[tile_position(4 * word) // 4] = word
        order = ir.Constant(ir.VectorType(I32, words.count), sources)
        with cgutils.for_range(builder, builder.udiv(length, ir.Constant(length.type, SUPER_BLOCK))) as loop:
            at = builder.mul(loop.index, ir.Constant(length.type, SUPER_BLOCK))
            row = _load(builder, _pointer(context, builder, natural_type, natural_, at), words)
            target = builder.bitcast(_pointer(context, builder, u_type, u_, at), words.as_pointer())
            builder.store(builder.shuffle_vector(row, row, order), target, align=1)
        return context.get_dummy_value()

    return types.none(natural, u), codegen


@intrinsic
def bit_fields(typingctx, u, at, row, low_at, low_shift, low_mask, high_at, high_shift, high_mask, up, count):
    """u[at + l] = (row[low_at + l] >> low_shift) & low_mask | ((row[high_at + l] >> high_shift) & high_mask)
    << up for l < count (a constant), u and row contiguous byte arrays: one load of each source, a few
    vector operations and one store, where numba's loop of the same took a check that u and row do not
    overlap and a scalar tail on every call (kernels.tiles' unpackers make runs of 16 or 32 weights)."""
    if not (_is_byte_array(u) and _is_byte_array(row) and isinstance(count, types.IntegerLiteral)):
        return None
    n = count.literal_value

    def codegen(context, builder, signature, args):
        u_type, row_type = signature.args[0], signature.args[2]
        u_, at_, row_, low_at_, low_shift_, low_mask_, high_at_, high_shift_, high_mask_, up_ = args[:10]
        vector_type = ir.VectorType(I8, n)

        def splat(value: ir.Value) -> ir.Value:
            byte = builder.trunc(value, I8)
            single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), byte, ir.Constant(I32, 0))
            return builder.shuffle_vector(single, single, ir.Constant(ir.VectorType(I32, n), None))

        def field(source: ir.Value, shift: ir.Value, mask: ir.Value) -> ir.Value:
            values = _load(builder, _pointer(context, builder, row_type, row_, source), vector_type)
            return builder.and_(builder.lshr(values, splat(shift)), splat(mask))

        high = builder.shl(field(high_at_, high_shift_, high_mask_), splat(up_))
        target = builder.bitcast(_pointer(context, builder, u_type, u_, at_), vector_type.as_pointer())
        builder.store(builder.or_(field(low_at_, low_shift_, low_mask_), high), target, align=1)
        return context.get_dummy_value()

    signature = types.none(u, at, row, low_at, low_shift, low_mask, high_at, high_shift, high_mask, up, count)
    return signature, codegen


def _dot_u8_s8_64(builder, acc: ir.Value, unsigned: ir.Value, signed: ir.Value) -> ir.Value:
    """acc <16 x i32> plus, in lane i, the products of bytes 4i .. 4i + 3 of <64 x i8> u8 and <64 x i8> s8."""
    if WIDE_DOT:
        a, b = builder.bitcast(unsigned, V16I32), builder.bitcast(signed, V16I32)
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", V16I32, acc, a, b)

    def half(v: ir.Value, h: int) -> ir.Value:
        return builder.shuffle_vector(
            v, v, ir.Constant(ir.VectorType(I32, 32), list(range(32 * h, 32 * h + 32)))
        )

    low = _dot_u8_s8(builder, half(unsigned, 0), half(signed, 0))
    high = _dot_u8_s8(builder, half(unsigned, 1), half(signed, 1))
    both = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(I32, 16), list(range(16))))
    return builder.add(acc, both)


@intrinsic
def micro_kernel(typingctx, u, scales, mins, r, xq, xd, sums, totals, t, out, zero):
    """out[t + j, r + i] = sum_k w[r + i, k] x[t + j, k] for i < MICRO_ROWS, j < MICRO_TOKENS (out f32, C):
    the 16 sums of 4 weight rows of the tile (u in tile_position order, cols a multiple of SUPER_BLOCK;
    scales, mins f32[., cols // 16]) and 4 quantized tokens (xq, xd, sums, totals, as
    quantize_activation_rows makes them), kept in vector registers over the whole row; each weight load
    feeds 4 tokens and each activation load 4 rows.

    `zero` (a constant): 0, or the offset of a type whose min is -zero scale (w = scale (u - zero): Q3_K,
    Q6_K, Q4_0, Q5_0, Q8_0), whose mins are then not read: each group's integer sum starts from -zero times
    the token's integer total, so that one conversion and one FMA scale the exact sum of q x, as ggml's
    integer sums do, where the min term took a second FMA (and the rounding of two large terms)."""
    if not (_is_byte_array(u) and _is_byte_array(xq) and isinstance(out, types.Array)):
        return None
    if not isinstance(zero, types.IntegerLiteral):
        return None
    offset = zero.literal_value

    def codegen(context, builder, signature, args):
        arrays = {
            name: (ty, context.make_array(ty)(context, builder, value))
            for name, ty, value in zip(
                ("u", "scales", "mins", "r", "xq", "xd", "sums", "totals", "t", "out", "zero"),
                signature.args,
                args,
                strict=True,
            )
            if isinstance(ty, types.Array)
        }
        r_, t_ = args[3], args[8]
        i64 = r_.type

        def constant(k: int) -> ir.Value:
            return ir.Constant(i64, k)

        def load(name: str, row: ir.Value, column: ir.Value, value_type: ir.Type, align: int) -> ir.Value:
            ty, array = arrays[name]
            element = cgutils.get_item_pointer(context, builder, ty, array, [row, column])
            return builder.load(builder.bitcast(element, value_type.as_pointer()), align=align)

        rows = [builder.add(r_, constant(i)) for i in range(MICRO_ROWS)]
        tokens = [builder.add(t_, constant(j)) for j in range(MICRO_TOKENS)]
        cols = cgutils.unpack_tuple(builder, arrays["u"][1].shape, 2)[1]
        accumulators = [
            [cgutils.alloca_once_value(builder, ir.Constant(V16F32, None)) for _ in range(MICRO_TOKENS)]
            for _ in range(MICRO_ROWS)
        ]
        with cgutils.for_range(builder, builder.udiv(cols, constant(SUPER_BLOCK))) as loop:
            group = builder.mul(loop.index, constant(SUPER_BLOCK // GROUP))
            if offset:
                starts = [
                    builder.mul(load("totals", token, group, V16I32, 4), ir.Constant(V16I32, [-offset] * 16))
                    for token in tokens
                ]
            else:
                starts = [ir.Constant(V16I32, None)] * MICRO_TOKENS
            lanes = [list(starts) for _ in range(MICRO_ROWS)]
            for step in range(SUPER_BLOCK // MICRO_STEP):
                at = builder.add(builder.mul(loop.index, constant(SUPER_BLOCK)), constant(MICRO_STEP * step))
                weights = [load("u", row, at, V64I8, 1) for row in rows]
                xs = [load("xq", token, at, V64I8, 1) for token in tokens]
                lanes = [
                    [_dot_u8_s8_64(builder, lanes[i][j], w, x) for j, x in enumerate(xs)]
                    for i, w in enumerate(weights)
                ]
            row_scales = [load("scales", row, group, V16F32, 4) for row in rows]
            x_scales = [load("xd", token, group, V16F32, 4) for token in tokens]
            if not offset:
                row_mins = [load("mins", row, group, V16F32, 4) for row in rows]
                x_sums = [load("sums", token, group, V16F32, 4) for token in tokens]
            for i in range(MICRO_ROWS):
                for j in range(MICRO_TOKENS):
                    acc = builder.load(accumulators[i][j])
                    if not offset:
                        acc = _call(builder, "llvm.fma.v16f32", V16F32, row_mins[i], x_sums[j], acc)
                    scale = builder.fmul(row_scales[i], x_scales[j])
                    total = builder.sitofp(lanes[i][j], V16F32)
                    builder.store(
                        _call(builder, "llvm.fma.v16f32", V16F32, total, scale, acc), accumulators[i][j]
                    )
        # the 16 cells' lanes summed as one tree of 15 shuffle-add pairs, leaving cell 4j + i in lane 4j + i
        cells = [builder.load(accumulators[i][j]) for j in range(MICRO_TOKENS) for i in range(MICRO_ROWS)]
        partials = 16
        while len(cells) > 1:
            half = partials // 2
            firsts = [k for k in range(32) if k % partials < half]
            seconds = [k + half for k in firsts]
            cells = [
                builder.fadd(
                    builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 16), firsts)),
                    builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 16), seconds)),
                )
                for a, b in zip(cells[::2], cells[1::2], strict=True)
            ]
            partials = half
        ty, array = arrays["out"]
        four = ir.VectorType(F32, MICRO_ROWS)
        for j, token in enumerate(tokens):
            sums_of_token = builder.shuffle_vector(
                cells[0], cells[0], ir.Constant(ir.VectorType(I32, MICRO_ROWS), list(range(4 * j, 4 * j + 4)))
            )
            first = cgutils.get_item_pointer(context, builder, ty, array, [token, r_])
            builder.store(sums_of_token, builder.bitcast(first, four.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(u, scales, mins, r, xq, xd, sums, totals, t, out, zero), codegen


# ---------------------------------------------------------------------------------------------------------
# Activations


@intrinsic
def quantize_group(typingctx, x, q, offset, size):
    """q[offset : offset + size] = x[offset : offset + size] quantized as ggml's quantize_row_q8_0_ref
    quantizes 32 values, bit for bit (q = rint(x 127 / amax)); returns (the scale amax / 127, the sum of
    those q). size a literal 16 or 32; x f32 and q int8 C-contiguous 1-D arrays. As vectors: the largest
    magnitude is the largest bit pattern without its sign bit (as unsigned integers they order as the
    magnitudes do); written as a numba loop the steps were unrolled into scalar code. A NaN has the largest
    pattern: its group's scale is NaN, so the product is too."""
    arrays = (x, types.float32), (q, types.int8)
    if not (
        all(
            isinstance(a, types.Array) and a.ndim == 1 and a.dtype == t and a.layout == "C" for a, t in arrays
        )
        and isinstance(size, types.IntegerLiteral)
        and size.literal_value in (16, 32)
    ):
        return None
    vectors = size.literal_value // 16

    def codegen(context, builder, signature, args):
        x_type, q_type, _, _ = signature.args
        x_, q_, offset_, _ = args
        x_data = context.make_array(x_type)(context, builder, x_).data
        q_data = context.make_array(q_type)(context, builder, q_).data
        at = [builder.add(offset_, offset_.type(16 * h)) for h in range(vectors)]
        values = [
            builder.load(builder.bitcast(builder.gep(x_data, [a]), V16F32.as_pointer()), align=4) for a in at
        ]
        sign_off = ir.Constant(V16I32, [0x7FFFFFFF] * 16)
        magnitudes = [builder.and_(builder.bitcast(v, V16I32), sign_off) for v in values]
        largest_lanes = magnitudes[0]
        for m in magnitudes[1:]:
            largest_lanes = builder.select(builder.icmp_unsigned(">", largest_lanes, m), largest_lanes, m)
        largest = _call(builder, "llvm.vector.reduce.umax.v16i32", I32, largest_lanes)
        amax = builder.bitcast(largest, F32)
        limit = ir.Constant(F32, 127.0)
        scale = builder.fdiv(amax, limit)
        positive = builder.fcmp_ordered(">", amax, ir.Constant(F32, 0.0))
        inverse = _splat_f32(
            builder, builder.select(positive, builder.fdiv(limit, amax), ir.Constant(F32, 0.0)), 16
        )
        total = ir.Constant(I32, 0)
        for a, v in zip(at, values, strict=True):
            rounded = builder.fptosi(
                _call(builder, "llvm.rint.v16f32", V16F32, builder.fmul(v, inverse)), V16I32
            )
            target = builder.bitcast(builder.gep(q_data, [a]), ir.VectorType(I8, 16).as_pointer())
            builder.store(builder.trunc(rounded, ir.VectorType(I8, 16)), target, align=1)
            total = builder.add(total, _call(builder, "llvm.vector.reduce.add.v16i32", I32, rounded))
        return context.make_tuple(builder, signature.return_type, [scale, total])

    return types.Tuple((types.float32, types.int32))(x, q, offset, size), codegen


@numba.njit(inline="always")
def _quantize_into(x: np.ndarray, q: np.ndarray, d: np.ndarray) -> None:
    """x f32[cols] -> q int8[cols], d f32[cols // 32] (both contiguous), as ggml's quantize_row_q8_0_ref."""
    for b in range(d.shape[0]):
        d[b], _ = quantize_group(x, q, QK8 * b, QK8)


@numba.njit(cache=True, fastmath=True)
def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x f32[cols] (cols a multiple of 32) -> (q int8[cols], d f32[cols // 32]) with x ~ d q per 32-block."""
    q = np.empty(x.shape[0], np.int8)
    d = np.empty(x.shape[0] // QK8, np.float32)
    _quantize_into(x, q, d)
    return q, d


@intrinsic
def first_largest_magnitude(typingctx, x, start, count):
    """x[k] for the first k in start .. start + count - 1 of largest |x[k]|, NaN never counted (0 if all
    are NaN); x a C-contiguous f32 1-D array, count a multiple of 64. As vectors: the largest magnitude,
    then the first lane holding it (LLVM leaves numba's loop, a compare and branch a value, scalar)."""
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.dtype == types.float32 and x.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        x_type, (x_, start_, count_) = signature.args[0], args
        array = context.make_array(x_type)(context, builder, x_)
        i64 = start_.type
        lanes, chains = 16, 4  # chains of maxima: one would wait on each compare
        vector_type = ir.VectorType(F32, lanes)
        chunks = builder.udiv(count_, ir.Constant(i64, lanes))

        def magnitudes(chunk: ir.Value) -> ir.Value:
            at = builder.add(start_, builder.mul(chunk, ir.Constant(i64, lanes)))
            element = cgutils.get_item_pointer(context, builder, x_type, array, [at])
            values = builder.load(builder.bitcast(element, vector_type.as_pointer()), align=4)
            return _call(builder, "llvm.fabs.v16f32", vector_type, values)

        def larger(a: ir.Value, b: ir.Value) -> ir.Value:
            # an ordered compare: a NaN in a is never taken (vmaxps)
            return builder.select(builder.fcmp_ordered(">", a, b), a, b)

        tops = [cgutils.alloca_once_value(builder, ir.Constant(vector_type, None)) for _ in range(chains)]
        with cgutils.for_range(builder, builder.udiv(chunks, ir.Constant(i64, chains))) as loop:
            for c, top in enumerate(tops):
                chunk = builder.add(builder.mul(loop.index, ir.Constant(i64, chains)), ir.Constant(i64, c))
                builder.store(larger(magnitudes(chunk), builder.load(top)), top)
        top = larger(
            larger(builder.load(tops[0]), builder.load(tops[1])), larger(*map(builder.load, tops[2:]))
        )
        reduce_type = ir.FunctionType(F32, [vector_type])
        reduce = cgutils.get_or_insert_function(builder.module, reduce_type, "llvm.vector.reduce.fmax.v16f32")
        largest = builder.call(reduce, [top], fastmath=("nnan",))  # top holds no NaN
        splat = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vector_type, ir.Undefined), largest, ir.Constant(I32, 0)),
            ir.Constant(vector_type, ir.Undefined),
            ir.Constant(ir.VectorType(I32, lanes), None),
        )
        # the chunks from last to first, each with the largest magnitude taking its first such lane
        first = cgutils.alloca_once_value(builder, count_)  # count: none holds it (all NaN)
        with cgutils.for_range(builder, chunks) as loop:
            chunk = builder.sub(builder.sub(chunks, ir.Constant(i64, 1)), loop.index)
            bits = builder.bitcast(builder.fcmp_ordered("==", magnitudes(chunk), splat), ir.IntType(lanes))
            lane = _call(builder, f"llvm.cttz.i{lanes}", ir.IntType(lanes), bits, ir.Constant(I1, 0))
            at = builder.add(builder.mul(chunk, ir.Constant(i64, lanes)), builder.zext(lane, i64))
            holds = builder.icmp_unsigned("!=", bits, ir.Constant(ir.IntType(lanes), 0))
            builder.store(builder.select(holds, at, builder.load(first)), first)
        index = builder.load(first)
        result = cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0))
        with builder.if_then(builder.icmp_unsigned("<", index, count_)):
            element = cgutils.get_item_pointer(context, builder, x_type, array, [builder.add(start_, index)])
            builder.store(builder.load(element), result)
        return builder.load(result)

    return types.float32(x, start, count), codegen


@numba.njit(inline="always")
def _quantize_per_256_into(x: np.ndarray, q: np.ndarray, d: np.ndarray) -> None:
    """As ggml's quantize_row_q8_K_ref, bit for bit: the value of largest |x| (the first one) maps to -127,
    q = min(127, rint(x (-127 / max))) and d = 1 / (-127 / max), all in f32."""
    for b in range(d.shape[0]):
        signed_max = first_largest_magnitude(x, QK_K * b, QK_K)
        if signed_max == 0:
            q[QK_K * b : QK_K * (b + 1)] = 0
            d[b] = 0
            continue
        inverse = np.float32(-127) / signed_max
        for k in range(QK_K):
            q[QK_K * b + k] = np.int8(min(127, np.int32(np.rint(inverse * x[QK_K * b + k]))))
        d[b] = np.float32(1) / inverse


@numba.njit(cache=True)
def activation_buffers(
    n: int, cols: int, rows_multiple: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed (q int8[m, c], xd f32[m, c // 16], sums f32[m, c // 16], totals int32[m, c // 16]) for n rows
    of cols activations: m the next multiple of rows_multiple, c of SUPER_BLOCK (the padding stays zero)."""
    m = (n + rows_multiple - 1) // rows_multiple * rows_multiple
    c = (cols + SUPER_BLOCK - 1) // SUPER_BLOCK * SUPER_BLOCK
    groups = c // GROUP
    return (
        np.zeros((m, c), np.int8),
        np.zeros((m, groups), np.float32),
        np.zeros((m, groups), np.float32),
        np.zeros((m, groups), np.int32),
    )


@numba.njit(cache=True)  # no fastmath: rint(x (127 / max)) as written, bit for bit on every machine
def quantize_activation_rows_into(
    x: np.ndarray, q: np.ndarray, xd: np.ndarray, sums: np.ndarray, totals: np.ndarray, i0: int, i1: int
) -> None:
    """Rows i0:i1 of x f32[n, cols] into activation_buffers' arrays for micro_kernel: each row quantized per
    16 values (GROUP) as ggml's Q8_0 rounds 32, q in tile_position order, xd[i, g] the scale of
    x[i, 16 g:16 g + 16], totals[i, g] the sum of its q and sums[i, g] = xd totals[i, g].

    The micro-kernel scales every 16 weights' integer sum with its own f32 product anyway, so one scale per
    16 activations costs nothing there, and its rounding error is ~30% less in KL from exact logits than
    ggml's per 32 (Q8_0) and less than half its per 256 (Q8_K, for the K-quants): full-size distilgpt2, 256
    tokens of WikiText, Q4_0 1.42e-3 -> 1.01e-3, Q4_K_M 2.31e-3 -> 1.00e-3. A function of its own so that a
    parallel caller hands out ranges of rows and LLVM still vectorizes it."""
    natural = np.zeros(q.shape[1], np.int8)
    for i in range(i0, i1):
        for g in range(x.shape[1] // GROUP):
            scale, total = quantize_group(x[i], natural, GROUP * g, GROUP)
            xd[i, g] = scale
            sums[i, g] = scale * np.float32(total)
            totals[i, g] = total
        interleave(natural, q[i])


@numba.njit(cache=True)
def quantize_activation_rows(
    x: np.ndarray, rows_multiple: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x f32[n, cols] -> activation_buffers(n, cols, rows_multiple) filled by quantize_activation_rows_into:
    the whole batch on one thread."""
    q, xd, sums, totals = activation_buffers(x.shape[0], x.shape[1], rows_multiple)
    quantize_activation_rows_into(x, q, xd, sums, totals, 0, x.shape[0])
    return q, xd, sums, totals


@numba.njit(cache=True, fastmath=True)
def quantize_tokens(x: np.ndarray, sums_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x f32[n, cols] -> (q int8[n, cols], d f32[n, cols // 32], sums f32[n, cols // sums_size]): each token
    quantized as quantize_activations does, and the sums of its quantized activations (d q) per sums_size
    values (dividing 32), which the `+ m` / `- dmin m` terms multiply. As ggml does (Q8_1's s, Q8_K's
    bsums): the whole weight d q + m then meets the same rounded x, so the rounding errors meet centred
    weights; the f32 sums of x would leave them meeting d q >= 0 alone, which doubled the KL from exact
    logits (test_fidelity.py)."""
    n, cols = x.shape
    q = np.empty((n, cols), np.int8)
    d = np.empty((n, cols // QK8), np.float32)
    sums = np.empty((n, cols // sums_size), np.float32)
    for i in range(n):
        _quantize_into(x[i], q[i], d[i])
        for g in range(sums.shape[1]):
            total = np.int32(0)
            for k in range(sums_size * g, sums_size * (g + 1)):
                total += np.int32(q[i, k])
            sums[i, g] = d[i, sums_size * g // QK8] * np.float32(total)
    return q, d, sums


@numba.njit(cache=True, fastmath=True)
def quantize_tokens_lane_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x f32[n, cols] -> (q int8[n, cols], d f32[n, cols // 32], minus_sums int32[n, cols // 4]): each token
    quantized as quantize_activations does, and minus the sum of each 4 consecutive q (one lane of an
    integer dot product), for the weights stored with a zero offset (_dot_offset_u8_s8)."""
    n, cols = x.shape
    q = np.empty((n, cols), np.int8)
    d = np.empty((n, cols // QK8), np.float32)
    minus_sums = np.empty((n, cols // 4), np.int32)
    for i in range(n):
        q_row, sums_row = q[i], minus_sums[i]
        _quantize_into(x[i], q_row, d[i])
        for g in range(cols // 4):
            total = np.int32(q_row[4 * g]) + np.int32(q_row[4 * g + 1])
            sums_row[g] = -(total + np.int32(q_row[4 * g + 2]) + np.int32(q_row[4 * g + 3]))
    return q, d, minus_sums


@numba.njit(cache=True)  # no fastmath: -127 / max must round as ggml's does (_quantize_per_256_into)
def quantize_tokens_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x f32[n, cols] -> (q int8[n, cols], d f32[n, cols // 256], bsums int16[n, cols // 16]): each token
    quantized per 256 values as ggml's Q8_K (bit for bit), and the integer sums of q per 16 values (Q8_K's
    bsums), which the min and offset terms of the K-quants' integer dot products multiply."""
    n, cols = x.shape
    q = np.empty((n, cols), np.int8)
    d = np.empty((n, cols // QK_K), np.float32)
    bsums = np.empty((n, cols // 16), np.int16)
    for i in range(n):
        _quantize_per_256_into(x[i], q[i], d[i])
        for g in range(bsums.shape[1]):
            total = np.int32(0)
            for k in range(16 * g, 16 * (g + 1)):
                total += np.int32(q[i, k])
            bsums[i, g] = np.int16(total)
    return q, d, bsums


# ---------------------------------------------------------------------------------------------------------
# f32 tiles for attention (kernels.ops.causal_attention): TILE_ROWS_F32 rows of a times `depth` rows of b,
# the sums kept in vector registers. Each b vector load feeds TILE_ROWS_F32 FMAs and each broadcast a value
# `vectors` FMAs: 65-80 G multiply-adds/s on one core (b in L1 or streamed in order from L2), where numba's
# loops, a load and a store around every FMA, reached 6-9.

F32_LANES = 16 if "avx512f" in _target_features() else 8
TILE_ROWS_F32 = 6


def _splat(builder, value: ir.Value) -> ir.Value:
    """<F32_LANES x value's type> with value in every lane."""
    vector_type = ir.VectorType(value.type, F32_LANES)
    single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(single, single, ir.Constant(ir.VectorType(I32, F32_LANES), None))


def _f32_matrix(t) -> bool:
    return isinstance(t, types.Array) and t.ndim == 2 and t.dtype == types.float32 and t.layout == "C"


@intrinsic
def f32_tile_product(typingctx, a, b, c, depth, b_col, c_col, vectors):
    """c[r, c_col + j] = sum_{k < depth} a[r, k] b[k, b_col + j] for r < TILE_ROWS_F32 and j < vectors
    F32_LANES (`vectors` a constant); a, b, c C-contiguous f32 2-D arrays."""
    if not (all(_f32_matrix(t) for t in (a, b, c)) and isinstance(vectors, types.IntegerLiteral)):
        return None
    count = vectors.literal_value

    def codegen(context, builder, signature, args):
        (a_type, b_type, c_type), (a_, b_, c_, depth_, b_col_, c_col_) = signature.args[:3], args[:6]
        arrays = {
            "a": (a_type, context.make_array(a_type)(context, builder, a_)),
            "b": (b_type, context.make_array(b_type)(context, builder, b_)),
            "c": (c_type, context.make_array(c_type)(context, builder, c_)),
        }
        i64 = depth_.type
        lanes = ir.VectorType(F32, F32_LANES)

        def element(name: str, row: ir.Value, column: ir.Value, v: int = 0) -> ir.Value:
            """Pointer to name[row, column + v F32_LANES]."""
            array_type, array = arrays[name]
            at = [row, builder.add(column, ir.Constant(i64, F32_LANES * v))]
            return cgutils.get_item_pointer(context, builder, array_type, array, at)

        def vector(pointer: ir.Value) -> ir.Value:
            return builder.bitcast(pointer, lanes.as_pointer())

        sums = [
            [cgutils.alloca_once_value(builder, ir.Constant(lanes, None)) for _ in range(count)]
            for _ in range(TILE_ROWS_F32)
        ]
        rows = [ir.Constant(i64, r) for r in range(TILE_ROWS_F32)]
        with cgutils.for_range(builder, depth_) as loop:
            k = loop.index
            bs = [builder.load(vector(element("b", k, b_col_, v)), align=4) for v in range(count)]
            for r, row in enumerate(rows):
                splat = _splat(builder, builder.load(element("a", row, k)))
                for v, b_vector in enumerate(bs):
                    total = _call(
                        builder, f"llvm.fma.v{F32_LANES}f32", lanes, splat, b_vector, builder.load(sums[r][v])
                    )
                    builder.store(total, sums[r][v])
        for r, row in enumerate(rows):
            for v in range(count):
                builder.store(builder.load(sums[r][v]), vector(element("c", row, c_col_, v)), align=4)
        return context.get_dummy_value()

    return types.none(a, b, c, depth, b_col, c_col, vectors), codegen


@intrinsic
def prefix_max(typingctx, row, count):
    """max(row[:count]) for count >= 1, row a C-contiguous f32 1-D array of at least count rounded up to
    F32_LANES values (those past count are read, not counted): LLVM does not vectorize numba's max loop
    (1.2 ns a value)."""
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.dtype == types.float32):
        return None

    def codegen(context, builder, signature, args):
        row_type, (row_, count_) = signature.args[0], args
        array = context.make_array(row_type)(context, builder, row_)
        i64 = count_.type
        lanes = ir.VectorType(F32, F32_LANES)
        lowest = ir.Constant(lanes, [float("-inf")] * F32_LANES)
        top = cgutils.alloca_once_value(builder, lowest)
        indices = ir.Constant(ir.VectorType(i64, F32_LANES), list(range(F32_LANES)))
        width = ir.Constant(i64, F32_LANES)
        vectors = builder.udiv(builder.add(count_, ir.Constant(i64, F32_LANES - 1)), width)
        maximum = f"llvm.maxnum.v{F32_LANES}f32"
        with cgutils.for_range(builder, vectors) as loop:
            start = builder.mul(loop.index, width)
            element = cgutils.get_item_pointer(context, builder, row_type, array, [start])
            values = builder.load(builder.bitcast(element, lanes.as_pointer()), align=4)
            counted = builder.icmp_signed("<", indices, _splat(builder, builder.sub(count_, start)))
            values = builder.select(counted, values, lowest)
            builder.store(_call(builder, maximum, lanes, builder.load(top), values), top)
        reduce = f"llvm.vector.reduce.fmax.v{F32_LANES}f32"
        return _call(builder, reduce, F32, builder.load(top))

    return types.float32(row, count), codegen
