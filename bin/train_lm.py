#!/usr/bin/env python3
"""Train the entropy-coding LM on codes of a frozen codec, and add it to the codec's release package.

    python bin/train_lm.py --codec ~/.cache/neucodec-train/release/neucodec_24khz.json \
        --corpus ~/.cache/neucodec-train/corpus --run-dir ~/.cache/neucodec-train/lm --steps 3000

Resumes from RUN_DIR's checkpoint when present; otherwise from --init-from's LM. It checkpoints
(and exports) every 500 steps or 10 minutes; SIGTERM or Ctrl-C finishes the step, checkpoints,
exports and exits.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import signal
from pathlib import Path

import torch

from neucodec import config as cfg
from neucodec.hub import load_codec
from neucodec.model import Codec
from neucodec.train.data import Batches, load_corpus
from neucodec.train.lm_solver import LMSolver, code_dataset
from neucodec.weights import carried, load_weights, resolve, save_release


def codes_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A digest of what the codes depend on (encoder and codebooks, not the decoder): a codec
    fine-tuned with a frozen encoder reuses the cached codes of its parent."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if not k.startswith("decoder.")):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", required=True, help="release package of the frozen codec")
    p.add_argument("--corpus", type=Path, default=Path.home() / ".cache/neucodec-train/corpus")
    p.add_argument("--run-dir", type=Path, default=Path.home() / ".cache/neucodec-train/lm")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-hours", type=float)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crops", type=int, default=64, help="batches of 8 x 5 s crops to code for training")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (also on resume)")
    p.add_argument("--init-from", help="release package whose LM to start from when no LM checkpoint exists")
    p.add_argument("--lm", default="{}", help="LMConfig overrides as JSON, e.g. '{\"dim\": 128}'")
    p.add_argument("--export", type=Path, help="write codec + LM release package here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    codec = load_codec(args.codec).to(args.device)
    weights = load_weights(resolve(args.codec))
    codec_config = weights.codec_config
    assert codec_config is not None
    start = load_weights(resolve(args.init_from)) if args.init_from else None
    base = LMSolver.saved_config(args.run_dir) or (start.lm_config if start is not None and start.lm_config
                                                    is not None else cfg.lm_for(codec_config))
    lm_config = dataclasses.replace(base, **json.loads(args.lm))
    args.run_dir.mkdir(parents=True, exist_ok=True)
    cache = args.run_dir / f"codes-{codes_fingerprint(weights.state)}.pt"
    if cache.is_file():
        codes, dev = torch.load(cache, weights_only=True).values()
    else:
        length = 5 * codec_config.sample_rate
        codes = code_dataset(codec, Batches(load_corpus(args.corpus, "train"), 8, length, seed=1), args.crops)
        dev = code_dataset(codec, Batches(load_corpus(args.corpus, "dev"), 8, length, seed=2), 4)
        torch.save({"codes": codes, "dev": dev}, cache)
    print(f"{len(codes)} training sequences, {len(dev)} dev sequences", flush=True)
    solver = LMSolver(lm_config, codec_config, codes, args.run_dir, lr=args.lr, batch_size=args.batch_size,
                      dev_codes=dev, device=args.device)
    if solver.load():
        print(f"resumed LM at step {solver.step}", flush=True)
    elif start is not None:
        if start.lm_state is None or start.lm_config != lm_config:
            raise SystemExit(f"{args.init_from} has no LM of this configuration to start from")
        solver.init_from(start.lm_state, int(start.metadata.get("lm_steps", 0)),
                         float(start.metadata.get("lm_hours", 0.0)))
        print(f"initialised the LM from {args.init_from} (step {solver.step})", flush=True)

    def export() -> None:
        if args.export is None:
            return
        train_codec = Codec(codec_config)
        train_codec.load_state_dict(dict(weights.state))
        meta = dict(weights.metadata, lm_steps=solver.step, lm_hours=round(solver.seconds / 3600, 3),
                    lm_eval=solver.evaluate())
        save_release(args.export, codec_config.name, train_codec, codec_config, solver.lm, lm_config, meta,
                     parents=[w for w in (weights, start) if w is not None], **carried(codec_config, weights)[1])

    def request_stop(signum: int, frame: object) -> None:  # SIGTERM / Ctrl-C: finish the step, save, export
        solver.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    solver.run(args.steps, None if args.max_hours is None else args.max_hours * 3600, on_checkpoint=export)
    export()


if __name__ == "__main__":
    main()
