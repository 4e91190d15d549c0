#!/usr/bin/env python3
"""Train (or resume) a neucodec codec; one process, or several under torchrun.

    python bin/train.py --corpus ~/.cache/neucodec-train/corpus --run-dir ~/.cache/neucodec-train/run \
        --config configs/neucodec_24khz.json --export neucodec/models/neucodec_24khz.json
    torchrun --nproc_per_node 8 bin/train.py ... --device cuda

Resumes from RUN_DIR/checkpoint.pt when present; otherwise from --init-from (release weights).
SIGTERM or Ctrl-C finishes the current step, checkpoints, exports and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from neucodec.train.solver import TrainConfig, build
from neucodec.weights import load_weights, resolve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path.home() / ".cache/neucodec-train/corpus")
    p.add_argument("--run-dir", type=Path, default=Path.home() / ".cache/neucodec-train/run")
    p.add_argument("--config", type=Path, help="TrainConfig JSON (see configs/)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override config fields")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", help="release package to start from when no checkpoint exists")
    p.add_argument("--export", type=Path, help="write a release package here at every checkpoint")
    p.add_argument("--latent-dim", type=int,
                   help="the codec's latent dimension; wider than --init-from's widens it, function-preserving")
    p.add_argument("--whiten-latent", action="store_true",
                   help="starting from --init-from: whiten its latent, same function (train/widen.py)")
    p.add_argument("--max-hours", type=float, help="stop (after a checkpoint) after this long")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = args.device
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    data = json.loads(args.config.read_text()) if args.config else {}
    for item in args.set:
        key, _, value = item.partition("=")
        data[key] = json.loads(value)
    if args.latent_dim:
        codec = data.setdefault("codec", {})
        for part in ("seanet", "quantizer"):
            codec.setdefault(part, {})["dimension"] = args.latent_dim
    config = TrainConfig.from_dict(data)
    solver = build(config, args.run_dir, args.corpus, device)
    parent = load_weights(resolve(args.init_from)) if args.init_from else None
    if solver.load():
        print(f"resumed from {solver.checkpoint_path} at step {solver.step}", flush=True)
    elif parent is not None:
        solver.init_from_release(parent)
        print(f"initialised from {args.init_from} (step {solver.step})", flush=True)
        if args.whiten_latent:
            solver.whiten_latent()
            print("latent whitened, codebooks initialised afresh", flush=True)
    solver.parents = [parent] if parent is not None else []  # exports say which of its files they read
    def request_stop(signum: int, frame: object) -> None:  # SIGTERM / Ctrl-C: finish the step, save, export
        solver.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    solver.run(args.export, None if args.max_hours is None else args.max_hours * 3600)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
