"""Entropy coding: LM range coding (batched, thread- and batch-independent), fallback to packing,
and the segments of the float32 LM (files of neucodec 0.1.0)."""
from __future__ import annotations

import constriction
import numpy as np
import pytest
import torch

from _bitstream import skewed_codes, skewed_lm
from neucodec import container, entropy, exactlm, packing
from neucodec.errors import CorruptStream


def test_lm_round_trip_threads_and_batching() -> None:
    lm = exactlm.exact(skewed_lm())
    codes = skewed_codes(2, 8, 60)
    other = skewed_codes(1, 8, 25, seed=1)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        payloads = entropy.lm_encode_many(lm, [codes, other])
        torch.set_num_threads(1)
        # decode each alone and together: same codes (batch composition does not matter)
        assert torch.equal(entropy.lm_decode(lm, payloads[0], 2, 8, 60), codes)
        assert torch.equal(entropy.lm_decode(lm, payloads[1], 1, 8, 25), other)
        both = entropy.lm_decode_many(lm, payloads, [(2, 8, 60), (1, 8, 25)])
        assert torch.equal(both[0], codes) and torch.equal(both[1], other)
        assert entropy.lm_encode(lm, codes, 8) == payloads[0]
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old
    assert len(payloads[0]) < len(packing.pack(codes)) / 2


def test_encode_segments_chooses_and_falls_back() -> None:
    lm = exactlm.exact(skewed_lm())
    good = skewed_codes(1, 8, 40)
    uniform = torch.randint(0, 1024, (1, 8, 40))
    coded = entropy.encode_segments([good, uniform], lm)
    assert coded[0].flags == container.ARITHMETIC_FLAGS[exactlm.NAME]
    assert coded[1].flags == container.SEGMENT_PACKED  # LM would not beat packing
    back = entropy.decode_segments([(c.flags, c.payload, (1, 8, 40), "s") for c in coded], lm)
    assert torch.equal(back[0], good) and torch.equal(back[1], uniform)


def test_encode_segments_falls_back_when_verification_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = exactlm.exact(skewed_lm())
    good = skewed_codes(1, 8, 40)
    real = entropy.lm_decode_many

    def broken(*args: object, **kw: object) -> list[torch.Tensor]:
        return [c + 1 for c in real(*args, **kw)]  # type: ignore[arg-type]

    monkeypatch.setattr(entropy, "lm_decode_many", broken)
    assert entropy.encode_segments([good], lm)[0].flags == container.SEGMENT_PACKED


def test_verify_decodes_with_the_encoders_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = exactlm.exact(skewed_lm())
    items = [skewed_codes(2, 8, 30, seed=s) for s in range(3)]
    tables: list[np.ndarray] = []
    payloads = entropy.lm_encode_many(lm, items, span=7, tables=tables)
    assert len(tables) == 7 and tables[0].shape == (2 * 5 * 3 * 8, 1024) and tables[0].dtype == np.float32
    shapes = [tuple(c.shape) for c in items]
    replayed = entropy.lm_decode_many(lm, payloads, shapes, span=7, tables=tables)
    real = entropy.lm_decode_many(lm, payloads, shapes, span=7)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(replayed, real, items))
    try:  # other tables do not give back the codes
        bad = entropy.lm_decode_many(lm, payloads, shapes, span=7, tables=tables[1:] + tables[:1])
        assert not all(torch.equal(a, c) for a, c in zip(bad, items))
    except CorruptStream:
        pass
    grouped = entropy.encode_segments(items, lm, span=7)
    monkeypatch.setattr(entropy, "VERIFY_TABLE_BYTES", 2 * 4 * 7 * 10 * 8 * 1024)  # two segments per group
    assert entropy._groups(shapes, 7, 1024) == [[0, 1], [2]]
    assert entropy.encode_segments(items, lm, span=7) == grouped
    monkeypatch.setattr(entropy, "VERIFY_TABLE_BYTES", 0)  # every segment alone, checked by running the LM
    assert entropy.encode_segments(items, lm, span=7) == grouped
    flags = container.ARITHMETIC_FLAGS[exactlm.NAME]
    assert all(c.flags == flags and c.payload == p for c, p in zip(grouped, payloads))
    monkeypatch.setattr(entropy, "LM_ROWS", 20)  # decoding in LM runs of at most 20 rows
    assert entropy._groups(shapes, 7) == [[0, 1], [2]]
    records = [(c.flags, c.payload, s, "s") for c, s in zip(grouped, shapes)]
    assert all(torch.equal(a, b) for a, b in zip(entropy.decode_segments(records, lm, span=7), items))


