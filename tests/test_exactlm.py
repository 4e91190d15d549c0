"""Exact LM arithmetic: machine-independent probabilities, the same by stepping and in chunks,
for any batch composition and thread count, and close to the float32 LM's."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch

from _bitstream import lm_coded_file, skewed_codes, skewed_lm, tiny_codec24
from neucodec import container, ecdc, entropy, exactlm
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


@pytest.mark.parametrize("B, T, chunk, steps", [(5, 50, 7, 50), (1, 45, 45, None), (3, 30, 1, 10_000)])
def test_chunks_steps_batches_and_threads_give_the_same_bits(B: int, T: int, chunk: int, steps: int | None) -> None:
    ex = exactlm.ExactLM(_lm())
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


def test_probabilities_are_on_the_grid_and_close_to_the_float_lm() -> None:
    lm = _lm(past=262)
    codes = _codes(40, 3)
    p = _stepped(exactlm.ExactLM(lm), codes, None)
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
    assert {r.flags for r in records} <= {container.SEGMENT_PACKED, container.SEGMENT_LM_EXACT}
    assert container.SEGMENT_LM_EXACT in {r.flags for r in records}  # flags 2: unknown to 0.1.0 readers


def test_the_coder_round_trips_with_the_exact_lm() -> None:
    ex = exactlm.exact(skewed_lm(n_q=4))
    codes = skewed_codes(3, 4, 30)
    payload = entropy.lm_encode(ex, codes, span=12)
    assert len(payload) < len(entropy.pack(codes))
    assert torch.equal(entropy.lm_decode(ex, payload, 3, 4, 30, span=12), codes)
    assert exactlm.exact(ex_lm := skewed_lm(n_q=4)) is exactlm.exact(ex_lm)  # made once per LM
    records = [(container.SEGMENT_LM_EXACT, payload, (3, 4, 30), "s")]
    assert torch.equal(entropy.decode_segments(records, ex.source, span=12)[0], codes)
