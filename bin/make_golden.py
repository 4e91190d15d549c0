#!/usr/bin/env python
"""Add golden .ecdc test vectors under tests/golden/; never rewrites one that exists.

The first run wrote a tiny fixed-seed release package (codec + LM, `weights.save_release`), the
LM-coded mono, packed 2-group and packed 48 kHz-style segmented files and expected.json with the
hashes that tests/test_golden.py asserts. Later runs add the cases that are missing (a new coder, a
new format version) and keep every existing file and model: they pin what every later neucodec
must decode. `lm_mono_24khz.ecdc` predates exact LM arithmetic (FORMAT.md §4.3): its LM ran in
float32, so it decodes only where the LM's float kernels give the writer's bits; it is marked
`machine_bound` and `lm_exact_24khz.ecdc` (exact-v1) is its portable successor;
`lm_exact2_24khz.ecdc` pins exact-v2, the int8-product arithmetic written since. The `*_zheader_*`
files pin the compressed header of FORMAT.md §2 (earlier files keep their plain JSON headers).
`packed_source_length_24khz.ecdc` pins the end record's source-length residue (FORMAT.md §3) of a
file resampled from 44.1 kHz: it must decode to exactly 66,151 samples at 44.1 kHz.
`shipped_{model}_{fingerprint}.ecdc` is a file of each model shipped in the package (`shipped`).
`envelope_lm_2groups_24khz.ecdc` pins format version 2: envelope corrections (table "e1", FORMAT.md
§4.5) in LM-coded segments of two channel groups; `envelope_e3_2groups_24khz.ecdc` the table "e3" (the
default model's in neucodec 0.16.0) in plain segments, `envelope_e4_2groups_24khz.ecdc` the table "e4"
(bands wider above 4 kHz; the default model's since 0.17.0).
"""
from __future__ import annotations

import hashlib
import json
import sys
import typing as tp
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _bitstream import skewed_lm, tiny_codec24, tiny_codec48  # noqa: E402
from neucodec import ecdc  # noqa: E402
from neucodec.hub import load_codec, load_lm  # noqa: E402
from neucodec.weights import save_release  # noqa: E402

OUT = ROOT / "tests" / "golden"


def audio_hash(x: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(x.numpy(), dtype="<f4").tobytes()).hexdigest()


def unigram_bias(lm: torch.nn.Module, codes: torch.Tensor) -> None:
    """Give the LM heads the log-frequencies of `codes` [1, K, F] so that LM coding beats packing."""
    with torch.no_grad():
        for k, lin in enumerate(lm.linears[: codes.shape[1]]):
            counts = torch.bincount(codes[0, k], minlength=lin.bias.shape[0]).float()
            lin.weight.mul_(0.1)
            lin.bias.copy_(torch.log(counts + 0.05))


