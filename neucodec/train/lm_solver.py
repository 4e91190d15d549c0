"""Entropy-coding LM training on the codes of a frozen codec (paper §3.3).

Codes of random 5 s crops are computed once with the frozen codec and cached; each batch then uses
a random number of codebooks (one of the codec's bandwidths) and, half the time, a random start
position, and the LM learns to predict step t from step t-1 by cross-entropy. The metric is bits
per code, against the log2(bins) bits of plain packing.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import config as cfg
from ..lm import LanguageModel
from ..model import Codec
from .data import Batches
from .progress import bar, log_line

Tensor = torch.Tensor


@torch.no_grad()
def code_dataset(codec: Codec, batches: Batches, n_batches: int) -> Tensor:
    """Codes [N, n_q, frames] (int16) of `n_batches` batches of crops, all codebooks."""
    codec.eval()
    out = [codec.encode(batches.next().to(codec.device), None, chunk_seconds=None).codes.to(torch.int16).cpu()
           for _ in range(n_batches)]
    return torch.cat(out)


def lm_loss(lm: LanguageModel, codes: Tensor, offset: int = 0) -> Tensor:
    """Mean cross-entropy (nats per code) of codes [B, K, T] under the teacher-forced LM."""
    logits = lm(codes, offset=offset)  # [B, K, T, card]
    return F.cross_entropy(logits.flatten(0, 2).float(), codes.flatten())


class LMSolver:
    """Trains a `LanguageModel` on cached codes; checkpoints to `run_dir/lm_checkpoint.pt`."""

    def __init__(self, lm_config: cfg.LMConfig, codec_config: cfg.CodecConfig, codes: Tensor,
                 run_dir: str | Path, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                 dev_codes: Tensor | None = None, device: str = "cpu") -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.lm = LanguageModel(lm_config).to(self.device)
        self.codes, self.dev_codes = codes, dev_codes
        self.run_dir = Path(run_dir)
        self.batch_size = batch_size
        self.lr = lr
        self.opt = torch.optim.AdamW(self.lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.rng = random.Random(seed)
        self.ks = sorted({min(lm_config.n_q, codec_config.n_q_for_bandwidth(b)) for b in codec_config.bandwidths})
        self.bits = math.log2(codec_config.quantizer.bins)
        self.step = 0
        self.seconds = 0.0
        self.stop_requested = False  # set from a signal handler: checkpoint, export, return

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "lm_checkpoint.pt"

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"lm": self.lm.state_dict(), "lm_config": json.dumps(cfg.to_dict(self.lm.cfg)),
                    "opt": self.opt.state_dict(), "step": self.step,
                    "seconds": self.seconds, "rng": json.dumps(self.rng.getstate())}, tmp)
        os.replace(tmp, self.checkpoint_path)

    @staticmethod
    def saved_config(run_dir: str | Path) -> cfg.LMConfig | None:
        """The LM configuration of the checkpoint in `run_dir`, if there is one that records it."""
        path = Path(run_dir) / "lm_checkpoint.pt"
        if not path.is_file():
            return None
        saved = torch.load(path, weights_only=True).get("lm_config")
        return cfg.lm_from_dict(json.loads(saved)) if saved else None

    def load(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        self.lm.load_state_dict(state["lm"])
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:  # the caller's rate, not the saved one (resume to anneal)
            group["lr"] = self.lr
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        r = json.loads(state["rng"])
        self.rng.setstate((r[0], tuple(r[1]), r[2]))
        return True

    def init_from(self, state: dict[str, Tensor], steps: int = 0, hours: float = 0.0) -> None:
        """Start from released LM weights (a fresh machine without the LM checkpoint)."""
        self.lm.load_state_dict(state)
        self.step, self.seconds = steps, hours * 3600

    def train_step(self) -> dict[str, float]:
        self.lm.train()
        idx = torch.tensor([self.rng.randrange(len(self.codes)) for _ in range(self.batch_size)])
        k = self.rng.choice(self.ks)
        codes = self.codes[idx, :k].long().to(self.device)
        offset = self.rng.randrange(1000) if self.rng.random() < 0.5 else 0
        loss = lm_loss(self.lm, codes, offset)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lm.parameters(), 1.0)
        self.opt.step()
        return {"loss": float(loss.detach()), "bits_per_code": float(loss.detach()) / math.log(2), "k": k}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Bits per code on held-out codes at every K, and the saving against plain packing."""
        if self.dev_codes is None:
            return {}
        self.lm.eval()
        out = {}
        for k in self.ks:
            bits = float(lm_loss(self.lm, self.dev_codes[:, :k].long().to(self.device))) / math.log(2)
            out[f"bits_k{k}"] = bits
            out[f"saving_k{k}"] = 1 - bits / self.bits
        return out

    def run(self, steps: int, max_seconds: float | None = None, log_every: int = 50,
            on_checkpoint: tp.Callable[[], None] | None = None, progress: bool | None = None) -> None:
        """Train to `steps` (or `max_seconds`, or a stop request); `progress`: a tqdm bar (None: only
        on a terminal). Checkpoints (and calls `on_checkpoint`) every 10 logs or 10 minutes."""
        start, t_last = time.time(), time.time()
        last_save = start
        acc: list[dict[str, float]] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with bar(steps, self.step, "lm", progress) as pbar:
            while self.step < steps and not self.stop_requested \
                    and (max_seconds is None or time.time() - start < max_seconds):
                t_step = time.time()
                acc.append(self.train_step())
                self.step += 1
                now = time.time()
                acc[-1]["step_s"] = now - t_step
                self.seconds += now - t_last
                t_last = now
                if not pbar.disable:
                    pbar.set_postfix(bits_per_code=f"{np.mean([a['bits_per_code'] for a in acc]):.3f}", refresh=False)
                    pbar.update()
                if self.step % log_every == 0:
                    row = {"step": self.step, "hours": round(self.seconds / 3600, 4),
                           "bits_per_code": round(float(np.mean([a["bits_per_code"] for a in acc])), 4),
                           "step_s": round(float(np.mean([a["step_s"] for a in acc])), 4)}
                    acc = []
                    if self.step % (log_every * 10) == 0 or time.time() - last_save > 600:
                        row.update({k: round(v, 4) for k, v in self.evaluate().items()})
                        self.save()
                        if on_checkpoint:
                            on_checkpoint()
                        last_save = time.time()
                    log_line(json.dumps(row))
                    with open(self.run_dir / "lm_log.csv", "a", newline="") as f:
                        csv.writer(f).writerow([json.dumps(row)])
        self.save()
