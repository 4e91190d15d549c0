"""Exact LM arithmetic: machine-independent probabilities, the same by stepping and in chunks,
for any batch composition and thread count, and close to the float32 LM's."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch

from _bitstream import lm_coded_file, skewed_codes, skewed_lm, tiny_codec24
from neucodec import container, ecdc, entropy, exactlm, packing
from neucodec import exactkernels as kernels
from neucodec.config import LMConfig
from neucodec.lm import LanguageModel, sin_embedding


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<f8").tobytes()).hexdigest()[:16]


def test_tables_are_pinned() -> None:
    """Built from correctly rounded IEEE operations and decimal arithmetic: the same bits on every
    machine. A change here changes every exact-v1 file's probabilities: it needs a new arithmetic name."""
    assert _sha(exactlm.exp2_table()) == "2f5f3c934bfa8e47"
    assert _sha(exactlm.gelu_table()) == "5b4fd9b0f217414f"
    assert _sha(exactlm.positions(200, 10000.0, 0, 300)) == "18ecaf78d78d4e25"


def test_tables_are_close_to_the_functions() -> None:
    x = torch.linspace(-7, 7, 2001, dtype=torch.float64)
    assert np.abs(exactlm._gelu(x.numpy()) - torch.nn.functional.gelu(x).numpy()).max() < 1e-5
    pos = sin_embedding(torch.arange(300, dtype=torch.float64).view(1, -1, 1), 200).view(300, 200)
    assert np.abs(exactlm.positions(200, 10000.0, 0, 300) - pos.numpy()).max() < 1e-4  # float32 phases there
    w = exactlm.exp_weights(np.array([[0.0, -1.0, -10.0, -np.inf]]), 20)
    assert w[0, 0] == 1 << 20 and w[0, 3] == 0
    assert np.allclose(w[0, :3] / 2.0 ** 20, np.exp([0.0, -1.0, -10.0]), rtol=1e-3, atol=2e-6)