def main() -> None:
    torch.set_num_threads(1)  # decoded-audio hashes are taken with 1 thread (conv results depend on it)
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    t = torch.arange(36000) / 24000
    tone = (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.01 * torch.randn(36000, generator=g)).view(1, 1, -1)
    if not (OUT / "golden_24khz.json").is_file():
        c24 = tiny_codec24(seed=0, prepared=False)
        lm = skewed_lm(n_q=4, seed=0, favoured=0)
        unigram_bias(lm, tiny_codec24(seed=0).encode(tone, 3.0).codes)
        save_release(OUT / "golden_24khz.json", "golden_24khz", c24, c24.config, lm, lm.cfg)
    noise = 0.1 * torch.randn(1, 2, 60000, generator=g)
    if not (OUT / "golden_48khz.json").is_file():
        c48 = tiny_codec48(seed=0, prepared=False)
        save_release(OUT / "golden_48khz.json", "golden_48khz", c48, c48.config)
    c24, lm = load_codec(OUT / "golden_24khz.json"), load_lm(OUT / "golden_24khz.json")
    c48 = load_codec(OUT / "golden_48khz.json")
    from_44k = {"source_sample_rate": 44100, "source_length": lambda: 66151}  # 36000 samples at 24 kHz
    cases = {  # lm_mono (float32 LM) and lm_exact* (exact-v1) can no longer be written: this neucodec writes exact-v2
        "packed_2groups_24khz.ecdc": (c24, torch.cat([tone, -0.5 * tone]), 1.5, None, 1.0),
        "packed_source_length_24khz.ecdc": (c24, tone, 1.5, None, 1.0, from_44k),
        "packed_48khz.ecdc": (c48, noise, 6.0, None, 10.0),
        "lm_exact_24khz.ecdc": (c24, tone, 3.0, lm, 0.5),
        "lm_exact_zheader_24khz.ecdc": (c24, tone, 3.0, lm, 0.5),  # compressed header (FORMAT.md §2)
        "packed_zheader_48khz.ecdc": (c48, noise, 6.0, None, 10.0),
        "lm_exact2_24khz.ecdc": (c24, tone, 3.0, lm, 0.5),
        "envelope_lm_2groups_24khz.ecdc": (c24, torch.cat([tone, -0.5 * tone]), 3.0, lm, 0.5,
                                           {"correct_envelope": True}),
        "envelope_e3_2groups_24khz.ecdc": (c24, torch.cat([tone, -0.5 * tone]), 3.0, None, 0.5,
                                           {"correct_envelope": "e3"}),
        "envelope_e4_2groups_24khz.ecdc": (c24, torch.cat([tone, -0.5 * tone]), 3.0, None, 0.5,
                                           {"correct_envelope": "e4"}),
    }
    path = OUT / "expected.json"
    expected = json.loads(path.read_text()) if path.is_file() else {"torch": torch.__version__, "files": {}}
    for name, (codec, wav, bw, model_lm, seg, *kw) in cases.items():
        if name in expected["files"]:
            continue
        data = ecdc.encode_bytes(codec, wav, bw, model_lm, segment_seconds=seg, **(kw[0] if kw else {}))
        (OUT / name).write_bytes(data)
        info, audio = ecdc.decode_bytes(data, codec, model_lm)
        expected["files"][name] = {
            "model": f"{info.model_id}.json", "length": info.length, "segments": info.segments,
            "lm_segments": info.lm_segments, "sha256": hashlib.sha256(data).hexdigest(),
            "audio_sha256": audio_hash(audio), "audio_rms": float(audio.pow(2).mean().sqrt())}
        if info.source_length is not None:  # stored since neucodec 0.5.0
            expected["files"][name]["source_length"] = info.source_length
        print(name, len(data), "bytes", info.segments, "segments", info.lm_segments, "LM-coded")
    expected["files"]["lm_mono_24khz.ecdc"]["machine_bound"] = True
    shipped(expected.setdefault("shipped", {}))
    path.write_text(json.dumps(expected, indent=2) + "\n")


def shipped(expected: dict[str, dict[str, tp.Any]]) -> None:
    """A file of each shipped model (3 s of the example speech, `-b 6 --lm`), which a plain decode
    must read in every later version: through the model, or its decode side once it is no longer
    the default (bin/archive_model.py)."""
    import tempfile

    import soundfile as sf

    from neucodec import pipeline
    from neucodec.weights import release_names

    x, sr = sf.read(ROOT / "docs/examples/speech.flac", dtype="float32", always_2d=True)
    for model in release_names():
        fingerprint = load_codec(model).fingerprint
        name = f"shipped_{model}_{fingerprint[:8]}.ecdc"
        if name in expected:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            sf.write(f"{tmp}/in.wav", x[: 3 * sr], sr)
            pipeline.encode_file(f"{tmp}/in.wav", OUT / name, model=model, bandwidth=6.0, use_lm=True)
            result = pipeline.decode_file(OUT / name, f"{tmp}/out.wav", subtype="FLOAT")
            audio, _ = sf.read(f"{tmp}/out.wav", dtype="float32", always_2d=True)
        data = (OUT / name).read_bytes()
        expected[name] = {"model": model, "fingerprint": fingerprint, "sha256": hashlib.sha256(data).hexdigest(),
                          "length": result.info.length, "segments": result.info.segments,
                          "lm_segments": result.info.lm_segments, "audio_rms": float(np.sqrt((audio ** 2).mean()))}
        print(name, len(data), "bytes", result.info.segments, "segments", result.info.lm_segments, "LM-coded")


if __name__ == "__main__":
    main()
