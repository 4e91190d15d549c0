"""Golden .ecdc files (tests/golden, made by bin/make_golden.py) must decode bit-exact in every later version.

One exception, by construction: `lm_mono_24khz.ecdc` (`machine_bound`) was LM-coded before exact LM
arithmetic, with the float32 LM, so it decodes only on machines whose float kernels give its
writer's bits (FORMAT.md §4.3); elsewhere it must fail cleanly with the CRC error, never decode to
wrong codes silently. Every file written since (`lm_exact_24khz.ecdc` in exact-v1, `lm_exact2_24khz.ecdc`
in exact-v2) must decode everywhere.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from neucodec import ecdc
from neucodec.errors import CorruptStream
from neucodec.hub import load_codec, load_lm

GOLDEN = Path(__file__).parent / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED["files"]))
def test_golden_decodes_bit_exact(name: str) -> None:
    exp = EXPECTED["files"][name]
    data = (GOLDEN / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == exp["sha256"], "golden file modified: never regenerate it"
    model = GOLDEN / exp["model"]
    codec = load_codec(model)
    lm = load_lm(model) if exp["lm_segments"] else None
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the audio hashes were taken with 1 thread
    try:
        info, audio = ecdc.decode_bytes(data, codec, lm)  # codes are checked against their stored CRC32
    except CorruptStream as e:
        if not exp.get("machine_bound") or "fail their CRC" not in str(e):
            raise
        pytest.skip("float32-LM file of another kind of machine: its codes fail their CRC here, as documented")
    finally:
        torch.set_num_threads(old)
    assert (info.length, info.segments, info.lm_segments) == (exp["length"], exp["segments"], exp["lm_segments"])
    assert info.source_length == exp.get("source_length")  # older files do not store it
    # The codes are bit-exact (decode_bytes checks each segment's codes against the CRC32 stored in
    # the file). The audio is not hashed: float kernels legitimately change with the torch build,
    # the thread count and our own speed work (e.g. fused 1x1 convolutions); it must stay close.
    assert abs(float(audio.pow(2).mean().sqrt()) - exp["audio_rms"]) < 1e-4


@pytest.mark.parametrize("name", sorted(EXPECTED.get("shipped", {})))
def test_files_of_every_shipped_model_decode_with_a_plain_decode(name: str, tmp_path: Path) -> None:
    """A file of each model neucodec has shipped decodes as `neucodec decode FILE OUT` does: with the
    model it names, or, once that is no longer the default, its decode side (`neucodec.archive`)."""
    import soundfile as sf

    from neucodec import pipeline

    exp = EXPECTED["shipped"][name]
    assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == exp["sha256"], "never regenerate it"
    result = pipeline.decode_file(GOLDEN / name, tmp_path / "out.wav", subtype="FLOAT")
    assert (result.info.length, result.info.segments, result.info.lm_segments) == \
        (exp["length"], exp["segments"], exp["lm_segments"])
    audio, _ = sf.read(tmp_path / "out.wav", dtype="float32", always_2d=True)
    assert abs(float((audio.astype("float64") ** 2).mean() ** 0.5) - exp["audio_rms"]) < 1e-4
