"""ggml's reference K-quant quantizers (no importance matrix), ported to Numba.

Ports of `quantize_row_q{2,3,4,5,6}_K_ref` and their helpers from ggml/src/ggml-quants.c (llama.cpp commit
01243c587feceaa5d6a6c2305535ef2f549c48b8), written to give the same bytes: every intermediate is float32
in C's order of operations (ints are converted to float32 before they meet a float, since Numba would
otherwise promote to float64), there is no fastmath, and f16 rounding follows GGML_FP32_TO_FP16.

Public kernels: quantize_row_q*_k(x f32[cols], out u8[cols // 256 * type_size]), cols % 256 == 0; the
parallel quantize_q*_k over rows are generated into kernels.kquants_drivers. Block layouts: kernels.layout.

Speed without changing a bit: the costly searches (make_qkx2_quants, make_qx_quants) run on all sub-blocks
of a row at once, sub-block index innermost, so each sub-block's sums keep ggml's order while the loops
vectorize across sub-blocks.
"""

from __future__ import annotations

import numba
import numpy as np

from .layout import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, QK_K

GROUP_MAX_EPS = np.float32(1e-15)

f32 = np.float32


@numba.njit(cache=True)
def nearest_int(fval: np.float32) -> int:
    # ggml's magic-number rounding: adding 1.5 * 2**23 in float32 rounds half to even and leaves the
    # integer in the low mantissa bits (valid for |fval| <= 4194303, like ggml's assert).
    bits = np.int64(f32(fval + f32(12582912.0)).view(np.uint32))
    return (bits & 0x007FFFFF) - 0x00400000


@numba.njit(cache=True)
def fp32_to_fp16(f: np.float32) -> int:
    """GGML_FP32_TO_FP16: round to nearest even, overflow to inf, NaN to 0x7E00 (the sign kept)."""
    base = (abs(f) * f32(2.0**112)) * f32(2.0**-110)
    w = np.int64(f32(f).view(np.uint32))
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = np.uint32((bias >> 1) + 0x07800000).view(np.float32) + base
    bits = np.int64(f32(base).view(np.uint32))
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)


@numba.njit(cache=True)
def fp16_to_fp32(h: int) -> np.float32:
    # Every f16 is exactly representable in float32, so the float64 detour is exact.
    sign = -1.0 if h & 0x8000 else 1.0
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:
        return f32(sign * mantissa * 2.0**-24)
    if exponent == 31:
        return f32(sign * np.inf) if mantissa == 0 else f32(np.nan)
    return f32(sign * (1024 + mantissa) * 2.0 ** (exponent - 25))


@numba.njit(cache=True)
def store_fp16(block: np.ndarray, offset: int, value: np.float32) -> np.float32:
    """Stores value as little-endian f16 at block[offset:offset + 2]; returns the stored value as f32."""
    h = fp32_to_fp16(value)
    block[offset] = h & 0xFF
    block[offset + 1] = h >> 8
    return fp16_to_fp32(h)


@numba.njit(cache=True)
def get_scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    """Sub-block j's 6-bit (scale, min) from the 12 packed bytes q of Q4_K/Q5_K."""
    if j < 4:
        return np.int64(q[j]) & 63, np.int64(q[j + 4]) & 63
    lo = np.int64(q[j + 4])
    return (lo & 0xF) | ((np.int64(q[j - 4]) >> 6) << 4), (lo >> 4) | ((np.int64(q[j]) >> 6) << 4)


