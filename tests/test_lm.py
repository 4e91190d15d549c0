"""Streaming LM: sized key/value buffers give `step`'s probabilities bit for bit."""
from __future__ import annotations

import typing as tp

import pytest
import torch

from neucodec.config import LMConfig
from neucodec.entropy import lm_threads
from neucodec.lm import LanguageModel


@pytest.fixture(autouse=True)
def _one_thread() -> tp.Iterator[None]:
    """The LM's thread count when it codes (`LM_THREADS`). With 2 threads `step` is not batch-size
    independent (measured: rows 8-9 of batches of 9 or 10 sequences of this LM differ from 1 thread
    and from larger batches)."""
    with lm_threads(1):
        yield


def _lm(past: int = 262, seed: int = 0) -> LanguageModel:
    """Head size 25, like the paper's LM: the attention kernel's results depend on memory alignment."""
    torch.manual_seed(seed)
    return LanguageModel(LMConfig(n_q=4, dim=50, num_heads=2, num_layers=2, past_context=past)).eval()


def _codes(T: int, B: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (T, B, 4), generator=torch.Generator().manual_seed(seed))


def _stepped(lm: LanguageModel, codes: torch.Tensor, steps: int | None) -> torch.Tensor:
    """Probabilities [T, B, K, card] of `step` fed codes[t - 1] (None at t = 0)."""
    T, B, K = codes.shape
    state = lm.init_state(B, steps)
    out = []
    for t in range(T):
        probs, state = lm.step(None if t == 0 else codes[t - 1], state, K)
        out.append(probs)
    return torch.stack(out)


def test_sized_buffers_keep_the_probabilities() -> None:
    lm = _lm()
    codes = _codes(12, 9)
    assert torch.equal(_stepped(lm, codes, 12), _stepped(lm, codes, None))
    assert lm.init_state(9, 12).keys[0].shape[2] % 16 == lm.init_state(9).keys[0].shape[2] % 16
    state = lm.init_state(2, 1)
    lm.step(None, state, 4)
    with pytest.raises(ValueError, match="made for 1 steps"):  # a sized state never moves its window
        lm.step(codes[0, :2], state, 4)


def test_a_sequence_gets_the_same_probabilities_in_any_batch() -> None:
    """What decoding the float32 LM's segments (files of neucodec 0.1.0) relies on: from
    `ROW_BLOCK` rows on, a row's results do not depend on the other rows."""
    lm = _lm()
    codes = _codes(10, 5)
    assert torch.equal(_stepped(lm, codes, 10)[:, :1], _stepped(lm, codes[:, :1], 10))
