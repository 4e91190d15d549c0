"""Compiled loops of the exact LM arithmetic (`exactlm`, FORMAT.md §4.3), one pass per job.

Each kernel is the numpy expression named in its docstring, written as a loop so that the LM's
many small steps cost one pass over the data instead of a dozen temporaries. They keep to the
rules of the exact arithmetic: integer sums (exact in float64 in any order), and otherwise
IEEE-754 basic operations in the order of the expression (no fast-math: numba then neither
reorders nor fuses a multiply and an add). `tests/test_exactlm.py` checks each against its numpy
expression bit for bit.

Compiled on first use and cached on disk beside the module (or in numba's user cache).
"""
from __future__ import annotations

import math

import numba
import numpy as np


def _jit(fn):  # type: ignore[no-untyped-def]
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location: compile per process
        return numba.njit(nogil=True)(fn)


@_jit
def _row_scale(row, bits_scale):  # type: ignore[no-untyped-def]
    """max|row| * 2^-bits (1 if the row is zero): the scale of a row quantization."""
    m = 0.0
    for v in row:
        m = max(m, abs(v))
    sc = m * bits_scale
    return 1.0 if sc == 0.0 else sc


@_jit
def quantize_rows(x, bits_scale, q, s):  # type: ignore[no-untyped-def]
    """s = max|x| * 2^-bits per row (1 if 0); q = round(x / s).   x, q [R, n]; s [R]."""
    for r in range(x.shape[0]):
        sc = _row_scale(x[r], bits_scale)
        s[r] = sc
        for j in range(x.shape[1]):
            q[r, j] = np.rint(x[r, j] / sc)


@_jit
def quantize_halves(x, bits_scale, halves, s):  # type: ignore[no-untyped-def]
    """quantize_rows, each integer v then split as v = 256 * hi + lo, lo in [-128, 127]:
    halves[r] = hi, halves[R + r] = lo (int8 for |v| <= 2^14).   x [R, n]; halves [2R, n]; s [R]."""
    R = x.shape[0]
    for r in range(R):
        sc = _row_scale(x[r], bits_scale)
        s[r] = sc
        for j in range(x.shape[1]):
            v = np.rint(x[r, j] / sc)
            hi = np.floor((v + 128.0) * 0.00390625)  # / 256: exact
            halves[r, j] = hi
            halves[R + r, j] = v - 256.0 * hi


@_jit
def join_halves(acc, out):  # type: ignore[no-untyped-def]
    """out = 256 * acc[:R] + acc[R:] in float64 (exact integers).   acc [2R, n] (int32); out [R, n]."""
    R = out.shape[0]
    for r in range(R):
        for j in range(out.shape[1]):
            out[r, j] = 256.0 * acc[r, j] + acc[R + r, j]


@_jit
def affine_(acc, s, scale, bias):  # type: ignore[no-untyped-def]
    """acc *= s[:, None] * scale; acc += bias (in place).   acc [R, n]; s [R]; scale, bias [n]."""
    for r in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            v = acc[r, j] * (s[r] * scale[j])
            acc[r, j] = v + bias[j]


@_jit
def norm(x, y, weight, bias, eps_nn, bits_scale, out):  # type: ignore[no-untyped-def]
    """Layer norm of x + y from integer sums (exactlm._Norm).   x, y, out [R, n]."""
    R, n = x.shape
    t = np.empty(n)
    for r in range(R):
        m = 0.0
        for j in range(n):
            v = x[r, j] + y[r, j]
            t[j] = v
            if abs(v) > m:
                m = abs(v)
        sc = m * bits_scale
        if sc == 0.0:
            sc = 1.0
        s1 = 0.0
        s2 = 0.0
        for j in range(n):
            q = np.rint(t[j] / sc)
            t[j] = q
            s1 += q
            s2 += q * q
        den = math.sqrt((n * s2 - s1 * s1) + eps_nn / (sc * sc))
        for j in range(n):
            v = (n * t[j] - s1) / den
            v = v * weight[j]
            out[r, j] = v + bias[j]


@_jit
def gelu_(x, table, step, half):  # type: ignore[no-untyped-def]
    """GELU by linear interpolation in `table` (points k / step, k = -half..half), in place.   x [R, n]."""
    top = half / step
    for r in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[r, j]
            if v >= top:
                continue
            if v < -top:
                x[r, j] = 0.0
                continue
            u = v * step
            k = min(max(math.floor(u), -half), half - 1)
            frac = u - k
            i = int(k) + half
            lo = table[i]
            x[r, j] = lo + (table[i + 1] - lo) * frac


