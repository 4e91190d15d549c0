"""Training parts: balancer, RVQ training, a fixed-batch run whose loss falls, resume, DDP,
evaluation (with and without ViSQOL), CSV logs and the progress bar."""
from __future__ import annotations

import csv
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp

from neucodec import config as cfg
from neucodec.quantization import ResidualVectorQuantizer, kmeans
from neucodec.train.data import Batches, Clip, Pool, Prefetched
from neucodec.train.losses import (
    Balancer,
    CompressedComplexLoss,
    LogStftLoss,
    MultiScaleMelLoss,
    SpectralNsimLoss,
    frame_comb_loss,
    si_snr,
)
from neucodec.train.solver import Solver, TrainConfig, append_csv, build
from neucodec.weights import load_weights

from ._corpus import FREQS, SR, tone_corpus

TINY = cfg.CodecConfig(name="tiny", seanet=cfg.SEANetConfig(n_filters=4, dimension=16, lstm=1),
                       quantizer=cfg.RVQConfig(dimension=16, n_q=4, bins=64, threshold_ema_dead_code=0.01),
                       bandwidths=(1.5, 3.0))


def _batches(seed: int = 0, batch: int = 4, length: int = 4800) -> Batches:
    rng = np.random.default_rng(123)
    t = np.arange(48000) / 24000
    clips = [Clip((0.3 * np.sin(2 * np.pi * f * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
                   + 0.02 * rng.standard_normal(len(t))).astype(np.float32), 0, len(t), f"s{f}")
             for f in (110, 220, 330, 440)]
    return Batches({"music": Pool(clips)}, batch, length, seed=seed)


def test_prefetched_batches_come_from_seeded_workers() -> None:
    def first(n: int, state: dict | None = None) -> list[torch.Tensor]:
        stream = Prefetched(_batches(seed=5), workers=2)
        if state is not None:
            stream.set_state(state)
        return [stream.next() for _ in range(n)]

    a, b = first(4), first(4)
    assert all(x.shape == (4, 1, 4800) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same batches in the same order
    assert not torch.equal(a[0], a[1])  # the two workers draw different crops
    moved = _batches(seed=5)
    moved.next()
    assert not torch.equal(first(1, moved.state())[0], a[0])  # a restored generator state seeds the workers


def test_balancer_gives_each_loss_its_weight_fraction() -> None:
    out = torch.zeros(2, 1, 8, requires_grad=True)
    # two losses on disjoint samples, with gradients of wildly different scales
    losses = {"a": 1000.0 * out[..., :4].pow(2).sum() + 5000.0 * out[..., :4].sum(),
              "b": 1e-3 * out[..., 4:].sum()}
    bal = Balancer({"a": 3.0, "b": 1.0})
    grad = bal.gradient(losses, out)
    na = grad[..., :4].flatten(1).norm(dim=1).mean()
    nb = grad[..., 4:].flatten(1).norm(dim=1).mean()
    assert float(na / nb) == pytest.approx(3.0, rel=1e-4)
    assert float(na + nb) == pytest.approx(1.0, rel=1e-4)  # total norm R = 1


def test_balancer_ema_is_bias_corrected() -> None:
    bal = Balancer({"a": 1.0}, ema_decay=0.9)
    assert bal._ema("a", 2.0) == pytest.approx(2.0)
    assert bal._ema("a", 4.0) == pytest.approx((0.9 * 2 + 4) / 1.9)


def test_kmeans_finds_clusters() -> None:
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = torch.cat([c + 0.1 * torch.randn(200, 2) for c in centers])
    means, bins = kmeans(samples, 3, iters=20)
    found = sorted(tuple(round(v) for v in m.tolist()) for m in means)
    assert found == [(0, 0), (0, 10), (10, 0)]
    assert bins.sum() == 600


def test_rvq_training_gradients_reach_every_layer_and_codes_are_replaced() -> None:
    rvq = ResidualVectorQuantizer(cfg.RVQConfig(dimension=8, n_q=4, bins=16, threshold_ema_dead_code=0.5))
    rvq.train()
    z = torch.randn(2, 8, 50, requires_grad=True)
    res = rvq(z, 4)
    assert all(bool(rvq._codebook(i).inited.item()) for i in range(4))  # k-means initialised
    for i, loss in enumerate(res.layer_losses):
        (g,) = torch.autograd.grad(loss, z, retain_graph=True)
        assert g.abs().sum() > 0, f"layer {i} commitment does not reach the encoder"
    # straight-through: the quantized output passes the gradient to z unchanged
    (g,) = torch.autograd.grad(res.quantized.sum(), z)
    assert torch.allclose(g, torch.ones_like(g))
    book = rvq._codebook(3)
    book.cluster_size.zero_()  # every code "dead": all must be replaced from the batch
    before = book.embed.clone()
    replaced = book.ema_update(torch.randn(100, 8), torch.zeros(100, dtype=torch.long))
    assert replaced >= 15 and not torch.equal(before, book.embed)


def test_mel_loss_and_si_snr_behave() -> None:
    x = torch.randn(2, 1, 4800)
    mel = MultiScaleMelLoss(24000)
    assert float(mel(x, x)) == 0.0
    assert float(mel(0.5 * x, x)) > 0.0
    assert float(si_snr(x, x).min()) > 60
    assert float(si_snr(torch.randn_like(x), x).max()) < 0


def test_nsim_loss_ranks_degradations_like_visqol() -> None:
    """The spectral NSIM is 1 for the signal itself, falls with noise, and falls for a version whose
    band levels are smoothed over time (the mean a reconstruction loss learns), as ViSQOL does."""
    t = torch.arange(24000) / 24000
    syllables = (1 + torch.sin(2 * math.pi * 4 * t)) / 2  # 4 Hz level changes across ...
    formant = 700 + 500 * torch.sin(2 * math.pi * 3 * t)  # ... a moving resonance
    x = sum(torch.sin(2 * math.pi * torch.cumsum(k * (130 + 0 * t), 0) / 24000)
            * torch.exp(-((k * 130 - formant) / 300) ** 2) for k in range(1, 40)) * syllables * 0.3
    x = x[None, None].float()
    loss = SpectralNsimLoss(24000)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g) * x.pow(2).mean().sqrt()
    flat = x.mean() + torch.nn.functional.avg_pool1d(x.abs(), 4801, 1, 2400, count_include_pad=False) * torch.sign(x)
    scores = {name: 1 - float(loss(y, x)) for name, y in
              [("same", x), ("noise 30 dB", x + 0.03 * noise), ("noise 10 dB", x + 0.3 * noise), ("smoothed", flat)]}
    assert scores["same"] > 0.999
    assert 0.999 > scores["noise 30 dB"] > scores["noise 10 dB"], scores
    assert scores["smoothed"] < scores["noise 30 dB"], scores
    y = (x + 0.3 * noise).requires_grad_()
    loss(y, x).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_log_stft_loss_sees_missing_energy_that_the_waveform_l1_prefers() -> None:
    """A random-phase component the codes cannot pin down: the waveform L1 is lower for leaving it out
    (the median of an unknown phase is silence), the log STFT loss for keeping it at the right level."""
    t = torch.arange(24000) / 24000
    g = torch.Generator().manual_seed(0)
    low = 0.3 * torch.sin(2 * math.pi * 200 * t)

    def partials() -> torch.Tensor:  # the same three partials at random phases
        return sum(0.05 * torch.sin(2 * math.pi * f * t + 6.3 * float(torch.rand(1, generator=g)))
                   for f in (1500, 2500, 3300))

    high, shifted = partials(), partials()
    x, kept, dropped = (v[None, None].float() for v in (low + high, low + shifted, low))
    loss = LogStftLoss()
    assert float(loss(x, x)) == 0.0
    assert float((dropped - x).abs().mean()) < float((kept - x).abs().mean())
    assert float(loss(kept, x)) < float(loss(dropped, x))
    y = dropped.clone().requires_grad_()
    loss(y, x).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_compressed_complex_loss_sees_a_quiet_bands_waveform_that_the_waveform_l1_overlooks() -> None:
    """A 3 kHz partial 40 dB below a 200 Hz tone: turning its phase over costs the waveform L1 less than
    a 5 % error in the loud tone's level; the compressed complex loss ranks them the other way."""
    t = torch.arange(24000) / 24000
    low, high = 0.3 * torch.sin(2 * math.pi * 200 * t), 0.003 * torch.sin(2 * math.pi * 3000 * t)
    x, flipped, quieter = (v[None, None].float() for v in (low + high, low - high, 0.95 * low + high))
    loss = CompressedComplexLoss()
    assert float(loss(x, x)) == 0.0
    assert float((flipped - x).abs().mean()) < float((quieter - x).abs().mean())
    assert float(loss(flipped, x)) > 10 * float(loss(quieter, x))
    y = torch.zeros_like(x).requires_grad_()  # silence: the compression's gradient stays finite
    loss(y, x).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_frame_comb_loss_sees_a_pattern_repeated_every_frame_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 24000, generator=g)
    stamp = 0.01 * torch.randn(320, generator=g).repeat(75)  # the same 320 samples on every frame
    noise = 0.01 * torch.randn(2, 1, 24000, generator=g)  # as loud, but different on every frame
    assert float(frame_comb_loss(x, x, 320)) == 0.0
    assert float(frame_comb_loss(x + stamp, x, 320)) > 20 * float(frame_comb_loss(x + noise, x, 320))


