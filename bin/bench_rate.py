#!/usr/bin/env python3
"""Does `-b` give the file's bitrate? Encode speech at several targets (and a 44.1 kHz stereo FLAC)
with the real command line and compare each file's bitrate with its target.

    python bin/bench_rate.py --markdown docs/rate.md

Speech: --seconds of the dev speech clips joined (default 30 s); stereo: two of them as left and
right at 44.1 kHz. The bar: every file within 1.05 x target + 0.1 kbps.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

DEFAULT_CLIPS = Path.home() / ".cache/neucodec-train/corpus/dev/clips"


def joined(paths: list[Path], seconds: float) -> tuple[np.ndarray, int]:
    parts, sr = [], 24000
    for p in paths:
        x, sr = sf.read(str(p), dtype="float32", always_2d=True)
        parts.append(x.mean(1))
    x = np.concatenate(parts)
    return np.resize(x, int(seconds * sr)), sr


def encode(src: Path, dst: Path, kbps: float, extra: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "neucodec", "encode", "-f", str(src), str(dst), "-b", f"{kbps:g}", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return float("nan"), out.stderr.strip().splitlines()[-1]
    info = sf.info(str(src))
    how = out.stderr.strip().splitlines()[-1].split(": ", 3)[-1].split(", ")[0]
    return 8 * dst.stat().st_size / info.duration / 1000, how


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=Path, default=DEFAULT_CLIPS)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--targets", type=float, nargs="*", default=[1.5, 3, 5, 6, 12])
    p.add_argument("--markdown", type=Path, help="append the table to this file")
    args = p.parse_args()
    speech = sorted(args.clips.glob("speech_*.wav"))
    if len(speech) < 2:
        p.error(f"need dev speech clips in {args.clips} (bin/build_corpus.py)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        x, sr = joined(speech, args.seconds)
        mono = Path(tmp) / "speech.wav"
        sf.write(str(mono), x, sr)
        for lm in ([], ["--lm"]):
            for kbps in args.targets:
                rate, how = encode(mono, Path(tmp) / "s.ecdc", kbps, lm)
                rows.append((f"{args.seconds:g} s speech, mono{' --lm' if lm else ''}", kbps, rate, how))
        left, _ = joined(speech[: len(speech) // 2], args.seconds)
        right, _ = joined(speech[len(speech) // 2:], args.seconds)
        stereo = soxr.resample(np.stack([left, right], 1), sr, 44100)
        flac = Path(tmp) / "stereo.flac"
        sf.write(str(flac), stereo, 44100)
        rate, how = encode(flac, Path(tmp) / "st.ecdc", 6, [])
        rows.append((f"{args.seconds:g} s speech, stereo 44.1 kHz FLAC", 6, rate, how))
    lines = ["", f"## Does `-b` give the file's bitrate? ({time.strftime('%Y-%m-%d')})", "",
             "`python bin/bench_rate.py` (the dev speech clips joined). Bar: file kbps ≤ 1.05 × target + 0.1.", "",
             "| input | -b | file kbps | within | chosen |", "|---|---|---|---|---|"]
    for what, kbps, rate, how in rows:
        ok = "yes" if rate <= 1.05 * kbps + 0.1 else ("error" if rate != rate else "**no**")
        lines.append(f"| {what} | {kbps:g} | {rate:.2f} | {ok} | {how} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
