"""Latent diagnostics (`neucodec.train.diagnostics`), latent widening and whitening (`neucodec.train.widen`) and
the quantizer knobs of the training step that the diagnostics are meant to judge."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from neucodec.model import Codec
from neucodec.train.diagnostics import band_correlation, latent_report, pca_rank, read_rank
from neucodec.train.solver import Solver, TrainConfig
from neucodec.train.widen import latent_dim, whiten_latent, widen_latent

from .test_training import TINY, _batches


def test_pca_rank_counts_the_dimensions_that_hold_the_energy() -> None:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0][:, :5]  # five orthonormal directions in 16 dims
    frames = rng.normal(size=(4000, 5)) * np.array([10, 5, 3, 2, 1]) @ basis.T + 3.0  # an offset is not energy
    assert pca_rank(frames, (0.5, 0.95, 0.999)) == [1, 3, 5]  # energies 100, 25, 9, 4, 1
    assert pca_rank(np.zeros((10, 4))) == [0, 0]


def test_band_correlation_sees_which_bands_follow_the_input() -> None:
    sr, n = 16000, 16000
    t = np.arange(n) / sr
    rng = np.random.default_rng(1)
    low, high = np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 5000 * t)
    ref = low + high
    out = low + np.sin(2 * np.pi * 5000 * t + np.pi / 2) + 0.01 * rng.normal(size=n)  # high band in quadrature
    corr = band_correlation(ref, out, sr, ((0, 1000), (4000, 6000), (1000, 3000)))
    assert corr[0] > 0.99 and abs(corr[1]) < 0.02 and abs(corr[2]) < 0.5
    assert band_correlation(ref, -ref, sr, ((0, 1000),)) == pytest.approx([-1.0])


def test_latent_report_on_a_tiny_model() -> None:
    torch.manual_seed(0)
    codec = Codec(TINY).eval()
    rng = np.random.default_rng(2)
    report = latent_report(codec, [rng.normal(size=4800).astype(np.float32) * 0.1], n_qs=(None, 2, 8))
    assert 1 <= report["rank90"] <= report["rank99"] <= TINY.seanet.dimension
    assert 1 <= report["read_rank90"] <= report["read_rank99"] <= TINY.seanet.dimension
    assert "corr_none_0-0.5k" in report and "corr_2_6-8k" in report
    assert not any(k.startswith("corr_8_") for k in report)  # more codebooks than the model has: skipped


def test_widening_the_latent_keeps_the_codec_function_and_codes() -> None:
    torch.manual_seed(0)
    codec = Codec(TINY).eval()
    x = torch.randn(1, 1, 4800) * 0.1
    with torch.no_grad():
        codec.quantizer(codec.encoder(x), TINY.quantizer.n_q)  # any codebooks will do
        state = codec.state_dict()
        wide_cfg = dataclasses.replace(TINY, seanet=dataclasses.replace(TINY.seanet, dimension=24),
                                       quantizer=dataclasses.replace(TINY.quantizer, dimension=24))
        wide = Codec(wide_cfg).eval()
        wide.load_state_dict(widen_latent(state, 24))
        assert latent_dim(wide.state_dict()) == 24
        z, zw = codec.encoder(x), wide.encoder(x)
        assert torch.equal(zw[:, :16], z) and zw[:, 16:].abs().max() > 0  # new dimensions carry something
        torch.testing.assert_close(wide.decoder(zw), codec.decoder(z), rtol=0, atol=1e-6)
        assert torch.equal(wide.quantizer.encode(zw, 4), codec.quantizer.encode(z, 4))
    with pytest.raises(ValueError, match="cannot widen"):
        widen_latent(wide.state_dict(), 16)


def test_whitening_the_latent_keeps_the_decoder_function_and_evens_the_variances() -> None:
    torch.manual_seed(0)
    codec = Codec(TINY).eval()
    x = torch.randn(2, 1, 9600) * 0.1
    with torch.no_grad():
        z = codec.encoder(x)
        frames = z.transpose(1, 2).reshape(-1, z.shape[1])
        codec.quantizer._codebook(0).embed[0] = frames[7]  # a codeword on a latent frame
        white = Codec(TINY).eval()
        white.load_state_dict(whiten_latent(codec.state_dict(), frames, floor=1e-8))
        zw = white.encoder(x)
        torch.testing.assert_close(white.decoder(zw), codec.decoder(z), rtol=0, atol=1e-5)
        white_frames = zw.transpose(1, 2).reshape(-1, z.shape[1])
        spread, before = (torch.linalg.eigvalsh(torch.cov(f.T)) for f in (white_frames, frames))
        assert float(spread.max() / spread.min()) < 1.01 < float(before.max() / before.min())
        assert float(spread.sum()) == pytest.approx(float(before.sum()), rel=1e-3)  # same total variance
        torch.testing.assert_close(white.quantizer._codebook(0).embed[0], white_frames[7], rtol=0, atol=1e-5)
        fractions = (0.5, 0.9, 0.99)  # the decoder reads the same latent; PCA sees a new basis
        assert read_rank(white, white_frames.numpy(), fractions) == read_rank(codec, frames.numpy(), fractions)
        assert pca_rank(white_frames.numpy(), fractions) != pca_rank(frames.numpy(), fractions)


def _solver(tmp_path: Path, **kw: object) -> Solver:
    c = TrainConfig(codec=TINY, batch_size=4, segment_seconds=0.2, adversarial=False, quantizer_start=0,
                    kmeans_batches=2, eval_every=0, **kw)  # type: ignore[arg-type]
    return Solver(c, tmp_path, _batches())


def test_commitment_mean_and_quantizer_bypass(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = _solver(tmp_path, bypass_prob=0.5, commit_mean=True)
    n_qs = [s.train_step(s.batches.next())["n_q"] for _ in range(12)]
    assert 0 in n_qs and any(n_qs)
    x = s.batches.next()
    s.codec.eval()
    with torch.no_grad():
        q = s.codec.quantizer(s.codec.encoder(x), 4)
    assert q.commit_loss == pytest.approx(float(torch.stack(q.layer_losses).sum()))  # the quantizer sums ...
    s.codec.train()
    grads = {}
    for mean in (False, True):  # ... and the step divides by the codebook count when asked to
        s.cfg = dataclasses.replace(s.cfg, commit_mean=mean, bypass_prob=0.0)
        s.n_qs = [4]
        torch.manual_seed(1)
        s.train_step(x)
        grads[mean] = s.codec.encoder.model[-1].conv.conv.bias.clone()
    assert not torch.equal(grads[False], grads[True])


def test_latent_noise_on_bypassed_training_steps_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = _solver(tmp_path, latent_noise=0.5)
    x = s.batches.next()
    with torch.no_grad():
        z = s.codec.encoder(x)
        s.codec.train()
        noise = s.codec.quantizer(z, 0).quantized - z
        assert float(noise.std() / z.pow(2).mean().sqrt()) == pytest.approx(0.5, rel=0.1)
        s.codec.eval()
        assert torch.equal(s.codec.quantizer(z, 0).quantized, z)  # evaluation, diagnostics: the latent itself
        s.codec.train()
        q = s.codec.quantizer(z, 4)  # a quantized step: the codes' vectors, no noise
        torch.testing.assert_close(q.quantized, s.codec.quantizer.decode(q.codes), rtol=0, atol=1e-6)
    assert _solver(tmp_path / "off").codec.quantizer._forward_hooks == {}


def test_codebooks_are_initialised_afresh_at_reinit_step(tmp_path: Path) -> None:
    s = _solver(tmp_path, reinit_codebooks=3)
    seen = []
    for step in range(5):
        s.step = step
        before = s.codec.quantizer._codebook(0).embed.clone()
        s.train_step(s.batches.next())
        after = s.codec.quantizer._codebook(0).embed
        seen.append(float((after - before).abs().max()))
    # an EMA step moves the entries by ~1 % of their distance to the batch means; k-means replaces them
    assert seen[3] > 5 * max(seen[1], seen[2], seen[4])


def test_whiten_at_whitens_once_at_that_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = _solver(tmp_path, whiten_at=2)
    optimizers = []
    for step in range(4):
        s.step = step
        s.train_step(s.batches.next())
        optimizers.append(s.opt)
    assert optimizers[0] is optimizers[1] and optimizers[2] is optimizers[3]
    assert optimizers[1] is not optimizers[2]  # whitening restarts Adam and initialises the codebooks afresh


def test_solver_whitens_the_latent_and_trains_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = _solver(tmp_path)
    s.whiten_latent()
    assert bool(s.codec.quantizer._codebook(0).inited.item())
    assert np.isfinite(s.train_step(s.batches.next())["mel"])
