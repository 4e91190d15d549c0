#!/usr/bin/env python3
"""Latent diagnostics of a codec: the PCA rank of its latent and, per frequency band, how well the
decoded audio follows the input, with the quantizer bypassed and at 2 / 8 / 32 codebooks.

    python bin/latent_diagnostics.py                               # the shipped default model
    python bin/latent_diagnostics.py ~/.cache/neucodec-train/run/checkpoint.pt --clips DIR --json out.json

MODEL is a release package (.json), an official checkpoint or a training checkpoint (checkpoint.pt).
Clips: the dev speech clips of the training corpus (`speech_*.wav`) by default.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from neucodec.hub import load_codec
from neucodec.model import Codec
from neucodec.train.diagnostics import BANDS_HZ, band_name, latent_report
from neucodec.train.solver import TrainConfig

DEFAULT_CLIPS = Path.home() / ".cache/neucodec-train/corpus/dev/clips"


def load_any(model: str | None) -> Codec:
    if model is not None and model.endswith(".pt"):
        state = torch.load(model, map_location="cpu", weights_only=True)
        codec = Codec(TrainConfig.from_dict(json.loads(state["config"])).codec)
        codec.load_state_dict(state["codec"])
        return codec.eval()
    return load_codec(model)


def markdown(report: dict[str, float], n_qs: list[str]) -> str:
    lines = [f"latent PCA rank: {report['rank90']:.0f} dims hold 90 % of its energy, {report['rank99']:.0f} hold 99 %; "
             f"as the decoder reads it: {report['read_rank90']:.0f} and {report['read_rank99']:.0f}", "",
             "| codebooks | " + " | ".join(band_name(b) + " Hz" for b in BANDS_HZ) + " |",
             "|---" * (len(BANDS_HZ) + 1) + "|"]
    for q in n_qs:
        cells = [f"{report[f'corr_{q}_{band_name(b)}']:.2f}" for b in BANDS_HZ]
        lines.append(f"| {'bypassed' if q == 'none' else q} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="release package, official checkpoint or checkpoint.pt (default: shipped)")
    p.add_argument("--clips", type=Path, default=DEFAULT_CLIPS, help="folder of clips (speech_*.wav are used)")
    p.add_argument("--pattern", default="speech_*.wav")
    p.add_argument("--codebooks", type=int, nargs="*", default=[2, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    codec = load_any(args.model)
    paths = sorted(args.clips.glob(args.pattern))
    if not paths:
        p.error(f"no {args.pattern} in {args.clips}; build the corpus (bin/build_corpus.py) or pass --clips")
    clips = []
    for path in paths:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
        x = x.mean(1)
        clips.append(soxr.resample(x, sr, codec.sample_rate) if sr != codec.sample_rate else x)
    n_qs = [None, *[q for q in args.codebooks if q <= codec.n_q]]
    report = latent_report(codec, clips, n_qs)
    print(f"{args.model or 'default model'}: {len(clips)} clips of {args.clips}, latent of "
          f"{codec.config.seanet.dimension} dimensions\n")
    print(markdown(report, ["none" if q is None else str(q) for q in n_qs]))
    if args.json:
        args.json.write_text(json.dumps({k: round(v, 4) for k, v in report.items()}, indent=1) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
