#!/usr/bin/env python3
"""Measure a model's operating points for rate control and store them in its package.

An operating point is a way to code a channel: a number of codebooks, an envelope correction table
(or none) and the LM (or not). For each, every dev clip goes through the real encoder into a real
file and back through the real decoder; the table records, per channel, the mean and the 95th
percentile of the payload rate (the file's bits after its header, per second) and the mean
ViSQOL (speech mode, 16 kHz) of the decoded clips. `neucodec encode -b KBPS` then picks the
best-scoring point whose high rate fits the target (`neucodec.rate`). Rerun whenever the weights
or an envelope table change:

    python bin/fit_rate.py neucodec/models/neucodec_24khz.json --write --markdown docs/rate.md

The LM changes the rate, never the decoded audio, so an LM point takes its score from its plain twin.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import neucodec
from neucodec import container, envelope
from neucodec.streamspec import encode_settings
from neucodec.train.metrics import load_visqol
from neucodec.weights import package_info

DEFAULT_CLIPS = Path.home() / ".cache/neucodec-train/corpus/dev/clips"


def measure(package: Path, clips: list[Path], n_qs: list[int], tables: list[str | None], lm: bool) -> list[dict]:
    visqol = load_visqol()
    if visqol is None:
        raise SystemExit("ViSQOL is needed: pip install -e '.[eval]'")
    codec = neucodec.load_codec(package)
    lm_model = neucodec.load_lm(package) if lm else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for table in tables:
            for n_q in n_qs:
                bandwidth = next(b for b in codec.config.bandwidths if codec.n_q_for_bandwidth(b) == n_q)
                row = {"codebooks": n_q, "envelope": table, "lm": False, "kbps": [], "score": []}
                lm_row = {**row, "lm": True, "kbps": []}
                t0 = time.time()
                for clip in clips:
                    out, wav = Path(tmp) / "c.ecdc", Path(tmp) / "c.wav"
                    res = neucodec.encode_file(clip, out, model=package, force=True,
                                               settings=encode_settings(codec, bandwidth, table or False))
                    row["kbps"].append(payload_kbps(out, res.seconds))
                    neucodec.decode_file(out, wav, model=package, force=True)
                    ref, sr = sf.read(str(clip), dtype="float32", always_2d=True)
                    dec, _ = sf.read(str(wav), dtype="float32", always_2d=True)
                    row["score"].append(visqol(ref.mean(1), dec.mean(1), sr))
                    if lm_model is not None:
                        res = neucodec.encode_file(clip, out, model=package, lm=lm_model, force=True,
                                                   settings=encode_settings(codec, bandwidth, table or False, lm_model))
                        lm_row["kbps"].append(payload_kbps(out, res.seconds))
                print(f"{n_q:2d} codebooks, envelope {table or 'none':4s}: {np.mean(row['kbps']):6.2f} kbps, "
                      f"ViSQOL {np.mean(row['score']):.3f} ({time.time() - t0:.0f} s)", flush=True)
                rows.append(row)
                if lm_model is not None:
                    rows.append({**lm_row, "score": row["score"]})
    return rows


def payload_kbps(path: Path, seconds: float) -> float:
    with open(path, "rb") as f:
        header = container.read_prelude(f).size
    return 8 * (path.stat().st_size - header) / seconds / 1000


def summary(rows: list[dict]) -> list[dict]:
    return [{"codebooks": r["codebooks"], "envelope": r["envelope"], "lm": r["lm"],
             "kbps": round(float(np.mean(r["kbps"])), 3), "kbps_high": round(float(np.percentile(r["kbps"], 95)), 3),
             "score": round(float(np.mean(r["score"])), 3)} for r in rows]


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """The package's points with those measured again replaced, in rate order."""
    def key(p: dict) -> tuple:
        return p["codebooks"], p["envelope"], p["lm"]
    fresh = {key(p) for p in new}
    return sorted([p for p in old if key(p) not in fresh] + new, key=lambda p: (p["kbps"], key(p)[0]))


def markdown(points: list[dict], package: Path, clips: Path, n: int) -> str:
    counts = {c: sum(1 for p in clips.glob(f"{c}_*.wav")) for c in ("speech", "music", "sfx")}
    where = str(clips).replace(str(Path.home()), "~")
    lines = [f"# Operating points of {package.stem} ({neucodec.__version__} weights)", "",
             f"`python bin/fit_rate.py {package} --write --markdown docs/rate.md` on the {n} dev clips of the "
             f"training corpus (`{where}`: {counts['speech']} speech, {counts['music']} music, {counts['sfx']} "
             f"general sounds, 10 s each), {time.strftime('%Y-%m-%d')}. Payload kbps per channel (after the "
             "header), mean and 95th percentile; ViSQOL (speech mode, 16 kHz) of the decoded clips, mean.", "",
             "| codebooks | envelope | LM | kbps | kbps (p95) | ViSQOL |", "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p["kbps"]):
        lines.append(f"| {p['codebooks']} | {p['envelope'] or 'none'} | {'yes' if p['lm'] else 'no'} | "
                     f"{p['kbps']:.2f} | {p['kbps_high']:.2f} | {p['score']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", type=Path, help="a model package (.json)")
    p.add_argument("--clips", type=Path, default=DEFAULT_CLIPS)
    p.add_argument("--tables", nargs="*", default=["none", "e1", "e2", "e4"], help="envelope tables ('none': without)")
    p.add_argument("--codebooks", nargs="*", type=int, help="codebook counts to measure (default: one per bandwidth)")
    p.add_argument("--no-lm", action="store_true", help="leave out the LM's points")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true",
                   help="store the points in the package's JSON, replacing those measured again and keeping the rest")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--json", type=Path, help="write every clip's figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clips = sorted(args.clips.glob("*.wav"))
    if not clips:
        p.error(f"no clips in {args.clips}; build the corpus (bin/build_corpus.py) or pass --clips")
    codec = neucodec.load_codec(args.package)
    n_qs = sorted({codec.n_q_for_bandwidth(b) for b in codec.config.bandwidths})
    if args.codebooks:
        if not set(args.codebooks) <= set(n_qs):
            p.error(f"--codebooks: the model's bandwidths code {n_qs} codebooks")
        n_qs = sorted(set(args.codebooks))
    tables = [None if t == "none" else t for t in args.tables]
    unknown = [t for t in tables if t is not None and t not in envelope.table_names()]
    if unknown:
        p.error(f"unknown envelope tables {unknown}; choose from {envelope.table_names()}")
    has_lm = package_info(args.package).lm_config is not None
    rows = measure(args.package, clips, n_qs, tables, has_lm and not args.no_lm)
    points = summary(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.write:
        package = json.loads(args.package.read_text())
        points = merged(package.get("operating_points", []), points)
        package["operating_points"] = points
        args.package.write_text(json.dumps(package, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(points, args.package, args.clips, len(clips)))
    print(markdown(points, args.package, args.clips, len(clips)))


if __name__ == "__main__":
    main()