def test_lm_span() -> None:
    assert entropy.lm_span(750, 262, 75) == 75  # 10 s segments at 24 kHz: ten 1 s spans
    assert entropy.lm_span(760, 262, 75) == 70  # eleven equal spans rather than ten of 75 and one of 10
    assert entropy.lm_span(30, 262, 75) == 30
    assert entropy.lm_span(150, 525, 150) == 150  # 48 kHz: one span per 1 s segment
    assert entropy.lm_span(900, 20, 75) == 20  # never beyond the LM's context
    assert entropy.lm_span(4500, 262, 75) == 141  # 60 s segments: 32 spans (LM_ROWS), not 60


def test_lm_decode_garbage_is_corrupt_stream() -> None:
    lm = skewed_lm()
    with pytest.raises(CorruptStream, match="32-bit words"):
        entropy.lm_decode(lm, b"abc", 1, 8, 10)
    rng = np.random.default_rng(0)
    for _ in range(5):
        try:
            entropy.lm_decode(lm, rng.bytes(8), 1, 8, 10)
        except CorruptStream:
            pass


def test_range_coder_panic_falls_back_to_packing() -> None:
    """Codes (a 10 s effects clip at 12 kbps, model of neucodec 0.1.0, 2026-11-25) on which
    constriction's leaky Categorical panicked inside that LM's coding (a Rust PanicException, not an
    Exception). The writer must store such a segment packed, never crash; with the shipped LM in
    exact arithmetic the panic may not occur, and the segment must then round-trip."""
    from pathlib import Path

    from neucodec.hub import load_lm

    codes = torch.from_numpy(np.load(Path(__file__).parent / "data/codes_panic_12kbps.npz")["codes"].astype(np.int64))
    lm = load_lm("neucodec_24khz")
    span = entropy.lm_span(codes.shape[-1], lm.cfg.past_context, 75)
    out = entropy.encode_segments([codes], exactlm.exact(lm), span=span)
    records = [(o.flags, o.payload, tuple(codes.shape), "segment 0") for o in out]
    back = entropy.decode_segments(records, lm, span=span)
    assert torch.equal(back[0], codes)


def test_only_the_exact_lm_codes_segments() -> None:
    with pytest.raises(TypeError, match="exact arithmetic"):
        entropy.encode_segments([skewed_codes(1, 8, 10)], skewed_lm())  # type: ignore[arg-type]


def test_segments_of_the_float32_lm_still_decode() -> None:
    """Flags 1 (files of neucodec 0.1.0): the float32 LM stepped frame by frame, probabilities
    floored to the grid, one range coder per segment. Coded here by hand, as that writer did."""
    lm = skewed_lm()
    codes = skewed_codes(1, 8, 30)
    encoder = constriction.stream.queue.RangeEncoder()
    family = constriction.stream.model.Categorical(perfect=False)
    with entropy.lm_threads(1):
        state = lm.init_state(1, 30)
        for t in range(30):
            probs, state = lm.step(None if t == 0 else codes[:, :, t - 1], state, 8)
            probs = (probs.float() / entropy.PROB_GRID).floor() * entropy.PROB_GRID
            encoder.encode(codes[0, :, t].numpy().astype(np.int32), family,
                           np.ascontiguousarray(probs.reshape(8, -1).numpy(), dtype=np.float32))
    payload = encoder.get_compressed().astype("<u4").tobytes()
    records = [(container.SEGMENT_LM, payload, (1, 8, 30), "segment 0")]
    assert torch.equal(entropy.decode_segments(records, lm)[0], codes)
    with pytest.raises(CorruptStream, match="segment 0: LM-coded but no LM"):
        entropy.decode_segments(records, None)