@numba.njit(cache=True)
def pack_scales_mins_k4(
    scales: np.ndarray, mins: np.ndarray, max_scale: np.float32, max_min: np.float32, q: np.ndarray
) -> None:
    """The 8 sub-block scales and mins of Q4_K/Q5_K as 6-bit integers in the 12 bytes q."""
    inv_scale = f32(63.0) / max_scale if max_scale > 0 else f32(0.0)
    inv_min = f32(63.0) / max_min if max_min > 0 else f32(0.0)
    for j in range(8):
        # ggml stores nearest_int into a uint8_t before clamping: keep the wrap-around.
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            q[j] = ls
            q[j + 4] = lm
        else:
            q[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            q[j - 4] |= (ls >> 4) << 6
            q[j] |= (lm >> 4) << 6


@numba.njit(cache=True, error_model="numpy")
def quantize_lanes(nmax: int, iscale: np.ndarray, xmin: np.ndarray, xt: np.ndarray, L: np.ndarray) -> None:
    """L[i, s] = clamp(nearest_int(iscale[s] (xt[i, s] - xmin[s])), 0, nmax)."""
    n, lanes = xt.shape
    for i in range(n):
        for s in range(lanes):
            L[i, s] = max(0, min(nmax, nearest_int(iscale[s] * (xt[i, s] - xmin[s]))))


@numba.njit(cache=True, error_model="numpy")
def weighted_error(
    xt: np.ndarray,
    wt: np.ndarray,
    L: np.ndarray,
    scale: np.ndarray,
    xmin: np.ndarray,
    use_mad: bool,
    err: np.ndarray,
) -> None:
    """err[s] = sum_i wt |scale L + min - x| (use_mad) or wt (scale L + min - x)^2, summed in order i."""
    n, lanes = xt.shape
    err[:] = 0
    for i in range(n):
        for s in range(lanes):
            diff = scale[s] * f32(L[i, s]) + xmin[s] - xt[i, s]
            diff = abs(diff) if use_mad else diff * diff
            err[s] += wt[i, s] * diff


@numba.njit(cache=True, error_model="numpy")
def make_qkx2_quants(
    nmax: int,
    xt: np.ndarray,
    wt: np.ndarray,
    Lt: np.ndarray,
    Laux: np.ndarray,
    rmin: np.float32,
    rdelta: np.float32,
    nstep: int,
    use_mad: bool,
    work: np.ndarray,
) -> None:
    """Asymmetric quantization, x ~ scale L + min with L in [0, nmax], of each lane (column) of
    xt f32[n, lanes] with weights wt f32[n, lanes]: L into Lt i32[n, lanes], scale into work[0], -min
    into work[1]. Laux i32[n, lanes] and work f32[16, lanes] are scratch.

    Lane s runs ggml's make_qkx2_quants on sub-block s. The lanes are independent, so every sum keeps
    ggml's order while the inner loops run across sub-blocks, which vectorizes; the loops are kept
    small so that LLVM's alias checks stay within its limits."""
    n, lanes = xt.shape
    scale, the_min, xmin, xmax = work[0], work[1], work[2], work[3]
    sum_w, sum_x, iscale, best_error = work[4], work[5], work[6], work[7]
    sum_l, sum_l2, sum_xl, D = work[8], work[9], work[10], work[11]
    this_scale, this_min, cur_error, better = work[12], work[13], work[14], work[15]
    xmin[:] = xt[0]
    xmax[:] = xt[0]
    for i in range(1, n):
        for s in range(lanes):
            if xt[i, s] < xmin[s]:
                xmin[s] = xt[i, s]
            if xt[i, s] > xmax[s]:
                xmax[s] = xt[i, s]
    sum_w[:] = wt[0]
    sum_x[:] = 0
    for s in range(lanes):
        sum_x[s] = sum_w[s] * xt[0, s]
    for i in range(1, n):
        for s in range(lanes):
            sum_w[s] += wt[i, s]
            sum_x[s] += wt[i, s] * xt[i, s]
    for s in range(lanes):
        if xmin[s] > 0:
            xmin[s] = 0
        # A flat lane (max == min) returns scale 0, L = 0; its arithmetic below is discarded.
        the_min[s] = -xmin[s]
        iscale[s] = f32(nmax) / (xmax[s] - xmin[s])
        scale[s] = f32(1.0) / iscale[s]
    quantize_lanes(nmax, iscale, xmin, xt, Lt)
    weighted_error(xt, wt, Lt, scale, xmin, use_mad, best_error)
    for step in range(nstep + 1):
        for s in range(lanes):
            iscale[s] = (rmin + rdelta * f32(step) + f32(nmax)) / (xmax[s] - xmin[s])
        quantize_lanes(nmax, iscale, xmin, xt, Laux)
        sum_l[:] = 0
        sum_l2[:] = 0
        sum_xl[:] = 0
        for i in range(n):
            for s in range(lanes):
                w = wt[i, s]
                fl = f32(Laux[i, s])
                sum_l[s] += w * fl
                sum_l2[s] += w * fl * fl
                sum_xl[s] += w * fl * xt[i, s]
        for s in range(lanes):
            D[s] = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s]
            this_scale[s] = (sum_w[s] * sum_xl[s] - sum_x[s] * sum_l[s]) / D[s]
            this_min[s] = (sum_l2[s] * sum_x[s] - sum_l[s] * sum_xl[s]) / D[s]
            if this_min[s] > 0:
                this_min[s] = 0
                this_scale[s] = sum_xl[s] / sum_l2[s]
        weighted_error(xt, wt, Laux, this_scale, this_min, use_mad, cur_error)
        n_better = 0
        for s in range(lanes):
            better[s] = 0
            if D[s] > 0 and cur_error[s] < best_error[s]:
                better[s] = 1
                n_better += 1
                best_error[s] = cur_error[s]
                scale[s] = this_scale[s]
                xmin[s] = this_min[s]
        if n_better:
            for i in range(n):
                for s in range(lanes):
                    if better[s]:
                        Lt[i, s] = Laux[i, s]
    for s in range(lanes):
        if xmax[s] == -the_min[s]:
            scale[s] = 0
            for i in range(n):
                Lt[i, s] = 0
        else:
            the_min[s] = -xmin[s]