def _lm(past: int = 20, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(LMConfig(n_q=4, dim=50, num_heads=2, num_layers=2, past_context=past)).eval()


def _codes(T: int, B: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (T, B, 4), generator=torch.Generator().manual_seed(seed))


def _stepped(ex: exactlm.ExactLM, codes: torch.Tensor, steps: int | None) -> torch.Tensor:
    T, B, K = codes.shape
    state = ex.init_state(B, steps)
    return torch.stack([ex.step(None if t == 0 else codes[t - 1], state, K)[0] for t in range(T)])


def _known(ex: exactlm.ExactLM, codes: torch.Tensor, chunk: int, steps: int | None) -> torch.Tensor:
    T, B, K = codes.shape
    previous = torch.cat([torch.full_like(codes[:1], -1), codes[:-1]])
    out = torch.empty(T, B, K, 1024)
    state = ex.init_state(B, steps)
    for t in range(0, T, chunk):
        state = ex.run_known(previous[t: t + chunk], state, K, out[t: t + chunk])
    return out


ARITHMETICS = pytest.mark.parametrize("arithmetic", [exactlm.V1, exactlm.V2])


@ARITHMETICS
@pytest.mark.parametrize("B, T, chunk, steps", [(5, 50, 7, 50), (1, 45, 45, None), (3, 30, 1, 10_000)])
def test_chunks_steps_batches_and_threads_give_the_same_bits(B: int, T: int, chunk: int, steps: int | None,
                                                             arithmetic: str) -> None:
    ex = exactlm.ExactLM(_lm(), arithmetic)
    codes = _codes(T, B, seed=B)
    stepped = _stepped(ex, codes, steps)
    assert torch.equal(_known(ex, codes, chunk, steps), stepped)  # past the context of 20: the window slides
    assert torch.equal(_stepped(ex, codes[:, -1:], None)[:, 0], stepped[:, -1])  # a sequence alone
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(_known(ex, codes, T, None), stepped)
    finally:
        torch.set_num_threads(old)


@ARITHMETICS
def test_probabilities_are_on_the_grid_and_close_to_the_float_lm(arithmetic: str) -> None:
    lm = _lm(past=262)
    codes = _codes(40, 3)
    p = _stepped(exactlm.ExactLM(lm, arithmetic), codes, None)
    units = p.double() * 2 ** exactlm.PROB_BITS
    assert torch.equal(units, units.round()) and float(units.min()) >= 1
    with torch.no_grad():
        logits = lm(codes.permute(1, 2, 0))  # [B, K, T, card]
    ref = logits.softmax(-1).permute(2, 0, 1, 3)
    assert float((p - ref).abs().max()) < 2e-3
    picked = codes.unsqueeze(-1)
    bits_exact = -p.gather(-1, picked).double().log2().sum()
    bits_float = -ref.gather(-1, picked).double().log2().sum()
    assert abs(float(bits_exact / bits_float) - 1) < 2e-3


def test_files_name_their_arithmetic_and_old_readers_would_refuse_them() -> None:
    codec, lm = tiny_codec24(), skewed_lm()
    data = lm_coded_file(codec, lm)
    info, _ = ecdc.decode_bytes(data, codec, lm)
    assert info.coder is not None and info.coder["arithmetic"] == exactlm.NAME and info.lm_segments > 0
    fo = io.BytesIO(data)
    records = list(container.ContainerReader(fo, container.read_prelude(fo)))
    assert exactlm.NAME == exactlm.V2 and {r.flags for r in records} <= {container.SEGMENT_PACKED, 3}
    assert 3 in {r.flags for r in records}  # flags 3 (exact-v2): unknown to neucodec 0.2.0, which asks for an upgrade


@ARITHMETICS
def test_the_coder_round_trips_with_the_exact_lm(arithmetic: str) -> None:
    ex = exactlm.exact(skewed_lm(n_q=4), arithmetic)
    codes = skewed_codes(3, 4, 30)
    payload = entropy.lm_encode(ex, codes, span=12)
    assert len(payload) < len(packing.pack(codes))
    assert torch.equal(entropy.lm_decode(ex, payload, 3, 4, 30, span=12), codes)
    assert exactlm.exact(ex_lm := skewed_lm(n_q=4), arithmetic) is exactlm.exact(ex_lm, arithmetic)  # once per LM
    flags = container.ARITHMETIC_FLAGS[arithmetic]
    assert entropy.encode_segments([codes], ex, span=12)[0].flags == flags
    records = [(flags, payload, (3, 4, 30), "s")]
    assert torch.equal(entropy.decode_segments(records, ex.source, span=12)[0], codes)  # the flags pick the arithmetic
    other = container.ARITHMETIC_FLAGS[exactlm.V1 if arithmetic == exactlm.V2 else exactlm.V2]
    assert not torch.equal(entropy.decode_segments([(other, payload, (3, 4, 30), "s")], ex.source, span=12)[0], codes)


def test_the_two_arithmetics_code_real_sized_layers_alike() -> None:
    """exact-v2's int8 products are the exact products of its integers, with `torch._int_mm` or
    without it, and its probabilities stay within rounding noise of exact-v1's."""
    lm = _lm(past=262)
    v1, v2 = exactlm.ExactLM(lm, exactlm.V1), exactlm.ExactLM(lm, exactlm.V2)
    lin = v2.layers[0].ff1
    x = _rows(9, R=6, n=50)
    products, s = lin.products(x)
    q, s_ref = exactlm.quantize_rows(x, exactlm.INT8_ACT_BITS)
    assert lin.weight.dtype == np.int8 and np.abs(lin.weight).max() == exactlm.INT8_WEIGHT_MAX
    assert np.array_equal(products, q @ lin.weight.astype(np.float64)) and np.array_equal(s, s_ref[:, 0])
    works = exactlm._int_mm_works
    try:
        exactlm._int_mm_works = lambda: False  # type: ignore[assignment]  # a torch without int8 products
        assert np.array_equal(lin.products(x)[0], products)
    finally:
        exactlm._int_mm_works = works  # type: ignore[assignment]
    codes = _codes(40, 3)
    p1, p2 = _stepped(v1, codes, None), _stepped(v2, codes, None)
    assert not torch.equal(p1, p2) and float((p1 - p2).abs().max()) < 1e-3
    with pytest.raises(ValueError, match="arithmetic"):
        exactlm.ExactLM(lm, "exact-v9")



def test_segment_groups_run_side_by_side_with_the_same_bits() -> None:
    """Exact-LM groups run on one Python thread per torch thread: the payloads and the decoded
    codes do not depend on it (the float32 LM keeps one group at a time)."""
    ex = exactlm.exact(skewed_lm(n_q=4))
    items = [skewed_codes(2, 4, 30, seed=i) for i in range(3)]
    shapes = [tuple(c.shape) for c in items]
    assert entropy._groups(shapes, 12, workers=2) == [[0, 1], [2]]  # 6 + 6 rows, then 6: half of 18
    assert entropy._groups(shapes, 12) == [[0, 1, 2]]
    assert entropy._workers(ex.source) == 1
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = entropy.encode_segments(items, ex, span=12)
        torch.set_num_threads(2)
        assert entropy._workers(ex) == 2
        assert entropy.encode_segments(items, ex, span=12) == alone
        assert torch.get_num_threads() == 2  # the caller's count is restored
        assert all(c.flags == container.ARITHMETIC_FLAGS[exactlm.NAME] for c in alone)
        records = [(c.flags, c.payload, s, f"segment {i}") for i, (c, s) in enumerate(zip(alone, shapes))]
        assert all(torch.equal(a, b) for a, b in zip(entropy.decode_segments(records, ex, span=12), items))
        records[2] = (records[2][0], records[2][1][:4], records[2][2], records[2][3])  # the second group's
        back = entropy.decode_segments(records, ex, span=12)  # damage stays in its segment (the CRC reports it)
        assert torch.equal(back[0], items[0]) and torch.equal(back[1], items[1]) and not torch.equal(back[2], items[2])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


# ---- the compiled kernels against the numpy expressions they implement, bit for bit
def _rows(seed: int, R: int = 7, n: int = 50) -> np.ndarray:
    """Random rows with the awkward cases: a zero row, a row of exact halves (ties of the
    rounding), huge and tiny magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(R, n)) * np.exp(rng.normal(size=(R, 1)) * 5)
    x[0] = 0.0
    x[1] = rng.integers(-2 ** 15, 2 ** 15, size=n) + 0.5
    x[1, 0] = 2 ** 15  # scale 1: x / scale are the halves themselves
    return x


def test_quantize_and_affine_kernels() -> None:
    x = _rows(0)
    q, s = np.empty_like(x), np.empty(len(x))
    kernels.quantize_rows(x, 2.0 ** -exactlm.ACT_BITS, q, s)
    q_ref, s_ref = exactlm.quantize_rows(x)
    assert np.array_equal(q, q_ref) and np.array_equal(s, s_ref[:, 0])
    rng = np.random.default_rng(1)
    scale, bias = rng.normal(size=50) * 1e-5, rng.normal(size=50)
    ref = q * (s[:, None] * scale) + bias
    kernels.affine_(q, s, scale, bias)
    assert np.array_equal(q, ref)


def test_int8_halves_kernels() -> None:
    x = _rows(0)
    x[2, :3] = [1.0, -1.0, 0.99998]  # the extremes +-2^14 and a value just below
    halves, s = np.empty((2 * len(x), x.shape[1]), np.int8), np.empty(len(x))
    kernels.quantize_halves(x, 2.0 ** -exactlm.INT8_ACT_BITS, halves, s)
    q, s_ref = exactlm.quantize_rows(x, exactlm.INT8_ACT_BITS)
    hi, lo = halves[: len(x)].astype(np.int64), halves[len(x):].astype(np.int64)
    assert np.array_equal(256 * hi + lo, q) and np.array_equal(s, s_ref[:, 0])
    assert lo.min() >= -128 and lo.max() <= 127 and np.abs(hi).max() == 64
    acc = np.random.default_rng(3).integers(-2 ** 31, 2 ** 31, size=(2 * len(x), 9)).astype(np.int32)
    out = np.empty((len(x), 9))
    kernels.join_halves(acc, out)
    assert np.array_equal(out, 256.0 * acc[: len(x)] + acc[len(x):])


def test_norm_and_gelu_kernels() -> None:
    x, y = _rows(2), _rows(3)[::-1].copy()
    rng = np.random.default_rng(4)
    weight, bias, eps = rng.normal(size=50), rng.normal(size=50), 1e-5
    n = x.shape[1]
    q, s = exactlm.quantize_rows(x + y, exactlm.NORM_BITS)
    s1 = q.sum(-1, keepdims=True)
    den = np.sqrt(n * np.einsum("...i,...i->...", q, q)[..., None] - s1 * s1 + (eps * n * n) / (s * s))
    ref = (n * q - s1) / den * weight + bias
    out = np.empty_like(x)
    kernels.norm(x, y, weight, bias, eps * n * n, 2.0 ** -exactlm.NORM_BITS, out)
    assert np.array_equal(out, ref)
    g = np.concatenate([_rows(5) * 1e-3, _rows(6), np.linspace(-7, 7, 50)[None]])
    ref = exactlm._gelu(g)
    kernels.gelu_(g, exactlm.gelu_table(), exactlm.GELU_STEP, exactlm.GELU_RANGE * exactlm.GELU_STEP)
    assert np.array_equal(g, ref)


def test_probs_kernel() -> None:
    rng = np.random.default_rng(7)
    R, K, card = 3, 2, 1024
    acc = np.round(rng.normal(size=(R, K * card)) * 2 ** 20)
    s, scale = np.abs(rng.normal(size=R)) * 1e-5, np.abs(rng.normal(size=K * card)) * 1e-3
    bias = rng.normal(size=K * card)
    bias[:5] = 40.0  # rows dominated by a few symbols: many weights floored to one unit
    logits = (acc * (s[:, None] * scale) + bias).reshape(R, K, card)
    w = exactlm.exp_weights(logits, 24)
    p = w.astype(np.float32) * (2.0 ** 20 / w.sum(-1, keepdims=True, dtype=np.int64)).astype(np.float32)
    ref = np.maximum(np.floor(p), np.float32(1)) * np.float32(2.0 ** -20)
    out = np.empty((R, 1, K, card), np.float32)
    kernels.probs(acc, s, scale, bias, K, exactlm._exp_ints(24), exactlm._LOG2E_UNITS, exactlm._MAX_UNITS,
                  2.0 ** 20, out)
    assert np.array_equal(out[:, 0], ref)


def test_attend_kernel() -> None:
    """Against the attention written with numpy: scores of all keys, the masked ones -inf."""
    rng = np.random.default_rng(8)
    B, T, H, Dh, old_end, lo, past = 2, 5, 3, 7, 9, 2, 6
    cap = old_end + T
    qkv = rng.normal(size=(B, T, 3, H, Dh)) * 3
    keys = np.round(rng.normal(size=(B, H, Dh, cap)) * 2 ** 14).astype(np.int32)
    scales = np.abs(rng.normal(size=(B, H, cap))) * 1e-4
    values = np.round(rng.normal(size=(B, H, Dh, cap)) * 2 ** 12).astype(np.int32)
    out = np.empty((B, T, H * Dh))
    kernels.attend(qkv, keys, scales, values, old_end, lo, past, 1 / np.sqrt(Dh), exactlm._exp_ints(20),
                   exactlm._LOG2E_UNITS, exactlm._MAX_UNITS, 2.0 ** 12, float(exactlm.VALUE_MAX), 2.0 ** -12, out)
    kq, ks = exactlm.quantize_rows(qkv[:, :, 1].transpose(0, 2, 1, 3))  # [B, H, T, Dh]
    assert np.array_equal(keys[..., old_end:], kq.swapaxes(-1, -2))
    assert np.array_equal(scales[..., old_end:], ks[..., 0])
    v = np.clip(np.round(qkv[:, :, 2].transpose(0, 2, 1, 3) * 2.0 ** 12), -exactlm.VALUE_MAX, exactlm.VALUE_MAX)
    assert np.array_equal(values[..., old_end:], v.swapaxes(-1, -2))
    qq, qs = exactlm.quantize_rows(qkv[:, :, 0].transpose(0, 2, 1, 3))
    scores = qq @ keys[..., lo:].astype(np.float64)
    scores *= qs * scales[:, :, None, lo:]
    scores *= 1 / np.sqrt(Dh)
    q_pos, k_pos = np.arange(T)[:, None] + old_end, np.arange(lo, cap)[None]
    scores[..., (k_pos > q_pos) | (k_pos < q_pos - past)] = -np.inf
    w = exactlm.exp_weights(scores, 20)
    ref = w.astype(np.float64) @ values[..., lo:].swapaxes(-1, -2).astype(np.float64)
    ref /= w.sum(-1, keepdims=True, dtype=np.int64)
    ref *= 2.0 ** -12
    assert np.array_equal(out, ref.transpose(0, 2, 1, 3).reshape(B, T, H * Dh))
