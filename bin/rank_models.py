#!/usr/bin/env python3
"""Rank candidate codecs quickly on the dev clips (a minute per model on 2 threads).

    python bin/rank_models.py A/neucodec_24khz.json B/neucodec_24khz.json ...

Per model, one JSON line of means per category and bandwidth (1.5 and 6 kbps): log-mel distance
and SI-SNR on every clip, ViSQOL (speech mode, 16 kHz) on the speech and music clips at 6 kbps.
The codec runs without the container or the LM; `bin/bench_quality.py` is the full report.

ViSQOL moves by about 0.1 between neighbouring checkpoints on the report's 8 + 8 clips. `--wide N`
scores N clips of 10 s per category instead, cut evenly from the whole dev split (written once
to DEV/clips-wide-N), which also keeps choices from being tuned to the report's own clips.

With `--paired`, the first model is the baseline and every later line adds, per key, the mean
of the clip-by-clip differences from it and the half-width of their 95 % interval (`d_KEY`:
[mean, ±]): two models scored on the same clips differ far less noisily than their means.

With `--envelope [TABLE]`, each clip's decoded audio is scored with its envelope correction applied
(`neucodec.envelope`, on the grid of TABLE, by default `e4`, the default model's), as a file of the
model carries it (a 10 s clip is one container segment): what a user of the default model hears;
each category and bandwidth then also gets the correction's rate, coded with TABLE (`envelope_kbps`).
"""
from __future__ import annotations

import argparse
import json
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from neucodec import load_codec
from neucodec.train.data import CORPUS_RATE, INT16_SCALE, load_corpus
from neucodec.train.metrics import dev_scores_per_clip, load_visqol


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--clips", type=Path, default=Path.home() / ".cache/neucodec-train/corpus/dev/clips")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wide", type=int, metavar="N", help="N clips of 10 s per category from the whole dev split")
    p.add_argument("--paired", action="store_true", help="also print differences from the first model, clip by clip")
    p.add_argument("--envelope", nargs="?", const="e4", default=None, metavar="TABLE",
                   help="score the audio with its envelope correction applied on the grid of TABLE (default e4, "
                        "the default model's), as the model's files carry it")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    visqol = load_visqol()
    if args.wide:
        args.clips = wide_clips(args.clips.parent, args.wide)
    clips = sorted(args.clips.glob("*.wav"))
    if not clips:
        raise SystemExit(f"no dev clips in {args.clips}; run bin/build_corpus.py first")
    base: dict[str, list[float]] | None = None
    for model in args.models:
        scores = dev_scores_per_clip(load_codec(model).eval(), clips, (1.5, 6.0), visqol,
                                     lambda category, index, bandwidth: category != "sfx" and bandwidth == 6.0,
                                     args.envelope)
        line: dict[str, tp.Any] = {k: round(float(np.mean(v)), 3) for k, v in sorted(scores.items())}
        if args.paired and base is not None:
            for k, v in sorted(scores.items()):
                d = np.asarray(v) - np.asarray(base[k])
                line[f"d_{k}"] = [round(float(d.mean()), 4), round(float(1.96 * d.std(ddof=1) / np.sqrt(len(d))), 4)]
        base = base or scores
        print(json.dumps({"model": model, **line}), flush=True)


def wide_clips(dev: Path, n: int, seconds: float = 10.0) -> Path:
    """DEV/clips-wide-N: per category, N windows of `seconds` spaced evenly over the dev split's
    audio (its files back to back: many dev speech files are shorter than a window)."""
    folder = dev / f"clips-wide-{n}"
    if folder.is_dir():
        return folder
    tmp = dev / f".clips-wide-{n}.tmp"
    tmp.mkdir(exist_ok=True)
    for category, pool in load_corpus(dev.parent, dev.name).items():
        audio = pool.clips[0][0].data  # the category's whole memory-mapped array
        size = int(seconds * CORPUS_RATE)
        count = min(n, len(audio) // size)
        for k, start in enumerate(np.linspace(0, len(audio) - size, count).round().astype(int)):
            x = audio[start: start + size].astype(np.float32) / INT16_SCALE
            sf.write(tmp / f"{category}_{k:03d}.wav", x, CORPUS_RATE, subtype="FLOAT")
    tmp.rename(folder)
    return folder

if __name__ == "__main__":
    main()
