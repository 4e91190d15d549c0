#!/usr/bin/env python3
"""Carry a training corpus to another machine compactly: a sample of it as Ogg Opus, and back.

    python bin/pack_corpus.py pack ~/.cache/neucodec-train/corpus .gpu/corpus --minutes 50 55 15
    python bin/pack_corpus.py unpack .gpu/corpus /tmp/corpus        # on the other machine

`pack` draws pieces of the train split the way training samples it (source by the pool's weight,
then file by duration; music as excerpts), up to the given minutes of speech, music and general
sounds (and --dev-minutes of the dev split, which `bin/train_lm.py` reports on), and writes per
split and category one Ogg Opus stream (opusenc, VBR at --kbps) plus a JSON index. `unpack`
decodes them (soundfile) into the corpus layout that `bin/train.py --corpus` reads:
`{split}/{category}.npy` (int16) and `.json`. About 1.5 hours fit in 30 MB at 40 kbps.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 24000
CATEGORIES = ("speech", "music", "sfx")
MAX_PIECE_S = {"speech": 20.0, "music": 15.0, "sfx": 10.0}  # longer files contribute an excerpt


def pack(corpus: Path, out: Path, split: str, minutes: list[float], kbps: float, seed: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from neucodec.train.data import load_corpus

    pools = load_corpus(corpus, split)
    out = out / split
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for cat, budget_min in zip(CATEGORIES, minutes):
        if cat not in pools or budget_min <= 0:
            continue
        pool, budget = pools[cat], int(budget_min * 60 * SAMPLE_RATE)
        taken: set[tuple[int, int]] = set()
        pieces, entries, total = [], [], 0
        while total < budget and len(taken) < sum(len(c) for c in pool.clips):
            s = int(rng.choice(len(pool.sources), p=pool.source_p))
            i = int(rng.choice(len(pool.clips[s]), p=pool.clip_p[s]))
            clip = pool.clips[s][i]
            n = min(clip.length, int(MAX_PIECE_S[cat] * SAMPLE_RATE), budget - total)
            if (s, i) in taken and n == clip.length:
                continue  # a whole file once; excerpts of long files may repeat elsewhere in them
            taken.add((s, i))
            start = clip.offset + int(rng.integers(0, clip.length - n + 1))
            pieces.append(np.asarray(clip.data[start: start + n], dtype=np.int16))
            entries.append({"offset": total, "length": n, "source": clip.source})
            total += n
        audio = np.concatenate(pieces)
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / f"{cat}.wav"
            sf.write(wav, audio, SAMPLE_RATE, subtype="PCM_16")
            subprocess.run(["opusenc", "--quiet", "--vbr", "--bitrate", f"{kbps:g}", str(wav),
                            str(out / f"{cat}.opus")], check=True)
        (out / f"{cat}.json").write_text(json.dumps({"samples": total, "entries": entries}))
        mb = (out / f"{cat}.opus").stat().st_size / 1e6
        print(f"{split}/{cat}: {total / SAMPLE_RATE / 60:.1f} min in {len(entries)} pieces, {mb:.1f} MB", flush=True)


def _unpack_one(packed: Path, dest: Path, cat: str) -> str:
    meta = json.loads((packed / f"{cat}.json").read_text())
    audio, sr = sf.read(str(packed / f"{cat}.opus"), dtype="int16")
    if sr != SAMPLE_RATE:
        raise SystemExit(f"{cat}.opus decodes at {sr} Hz, expected {SAMPLE_RATE}")
    n = meta["samples"]
    data = np.zeros(n, dtype=np.int16)
    data[: min(n, len(audio))] = audio[:n]
    np.save(dest / f"{cat}.npy", data)
    (dest / f"{cat}.json").write_text(json.dumps({"entries": meta["entries"]}))
    return f"{dest.name}/{cat}: {n / SAMPLE_RATE / 60:.1f} min"


def unpack(packed: Path, corpus: Path) -> None:
    jobs = [(packed / split, corpus / split, cat) for split in ("train", "dev") for cat in CATEGORIES
            if (packed / split / f"{cat}.opus").is_file()]
    if not jobs:
        raise SystemExit(f"no packed corpus in {packed}")
    for _, dest, _ in jobs:
        dest.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(len(jobs)) as pool:
        for line in pool.map(_unpack_one, *zip(*jobs)):
            print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("corpus", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--minutes", type=float, nargs=3, default=[50, 55, 15], metavar=("SPEECH", "MUSIC", "SFX"))
    a.add_argument("--dev-minutes", type=float, nargs=3, default=[2, 2, 1], metavar=("SPEECH", "MUSIC", "SFX"))
    a.add_argument("--kbps", type=float, default=40)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("unpack")
    b.add_argument("packed", type=Path)
    b.add_argument("corpus", type=Path)
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.corpus, args.out, "train", args.minutes, args.kbps, args.seed)
        pack(args.corpus, args.out, "dev", args.dev_minutes, args.kbps, args.seed)
    else:
        unpack(args.packed, args.corpus)


if __name__ == "__main__":
    main()
