"""The entropy-coding LM computed in exact arithmetic: the same probabilities on every machine.

Range decoding needs, at every frame, exactly the probabilities the encoder used. A float32
transformer does not give them across machines: matrix-product kernels, vector widths and thread
counts change the order of the sums, so another CPU gets other last bits, and a file coded on one
machine fails its CRC on another (seen: the golden LM file of FORMAT.md §4 on a second Xeon).

`ExactLM` runs a `LanguageModel`'s weights (numpy, float64 and integers) so that every operation
either is exact or is one IEEE-754 basic operation (+, -, *, /, sqrt: correctly rounded, the same
bits on every conforming machine), in a fixed order:

* Every matrix product multiplies integers: inputs are quantized per row to |q| <= 2^15 with a
  float scale (row max * 2^-15), weights per output row the same way, once. Summed in
  float64, all partial sums are integers below 2^53, so the result is exact whatever the BLAS
  kernel, the order of the sums or the thread count.
* Layer norms quantize their input per row to |q| <= 2^17 and take the mean and variance from the
  integer sums n*sum(q^2) - sum(q)^2 (exact), then one sqrt and one division per row.
* exp (attention and output softmax) is a table: x - max(x) is rounded, in float32, to whole
  1/1024-ths of a bit, u = 1024 i + j, and the weight is the integer round(2^b * 2^(-j/1024))
  shifted right by i; that table comes from repeated square roots of 1/2 (correctly rounded). Sums
  of weights are integer sums.
* Attention values are rounded to the grid 2^-12; GELU interpolates a table computed in decimal
  arithmetic (`decimal`: software, the same digits everywhere); sinusoidal positions too.
* Output probabilities are integers: floor(p * 2^20) with a floor of 1, times 2^-20, in float32.

Two arithmetics, differing only in the matrix products (FORMAT.md §4.3):

* `exact-v1` (segment flags 2, neucodec 0.2.0): inputs and weights as above, the products of
  16-bit integers summed in float64 (BLAS).
* `exact-v2` (flags 3, what the writer uses since): weights quantized per output row to
  |q| <= 127 (scale max / 127), inputs per row to |q| <= 2^14, each input integer split as
  256 * hi + lo with hi, lo int8, so that a product is two int8 matrix products summed exactly in
  int32 (`torch._int_mm`: AVX-512 VNNI / AMX where present; float64 where it is missing -- the
  same integers). About ten times faster than float64 products; the same payload sizes on real
  codes as exact-v1 to within 0.06 % (docs/benchmarks.md).

The result differs from the float32 LM by rounding noise (+0.01 % in bits on real codes) and is
the same on every machine, thread count and batch composition: the encoder runs many frames at
once (`run_known`), the decoder steps (`step`), and both give the same bits by construction.
Format: docs/FORMAT.md §4.3 (header `coder.arithmetic` names the writer's arithmetic).

The per-element work runs as compiled loops (`exactkernels`, numba; compiled at first use and
cached on disk); `quantize_rows`, `exp_weights` and `_gelu` below are the numpy definitions the
tests hold those loops to, bit for bit.
"""
from __future__ import annotations

import dataclasses
import decimal
import functools
import math
import typing as tp

import numpy as np
import torch

from .lm import LanguageModel

V1, V2 = "exact-v1", "exact-v2"  # the arithmetics (the header's coder "arithmetic")
NAME = V2  # the writer's
ACT_BITS = 15  # exact-v1 matrix-product inputs and weights: integers with |q| <= 2^15
INT8_ACT_BITS = 14  # exact-v2 matrix-product inputs: |q| <= 2^14, split into two int8 halves
INT8_WEIGHT_MAX = 127  # exact-v2 weights: |q| <= 127 per output row
NORM_BITS = 17  # layer-norm inputs: integers with |q| <= 2^17
EXP_SHIFT = 10  # exp's argument is rounded to 2^-EXP_SHIFT of a bit
ATTN_ONE = 20  # attention weights are integers, the largest 2^ATTN_ONE
VALUE_GRID = 12  # attention values are rounded to multiples of 2^-VALUE_GRID ...
VALUE_MAX = (1 << 20) - 1  # ... and clamped to this many of them
PROB_BITS = 20  # probabilities are multiples of 2^-PROB_BITS, at least one
GELU_STEP = 128  # GELU table: points every 1/GELU_STEP ...
GELU_RANGE = 6  # ... on [-GELU_RANGE, GELU_RANGE]; beyond: GELU(x) = x or 0
MAX_WIDTH = 512  # widths (and feed-forward widths / 4) up to this keep every integer sum below 2^53
MAX_CONTEXT = 4096

