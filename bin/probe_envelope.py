#!/usr/bin/env python3
"""What the envelope correction (`neucodec.envelope`) buys at other settings (steps, bands), and its cost.

For each dev clip and each bandwidth (any multiple of 0.75 kbps, so 4.5 uses 6 codebooks) it scores
the model's decoded audio as is and with the correction applied at each quantizer step, with the
metrics of `bin/bench_quality.py` (ViSQOL in speech mode at 16 kHz, log-mel distance, SI-SNR; for
speech also PESQ-WB and STOI), and estimates the side channel's rate from the corrections
themselves: the entropy of each value in its context (`envelope.contexts`: a fixed table per
category, fitted on half of the clips and measured on the other half, both ways, with add-one
smoothing; so what a range coder with that table would need, header excluded). With `--table NAME`
(one of the format's tables, `envelope.table_names`, fitted on the train split by
`bin/fit_envelope.py`) it also codes each clip's corrections with `envelope.encode_steps`, checks
that they decode, and reports the bytes (the table's step must be the one probed). The codec's own
payload is K x 0.75 kbps without the LM.

    python bin/probe_envelope.py [--clips ~/.cache/neucodec-train/corpus/dev/clips-wide-40]
        [--bandwidths 3 4.5 6] [--steps-db 3 6] [--bins 8] [--hops 4] [--bands 20] [--limit 40]
        [--category speech]
        [--table e1] [--json out.json]
(needs the eval extra)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from pesq import pesq
from pystoi import stoi

from neucodec import envelope, load_codec
from neucodec.train.losses import mel_distance, si_snr
from neucodec.train.metrics import VisqolSpeech


def speech_scores(x: np.ndarray, signal: np.ndarray) -> dict[str, float]:
    """PESQ-WB (at 16 kHz) and STOI, as `bin/bench_quality.py` computes them (no delay to align here)."""
    ref16 = soxr.resample(x, 24000, 16000)
    deg16 = soxr.resample(signal.astype(np.float32), 24000, 16000)
    try:
        pesq_wb = float(pesq(16000, ref16, deg16, "wb"))
    except Exception:  # noqa: BLE001 - silent output: PESQ cannot score it
        pesq_wb = float("nan")
    return {"pesq": pesq_wb, "stoi": float(stoi(x.astype(np.float64), signal, 24000, extended=False))}


def cross_entropy_kbps(corrections: list[np.ndarray], seconds: float, span: int) -> float:
    """Bits per second, in kbps, to code each value given its band's previous one (two-fold cross-fit)."""
    bits = 0.0
    for fit, test in ((corrections[0::2], corrections[1::2]), (corrections[1::2], corrections[0::2])):
        if fit and test:
            counts = envelope.transition_counts(test, span)
            bits -= float(np.sum(counts * np.log2(envelope.transition_table(fit, span))))
    return bits / seconds / 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="neucodec_24khz")
    p.add_argument("--clips", type=Path, default=Path.home() / ".cache/neucodec-train/corpus/dev/clips-wide-40")
    p.add_argument("--bandwidths", type=float, nargs="+", default=[3.0, 4.5, 6.0])
    p.add_argument("--steps-db", type=float, nargs="+", default=[3.0, 6.0])
    p.add_argument("--bins", type=int, default=envelope.Grid.bins, help="STFT bins (50 Hz) per band")
    p.add_argument("--hops", type=int, default=envelope.Grid.hops, help="STFT hops (10 ms) per tile")
    p.add_argument("--bands", type=int, default=None, help="coded bands from 0 Hz [default: up to 8 kHz]")
    p.add_argument("--limit", type=int, default=None, help="clips per category")
    p.add_argument("--category", default=None, help="only this category (speech, music or sfx)")
    p.add_argument("--json", type=Path, default=None, help="write every score here")
    p.add_argument("--table", default=None, help="code the corrections with this table of the format")
    args = p.parse_args()
    args.bands = args.bands or 160 // args.bins  # 160 bins of 50 Hz: 8 kHz
    table = envelope.table(args.table) if args.table else None
    table_grid = envelope.table_grid(args.table) if args.table else None  # what the table codes
    torch.set_num_threads(1)
    codec, visqol = load_codec(args.model).eval(), VisqolSpeech()
    if codec.sample_rate != 24000 or codec.channels != 1:
        raise SystemExit("the envelope grid is laid out for 24 kHz mono models")
    paths = sorted(args.clips.glob("*.wav"))
    by_cat: dict[str, list[Path]] = {}
    for path in paths:
        if args.category in (None, path.stem.split("_")[0]):
            by_cat.setdefault(path.stem.split("_")[0], []).append(path)
    if not by_cat:
        raise SystemExit(f"no clips in {args.clips}; run bin/build_corpus.py first")
    rows: list[dict[str, object]] = []
    corrections: dict[tuple[str, str], list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    coded: dict[tuple[str, str], int] = {}  # bytes of the coded corrections
    for cat, cat_paths in sorted(by_cat.items()):
        for path in cat_paths[: args.limit]:
            x = sf.read(str(path), dtype="float32")[0]
            ref = x.astype(np.float64)
            seconds[cat] = seconds.get(cat, 0.0) + len(x) / codec.sample_rate
            with torch.no_grad():
                latent = codec.encoder(torch.from_numpy(x)[None, None])
            for kbps in args.bandwidths:
                n_q = round(kbps / 0.75)
                with torch.no_grad():
                    y = codec.decoder(codec.quantizer(latent, n_q).quantized)[0, 0, : len(x)]
                decoded = y.double().numpy()
                signals = {f"{kbps:g} kbps": decoded}
                for step in args.steps_db:
                    grid = envelope.Grid(step_db=step, bands=args.bands, bins=args.bins, hops=args.hops)
                    steps = envelope.measure(ref, decoded, grid)
                    name = f"{kbps:g} kbps + envelope, {step:g} dB"
                    corrections.setdefault((name, cat), []).append(steps)
                    if grid == table_grid:  # the table codes its own grid only
                        payload = envelope.encode_steps(steps[None], table)
                        if not np.array_equal(envelope.decode_steps(payload, table, 1, *steps.shape)[0], steps):
                            raise SystemExit(f"{path.name}: the coded corrections do not decode")
                        coded[(name, cat)] = coded.get((name, cat), 0) + len(payload)
                    signals[name] = envelope.apply(decoded, steps, grid)
                for name, signal in signals.items():
                    mel = mel_distance(torch.from_numpy(signal).float().view(1, 1, -1),
                                       torch.from_numpy(x).view(1, 1, -1), codec.sample_rate)
                    rows.append({"clip": path.name, "category": cat, "system": name, "codes_kbps": n_q * 0.75,
                                 "visqol": visqol(ref, signal, codec.sample_rate), "mel": mel,
                                 "si_snr": float(si_snr(torch.from_numpy(signal).view(1, 1, -1),
                                                        torch.from_numpy(ref).view(1, 1, -1))[0]),
                                 **(speech_scores(x, signal) if cat == "speech" else {})})
            print(f"{path.name} done", flush=True)
    print(f"\nmodel {args.model}; clips {args.clips}; grid "
          f"{envelope.Grid(bands=args.bands, bins=args.bins, hops=args.hops)} (step varied)\n")
    print("| category | system | codes kbps | side kbps, estimated | side kbps, coded | ViSQOL | mel dist | SI-SNR dB "
          "| PESQ-WB | STOI |\n|---|---|---|---|---|---|---|---|---|---|")
    for cat in sorted(by_cat):
        for name in dict.fromkeys(r["system"] for r in rows if r["category"] == cat):
            sel = [r for r in rows if r["category"] == cat and r["system"] == name]
            side = corrections.get((str(name), cat))
            side_kbps = (f"{cross_entropy_kbps(side, seconds[cat], envelope.Grid.max_steps):.2f}"
                         if side and len(side) > 1 else "—")  # the cross-fit needs two clips
            n_bytes = coded.get((str(name), cat))
            side_coded = f"{8 * n_bytes / seconds[cat] / 1000:.2f}" if n_bytes is not None else "—"
            print(f"| {cat} | {name} | {sel[0]['codes_kbps']:.2f} | {side_kbps} | {side_coded} | "
                  f"{np.mean([r['visqol'] for r in sel]):.3f} | {np.mean([r['mel'] for r in sel]):.3f} | "
                  f"{np.mean([r['si_snr'] for r in sel]):.2f} | "
                  + " | ".join(f"{np.nanmean([r[k] for r in sel]):.3f}" if k in sel[0] else "—"
                               for k in ("pesq", "stoi"))
                  + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