@_jit
def attend(qkv, keys, key_scales, values, old_end, lo, past, inv_sqrt, exp_ints, log2e_units, max_units,
           value_scale, value_max, value_unit, out):  # type: ignore[no-untyped-def]
    """One layer's attention for T new steps (positions old_end .. old_end + T - 1).

    qkv [B, T, 3, H, Dh] (projected). The new keys go, quantized per head like matrix-product
    inputs, to keys [B, H, Dh, cap] (int32) and key_scales [B, H, cap]; the new values, rounded to
    multiples of 1 / value_scale and clamped, to values [B, H, Dh, cap] (int32). Query t sees keys
    max(lo, old_end + t - past) .. old_end + t: scores (q.k) * (q_scale * k_scale) * inv_sqrt,
    rounded to float32, exp-weighted (integer weights) and the values' weighted mean -> out [B, T, H * Dh].
    The products of integers are summed in int64 (exact: below 2^49).
    """
    B, T, _, H, Dh = qkv.shape
    kscale = 2.0 ** -15
    qq = np.empty(Dh, np.int64)
    n_keys = old_end + T - lo
    dots = np.empty(n_keys, np.int64)
    scores = np.empty(n_keys, np.float32)
    w = np.empty(n_keys, np.int64)
    for b in range(B):
        for t in range(T):
            p = old_end + t
            for h in range(H):
                sc = _row_scale(qkv[b, t, 1, h], kscale)
                key_scales[b, h, p] = sc
                for d in range(Dh):
                    keys[b, h, d, p] = int(np.rint(qkv[b, t, 1, h, d] / sc))
                    v = np.rint(qkv[b, t, 2, h, d] * value_scale)
                    values[b, h, d, p] = int(min(max(v, -value_max), value_max))
    for b in range(B):
        for t in range(T):
            pos = old_end + t
            first = max(lo, pos - past)
            n = pos + 1 - first
            for h in range(H):
                qs = _row_scale(qkv[b, t, 0, h], kscale)
                for d in range(Dh):
                    qq[d] = int(np.rint(qkv[b, t, 0, h, d] / qs))
                dots[:n] = 0
                for d in range(Dh):
                    qd = qq[d]
                    row = keys[b, h, d, first: pos + 1]  # 1-D views: simple loops that vectorise
                    for i in range(n):
                        dots[i] += qd * np.int64(row[i])
                top = np.float32(-np.inf)
                for i in range(n):
                    f = np.float32((np.float64(dots[i]) * (qs * key_scales[b, h, first + i])) * inv_sqrt)
                    scores[i] = f
                    top = max(top, f)
                total = 0
                for i in range(n):
                    u = min(np.rint((top - scores[i]) * log2e_units), max_units)
                    w[i] = exp_ints[int(u)]
                    total += w[i]
                for d in range(Dh):
                    acc = 0
                    row = values[b, h, d, first: pos + 1]
                    for i in range(n):
                        acc += w[i] * np.int64(row[i])
                    out[b, t, h * Dh + d] = (np.float64(acc) / total) * value_unit


@_jit
def probs(acc, s, scale, bias, K, exp_ints, log2e_units, max_units, prob_one, out):  # type: ignore[no-untyped-def]
    """Output heads' logits -> probabilities (exactlm.ExactLM._probs).

    acc [R, K * card]: integer products of the heads; the logits are acc * (s * scale) + bias.
    out [B, T, K, card] float32 (any strides), row r = b * T + t: floor(w * 2^P / sum w) with a floor of 1, times 2^-P,
    where w are the exp weights of the float32 logits (at most 2^24) and 2^P = prob_one.
    """
    R, T = acc.shape[0], out.shape[1]
    card = acc.shape[1] // K
    f = np.empty(card, np.float32)
    w = np.empty(card, np.int32)
    unit = np.float32(1.0 / prob_one)
    for r in range(R):
        for k in range(K):
            top = np.float32(-np.inf)
            for j in range(card):
                c = k * card + j
                v = acc[r, c] * (s[r] * scale[c])
                v = np.float32(v + bias[c])
                f[j] = v
                if v > top:
                    top = v
            total = 0
            for j in range(card):
                u = np.rint((top - f[j]) * log2e_units)
                if u > max_units:
                    u = max_units
                wj = exp_ints[int(u)]
                w[j] = wj
                total += wj
            per = np.float32(prob_one / total)
            for j in range(card):
                p = np.floor(np.float32(w[j]) * per)
                if p < 1.0:
                    p = np.float32(1.0)
                out[r // T, r % T, k, j] = p * unit