def _solver(tmp_path: Path, **kw: object) -> Solver:
    kw = {"batch_size": 4, "segment_seconds": 0.2, "adversarial": True, "quantizer_start": 0, "kmeans_batches": 2,
          "log_every": 1, "eval_every": 0, "checkpoint_every": 1000, **kw}
    c = TrainConfig(codec=TINY, **kw)  # type: ignore[arg-type]
    return Solver(c, tmp_path, _batches())


def test_fixed_batch_autoencoder_learns_the_waveform(tmp_path: Path) -> None:
    """The cheap check that the model can learn at all: overfit one batch to a clearly positive
    SI-SNR (a falling mel loss alone proves nothing: phase-less noise can lower it)."""
    torch.manual_seed(0)
    codec = cfg.CodecConfig(name="tiny8", seanet=cfg.SEANetConfig(n_filters=8, dimension=32, lstm=1),
                            quantizer=cfg.RVQConfig(dimension=32, n_q=4, bins=64), bandwidths=(1.5, 3.0))
    solver = Solver(TrainConfig(codec=codec, batch_size=4, segment_seconds=0.2, adversarial=False, lr=3e-3,
                                weights={"l1": 1.0, "mel": 1.0}), tmp_path, _batches())
    solver.n_qs = [0]  # plain autoencoder
    batch = solver.batches.next()
    first = solver.train_step(batch)
    for _ in range(60):
        last = solver.train_step(batch)
    assert last["mel"] < first["mel"] and last["l1"] < first["l1"]
    assert last["si_snr"] > 10.0, last["si_snr"]