@numba.njit(cache=True, error_model="numpy")
def make_qx_quants(nmax: int, xt: np.ndarray, Lt: np.ndarray, Laux: np.ndarray, work: np.ndarray) -> None:
    """Symmetric quantization, weights x^2 (ggml's rmse_type 1 without qw), of each lane (column) of
    xt f32[n, lanes]: L in [0, 2 nmax) into Lt i32[n, lanes], scale into work[0]. Laux i32[n, lanes]
    and work f32[8, lanes] are scratch. Lanes are independent sub-blocks, as in make_qkx2_quants."""
    n, lanes = xt.shape
    scale, xmax, amax, iscale = work[0], work[1], work[2], work[3]
    sumlx, suml2, best, better = work[4], work[5], work[6], work[7]
    for s in range(lanes):
        xmax[s] = 0
        amax[s] = 0
        sumlx[s] = 0
        suml2[s] = 0
    for i in range(n):
        for s in range(lanes):
            ax = abs(xt[i, s])
            if ax > amax[s]:
                amax[s] = ax
                xmax[s] = xt[i, s]
    # An all-zero lane (amax < GROUP_MAX_EPS) returns scale 0, L = 0; its arithmetic is discarded.
    for s in range(lanes):
        iscale[s] = f32(-nmax) / xmax[s]
    for i in range(n):
        for s in range(lanes):
            li = max(-nmax, min(nmax - 1, nearest_int(iscale[s] * xt[i, s])))
            Lt[i, s] = li + nmax
            w = xt[i, s] * xt[i, s]
            fl = f32(li)
            sumlx[s] += w * xt[i, s] * fl
            suml2[s] += w * fl * fl
    for s in range(lanes):
        scale[s] = sumlx[s] / suml2[s] if suml2[s] != 0 else f32(0.0)
        best[s] = scale[s] * sumlx[s]
    for step in range(-9, 10):
        if step == 0:
            continue
        for s in range(lanes):
            iscale[s] = -(f32(nmax) + f32(0.1) * f32(step)) / xmax[s]
            sumlx[s] = 0
            suml2[s] = 0
        for i in range(n):
            for s in range(lanes):
                li = max(-nmax, min(nmax - 1, nearest_int(iscale[s] * xt[i, s])))
                Laux[i, s] = li + nmax
                w = xt[i, s] * xt[i, s]
                fl = f32(li)
                sumlx[s] += w * xt[i, s] * fl
                suml2[s] += w * fl * fl
        n_better = 0
        for s in range(lanes):
            better[s] = 0
            if suml2[s] > 0 and sumlx[s] * sumlx[s] > best[s] * suml2[s]:
                better[s] = 1
                n_better += 1
                scale[s] = sumlx[s] / suml2[s]
                best[s] = scale[s] * sumlx[s]
        if n_better:
            for i in range(n):
                for s in range(lanes):
                    if better[s]:
                        Lt[i, s] = Laux[i, s]
    for s in range(lanes):
        if amax[s] < GROUP_MAX_EPS:
            scale[s] = 0
            for i in range(n):
                Lt[i, s] = 0


@numba.njit(cache=True)
def make_q3_quants(n: int, nmax: int, x: np.ndarray, L: np.ndarray) -> np.float32:
    """Symmetric quantization of x f32[n] to L in [0, 2 nmax) by coordinate descent on the x^2-weighted
    error (ggml's do_rmse path). An all-zero x leaves L = 0, not nmax, as in ggml."""
    xmax = f32(0.0)
    amax = f32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            xmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(-nmax) / xmax
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        li = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = li
        w = x[i] * x[i]
        fl = f32(li)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fl = f32(L[i])
            slx = sumlx - w * x[i] * fl
            if slx > 0:
                sl2 = suml2 - w * fl * fl
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fnew = f32(new_l)
                    slx += w * x[i] * fnew
                    sl2 += w * fnew * fnew
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