kernels: tp.Any = None  # `exactkernels`, imported with the first ExactLM (importing numba takes ~0.4 s)

_LOG2E_UNITS = np.float32((1 << EXP_SHIFT) * 1.4426950408889634)  # nats -> units: log2(e) written out
_MAX_UNITS = np.float32(31 << EXP_SHIFT)  # shifts of 31 bits and more give 0


# ---------------------------------------------------------------- tables
@functools.cache
def exp2_table() -> np.ndarray:
    """T[j] = 2^(-j / 2^EXP_SHIFT) from repeated square roots of 1/2 (correctly rounded operations)."""
    roots = [0.5]  # roots[b] = 2^(-2^b / 2^EXP_SHIFT) for the bits b of j
    for _ in range(EXP_SHIFT):
        roots.insert(0, math.sqrt(roots[0]))
    out = []
    for j in range(1 << EXP_SHIFT):
        v = 1.0
        for b in range(EXP_SHIFT):
            if j >> b & 1:
                v *= roots[b]
        out.append(v)
    return np.array(out, dtype=np.float64)


@functools.cache
def _exp_ints(one_bits: int) -> np.ndarray:
    """Entry u = 2^EXP_SHIFT * i + j: round(2^one_bits * T[j]) >> i, int32 (one_bits <= 24, i < 32)."""
    ints = np.round(exp2_table() * 2.0 ** one_bits).astype(np.int32)
    return np.concatenate([ints >> i for i in range(32)])


def exp_weights(x: np.ndarray, one_bits: int) -> np.ndarray:
    """Integer weights ~ 2^one_bits * exp(x - max(x)) along the last axis (int32; -inf gives 0)."""
    xf = x.astype(np.float32)
    u = np.max(xf, axis=-1, keepdims=True) - xf
    u *= _LOG2E_UNITS
    np.round(u, out=u)
    np.minimum(u, _MAX_UNITS, out=u)
    return _exp_ints(one_bits)[u.astype(np.int32)]


_PI = decimal.Decimal("3.14159265358979323846264338327950288419716939937510582097494459")
with decimal.localcontext() as _ctx:
    _ctx.prec = 60
    _SQRT_PI = _PI.sqrt()
    _SQRT2 = decimal.Decimal(2).sqrt()


def _decimal_erf(x: decimal.Decimal) -> decimal.Decimal:
    """erf by its Taylor series in decimal arithmetic (|x| <= GELU_RANGE / sqrt 2; 40 digits)."""
    total, term, n = decimal.Decimal(0), x, 0
    x2 = x * x
    while True:
        add = term / (2 * n + 1)
        total += add
        if abs(add) < decimal.Decimal("1e-30"):
            return total * 2 / _SQRT_PI
        n += 1
        term = -term * x2 / n


@functools.cache
def gelu_table() -> np.ndarray:
    """GELU(k / GELU_STEP) for k in [-GELU_RANGE * GELU_STEP, GELU_RANGE * GELU_STEP]."""
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        n = GELU_RANGE * GELU_STEP
        out = [float(x * (1 + _decimal_erf(x / _SQRT2)) / 2)
               for x in (decimal.Decimal(k) / GELU_STEP for k in range(-n, n + 1))]
    return np.array(out, dtype=np.float64)


