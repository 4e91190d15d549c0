"""archive: an earlier default's decode side keeps its files decoding after the default changes."""
from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import TINY_RVQ, TINY_SEANET, copy_package

from neucodec import archive, pipeline
from neucodec.config import CodecConfig, LMConfig, SEANetConfig
from neucodec.errors import ModelMismatch, UnsupportedSetting
from neucodec.hub import load_codec
from neucodec.lm import LanguageModel
from neucodec.model import Codec
from neucodec.weights import save_release

pytestmark = pytest.mark.usefixtures("one_thread")


def _release(folder: Path, seed: int) -> Path:
    """A tiny causal package named `tiny_24khz` with an LM; another seed gives other weights."""
    torch.manual_seed(seed)
    config = CodecConfig(name="tiny_24khz", seanet=SEANetConfig(**TINY_SEANET), quantizer=TINY_RVQ,
                         bandwidths=(1.5, 3.0, 6.0))
    lm_config = LMConfig(n_q=8, dim=32, num_layers=2, num_heads=2, past_context=50)
    return save_release(folder / "tiny_24khz.json", "tiny_24khz", Codec(config), config, LanguageModel(lm_config),
                        lm_config, envelope="e1")


def test_files_of_an_earlier_default_decode_through_its_decode_side(
        recordings: dict[str, Path], tmp_path: Path, model_cache: Path) -> None:
    old, new = _release(tmp_path / "old", 0), _release(tmp_path / "new", 1)
    copy_package(new, model_cache)  # the installed `tiny_24khz` is the new model
    files = {}
    for lm in (False, True):
        files[lm] = tmp_path / f"old_lm{lm}.ecdc"
        pipeline.encode_file(recordings["wav_mono"], files[lm], model=old, use_lm=lm)
        pipeline.decode_file(files[lm], tmp_path / f"want_lm{lm}.wav", model=old, subtype="FLOAT")
        with pytest.raises(ModelMismatch, match="cannot read"):  # no decode side installed yet
            pipeline.decode_file(files[lm], tmp_path / "x.wav")

    side = archive.write_decode_side(old, model_cache / "archive")
    assert side.name.startswith("tiny_24khz-") and archive.find("tiny_24khz", load_codec(old).fingerprint) == side
    tensors = side.with_suffix(".safetensors").stat().st_size
    assert tensors < old.with_suffix(".safetensors").stat().st_size  # no encoder
    for lm in (False, True):  # a plain decode, as `neucodec decode old.ecdc out.wav`, reads them again
        pipeline.decode_file(files[lm], tmp_path / f"got_lm{lm}.wav", subtype="FLOAT")
        want, got = (sf.read(tmp_path / f"{k}_lm{lm}.wav")[0] for k in ("want", "got"))
        assert (want == got).all()
    with pytest.raises(UnsupportedSetting, match="decode side"):  # and encodes nothing
        pipeline.encode_file(recordings["wav_mono"], tmp_path / "y.ecdc", model=side)
    pipeline.encode_file(recordings["wav_mono"], tmp_path / "new.ecdc", model="tiny_24khz")  # the installed one encodes
    assert archive.find("tiny_24khz", load_codec(new).fingerprint) is None
