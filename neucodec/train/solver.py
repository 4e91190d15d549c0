"""Codec training loop: losses, balancer, adversary, RVQ, checkpoints, evaluation, export.

One process on CPU or CUDA (bf16 autocast), or several under torchrun (DistributedDataParallel,
gloo on CPU, nccl on GPU). Everything needed to resume (weights, optimizers, discriminator,
balancer, step, RNG states) is in `run_dir/checkpoint.pt`, written atomically.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from torch import nn

from .. import config as cfg
from .. import envelope
from ..model import Codec
from ..weights import Weights, carried, complete_codebooks, load_weights, resolve, save_release
from .correction import corrected
from .data import Batches, MixConfig, Prefetched, load_corpus
from .diagnostics import latent_report
from .discriminators import MultiScaleSTFTDiscriminator
from .losses import (
    Balancer,
    CompressedComplexLoss,
    LogStftLoss,
    MultiScaleMelLoss,
    SpectralNsimLoss,
    frame_comb_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    relative_feature_loss,
    si_snr,
)
from .metrics import VisqolSpeech, dev_scores, load_visqol
from .progress import bar, log_line
from .widen import latent_dim, whiten_latent, widen_latent

Tensor = torch.Tensor


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs besides the data; saved into the checkpoint and the release."""

    codec: cfg.CodecConfig = cfg.CodecConfig(name="neucodec_24khz")
    steps: int = 100_000
    batch_size: int = 8
    segment_seconds: float = 1.0
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"l1": 0.1, "mel": 1.0, "adv": 3.0, "feat": 3.0})
    commit_weight: float = 1.0
    commit_mean: bool = False  # the commitment loss averaged over the step's codebooks (the reference), not summed
    balancer: bool = True
    adversarial: bool = True
    adversarial_start: int = 0  # step from which the adversarial and feature losses are on
    disc_prob: float = 2 / 3  # probability of a discriminator update per step
    disc_filters: int = 32  # channels of the STFT discriminators' convolutions (paper: 32)
    disc_warmup: int = 0  # steps from adversarial_start in which only the discriminator learns (every step)
    disc_lr: float | None = None  # the discriminator's learning rate (None: lr)
    quantizer_start: int = 0  # steps of plain autoencoder before the RVQ is switched on
    kmeans_batches: int = 16  # batches of latents for the k-means initialisation of the codebooks
    bypass_prob: float = 0.0  # probability that a step bypasses the quantizer (the plain autoencoder)
    latent_noise: float = 0.0  # on bypassed steps, Gaussian noise of this times the latent's RMS is added (`_noisy`)
    reinit_codebooks: int = 0  # step at which the codebooks are k-means-initialised afresh (0: never)
    whiten_at: int = 0  # step at which the latent is whitened and the codebooks initialised afresh (0: never)
    diag_clips: int = 4  # dev speech clips for the latent diagnostics at each evaluation (0: none)
    seed: int = 0
    log_every: int = 50
    eval_every: int = 1000
    visqol_clips: int = 2  # dev clips per category scored with ViSQOL at each evaluation (0: none)
    checkpoint_every: int = 500
    grad_clip: float = 0.0
    freeze_encoder: bool = False  # train the decoder only: the encoder and codebooks, so the codes, stay fixed
    bf16: bool = True  # on CUDA, forward passes under bf16 autocast (losses in float32)
    loader_workers: int = 0  # processes drawing batches ahead of the loop (0: the loop draws them)
    mel_floor: float = 1e-5  # the mel loss's log floor: log(floor + mel); higher ignores near-silent bins
    decay_start: int = 0  # step at which the learning rates start a cosine decay to zero ...
    decay_steps: int = 0  # ... reached this many steps later (0: constant learning rates)
    bandwidth_weights: tuple[float, ...] | None = None  # how often each of codec.bandwidths is drawn (None: equally)
    mix: dict[str, float] = dataclasses.field(default_factory=dict)  # MixConfig fields to change (none: the paper's)
    envelope: str | None = None  # an envelope table: the losses also score the output corrected on its grid ...
    envelope_share: float = 0.5  # ... with this weight, the plain output 1 - it (`correction.corrected`)

    def __post_init__(self) -> None:
        if self.bandwidth_weights is not None:
            self.bandwidth_weights = tuple(float(w) for w in self.bandwidth_weights)
            if len(self.bandwidth_weights) != len(self.codec.bandwidths) or min(self.bandwidth_weights) < 0 \
                    or not sum(self.bandwidth_weights):
                raise ValueError(f"bandwidth_weights needs one weight >= 0 per bandwidth "
                                 f"{list(self.codec.bandwidths)}, not all 0; got {list(self.bandwidth_weights)}")
        if self.envelope is not None and self.envelope not in envelope.table_names():
            raise ValueError(f"no envelope table {self.envelope!r}; choose one of {', '.join(envelope.table_names())}")
        fields = [f.name for f in dataclasses.fields(MixConfig)]
        if unknown := sorted(set(self.mix) - set(fields)):
            raise ValueError(f"mix has no field {unknown}; fields: {fields}")

    def lr_scale(self, step: int) -> float:
        """The factor on `lr` and `disc_lr` at `step`: 1 before `decay_start`, then a half cosine to 0."""
        if not self.decay_steps or step < self.decay_start:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.decay_start) / self.decay_steps)))

    @classmethod
    def from_dict(cls, data: dict[str, tp.Any]) -> TrainConfig:
        data = dict(data)
        codec = cfg.codec_from_dict(data.pop("codec")) if "codec" in data else cls.codec
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(codec=codec, **data)