def _gelu(x: np.ndarray) -> np.ndarray:
    """GELU by linear interpolation in `gelu_table` (IEEE operations in a fixed order; the
    kernel `exactkernels.gelu_` computes the same per element)."""
    table, n = gelu_table(), GELU_RANGE * GELU_STEP
    u = x * GELU_STEP
    k = np.clip(np.floor(u), -n, n - 1)
    frac = u - k
    i = k.astype(np.int64) + n
    lo = table[i]
    y = lo + (table[i + 1] - lo) * frac
    return np.where(x >= GELU_RANGE, x, np.where(x < -GELU_RANGE, 0.0, y))


def _decimal_cos_sin(x: decimal.Decimal) -> tuple[decimal.Decimal, decimal.Decimal]:
    two_pi = 2 * _PI
    x = x - two_pi * (x / two_pi).to_integral_value(rounding=decimal.ROUND_FLOOR)
    c, s, term, n = decimal.Decimal(0), decimal.Decimal(0), decimal.Decimal(1), 0
    eps = decimal.Decimal("1e-24")
    while abs(term) > eps or n < 2:
        if n % 2 == 0:
            c += term if n % 4 == 0 else -term
        else:
            s += term if n % 4 == 1 else -term
        n += 1
        term = term * x / n
    return c, s


@functools.lru_cache(maxsize=8)
def _frequencies(dim: int, max_period: float) -> tuple[decimal.Decimal, ...]:
    """1 / max_period^(i / (dim/2 - 1)) for i < dim/2, in decimal arithmetic."""
    half = dim // 2
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        log_period = decimal.Decimal(repr(float(max_period))).ln()
        return tuple((-(log_period * i / (half - 1))).exp() for i in range(half))


@functools.lru_cache(maxsize=1 << 16)
def _position(dim: int, max_period: float, p: int) -> np.ndarray:
    with decimal.localcontext() as ctx:
        ctx.prec = 30
        cs = [_decimal_cos_sin(p * f) for f in _frequencies(dim, max_period)]
    return np.array([float(c) for c, _ in cs] + [float(s) for _, s in cs], dtype=np.float64)


def positions(dim: int, max_period: float, start: int, count: int) -> np.ndarray:
    """Sinusoidal embeddings [count, dim] of positions start.. (cos then sin, as `lm.sin_embedding`)."""
    return np.stack([_position(dim, max_period, p) for p in range(start, start + count)]) if count \
        else np.zeros((0, dim))


# ---------------------------------------------------------------- exact building blocks
def quantize_rows(x: np.ndarray, bits: int = ACT_BITS) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] -> (integers q, |q| <= 2^bits, as float64; scale [..., 1]) with x ~ q * scale."""
    scale = np.max(np.abs(x), axis=-1, keepdims=True)
    scale *= 2.0 ** -bits
    scale[scale == 0] = 1.0
    return np.round(x / scale), scale


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b of integer-valued float64 matrices (torch's BLAS: exact in any order and thread count)."""
    return torch.from_numpy(a).matmul(torch.from_numpy(b)).numpy()


@functools.cache
def _int_mm_works() -> bool:
    """Whether `torch._int_mm` (int8 x int8 -> int32) runs here and gives the exact products."""
    a = torch.arange(-128, 128, dtype=torch.int8).view(32, 8)
    try:
        return torch.equal(torch._int_mm(a, a.t().contiguous()).double(), a.double() @ a.double().t())
    except (AttributeError, RuntimeError, TypeError):  # an older torch, or a build without the kernel
        return False


