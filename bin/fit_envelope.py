#!/usr/bin/env python3
"""Fit the probability table of the envelope corrections (`neucodec.envelope`) on the train split.

Takes `--crops` crops of `--seconds` from each category of the train split (speech, music, general
sounds: equal shares), codes each with the model at every bandwidth of `--bandwidths`, measures the
corrections of its decoded audio and counts how often each value comes in each context
(`envelope.transition_counts`), and adds the weights (the counts plus 1) under `--name` to a table
file (`neucodec/envelope_tables.json` by default: the tables files may name), with the grid and
what they were fitted on. It never replaces a table: they are part of the .ecdc format.

    python bin/fit_envelope.py --name e2 --bins 4 [--wider BIN:BINS ...] [--out neucodec/envelope_tables.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from neucodec import envelope, load_codec
from neucodec.train.data import load_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="neucodec_24khz")
    p.add_argument("--corpus", type=Path, default=Path.home() / ".cache/neucodec-train/corpus")
    p.add_argument("--crops", type=int, default=64, help="per category")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--bandwidths", type=float, nargs="+", default=[1.5, 3.0, 4.5, 6.0, 12.0])
    p.add_argument("--step-db", type=float, default=envelope.Grid.step_db)
    p.add_argument("--bins", type=int, default=envelope.Grid.bins, help="STFT bins (50 Hz at 24 kHz) per band")
    p.add_argument("--hops", type=int, default=envelope.Grid.hops, help="STFT hops (10 ms) per tile")
    p.add_argument("--bands", type=int, default=None, help="coded bands from 0 Hz [default: up to 8 kHz]")
    p.add_argument("--wider", nargs="+", default=[], metavar="BIN:BINS",
                   help="from STFT bin BIN on, bands of BINS bins (`envelope.Grid.wider`; e4: 80:4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", required=True, help="the new table's name")
    p.add_argument("--out", type=Path, default=envelope.TABLE_FILE)
    args = p.parse_args()
    tables = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.name in tables:
        raise SystemExit(f"{args.out} already has a table {args.name!r}; tables never change: pick a new name")
    torch.set_num_threads(1)
    codec = load_codec(args.model).eval()
    wider = tuple(tuple(int(v) for v in pair.split(":")) for pair in args.wider)
    grid = envelope.Grid(step_db=args.step_db, bins=args.bins, hops=args.hops, wider=wider)
    bands = args.bands or next(n for n in range(1, 161) if dataclasses.replace(grid, bands=n).top >= 160)
    grid = dataclasses.replace(grid, bands=bands)  # by default, up to 8 kHz (bin 160)
    corrections = []
    rng = np.random.default_rng(args.seed)
    length = int(args.seconds * codec.sample_rate)
    for category, pool in sorted(load_corpus(args.corpus, "train").items()):
        for _ in range(args.crops):
            x = pool.crop(rng, length).astype(np.float32)
            with torch.no_grad():
                latent = codec.encoder(torch.from_numpy(x)[None, None])
                for kbps in args.bandwidths:
                    y = codec.decoder(codec.quantizer(latent, round(kbps / 0.75)).quantized)[0, 0, :length]
                    corrections.append(envelope.measure(x.astype(np.float64), y.double().numpy(), grid))
        print(f"{category}: {args.crops} crops", flush=True)
    weights = envelope.transition_counts(corrections, grid.max_steps).astype(np.int64) + 1
    tables[args.name] = {
        "fitted_on": {"model": args.model, "grid": dataclasses.asdict(grid), "crops_per_category": args.crops,
                      "seconds": args.seconds, "bandwidths": args.bandwidths, "seed": args.seed,
                      "values": sum(c.size for c in corrections)},
        "weights": weights.tolist()}
    args.out.write_text(json.dumps(tables, separators=(",", ":")) + "\n")
    print(f"added {args.name} to {args.out}")


if __name__ == "__main__":
    main()
