"""Model identity: fingerprints of weights, and which weights read which files (with advice when not)."""
from __future__ import annotations

import dataclasses
import json
import typing as tp
from pathlib import Path

import pytest
import torch

from _bitstream import lm_coded_file, skewed_lm, tiny_codec24
from neucodec import ecdc
from neucodec.errors import ModelMismatch, WeightsUnavailable
from neucodec.identity import model_identity
from neucodec.weights import load_weights, save_release


def test_a_model_built_in_code_is_named_by_its_config_and_weights() -> None:
    a, b = tiny_codec24(), tiny_codec24()
    mid, fp = model_identity(a)
    assert mid == "tiny24" and fp.startswith("sd:") and model_identity(b) == (mid, fp)
    assert model_identity(tiny_codec24(seed=1))[1] != fp


def test_a_new_decoder_reads_the_files_of_the_weights_it_was_trained_from(tmp_path: Path) -> None:
    """Release B (decoder changed, same encoder, codebooks and LM) lists A, so A's files decode
    with B and with B's fine-tuning C; D (encoder changed) lists neither and refuses them."""
    from neucodec.hub import load_codec, load_lm

    raw, lm = tiny_codec24(prepared=False), skewed_lm()

    def release(folder: str, *parents: Path, config: tp.Any = raw.config) -> Path:
        return save_release(tmp_path / folder / "bs_tiny.json", "bs_tiny", raw, config, lm, lm.cfg,
                            dtype=torch.float32, parents=[load_weights(p) for p in parents])

    a = release("a", config=dataclasses.replace(raw.config, bandwidths=(1.5, 3.0, 4.5, 6.0)))  # offers one more
    data = lm_coded_file(load_codec(a), load_lm(a))
    with torch.no_grad():
        next(raw.decoder.parameters()).add_(0.01)
    b = release("b", a)
    with torch.no_grad():
        next(raw.decoder.parameters()).add_(0.01)
    c = release("c", b)
    fa, fb = load_weights(a).fingerprint, load_weights(b).fingerprint
    assert load_weights(b).compatible == {"codec": [fa], "lm": [fa]}
    assert load_weights(c).compatible == {"codec": [fb, fa], "lm": [fb, fa]}
    info, want = ecdc.decode_bytes(data, load_codec(a), load_lm(a))
    assert info.lm_segments > 0
    for newer in (b, c):
        _, audio = ecdc.decode_bytes(data, load_codec(newer), load_lm(newer))
        assert audio.shape == want.shape and not torch.equal(audio, want)  # same codes, the new decoder
    with torch.no_grad():
        next(raw.encoder.parameters()).add_(0.01)
    d = release("d", c)
    assert load_weights(d).compatible == {"lm": [load_weights(c).fingerprint, fb, fa]}
    with pytest.raises(ModelMismatch, match=f"model bs_tiny \\(weights {fa}\\).*version that wrote it"):
        ecdc.decode_bytes(data, load_codec(d), load_lm(d))
    meta = json.loads(d.read_text())  # a release lists the earlier defaults: the advice names the one
    meta["earlier"] = {fa: {"neucodec": "0.5.0", "commit": "0f1799b"}}
    d.write_text(json.dumps(meta))
    with pytest.raises(ModelMismatch, match="neucodec 0.5.0's default model.*commit 0f1799b"):
        ecdc.decode_bytes(data, load_codec(d), load_lm(d))
    meta["earlier"] = {fa: "0.5.0"}
    d.write_text(json.dumps(meta))
    with pytest.raises(WeightsUnavailable, match="'earlier' must map"):
        load_codec(d)
