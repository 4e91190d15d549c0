#!/usr/bin/env python3
"""Rank candidate codecs quickly on the dev clips (a minute per model on 2 threads).

    python bin/rank_models.py A/neucodec_24khz.json B/neucodec_24khz.json ...

Per model, one JSON line of means per category and bandwidth (1.5 and 6 kbps): log-mel distance
and SI-SNR on every clip, ViSQOL (speech mode, 16 kHz) on the speech and music clips at 6 kbps.
The codec runs without the container or the LM; `bin/bench_quality.py` is the full report.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from neucodec import load_codec
from neucodec.train.metrics import load_visqol
from neucodec.train.solver import dev_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--clips", type=Path, default=Path.home() / ".cache/neucodec-train/corpus/dev/clips")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    visqol = load_visqol()
    clips = sorted(args.clips.glob("*.wav"))
    if not clips:
        raise SystemExit(f"no dev clips in {args.clips}; run bin/build_corpus.py first")
    for model in args.models:
        scores = dev_scores(load_codec(model).eval(), clips, (1.5, 6.0), visqol,
                            lambda category, index, bandwidth: category != "sfx" and bandwidth == 6.0)
        print(json.dumps({"model": model, **{k: round(v, 3) for k, v in sorted(scores.items())}}), flush=True)


if __name__ == "__main__":
    main()