def test_adversarial_step_and_resume_is_exact(tmp_path: Path) -> None:
    a = _solver(tmp_path)
    for _ in range(2):
        a.train_step(a.batches.next())
        a.step += 1
    a.save()
    expected = a.train_step(a.batches.next())
    assert {"adv", "feat", "mel", "l1", "commit"} <= set(expected)
    b = _solver(tmp_path)
    assert b.load() and b.step == 2
    got = b.train_step(b.batches.next())
    for key in ("l1", "mel", "commit", "n_q"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key


def test_discriminator_warmup_leaves_the_codec_alone(tmp_path: Path) -> None:
    s = _solver(tmp_path, adversarial_start=1, disc_warmup=2, disc_prob=0.0, disc_filters=4, disc_lr=1e-3)
    assert s.disc_opt.param_groups[0]["lr"] == 1e-3
    seen = []
    for step in range(4):
        s.step = step
        before = [p.detach().clone() for p in s.disc.parameters()]
        m = s.train_step(s.batches.next())
        changed = any(not torch.equal(a, p) for a, p in zip(before, s.disc.parameters()))
        seen.append(("adv" in m, "d_loss" in m, changed))
    # step 0: no adversary; 1-2: the discriminator learns every step, the codec gets no adversarial loss;
    # 3: the codec's adversarial and feature losses are on (and disc_prob=0 skips the update)
    assert seen == [(False, False, False), (False, True, True), (False, True, True), (True, False, False)]


def test_freeze_encoder_trains_the_decoder_only(tmp_path: Path) -> None:
    s = _solver(tmp_path, freeze_encoder=True, adversarial=True, disc_filters=4)
    s.train_step(s.batches.next())  # initialises the codebooks
    parent = load_weights(s.export(tmp_path / "parent" / "tiny.json"))
    s.parents = [parent]
    frozen = {k: v.clone() for k, v in s.codec.state_dict().items() if not k.startswith("decoder.")}
    decoder = {k: v.clone() for k, v in s.codec.decoder.state_dict().items()}
    for _ in range(2):
        m = s.train_step(s.batches.next())
    assert "adv" in m
    assert all(torch.equal(v, s.codec.state_dict()[k]) for k, v in frozen.items())  # codes stay the same
    assert any(not torch.equal(v, s.codec.decoder.state_dict()[k]) for k, v in decoder.items())
    child = load_weights(s.export(tmp_path / "child" / "tiny.json"))
    assert child.fingerprint != parent.fingerprint and child.compatible == {"codec": [parent.fingerprint]}


def test_learning_rates_decay_on_a_cosine_from_decay_start(tmp_path: Path) -> None:
    s = _solver(tmp_path, lr=1e-3, disc_lr=2e-3, disc_filters=4, decay_start=2, decay_steps=4)
    assert [s.cfg.lr_scale(k) for k in (0, 2, 4, 6, 9)] == pytest.approx([1, 1, 0.5, 0, 0], abs=1e-12)
    seen = []
    for step in (1, 4, 6):
        s.step = step
        before = [p.detach().clone() for p in s.codec.decoder.parameters()]
        m = s.train_step(s.batches.next())
        moved = any(not torch.equal(a, p) for a, p in zip(before, s.codec.decoder.parameters()))
        seen.append((m["lr"], s.disc_opt.param_groups[0]["lr"], moved))
    assert seen == [(1e-3, 2e-3, True), (5e-4, pytest.approx(1e-3), True), (0.0, 0.0, False)]


def test_bandwidth_weights_set_how_often_each_bandwidth_is_trained(tmp_path: Path) -> None:
    low, high = (TINY.n_q_for_bandwidth(b) for b in TINY.bandwidths)
    assert low != high
    even = _solver(tmp_path / "even", disc_filters=4)
    assert {even.draw_n_q() for _ in range(50)} == {low, high}
    skewed = _solver(tmp_path / "skewed", disc_filters=4, bandwidth_weights=[3, 1])
    draws = [skewed.draw_n_q() for _ in range(2000)]
    assert 0.7 < draws.count(low) / len(draws) < 0.8
    only_high = _solver(tmp_path / "high", adversarial=False, bandwidth_weights=[0, 1])
    assert only_high.train_step(only_high.batches.next())["n_q"] == high
    for bad in ([1.0], [1, -1], [0, 0]):
        with pytest.raises(ValueError, match="bandwidth_weights"):
            TrainConfig(codec=TINY, bandwidth_weights=bad)


def test_mix_sets_which_categories_the_batches_draw(tmp_path: Path) -> None:
    """`mix` reaches the batches that `build` makes: here only single speech crops, never music."""
    tone_corpus(tmp_path)

    def peaks(**mix: float) -> set[float]:
        config = TrainConfig(codec=TINY, batch_size=16, segment_seconds=0.1, mix=mix)
        x = build(config, tmp_path / "run", tmp_path).batches.next()[:, 0].numpy()
        return set(np.fft.rfftfreq(x.shape[1], 1 / SR)[np.abs(np.fft.rfft(x)).argmax(axis=1)])

    speech, drawn = set(FREQS["speech"]), peaks()
    assert drawn & speech and drawn - speech  # the paper's mixture draws speech, and music and sounds too
    assert peaks(p_single_music=0, p_single_other=1, p_mix2=0, p_mix3=0, speech_share=1) <= speech
    with pytest.raises(ValueError, match="mix has no field"):
        TrainConfig(codec=TINY, mix={"speech": 1.0})


def test_export_is_loadable(tmp_path: Path) -> None:
    from neucodec import load_codec

    s = _solver(tmp_path)
    s.train_step(s.batches.next())
    path = s.export(tmp_path / "rel" / "tiny.json")
    codec = load_codec(path)
    wav = torch.randn(1, 1, 2400) * 0.1
    enc = codec.encode(wav, 3.0)
    assert enc.codes.shape == (1, 4, 8)  # 3 kbps of 6-bit codebooks: min(4, 6) codebooks
    assert codec.decode(enc).shape == wav.shape


def test_exports_keep_their_parents_package_settings(tmp_path: Path) -> None:
    """A candidate trained from a release offers what it offered (a bandwidth the training config
    does not draw), names its envelope table and default bandwidth, so it can ship as it is."""
    import dataclasses

    from neucodec.weights import save_release

    s = _solver(tmp_path, freeze_encoder=True)
    s.train_step(s.batches.next())
    offered = dataclasses.replace(TINY, bandwidths=(0.75, 1.5, 3.0))
    parent = load_weights(save_release(tmp_path / "parent" / "tiny.json", "tiny", s.codec, offered,
                                       envelope="e1", default_bandwidth=0.75))
    s.parents = [parent]
    s.train_step(s.batches.next())
    child = load_weights(s.export(tmp_path / "child" / "tiny.json"))
    assert child.codec_config.bandwidths == (0.75, 1.5, 3.0)
    assert (child.envelope, child.default_bandwidth) == ("e1", 0.75)
    assert child.compatible == {"codec": [parent.fingerprint]}
    s.parents = []  # from scratch: the training configuration's bandwidths, no settings
    orphan = load_weights(s.export(tmp_path / "orphan" / "tiny.json"))
    assert (orphan.codec_config.bandwidths, orphan.envelope, orphan.default_bandwidth) == ((1.5, 3.0), None, None)


def _dev_clips(folder: Path) -> list[Path]:
    """Two 1 s dev clips per category, named like the corpus builder's (category from the name)."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(24000) / 24000
    paths = []
    for i, (cat, f0) in enumerate([("music", 196), ("music", 262), ("speech", 120), ("speech", 210)]):
        x = sum(0.3 / k * np.sin(2 * np.pi * k * f0 * t) for k in (1, 2, 3)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
        path = folder / f"{cat}_{i % 2:02d}.wav"
        sf.write(path, x.astype(np.float32), 24000)
        paths.append(path)
    return sorted(paths)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_scores_visqol_on_the_first_clips_of_each_category(tmp_path: Path) -> None:
    pytest.importorskip("visqol")
    s = _solver(tmp_path, visqol_clips=1)
    s.dev_clips = _dev_clips(tmp_path / "clips")
    ev = s.evaluate()
    assert {k for k in ev if k.endswith("visqol")} == {f"{c}_{b}k_visqol" for c in ("music", "speech")
                                                        for b in ("1.5", "6")}
    assert all(1.0 <= ev[k] <= 5.0 for k in ev if k.endswith("visqol")), ev
    x, sr = sf.read(s.dev_clips[0], dtype="float32")  # the scorer itself: identity near the top, silence unscored
    assert s.visqol(x, x, sr) > 4.5 and math.isnan(s.visqol(x, np.zeros_like(x), sr))  # type: ignore[misc]
    assert {f"{c}_{b}k_{m}" for c in ("music", "speech") for b in ("1.5", "6") for m in ("si_snr", "mel")} < set(ev)


def test_eval_without_visqol_says_so_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "visqol", None)  # `import visqol` now fails, as when not installed
    s = _solver(tmp_path)
    s.dev_clips = _dev_clips(tmp_path / "clips")
    first, second = s.evaluate(), s.evaluate()
    scores = [k for k in first if not k.startswith(("rank", "read_rank", "corr_"))]  # the rest: latent diagnostics
    assert set(first) == set(second) and len(scores) == 8  # 2 categories x 2 bandwidths x (si_snr, mel)
    assert {"rank90", "rank99", "read_rank99", "corr_none_0-0.5k", "corr_2_6-8k"} <= set(first)  # on the speech clips
    assert not any(k.endswith("visqol") for k in first)
    assert capsys.readouterr().out.count("visqol-python is not installed") == 1
    off = _solver(tmp_path, visqol_clips=0)
    off.dev_clips = s.dev_clips
    assert set(off.evaluate()) == set(first) and "visqol" not in vars(off)  # not even looked for


def test_append_csv_extends_the_header_of_an_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "eval.csv"
    path.write_text("step,speech_6k_si_snr,speech_6k_mel\r\n1000,1.5,0.75\r\n")  # a run from before ViSQOL
    append_csv(path, {"step": 2000, "speech_6k_si_snr": 2.5, "speech_6k_mel": 0.7, "speech_6k_visqol": 2.1})
    append_csv(path, {"step": 3000, "speech_6k_si_snr": 3.5, "speech_6k_mel": 0.6})  # ViSQOL gone again
    assert path.read_text().splitlines()[0] == "step,speech_6k_si_snr,speech_6k_mel,speech_6k_visqol"
    assert _read_csv(path) == [
        {"step": "1000", "speech_6k_si_snr": "1.5", "speech_6k_mel": "0.75", "speech_6k_visqol": ""},
        {"step": "2000", "speech_6k_si_snr": "2.5", "speech_6k_mel": "0.7", "speech_6k_visqol": "2.1"},
        {"step": "3000", "speech_6k_si_snr": "3.5", "speech_6k_mel": "0.6", "speech_6k_visqol": ""}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.csv"]


@pytest.mark.parametrize("progress", [None, True])
def test_run_logs_evaluates_and_shows_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               progress: bool | None) -> None:
    """A short run through `Solver.run`: log and eval CSVs, and a progress bar only where asked
    (None = automatic: pytest's captured streams are not terminals, so only the log lines)."""
    s = _solver(tmp_path / "run", steps=4, log_every=2, eval_every=4, visqol_clips=1)
    s.dev_clips = _dev_clips(tmp_path / "clips")
    s.run(progress=progress)
    out, err = capsys.readouterr()
    log = _read_csv(tmp_path / "run" / "log.csv")
    assert [r["step"] for r in log] == ["2", "4"] and all(float(r["step_s"]) > 0 for r in log)
    (ev,) = _read_csv(tmp_path / "run" / "eval.csv")
    assert ev["step"] == "4" and math.isfinite(float(ev["speech_1.5k_si_snr"]))
    assert len([line for line in out.splitlines() if line.startswith("{")]) == 3  # 2 log rows + 1 eval row
    if progress:
        assert "train: 100%" in err and "4/4" in err and "si_snr=" in err
    else:
        assert "train:" not in err and "\r" not in err


def test_lm_run_with_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from neucodec.train.lm_solver import LMSolver

    codes = torch.randint(0, 1024, (8, 4, 12), dtype=torch.int16)
    lm_cfg = cfg.LMConfig(n_q=4, dim=16, num_layers=1, num_heads=2, past_context=10)
    codec_cfg = cfg.CodecConfig(quantizer=cfg.RVQConfig(n_q=4), bandwidths=(1.5, 3.0))
    solver = LMSolver(lm_cfg, codec_cfg, codes, tmp_path / "lm", batch_size=2)
    solver.run(4, log_every=2, progress=True)
    out, err = capsys.readouterr()
    assert solver.step == 4 and len(out.splitlines()) == 2 and '"step_s"' in out
    assert "lm: 100%" in err and "bits_per_code=" in err
    assert (tmp_path / "lm" / "lm_checkpoint.pt").is_file()
    assert LMSolver.saved_config(tmp_path / "lm") == lm_cfg  # what train_lm resumes with
    again = LMSolver(lm_cfg, codec_cfg, codes, tmp_path / "lm", lr=1e-4, batch_size=2)
    assert again.load() and again.step == 4 and again.opt.param_groups[0]["lr"] == 1e-4
    fresh = LMSolver(lm_cfg, codec_cfg, codes, tmp_path / "other", batch_size=2)
    fresh.init_from(solver.lm.state_dict(), steps=4, hours=0.5)
    assert fresh.step == 4 and torch.equal(fresh.lm.emb[0].weight, solver.lm.emb[0].weight)
    again.stop_requested = True  # what SIGTERM does in bin/train_lm.py: no step, but a checkpoint
    (tmp_path / "lm" / "lm_checkpoint.pt").unlink()
    again.run(10, progress=False)
    assert again.step == 4 and (tmp_path / "lm" / "lm_checkpoint.pt").is_file()


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    s = Solver(TrainConfig(codec=TINY, batch_size=2, segment_seconds=0.2, adversarial=True, kmeans_batches=1,
                           eval_every=0), tmp, _batches(seed=rank, batch=2))
    for _ in range(2):
        s.train_step(s.batches.next())
    flat = torch.cat([p.detach().flatten() for p in s.codec.parameters()]
                     + [s.codec.quantizer._codebook(0).embed.flatten()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    if rank == 0:
        assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
        Path(tmp, "ok").write_text("1")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown ("terminate called ...") at random


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok").exists()


def test_lm_training_learns_predictable_codes(tmp_path: Path) -> None:
    from neucodec.train.lm_solver import LMSolver

    torch.manual_seed(0)
    # each codebook repeats one code: perfectly predictable from step t-1
    codes = torch.randint(0, 1024, (32, 4, 1)).expand(32, 4, 30).to(torch.int16).contiguous()
    lm_cfg = cfg.LMConfig(n_q=4, dim=32, num_layers=1, num_heads=2, past_context=20, tie_embeddings=True)
    codec_cfg = cfg.CodecConfig(quantizer=cfg.RVQConfig(n_q=4), bandwidths=(1.5, 3.0))
    solver = LMSolver(lm_cfg, codec_cfg, codes, tmp_path, lr=1e-2, batch_size=8, dev_codes=codes[:4])
    before = solver.evaluate()
    for _ in range(60):
        solver.train_step()
    after = solver.evaluate()
    assert before["bits_k4"] > 5  # little learnt yet (tied heads already favour repeating a code)
    assert after["bits_k4"] < 0.5 * before["bits_k4"] and after["saving_k4"] > 0.3
    solver.step = 60
    solver.save()
    again = LMSolver(lm_cfg, codec_cfg, codes, tmp_path, dev_codes=codes[:4])
    assert again.load() and again.step == 60
    assert again.evaluate()["bits_k4"] == pytest.approx(after["bits_k4"])


def test_visqol_leaves_the_callers_torch_thread_count_alone() -> None:
    """visqol-python's parallel numba loops can reset the OpenMP thread count that torch reads
    (measured in bench_quality: 1 -> 2 after the first score, once our LM kernels had loaded numba),
    so the codec after a score ran on more threads than the caller set. Whether a given process hits
    it depends on library load order and environment, so the reset is made here, inside the real
    scorer's call, and the scorer must undo it."""
    pytest.importorskip("visqol")
    from neucodec.train.metrics import VisqolSpeech

    scorer = VisqolSpeech()
    measure = scorer.api.measure_from_arrays

    def measure_resetting_threads(*args: object, **kwargs: object) -> object:
        torch.set_num_threads(2)
        return measure(*args, **kwargs)

    scorer.api.measure_from_arrays = measure_resetting_threads  # type: ignore[method-assign]
    x = (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    assert torch.get_num_threads() == 1  # (the training tests' fixture)
    assert 1.0 <= scorer(x, 0.9 * x, 16000) <= 5.0
    assert torch.get_num_threads() == 1


def test_dev_scores_with_the_envelope_correction_score_what_files_carry(tmp_path: Path) -> None:
    """`rank_models.py --envelope`: the corrected audio of a tiny random codec is far closer to its
    input's envelope, so its mel distance drops; the keys and clip order are those of the plain scores."""
    from _bitstream import tiny_codec24
    from neucodec.train.metrics import dev_scores_per_clip

    codec = tiny_codec24()
    t = np.arange(24000) / 24000
    rng = np.random.default_rng(0)
    for i, name in enumerate(["speech_000.wav", "music_000.wav"]):  # noise with a syllable-rate envelope
        x = rng.normal(size=t.size) * (0.02 + 0.2 * np.sin(2 * np.pi * (2 + i) * t) ** 2)
        sf.write(tmp_path / name, x.astype(np.float32), 24000)
    clips = sorted(tmp_path.glob("*.wav"))
    with torch.no_grad():
        plain = dev_scores_per_clip(codec, clips, (1.5,), None, lambda *_: False)
        fixed = dev_scores_per_clip(codec, clips, (1.5,), None, lambda *_: False, "e1")
    assert plain.keys() == {"music_1.5k_mel", "music_1.5k_si_snr", "speech_1.5k_mel", "speech_1.5k_si_snr"}
    assert fixed.keys() == plain.keys() | {"music_1.5k_envelope_kbps", "speech_1.5k_envelope_kbps"}
    assert all(0.1 < kbps[0] < 3.2 for k, kbps in fixed.items() if k.endswith("envelope_kbps"))  # e1: 1,000 values/s
    for key in ("music_1.5k_mel", "speech_1.5k_mel"):
        assert fixed[key][0] < plain[key][0]


def test_corrected_is_the_envelope_correction_with_the_levels_its_own() -> None:
    """`correction.corrected` is `envelope.apply` of the measured correction where that is exact (a
    decoded signal whole steps too quiet in every tile, partial last tile included), and the loss
    of what it returns cannot move a tile's level: no gradient on the decoded audio's gain below
    the coded bands' top (the ratchet of rounded gains, see the module), unlike the plain output's."""
    from neucodec import envelope
    from neucodec.train.correction import corrected

    rng = np.random.default_rng(1)
    for grid in (envelope.table_grid("e4"), envelope.table_grid("e3")):  # wider bands higher up, and uniform
        for n in (6 * grid.tile, 6 * grid.tile + 333):
            ref = rng.normal(size=n) * np.linspace(0.01, 0.3, n)
            dec = ref * 10 ** (-2 * grid.step_db / 20)
            steps = envelope.measure(ref, dec, grid)
            assert (steps == 2).all()
            got = corrected(torch.tensor(dec)[None, None], torch.tensor(ref)[None, None], grid)[0, 0].numpy()
            np.testing.assert_allclose(got, envelope.apply(dec, steps, grid), atol=1e-9)

    def lowpass(x: np.ndarray) -> np.ndarray:  # below the top of e3's bands (8 kHz)
        spectrum = np.fft.rfft(x)
        spectrum[len(spectrum) * 7 // 12:] = 0
        return np.fft.irfft(spectrum, len(x))

    n = 6 * grid.tile
    ref = torch.tensor(lowpass(rng.normal(size=n)) * np.linspace(0.05, 0.3, n))[None, None]
    dec = torch.tensor(lowpass(rng.normal(size=n)) * 0.1)[None, None]
    slopes = []
    for correct in (False, True):
        gain = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        out = corrected(gain * dec, ref, grid) if correct else gain * dec
        (out - ref).abs().mean().backward()
        slopes.append(abs(float(gain.grad)))
    assert slopes[0] > 0.01 and slopes[1] < 1e-4, slopes


def test_envelope_share_weighs_the_corrected_output_against_the_plain_one(tmp_path: Path) -> None:
    """With `envelope` each loss scores (1 - share) of the plain output plus share of it corrected
    (so, here, a far smaller mel loss at share 1 than at 0, and halfway at 0.5)."""
    with pytest.raises(ValueError, match="no envelope table 'e9'"):
        TrainConfig(codec=TINY, envelope="e9")
    mel = {}
    for share in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        s = _solver(tmp_path / str(share), adversarial=False, envelope="e3", envelope_share=share)
        mel[share] = s.train_step(s.batches.next())["mel"]
    assert mel[1.0] < 0.8 * mel[0.0], mel
    assert mel[0.5] == pytest.approx((mel[0.0] + mel[1.0]) / 2, rel=1e-4)