def _noisy(scale: float, quantizer: nn.Module, inputs: tuple[tp.Any, ...], out: tp.Any) -> tp.Any:
    """Quantizer forward hook: a bypassed step's latent plus noise of `scale` times its RMS (detached):
    a channel of finite SNR, in which spreading information over more dimensions carries more."""
    if not quantizer.training or out.n_q:
        return out
    z = out.quantized
    return dataclasses.replace(out, quantized=z + scale * z.detach().pow(2).mean().sqrt() * torch.randn_like(z))


def _world() -> tuple[int, int]:
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


class Solver:
    """Trains a `Codec` on batches from `Batches`; call `run()`."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, batches: Batches | Prefetched,
                 dev_clips: list[Path] | None = None, device: str = "cpu") -> None:
        self.cfg, self.run_dir, self.batches = config, Path(run_dir), batches
        self.dev_clips = dev_clips or []
        self.device = torch.device(device)
        self.rank, self.world = _world()
        torch.manual_seed(config.seed)
        self.codec = zero_conv_biases(Codec(config.codec)).to(self.device)
        if config.freeze_encoder:  # before DDP, which only registers parameters that need gradients
            for p in (*self.codec.encoder.parameters(), *self.codec.quantizer.parameters()):
                p.requires_grad_(False)
        self.disc = MultiScaleSTFTDiscriminator(config.codec.channels, config.disc_filters).to(self.device)
        if config.latent_noise:
            self.codec.quantizer.register_forward_hook(functools.partial(_noisy, config.latent_noise))
        self.model, self.disc_model = self.codec, self.disc  # or their DistributedDataParallel wrappers
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.codec, device_ids=ids)
            self.disc_model = nn.parallel.DistributedDataParallel(self.disc, device_ids=ids)
        self.opt = torch.optim.Adam(self.codec.parameters(), lr=config.lr, betas=config.betas)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=config.disc_lr or config.lr, betas=config.betas)
        self.mel_loss = MultiScaleMelLoss(config.codec.sample_rate, floor=config.mel_floor).to(self.device)
        self.nsim_loss = SpectralNsimLoss(config.codec.sample_rate).to(self.device) if config.weights.get("nsim") \
            else None  # optional: made only when it has a weight
        self.stft_loss = LogStftLoss(floor=config.mel_floor).to(self.device) if config.weights.get("stft") else None
        self.cplx_loss = CompressedComplexLoss().to(self.device) if config.weights.get("cplx") else None
        self.balancer = Balancer(config.weights) if config.balancer else None
        self.step = 0
        self.seconds = 0.0  # training wall time, accumulated across resumes
        self.stop_requested = False  # set from a signal handler: checkpoint, export, return
        self.parents: list[Weights] = []  # releases trained from: exports list those whose files they read
        self.bw_rng = random.Random(config.seed)  # same on every rank: same n_q per step
        self.n_qs = sorted({config.codec.n_q_for_bandwidth(b) for b in config.codec.bandwidths})

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def save(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": json.dumps(dataclasses.asdict(self.cfg)), "step": self.step, "seconds": self.seconds,
            "codec": self.codec.state_dict(), "disc": self.disc.state_dict(),
            "opt": self.opt.state_dict(), "disc_opt": self.disc_opt.state_dict(),
            "balancer": json.dumps(self.balancer.state_dict()) if self.balancer else "",
            "torch_rng": torch.get_rng_state(), "data_rng": json.dumps(self.batches.state()),
            "bw_rng": json.dumps(self.bw_rng.getstate()),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load(self) -> bool:
        """Resume from `run_dir/checkpoint.pt` if it exists."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        self.codec.load_state_dict(state["codec"])
        self.opt.load_state_dict(state["opt"])
        try:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        except (RuntimeError, ValueError):  # another disc_filters: the adversary starts afresh
            print(f"checkpoint's discriminator does not match disc_filters={self.cfg.disc_filters}; starting a new one",
                  file=sys.stderr)
        for opt in (self.opt, self.disc_opt):
            for group in opt.param_groups:  # the config's betas, not the saved ones (train_step sets the lrs)
                group["betas"] = tuple(self.cfg.betas)
        if self.balancer and state["balancer"]:
            self.balancer.load_state_dict(json.loads(state["balancer"]))
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        torch.set_rng_state(state["torch_rng"].cpu())
        data_rng = json.loads(state["data_rng"])
        self.batches.set_state(data_rng)
        bw = json.loads(state["bw_rng"])
        self.bw_rng.setstate((bw[0], tuple(bw[1]), bw[2]))
        return True

    def init_from_release(self, release: str | Weights) -> None:
        """Start from released codec weights (a fresh machine without the training checkpoint)."""
        w = release if isinstance(release, Weights) else load_weights(resolve(release))
        state = complete_codebooks(dict(w.state))
        if latent_dim(state) < self.cfg.codec.seanet.dimension:  # a wider latent: same function, new channels
            state = widen_latent(state, self.cfg.codec.seanet.dimension, seed=self.cfg.seed)
        self.codec.load_state_dict(state)
        self.step = int(w.metadata.get("steps", 0))
        self.seconds = float(w.metadata.get("train_hours", 0.0)) * 3600

    # ------------------------------------------------------------------ quantizer init
    @torch.no_grad()
    def latent_frames(self) -> Tensor:
        """The encoder's latent frames [N, dim] on `kmeans_batches` batches."""
        z = torch.cat([self.codec.encoder(self.batches.next().to(self.device)) for _ in range(self.cfg.kmeans_batches)])
        return z.transpose(1, 2).reshape(-1, z.shape[1])

    @torch.no_grad()
    def init_codebooks(self) -> None:
        """k-means on latent frames, residual layer by residual layer."""
        residual = self.latent_frames()
        for i in range(self.codec.n_q):
            book = self.codec.quantizer._codebook(i)
            book.init_from(residual)
            if self.world > 1:
                for b in (book.embed, book.embed_avg, book.cluster_size):
                    dist.broadcast(b, 0)
            residual = residual - book.decode(book.encode(residual))

    def whiten_latent(self) -> None:
        """Whiten the latent (`widen.whiten_latent`), initialise the codebooks afresh, restart the optimizer."""
        state = {k: v.cpu() for k, v in self.codec.state_dict().items()}
        self.codec.load_state_dict(whiten_latent(state, self.latent_frames().cpu()))
        for t in self.codec.state_dict().values() if self.world > 1 else ():
            dist.broadcast(t, 0)  # every replica takes rank 0's whitening
        self.opt = torch.optim.Adam(self.codec.parameters(), lr=self.cfg.lr, betas=self.cfg.betas)
        self.init_codebooks()

    # ------------------------------------------------------------------ one step
    def draw_n_q(self) -> int:
        """This step's number of codebooks: that of one of the codec's bandwidths, drawn equally
        often or by `bandwidth_weights` (low bitrates can get more of the decoder's training)."""
        c = self.cfg
        if c.bandwidth_weights is None:
            return self.bw_rng.choice(self.n_qs)
        return c.codec.n_q_for_bandwidth(self.bw_rng.choices(c.codec.bandwidths, c.bandwidth_weights)[0])

    def _scorer(self, x_hat: Tensor, wav: Tensor) -> tp.Callable[[tp.Callable[[Tensor], Tensor]], Tensor]:
        """How a loss scores this step's output: of `x_hat`, or with `envelope`, (1 - share) of it
        plus share of it with its envelope correction applied (`correction.corrected`)."""
        c = self.cfg
        if c.envelope is None or not c.envelope_share:
            return lambda loss: loss(x_hat)
        fixed = corrected(x_hat, wav, envelope.table_grid(c.envelope))
        if c.envelope_share == 1:
            return lambda loss: loss(fixed)
        return lambda loss: (1 - c.envelope_share) * loss(x_hat) + c.envelope_share * loss(fixed)

    def train_step(self, wav: Tensor) -> dict[str, float]:
        c = self.cfg
        quantize = self.step >= c.quantizer_start
        if c.whiten_at and self.step == c.whiten_at:
            self.whiten_latent()
        elif quantize and (not bool(self.codec.quantizer._codebook(0).inited.item())
                           or (c.reinit_codebooks and self.step == c.reinit_codebooks)):
            self.init_codebooks()
        if quantize and c.bypass_prob and self.bw_rng.random() < c.bypass_prob:
            quantize = False
        n_q = self.draw_n_q() if quantize else 0
        adversarial = c.adversarial and self.step >= c.adversarial_start
        warming = adversarial and self.step < c.adversarial_start + c.disc_warmup  # no adversary for the codec yet
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.bf16 and self.device.type == "cuda")
        self.model.train()
        if c.freeze_encoder:  # inference codes: no codebook updates, no straight-through
            self.codec.encoder.eval()
            self.codec.quantizer.eval()
        with autocast:
            x_hat, q = self.model(wav, n_q)
        x_hat32 = x_hat.float()
        score = self._scorer(x_hat32, wav)
        losses = {"l1": score(lambda y: (y - wav).abs().mean()), "mel": score(lambda y: self.mel_loss(y, wav))}
        if c.weights.get("si_snr"):  # optional: negative SI-SNR pulls the output onto the waveform
            losses["si_snr"] = score(lambda y: -si_snr(y, wav).mean())
        if self.nsim_loss is not None:  # the local structure of band levels, as ViSQOL compares it
            losses["nsim"] = score(lambda y: self.nsim_loss(y, wav))
        if self.stft_loss is not None:  # fine-frequency log magnitudes: harmonics against noise
            losses["stft"] = score(lambda y: self.stft_loss(y, wav))
        if self.cplx_loss is not None:  # compressed complex spectra: every band's waveform, phase included
            losses["cplx"] = score(lambda y: self.cplx_loss(y, wav))
        if c.weights.get("comb"):  # a pattern stamped on every code frame: a buzz at the frame rate
            losses["comb"] = score(lambda y: frame_comb_loss(y, wav, self.codec.hop_length))
        metrics: dict[str, float] = {}
        update_disc = adversarial and (self.bw_rng.random() < c.disc_prob or warming)
        if adversarial and not warming:
            with autocast:  # the real pass serves the feature loss and, kept, the discriminator's update
                with torch.set_grad_enabled(update_disc):
                    logits_real, fmap_real = self.disc_model(wav)
                logits_fake, fmap_fake = self.disc_model(x_hat32)
            losses["adv"] = hinge_generator_loss([lg.float() for lg in logits_fake])
            losses["feat"] = relative_feature_loss([[f.detach().float() for f in fr] for fr in fmap_real],
                                                   [[f.float() for f in ff] for ff in fmap_fake])
        self.opt.zero_grad(set_to_none=True)
        commit = c.commit_weight * (q.commit_loss / max(q.n_q, 1) if c.commit_mean else q.commit_loss)
        if self.balancer is not None:
            out_grad = self.balancer.gradient(losses, x_hat32)
            tensors, grads = [x_hat32], [out_grad]
            metrics.update(self.balancer.metrics)
        else:
            total = sum(c.weights.get(k, 0.0) * v for k, v in losses.items())
            tensors, grads = [total], [torch.ones_like(total)]  # type: ignore[list-item]
        if commit.requires_grad:
            tensors.append(commit)
            grads.append(torch.ones_like(commit))
        torch.autograd.backward(tensors, grads)  # one backward pass (DDP-friendly)
        if c.grad_clip:
            nn.utils.clip_grad_norm_(self.codec.parameters(), c.grad_clip)
        scale = c.lr_scale(self.step)
        for opt, lr in ((self.opt, c.lr), (self.disc_opt, c.disc_lr or c.lr)):
            for group in opt.param_groups:
                group["lr"] = lr * scale
        self.opt.step()
        if update_disc:  # the generator's step left the discriminator's weights as they were for logits_real
            with autocast:
                if warming:
                    logits_real, _ = self.disc_model(wav)
                fake, _ = self.disc_model(x_hat32.detach())
            d_loss = hinge_discriminator_loss([r.float() for r in logits_real], [f.float() for f in fake])
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            metrics["d_loss"] = float(d_loss.detach())
        metrics.update({k: float(v.detach()) for k, v in losses.items()})
        metrics["commit"] = float(q.commit_loss.detach())
        metrics["n_q"] = n_q
        if c.decay_steps:
            metrics["lr"] = c.lr * scale
        with torch.no_grad():
            metrics["si_snr"] = float(si_snr(x_hat32, wav).mean())
        return metrics

    # ------------------------------------------------------------------ evaluation
    @functools.cached_property
    def visqol(self) -> VisqolSpeech | None:
        """The ViSQOL scorer, made at the first evaluation that uses it; None (said once) without visqol-python."""
        scorer = load_visqol()
        if scorer is None:
            log_line("visqol-python is not installed: evaluation without ViSQOL")
        return scorer

    def evaluate(self, bandwidths: tp.Sequence[float] = (1.5, 6.0)) -> dict[str, float]:
        """Mean SI-SNR and mel distance on the dev clips, per category and bandwidth, and ViSQOL
        (speech mode, 16 kHz) on the first `visqol_clips` clips of each category when it is installed."""
        scores = dev_scores(self.codec.eval(), self.dev_clips, bandwidths,
                            self.visqol if self.cfg.visqol_clips else None,
                            lambda category, index, bandwidth: index < self.cfg.visqol_clips)
        speech = [p for p in self.dev_clips if p.stem.startswith("speech")][: self.cfg.diag_clips]
        if speech:
            clips = [sf.read(str(p), dtype="float32", always_2d=True)[0].mean(1) for p in speech]
            scores.update(latent_report(self.codec, clips))
        return scores

    # ------------------------------------------------------------------ loop
    def run(self, export_to: Path | None = None, max_seconds: float | None = None,
            progress: bool | None = None) -> None:
        """Train to `cfg.steps` (or `max_seconds`, or a stop request), then checkpoint and export.

        `progress`: a tqdm bar on rank 0 (None: only when stdout and stderr are terminals).
        """
        start, last_save = time.time(), time.time()
        log_path = self.run_dir / "log.csv"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        acc: dict[str, list[float]] = {}
        t_last = time.time()
        with bar(self.cfg.steps, self.step, "train", progress if self.rank == 0 else False) as pbar:
            while self.step < self.cfg.steps:
                if self.stop_requested or (max_seconds is not None and time.time() - start > max_seconds):
                    break
                t_step = time.time()
                m = self.train_step(self.batches.next().to(self.device))
                self.step += 1
                now = time.time()
                m["step_s"] = now - t_step  # batch + step, without logging, evaluation, checkpoints
                self.seconds += now - t_last
                t_last = now
                for k, v in m.items():
                    acc.setdefault(k, []).append(v)
                if not pbar.disable:
                    pbar.set_postfix({k: f"{np.mean(acc[k]):.3g}" for k in ("mel", "si_snr")}, refresh=False)
                    pbar.update()
                if self.rank == 0 and self.step % self.cfg.log_every == 0:
                    row = {"step": self.step, "hours": round(self.seconds / 3600, 4),
                           **{k: round(float(np.mean(v)), 5) for k, v in acc.items()}}
                    acc = {}
                    self._log(log_path, row)
                if self.rank == 0 and self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.dev_clips:
                    ev = self.evaluate()
                    self._log(self.run_dir / "eval.csv", {"step": self.step, **{k: round(v, 4) for k, v in ev.items()}})
                if self.step % self.cfg.checkpoint_every == 0 or time.time() - last_save > 600:
                    self.save()
                    if export_to is not None and self.rank == 0:
                        self.export(export_to)
                    last_save = time.time()
        self.save()
        if export_to is not None and self.rank == 0:
            self.export(export_to)

    def _log(self, path: Path, row: dict[str, tp.Any]) -> None:
        log_line(json.dumps(row))
        append_csv(path, row)

    def export(self, path: Path, lm: nn.Module | None = None, lm_config: cfg.LMConfig | None = None) -> Path:
        """Release package (fp16 safetensors + JSON) of the current weights; it keeps the first
        parent's package settings (`weights.carried`: bandwidths offered, envelope table, default
        bandwidth)."""
        meta = {"steps": self.step, "train_hours": round(self.seconds / 3600, 3),
                "batch_size": self.cfg.batch_size * self.world, "segment_seconds": self.cfg.segment_seconds}
        codec_config, settings = carried(self.cfg.codec, self.parents[0] if self.parents else None)
        return save_release(path, self.cfg.codec.name, self.codec, codec_config, lm, lm_config, meta,
                            parents=self.parents, **settings)


