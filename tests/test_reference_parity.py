"""Parity with the reference implementation (encodec 0.1.1) on identical random weights."""
from __future__ import annotations

import pytest
import torch

from neucodec import config as cfg
from neucodec.lm import LanguageModel
from neucodec.model import Codec
from reference import import_encodec, randomize, reference_codec

# 53,760 samples makes 0.1.1's float frame count wrong (encodec#35); 1 and 100 are sub-frame
LENGTHS = [1, 100, 53760]  # at 48 kHz, 53,760 samples also make two overlapping segments


@pytest.fixture(scope="module", params=["encodec_24khz", "encodec_48khz"])
def pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, Codec]:
    ref = reference_codec(request.param)
    ours = Codec(cfg.OFFICIAL[request.param]())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.prepare_for_inference()


def test_codes_and_audio_match_reference(pair: tuple[torch.nn.Module, Codec]) -> None:
    ref, ours = pair
    c = ours.config
    torch.manual_seed(1)
    for length in LENGTHS:
        wav = 0.1 * torch.randn(1, c.channels, length)
        for bw in c.bandwidths:
            ref.set_target_bandwidth(bw)
            with torch.no_grad():
                frames = ref.encode(wav)
                expected_audio = ref.decode(frames)[..., :length]
            enc = ours.encode(wav, bw)
            expected_codes = torch.cat([f[0] for f in frames], dim=-1)
            assert torch.equal(enc.codes, expected_codes), (length, bw)
            if c.normalize:
                expected_scales = torch.cat([f[1] for f in frames], dim=-1)
                assert torch.equal(enc.scales, expected_scales)
            audio = ours.decode(enc)
            assert audio.shape == wav.shape
            assert (audio - expected_audio).abs().max() < 1e-4, (length, bw)


def test_batch_of_signals_matches_one_by_one(pair: tuple[torch.nn.Module, Codec]) -> None:
    _, ours = pair
    c = ours.config
    wav = 0.1 * torch.randn(3, c.channels, 30000)
    together = ours.encode(wav, c.bandwidths[1])
    for i in range(3):
        alone = ours.encode(wav[i: i + 1], c.bandwidths[1])
        assert torch.equal(together.codes[i: i + 1], alone.codes)


def test_lm_probabilities_match_reference() -> None:
    encodec = import_encodec()
    from encodec.model import LMModel

    for n_q, frame_rate in ((32, 75), (16, 150)):
        ref = randomize(LMModel(n_q, 1024, num_layers=5, dim=200, past_context=int(3.5 * frame_rate)), seed=n_q)
        ours = LanguageModel(cfg.LMConfig(n_q=n_q, past_context=int(3.5 * frame_rate)))
        ours.load_state_dict(ref.state_dict(), strict=True)
        ours.eval()
        g = torch.Generator().manual_seed(0)
        for K in (2, n_q):
            codes = torch.randint(0, 1024, (2, K, 6), generator=g)
            states, offset, state = None, 0, ours.init_state(2)
            inp = torch.zeros(2, K, 1, dtype=torch.long)
            teacher = torch.softmax(ours(codes), dim=-1)  # [B, K, T, card]
            for t in range(codes.shape[-1]):
                with torch.no_grad():
                    probs, states, offset = ref(inp, states, offset)  # [B, card, K, 1]
                inp = 1 + codes[:, :, t: t + 1]
                expected = probs[..., 0].transpose(1, 2)
                mine, state = ours.step(None if t == 0 else codes[:, :, t - 1], state, K)
                assert (mine - expected).abs().max() < 1e-6, (n_q, K, t)
                assert (teacher[:, :, t] - expected).abs().max() < 1e-6
    assert encodec is not None