@numba.njit(cache=True)
def pack_2bit(L: np.ndarray, qs: np.ndarray) -> None:
    # Byte 32h + k holds elements 128h + k + 32j in bits 2j (Q2_K and Q3_K low bits).
    for h in range(2):
        for k in range(32):
            e = 128 * h + k
            qs[32 * h + k] = L[e] | (L[e + 32] << 2) | (L[e + 64] << 4) | (L[e + 96] << 6)


@numba.njit(cache=True)
def split_lanes(x: np.ndarray, n: int) -> np.ndarray:
    """x f32[cols] -> xt f32[n, cols // n]: lane s is sub-block s (elements n s .. n s + n - 1)."""
    lanes = x.shape[0] // n
    xt = np.empty((n, lanes), np.float32)
    for s in range(lanes):
        for i in range(n):
            xt[i, s] = x[n * s + i]
    return xt


@numba.njit(cache=True)
def join_lanes(Lt: np.ndarray) -> np.ndarray:
    """The inverse of split_lanes: Lt i32[n, lanes] -> L i32[n lanes] in element order."""
    n, lanes = Lt.shape
    L = np.empty(n * lanes, np.int32)
    for s in range(lanes):
        for i in range(n):
            L[n * s + i] = Lt[i, s]
    return L


@numba.njit(cache=True)
def quantize_row_q2_k(x: np.ndarray, out: np.ndarray) -> None:
    """x f32[cols] -> out u8[cols // 256 * 84]."""
    xt = split_lanes(x, 16)
    lanes = xt.shape[1]
    wt = np.abs(xt)
    Lt = np.empty((16, lanes), np.int32)
    work = np.empty((16, lanes), np.float32)
    make_qkx2_quants(3, xt, wt, Lt, np.empty_like(Lt), f32(-0.5), f32(0.1), 15, True, work)
    L = join_lanes(Lt)
    for b in range(lanes // 16):
        blk = slice(b * QK_K, (b + 1) * QK_K)
        sub = slice(b * 16, (b + 1) * 16)
        quantize_block_q2_k(
            x[blk], out[b * Q2_K.bytes : (b + 1) * Q2_K.bytes], work[0, sub], work[1, sub], L[blk]
        )


@numba.njit(cache=True)
def quantize_block_q2_k(
    x: np.ndarray, y: np.ndarray, scales: np.ndarray, mins: np.ndarray, L: np.ndarray
) -> None:
    """x f32[256] -> y u8[84]: scales[16], qs[64], d:f16, dmin:f16, given make_qkx2_quants' sub-block
    scales f32[16], mins f32[16] and L i32[256] (requantized in place)."""
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(16):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]

    sc = y[Q2_K.scales : Q2_K.scales + 16]
    if max_scale > 0:
        iscale = f32(15.0) / max_scale
        for j in range(16):
            sc[j] = nearest_int(iscale * scales[j]) & 0xFF
        d = store_fp16(y, Q2_K.d, max_scale / f32(15.0))
    else:
        sc[:] = 0
        d = store_fp16(y, Q2_K.d, f32(0.0))
    if max_min > 0:
        iscale = f32(15.0) / max_min
        for j in range(16):
            sc[j] = (sc[j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
        dmin = store_fp16(y, Q2_K.dmin, max_min / f32(15.0))
    else:
        dmin = store_fp16(y, Q2_K.dmin, f32(0.0))

    for j in range(16):
        s = np.int64(sc[j])
        dj = d * f32(s & 0xF)
        if dj == 0:
            continue
        dm = dmin * f32(s >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, nearest_int((x[16 * j + ii] + dm) / dj)))
    pack_2bit(L, y[Q2_K.qs : Q2_K.qs + 64])


@numba.njit(cache=True)
def quantize_block_q3_k(x: np.ndarray, y: np.ndarray) -> None:
    """x f32[256] -> y u8[110]: hmask[32], qs[64], scales[12], d:f16."""
    L = np.empty(QK_K, np.int32)
    scales = np.empty(16, np.float32)
    max_scale = f32(0.0)
    amax = f32(0.0)
    for j in range(16):
        scales[j] = make_q3_quants(16, 4, x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16])
        scale = abs(scales[j])
        if scale > amax:
            amax = scale
            max_scale = scales[j]

    # 16 signed 6-bit scales: low nibbles in bytes 0-7, high 2-bit pairs in bytes 8-11.
    sc = y[Q3_K.scales : Q3_K.scales + 12]
    sc[:] = 0
    if max_scale != 0:
        iscale = f32(-32.0) / max_scale
        for j in range(16):
            q = max(-32, min(31, nearest_int(iscale * scales[j]))) + 32
            if j < 8:
                sc[j] = q & 0xF
            else:
                sc[j - 8] |= (q & 0xF) << 4
            sc[j % 4 + 8] |= (q >> 4) << (2 * (j // 4))
        d = store_fp16(y, Q3_K.d, f32(1.0) / iscale)
    else:
        d = store_fp16(y, Q3_K.d, f32(0.0))

    for j in range(16):
        lo = np.int64(sc[j]) & 0xF if j < 8 else np.int64(sc[j - 8]) >> 4
        hi = (np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3
        dj = d * f32((lo | (hi << 4)) - 32)
        if dj == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, nearest_int(x[16 * j + ii] / dj))) + 4

    # The high bit of element j goes to hmask[j % 32], bit j // 32.
    hmask = y[Q3_K.hmask : Q3_K.hmask + 32]
    hmask[:] = 0
    for j in range(QK_K):
        if L[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    pack_2bit(L, y[Q3_K.qs : Q3_K.qs + 64])


@numba.njit(cache=True)
def quantize_subblocks_k4(x: np.ndarray, nmax: int, rmin: np.float32, nstep: int) -> tuple:
    """Q4_K/Q5_K first pass over a row x f32[cols]: make_qkx2_quants on every 32-sub-block.
    Returns (scales f32[cols // 32], mins f32[cols // 32], L i32[cols])."""
    xt = split_lanes(x, 32)
    lanes = xt.shape[1]
    # weights av_x + |x|, av_x = sqrt(mean(x^2)) of the sub-block
    sum_x2 = np.zeros(lanes, np.float32)
    for i in range(32):
        for s in range(lanes):
            sum_x2[s] += xt[i, s] * xt[i, s]
    av_x = np.sqrt(sum_x2 / f32(32.0))
    wt = np.empty_like(xt)
    for i in range(32):
        for s in range(lanes):
            wt[i, s] = av_x[s] + abs(xt[i, s])
    Lt = np.empty((32, lanes), np.int32)
    work = np.empty((16, lanes), np.float32)
    make_qkx2_quants(nmax, xt, wt, Lt, np.empty_like(Lt), rmin, f32(0.1), nstep, False, work)
    return work[0], work[1], join_lanes(Lt)


@numba.njit(cache=True)
def quantize_block_k4(
    x: np.ndarray, y: np.ndarray, nmax: int, scales: np.ndarray, mins: np.ndarray, L: np.ndarray
) -> None:
    """Q4_K/Q5_K second pass on one block x f32[256]: d, dmin and scales into y[0:16], L i32[256]
    requantized in [0, nmax] with the stored scales."""
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]

    q = y[Q4_K.scales : Q4_K.scales + 12]  # Q5_K's d, dmin and scales lie where Q4_K's do
    pack_scales_mins_k4(scales, mins, max_scale, max_min, q)
    d = store_fp16(y, Q4_K.d, max_scale / f32(63.0))
    dmin = store_fp16(y, Q4_K.dmin, max_min / f32(63.0))
    for j in range(8):
        sc, m = get_scale_min_k4(j, q)
        dj = d * f32(sc)
        if dj == 0:
            continue
        dm = dmin * f32(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((x[32 * j + ii] + dm) / dj)))


