"""Version-0 files written by the reference encodec package (no LM) decode to the reference's codes/audio."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from _bitstream import tiny_codec24, tiny_codec48
from neucodec import config, ecdc
from neucodec.errors import CorruptStream, ModelMismatch, UnsupportedFormatVersion
from neucodec.model import Codec

sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
encodec = pytest.importorskip("encodec")
from encodec.compress import compress  # noqa: E402
from encodec.model import EncodecModel  # noqa: E402


def pair(name: str) -> tuple[EncodecModel, Codec]:
    torch.manual_seed(0)
    ref = getattr(EncodecModel, f"encodec_model_{name[8:]}")(pretrained=False)
    ref.name = name  # pretrained=False leaves it "unset"; compress() refuses that
    ref.eval()
    ours = Codec(config.OFFICIAL[name]())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.prepare_for_inference()


@pytest.mark.parametrize("name,bw,T", [("encodec_24khz", 6.0, 24000 + 77), ("encodec_48khz", 6.0, 48000 + 500)])
def test_reference_v0_decodes(name: str, bw: float, T: int) -> None:
    ref, ours = pair(name)
    ref.set_target_bandwidth(bw)
    wav = 0.1 * torch.randn(ref.channels, T)
    data = compress(ref, wav, use_lm=False)
    info, audio = ecdc.decode_bytes(data, ours)
    assert info.format_version == 0 and info.length == T and info.n_q == ours.n_q_for_bandwidth(bw)
    with torch.no_grad():
        frames = ref.encode(wav[None])
        expected = ref.decode(frames)[0, :, :T]
    assert audio.shape == (1, ref.channels, T)
    assert torch.allclose(audio[0], expected, atol=1e-4), (audio[0] - expected).abs().max()
    # the codes themselves: re-encoding with our codec gives the reference's codes
    ours_codes = ours.encode(wav[None], bw).codes
    assert torch.equal(ours_codes, torch.cat([f[0] for f in frames], -1))
    # truncation and wrong model are one-line errors
    with pytest.raises(CorruptStream, match="truncated"):
        ecdc.decode_bytes(data[:-3], ours)
    other = tiny_codec48() if name == "encodec_24khz" else tiny_codec24()
    with pytest.raises(ModelMismatch, match=name):
        ecdc.decode_bytes(data, other)


def test_v0_lm_files_are_refused_clearly() -> None:
    from neucodec.container import v0_header_bytes

    data = v0_header_bytes({"m": "encodec_24khz", "al": 100, "nc": 8, "lm": True}) + b"\0" * 10
    with pytest.raises(UnsupportedFormatVersion, match="lm: true"):
        ecdc.decode_bytes(data, Codec(config.encodec_24khz()))
    for bad in ({"m": "x", "al": 1, "nc": 1, "lm": False}, {"m": "encodec_24khz", "al": -1, "nc": 8, "lm": False},
                {"m": "encodec_24khz", "al": 10, "nc": 99, "lm": False}):
        with pytest.raises(CorruptStream):
            ecdc.decode_bytes(v0_header_bytes(bad))