def _int8_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b of int8 matrices, exact: int32 sums (|sum| < 2^31 for inner sizes up to 2^17), or
    float64 where `torch._int_mm` is missing (the same integers)."""
    if _int_mm_works():
        return torch._int_mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    return _matmul(a.astype(np.float64), b.astype(np.float64))


@dataclasses.dataclass
class _Linear:
    weight: np.ndarray  # [in, out] integers (float64)
    scale: np.ndarray  # [out]
    bias: np.ndarray  # [out]

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> _Linear:
        q, s = quantize_rows(weight.detach().cpu().double().numpy())
        b = np.zeros(weight.shape[0]) if bias is None else bias.detach().cpu().double().numpy()
        return cls(np.ascontiguousarray(q.T), s.reshape(-1), b)

    def products(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [R, in] -> (exact integer products [R, out], row scales [R]): quantize_rows(x), then @."""
        q, s = np.empty_like(x), np.empty(len(x))
        kernels.quantize_rows(x, 2.0 ** -ACT_BITS, q, s)
        return _matmul(q, self.weight), s

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [R, in] -> [R, out]: products * (s * scale) + bias, two roundings per element."""
        out, s = self.products(x)
        kernels.affine_(out, s, self.scale, self.bias)
        return out


@dataclasses.dataclass
class _Linear8(_Linear):
    """exact-v2: weights |q| <= 127 (`weight`: int8), inputs |q| <= 2^14 as two int8 halves
    (module docstring)."""

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> _Linear8:
        w = weight.detach().cpu().double().numpy()
        scale = np.max(np.abs(w), axis=1) / INT8_WEIGHT_MAX
        scale[scale == 0] = 1.0
        q = np.round(w / scale[:, None])
        b = np.zeros(weight.shape[0]) if bias is None else bias.detach().cpu().double().numpy()
        return cls(np.ascontiguousarray(q.T, dtype=np.int8), scale, b)

    def products(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        R = len(x)
        halves, s = np.empty((2 * R, x.shape[1]), np.int8), np.empty(R)
        kernels.quantize_halves(x, 2.0 ** -INT8_ACT_BITS, halves, s)
        out = np.empty((R, self.weight.shape[1]))
        kernels.join_halves(_int8_matmul(halves, self.weight), out)
        return out, s


@dataclasses.dataclass
class _Norm:
    """Layer norm from integer sums: the input is quantized per row to |q| <= 2^NORM_BITS, the
    mean and variance come from n*sum(q^2) - sum(q)^2 (exact), then one sqrt and one division
    per row (`exactkernels.norm`)."""

    weight: np.ndarray
    bias: np.ndarray
    eps: float

    @classmethod
    def of(cls, ln: torch.nn.LayerNorm) -> _Norm:
        return cls(ln.weight.detach().cpu().double().numpy(), ln.bias.detach().cpu().double().numpy(), float(ln.eps))

    def __call__(self, x: np.ndarray, residual: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """norm(x + residual) [R, n]; `out` may be x."""
        n = x.shape[-1]
        out = np.empty_like(x) if out is None else out
        kernels.norm(x, residual, self.weight, self.bias, self.eps * n * n, 2.0 ** -NORM_BITS, out)
        return out


@dataclasses.dataclass
class _Layer:
    qkv: _Linear
    out: _Linear
    norm1: _Norm
    ff1: _Linear
    ff2: _Linear
    norm2: _Norm


@dataclasses.dataclass
class ExactState:
    """Per layer, buffers of quantized keys [B, H, Dh, capacity] (int32), their scales
    [B, H, capacity] and values on the grid [B, H, Dh, capacity] (int32); positions
    start..end-1 are live (the zero token first). A step writes
    in place, so a state is consumed by `step`/`run_known`: keep using the returned one."""

    keys: list[np.ndarray]
    key_scales: list[np.ndarray]
    values: list[np.ndarray]
    offset: int
    batch: int
    start: int = 0
    end: int = 1


class ExactLM:
    """A `LanguageModel`'s weights run in exact arithmetic (see the module docstring).

    Offers what the range coder's frame model uses (`entropy._FrameModel`): `cfg`, `device`,
    `init_state`, `step`, `run_known` and `known_chunk`. Probabilities are float32 multiples of
    2^-PROB_BITS.
    """

    def __init__(self, lm: LanguageModel, arithmetic: str = NAME) -> None:
        global kernels
        if kernels is None:
            from . import exactkernels
            kernels = exactkernels
        c = lm.cfg
        if c.dim > MAX_WIDTH or c.dim * c.hidden_scale > 4 * MAX_WIDTH or c.past_context > MAX_CONTEXT:
            raise ValueError(f"exact LM arithmetic supports widths up to {MAX_WIDTH} and contexts up to {MAX_CONTEXT}")
        if arithmetic not in (V1, V2):
            raise ValueError(f"unknown LM arithmetic {arithmetic!r}")
        self.source, self.cfg, self.arithmetic = lm, c, arithmetic
        self._linear = linear = _Linear8.of if arithmetic == V2 else _Linear.of
        self.device = torch.device("cpu")
        self.heads, self.head_dim = c.num_heads, c.dim // c.num_heads
        tables = np.stack([e.weight.detach().cpu().double().numpy() for e in lm.emb])  # [n_q, card + 1, D]
        top = float(np.abs(tables).max())
        exponent = 20 - (math.frexp(top)[1] if top > 0 else 0)  # one power-of-two grid: exact sums
        self.emb_scale, self.emb = 2.0 ** -exponent, np.round(tables * 2.0 ** exponent)
        self.norm_in = _Norm.of(lm.transformer.norm_in)
        self.layers = [_Layer(linear(ly.self_attn.in_proj_weight, ly.self_attn.in_proj_bias),
                              linear(ly.self_attn.out_proj.weight, ly.self_attn.out_proj.bias),
                              _Norm.of(ly.norm1), linear(ly.linear1.weight, ly.linear1.bias),
                              linear(ly.linear2.weight, ly.linear2.bias), _Norm.of(ly.norm2))
                       for ly in lm.transformer.layers]
        self._head_cache: dict[int, _Linear] = {}

    def _head(self, K: int) -> _Linear:
        """The first K output heads as one linear layer (quantized per output row: the same
        integers and scales as each head alone), made at the first use of K."""
        head = self._head_cache.get(K)
        if head is None:
            lm = self.source
            head = self._linear(torch.cat([lm.head_weight(k) for k in range(K)]),
                                torch.cat([lm.linears[k].bias for k in range(K)]))
            self._head_cache[K] = head
        return head

    # ------------------------------------------------------------- state
    def init_state(self, batch: int, steps: int | None = None) -> ExactState:
        """Fresh state for `batch` sequences; `steps`, if known, sizes the key/value buffers."""
        H, Dh = self.heads, self.head_dim
        room = 2 * (self.cfg.past_context + 1) + 64
        cap = min(room, steps + 1) if steps is not None else room
        state = ExactState([], [], [], 0, batch)
        for layer in self.layers:
            _, bk, bv = np.split(layer.qkv.bias, 3)  # the all-zero first token: keys/values are the biases
            kq, ks = quantize_rows(bk.reshape(H, Dh))
            vq = np.clip(np.round(bv * 2.0 ** VALUE_GRID), -VALUE_MAX, VALUE_MAX).reshape(H, Dh)
            keys, values = np.zeros((batch, H, Dh, cap), np.int32), np.zeros((batch, H, Dh, cap), np.int32)
            keys[..., 0], values[..., 0] = kq, vq
            scales = np.zeros((batch, H, cap))
            scales[..., 0] = ks[:, 0]
            state.keys.append(keys)
            state.key_scales.append(scales)
            state.values.append(values)
        return state

    @staticmethod
    def _make_room(state: ExactState, free: int) -> None:
        """At least `free` unused entries after `end`: move the live ones to the front, grow if need be."""
        cap = state.key_scales[0].shape[-1]
        if state.end + free <= cap:
            return
        live = state.end - state.start
        cap = max(cap, live + free)
        for buffers in (state.keys, state.key_scales, state.values):  # positions: the last axis
            for i, b in enumerate(buffers):
                new = np.zeros((*b.shape[:-1], cap), b.dtype)
                new[..., :live] = b[..., state.start: state.end]
                buffers[i] = new
        state.start, state.end = 0, live

    def known_chunk(self, batch: int, n_q: int) -> int:
        """Steps `run_known` should take at once (any number gives the same bits)."""
        per_step = max(1, batch) * n_q * self.cfg.card * 8  # the heads' float64 products
        return max(1, min(256, (64 << 20) // per_step))

    # ------------------------------------------------------------- the computation
    def _inputs(self, previous: np.ndarray, K: int) -> np.ndarray:
        """previous codes [R, K] (-1: none) -> normalised embedding sums [R, D]."""
        idx = np.maximum(previous + 1, 0)
        total = self.emb[0, idx[:, 0]]
        for k in range(1, K):
            total += self.emb[k, idx[:, k]]
        total *= self.emb_scale
        return self.norm_in(total, np.zeros_like(total), out=total)

    def _run(self, previous: np.ndarray, state: ExactState, K: int, out: np.ndarray) -> None:
        """previous codes [B, T, K] for T consecutive steps -> probabilities out [B, T, K, card].

        Attention (`exactkernels.attend`): query t is key old_end + t and sees keys
        old_end + t - past .. old_end + t; keys are quantized per head like matrix-product inputs,
        values rounded to the grid 2^-VALUE_GRID, scores exp-weighted with 2^ATTN_ONE for the largest.
        """
        B, T, _ = previous.shape
        H, Dh, past = self.heads, self.head_dim, self.cfg.past_context
        x = self._inputs(previous.reshape(B * T, K), K).reshape(B, T, -1)
        x += positions(self.cfg.dim, self.cfg.max_period, state.offset, T)
        x = x.reshape(B * T, -1)
        self._make_room(state, T)
        old_end, end = state.end, state.end + T
        lo = max(state.start, old_end - past)  # the first key any of these queries sees
        a = np.empty((B, T, H * Dh))
        for i, layer in enumerate(self.layers):
            kernels.attend(layer.qkv(x).reshape(B, T, 3, H, Dh), state.keys[i], state.key_scales[i],
                           state.values[i], old_end, lo, past, 1.0 / math.sqrt(Dh), _exp_ints(ATTN_ONE),
                           _LOG2E_UNITS, _MAX_UNITS, 2.0 ** VALUE_GRID, float(VALUE_MAX), 2.0 ** -VALUE_GRID, a)
            layer.norm1(x, layer.out(a.reshape(B * T, -1)), out=x)
            hidden = layer.ff1(x)
            kernels.gelu_(hidden, gelu_table(), GELU_STEP, GELU_RANGE * GELU_STEP)
            layer.norm2(x, layer.ff2(hidden), out=x)
        state.end, state.offset = end, state.offset + T
        state.start = max(state.start, end - (past + 1))  # what the next query can still see
        head = self._head(K)
        products, s = head.products(x)
        kernels.probs(products, s, head.scale, head.bias, K, _exp_ints(24), _LOG2E_UNITS, _MAX_UNITS,
                      2.0 ** PROB_BITS, out)  # exp weights at most 2^24: exact in float32

    def step(self, previous: torch.Tensor | None, state: ExactState, n_q: int,
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, ExactState]:
        """One frame: previous codes [B, K] (None at frame 0) -> probabilities [B, K, card]."""
        B = state.batch
        prev = np.full((B, n_q), -1, dtype=np.int64) if previous is None else previous.cpu().numpy()
        out = torch.empty(B, n_q, self.cfg.card) if out is None else out
        self._run(prev.reshape(B, 1, n_q).astype(np.int64), state, n_q, out.numpy()[:, None])
        return out, state

    def run_known(self, previous: torch.Tensor, state: ExactState, n_q: int, out: torch.Tensor) -> ExactState:
        """Several frames at once: previous codes [n, B, K] (-1: none) -> out [n, B, K, card]."""
        prev = np.ascontiguousarray(previous.cpu().numpy().astype(np.int64).transpose(1, 0, 2))
        self._run(prev, state, n_q, out.numpy().transpose(1, 0, 2, 3))
        return state


def exact(lm: tp.Any, arithmetic: str = NAME) -> ExactLM:
    """The runner of `lm` in `arithmetic`, made once per LM object (its weights must not change after)."""
    runners = lm.__dict__.setdefault("_exact", {})
    if arithmetic not in runners:
        runners[arithmetic] = ExactLM(lm, arithmetic)
    return runners[arithmetic]