@numba.njit(cache=True)
def quantize_row_q4_k(x: np.ndarray, out: np.ndarray) -> None:
    """x f32[cols] -> out u8[cols // 256 * 144]: blocks of d:f16, dmin:f16, scales[12], qs[128]."""
    scales, mins, L = quantize_subblocks_k4(x, 15, f32(-1.0), 20)
    for b in range(x.shape[0] // QK_K):
        y = out[b * Q4_K.bytes : (b + 1) * Q4_K.bytes]
        Lb = L[b * QK_K : (b + 1) * QK_K]
        sub = slice(b * 8, (b + 1) * 8)
        quantize_block_k4(x[b * QK_K : (b + 1) * QK_K], y, 15, scales[sub], mins[sub], Lb)
        for c in range(4):
            for k in range(32):
                y[Q4_K.qs + 32 * c + k] = Lb[64 * c + k] | (Lb[64 * c + k + 32] << 4)


@numba.njit(cache=True)
def quantize_row_q5_k(x: np.ndarray, out: np.ndarray) -> None:
    """x f32[cols] -> out u8[cols // 256 * 176]: blocks of d:f16, dmin:f16, scales[12], qh[32], qs[128]."""
    scales, mins, L = quantize_subblocks_k4(x, 31, f32(-0.5), 15)
    for b in range(x.shape[0] // QK_K):
        y = out[b * Q5_K.bytes : (b + 1) * Q5_K.bytes]
        Lb = L[b * QK_K : (b + 1) * QK_K]
        sub = slice(b * 8, (b + 1) * 8)
        quantize_block_k4(x[b * QK_K : (b + 1) * QK_K], y, 31, scales[sub], mins[sub], Lb)
        pack_q5_k(Lb, y)


@numba.njit(cache=True)
def pack_q5_k(L: np.ndarray, y: np.ndarray) -> None:
    """L i32[256] in [0, 31] -> y's qh[32] (bit 2c or 2c + 1 of byte k for element 64c + k or + 32) and qs."""
    qh = y[Q5_K.qh : Q5_K.qh + 32]
    qh[:] = 0
    for c in range(4):
        for k in range(32):
            l1 = L[64 * c + k]
            if l1 > 15:
                l1 -= 16
                qh[k] |= 1 << (2 * c)
            l2 = L[64 * c + k + 32]
            if l2 > 15:
                l2 -= 16
                qh[k] |= 2 << (2 * c)
            y[Q5_K.qs + 32 * c + k] = l1 | (l2 << 4)


@numba.njit(cache=True)
def quantize_row_q6_k(x: np.ndarray, out: np.ndarray) -> None:
    """x f32[cols] -> out u8[cols // 256 * 210]."""
    xt = split_lanes(x, 16)
    Lt = np.empty(xt.shape, np.int32)
    work = np.empty((8, xt.shape[1]), np.float32)
    make_qx_quants(32, xt, Lt, np.empty_like(Lt), work)
    L = join_lanes(Lt)
    for b in range(x.shape[0] // QK_K):
        blk = slice(b * QK_K, (b + 1) * QK_K)
        quantize_block_q6_k(
            x[blk], out[b * Q6_K.bytes : (b + 1) * Q6_K.bytes], work[0, b * 16 : (b + 1) * 16], L[blk]
        )


@numba.njit(cache=True)
def quantize_block_q6_k(x: np.ndarray, y: np.ndarray, scales: np.ndarray, L: np.ndarray) -> None:
    """x f32[256] -> y u8[210]: ql[128], qh[64], scales[16] int8, d:f16, given make_qx_quants' sub-block
    scales f32[16] and L i32[256] (requantized in place)."""
    max_scale = f32(0.0)
    max_abs_scale = f32(0.0)
    for ib in range(16):
        abs_scale = abs(scales[ib])
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scales[ib]

    if max_abs_scale < GROUP_MAX_EPS:
        y[:] = 0
        return

    iscale = f32(-128.0) / max_scale
    d = store_fp16(y, Q6_K.d, f32(1.0) / iscale)
    for ib in range(16):
        # int8 storage of min(127, q): wrap to [-128, 127] as the C assignment does.
        s = ((min(127, nearest_int(iscale * scales[ib])) + 128) & 0xFF) - 128
        y[Q6_K.scales + ib] = s & 0xFF
        dj = d * f32(s)
        if dj == 0:
            continue
        for ii in range(16):
            L[16 * ib + ii] = max(-32, min(31, nearest_int(x[16 * ib + ii] / dj))) + 32

    for h in range(2):
        for k in range(32):
            e = 128 * h + k
            ql = Q6_K.ql + 64 * h + k
            y[ql] = (L[e] & 0xF) | ((L[e + 64] & 0xF) << 4)
            y[ql + 32] = (L[e + 32] & 0xF) | ((L[e + 96] & 0xF) << 4)
            y[Q6_K.qh + 32 * h + k] = (
                (L[e] >> 4) | ((L[e + 32] >> 4) << 2) | ((L[e + 64] >> 4) << 4) | ((L[e + 96] >> 4) << 6)
            )


@numba.njit(cache=True)
def quantize_row_q3_k(x: np.ndarray, out: np.ndarray) -> None:
    """x f32[cols] -> out u8[cols // 256 * 110]."""
    for b in range(x.shape[0] // QK_K):
        quantize_block_q3_k(x[b * QK_K : (b + 1) * QK_K], out[b * Q3_K.bytes : (b + 1) * Q3_K.bytes])
