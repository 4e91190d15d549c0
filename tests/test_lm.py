"""Streaming LM: sized key/value buffers and `run_known` give `step`'s probabilities bit for bit."""
from __future__ import annotations

import typing as tp

import pytest
import torch

from neucodec.config import LMConfig
from neucodec.entropy import lm_threads
from neucodec.lm import LanguageModel


@pytest.fixture(autouse=True)
def _one_thread() -> tp.Iterator[None]:
    """The LM's thread count when it codes (`LM_THREADS`). With 2 threads `step` itself is not
    batch-size independent (measured: rows 8-9 of batches of 9 or 10 sequences of this LM differ
    from 1 thread and from larger batches); `run_known` then finds it differs and keeps stepping."""
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


@pytest.mark.parametrize("B, T, chunk, past", [
    (9, 40, 16, 262),  # chunks of 16, 16, 8
    (3, 50, 7, 20),  # fewer sequences than ROW_BLOCK; the window slides and moves
    (1, 45, 45, 20),  # one call across the buffer's end
])
def test_run_known_matches_step(B: int, T: int, chunk: int, past: int) -> None:
    lm = _lm(past)
    codes = _codes(T, B, seed=B)
    expected = _stepped(lm, codes, T)
    previous = torch.cat([torch.full_like(codes[:1], -1), codes[:-1]])  # -1: no previous frame
    out = torch.empty_like(expected)
    state = lm.init_state(B, T)
    for t in range(0, T, chunk):
        state = lm.run_known(previous[t: t + chunk], state, 4, out[t: t + chunk])
    assert torch.equal(out, expected)
    assert state.offset == T
    # whether the chunked path was found exact (and used) depends on this machine's kernels: on a
    # second Xeon it was not for 6-7 sequences; either way the probabilities are the step's


def test_run_known_keeps_stepping_where_it_would_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = _lm()
    real = LanguageModel._known_chunk

    def off(self: LanguageModel, previous: torch.Tensor, state: object, n_q: int, out: torch.Tensor) -> None:
        real(self, previous, state, n_q, out)  # type: ignore[arg-type]
        out.mul_(1 + 2 ** -20)

    monkeypatch.setattr(LanguageModel, "_known_chunk", off)
    codes = _codes(30, 9)
    previous = torch.cat([torch.full_like(codes[:1], -1), codes[:-1]])
    out = torch.empty(30, 9, 4, 1024)
    state = lm.init_state(9, 30)
    for t in range(0, 30, 10):
        state = lm.run_known(previous[t: t + 10], state, 4, out[t: t + 10])
    assert torch.equal(out, _stepped(lm, codes, 30))
    assert list(lm._known_matches_step.values()) == [False]