def append_csv(path: Path, row: dict[str, tp.Any]) -> None:
    """Append `row` to the CSV file `path`, keeping one file per run whatever columns come and go.

    A row with columns the header lacks (ViSQOL added to eval.csv, the adversary's losses to log.csv)
    extends the header: the file is rewritten atomically with the new columns last and empty cells
    in the earlier rows. Columns that a row lacks are left empty.
    """
    header: list[str] = []
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f))
    fields = header + [k for k in row if k not in header]
    if fields == header:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)
        return
    rows: list[dict[str, tp.Any]] = []
    if header:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows([*rows, row])
    os.replace(tmp, path)


def zero_conv_biases(codec: Codec) -> Codec:
    """Start every convolution bias at zero.

    PyTorch's default biases pass through the stacked transposed convolutions as a fixed periodic
    pattern (period = hop) that is independent of the input and swamps the signal path at
    initialisation: the output is then uncorrelated with the input and stays so for thousands of
    steps (measured here: SI-SNR stuck near -44 dB for 1,000 steps with default biases, several
    items above 0 dB after 60 steps with zero biases).
    """
    for module in codec.modules():
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return codec


def dev_clip_paths(corpus_root: str | Path) -> list[Path]:
    return sorted((Path(corpus_root) / "dev" / "clips").glob("*.wav"))


def build(config: TrainConfig, run_dir: Path, corpus: Path, device: str = "cpu") -> Solver:
    rank, _ = _world()
    pools = load_corpus(corpus, "train")
    batches = Batches(pools, config.batch_size, int(config.segment_seconds * config.codec.sample_rate),
                      seed=config.seed + 1000 * rank, mix=MixConfig(**config.mix))
    stream = Prefetched(batches, config.loader_workers) if config.loader_workers else batches
    return Solver(config, run_dir, stream, dev_clip_paths(corpus), device)

