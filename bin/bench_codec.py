#!/usr/bin/env python3
"""Codec speed and memory benchmark: neucodec against the reference encodec package, side by side.

Both implementations get identical random weights and the same real recording (docs/examples,
tiled to --seconds), run in turns in one process with the same thread count; the table reports
real-time factors (audio seconds per second of compute, best of --rounds) and their ratio, which
is what stays meaningful on a shared, noisy machine. Peak RSS is measured by running
`neucodec encode` and `neucodec decode` on long generated WAV files in child processes.

    python bin/bench_codec.py --seconds 60 --threads 2 --rss-minutes 10 60 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from neucodec import config as cfg
from neucodec.model import Codec

ROOT = Path(__file__).resolve().parent.parent


def recording(seconds: float, sample_rate: int, channels: int) -> torch.Tensor:
    x, sr = sf.read(str(ROOT / "docs/examples/speech.flac"), dtype="float32")
    x = soxr.resample(x, sr, sample_rate).astype(np.float32)
    n = int(seconds * sample_rate)
    x = np.resize(x, n)
    if channels == 2:  # a second, different channel: the same speech delayed by 0.37 s
        x = np.stack([x, np.roll(x, int(0.37 * sample_rate))])
    return torch.from_numpy(np.atleast_2d(x))[None]


def reference(name: str) -> torch.nn.Module:
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))  # encodec 0.1.1 imports it at top level
    import encodec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctor = {"encodec_24khz": encodec.EncodecModel.encodec_model_24khz,
                "encodec_48khz": encodec.EncodecModel.encodec_model_48khz}[name]
        model = ctor(pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    for n, b in model.named_buffers():
        if n.endswith("embed"):
            b.copy_(torch.randn(b.shape, generator=g))
    return model


def best(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.inference_mode()
def speed(name: str, seconds: float, rounds: int, bandwidth: float) -> dict[str, float]:
    ref = reference(name)
    ours = Codec(cfg.OFFICIAL[name]())
    ours.load_state_dict(ref.state_dict())
    ours.prepare_for_inference()
    wav = recording(seconds, ours.sample_rate, ours.channels)
    ref.set_target_bandwidth(bandwidth)
    frames = ref.encode(wav)
    enc = ours.encode(wav, bandwidth)
    assert torch.equal(torch.cat([f[0] for f in frames], -1), enc.codes) or name == "encodec_24khz"
    out: dict[str, float] = {"ref_enc": 1e9, "ours_enc": 1e9, "ref_dec": 1e9, "ours_dec": 1e9}
    for _ in range(rounds):  # interleaved so that load changes hit both sides alike
        out["ref_enc"] = min(out["ref_enc"], best(lambda: ref.encode(wav), 1))
        out["ours_enc"] = min(out["ours_enc"], best(lambda: ours.encode(wav, bandwidth), 1))
        out["ref_dec"] = min(out["ref_dec"], best(lambda: ref.decode(frames), 1))
        out["ours_dec"] = min(out["ours_dec"], best(lambda: ours.decode(enc), 1))
    return {k: seconds / v for k, v in out.items()}


def peak_rss(minutes: float, threads: int) -> tuple[float, float]:
    """Peak RSS (MB) of `neucodec encode` and of `neucodec decode` on a generated file, full-size
    24 kHz model with random weights saved under its official file-name pattern."""
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        model = Codec(cfg.encodec_24khz())
        ckpt = tmpd / "w.th"
        torch.save(model.state_dict(), ckpt)
        sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:8]
        ckpt = ckpt.rename(tmpd / f"encodec_24khz-{sha}.th")
        wav_path = tmpd / "long.wav"
        rate = 24000
        speech = recording(60, rate, 1)[0, 0].numpy()
        with sf.SoundFile(str(wav_path), "w", rate, 1, "PCM_16") as f:
            for _ in range(int(minutes)):
                f.write(speech)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), NEUCODEC_OFFLINE="1")
        rss = []
        for args in (["encode", str(wav_path), str(tmpd / "long.ecdc")],
                     ["decode", str(tmpd / "long.ecdc"), str(tmpd / "back.wav")]):
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so it would report this
            # (large) benchmark process's peak instead of the command's own
            code = ("import sys; from neucodec.cli import main; sys.argv = ['neucodec'] + sys.argv[1:]\n"
                    "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])")
            p = subprocess.run([sys.executable, "-c", code, *args, "-m", str(ckpt), "-q", "-f"],
                               env=env, capture_output=True, text=True, check=True)
            rss.append(int(p.stdout.strip().splitlines()[-1]) / 1024)
        return rss[0], rss[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="audio per speed run; 0 skips the speed table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=6.0)
    p.add_argument("--rss-minutes", type=float, nargs="*", default=[10, 60])
    p.add_argument("--markdown", type=Path, help="append the results as a markdown section")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"Command: `python bin/bench_codec.py --seconds {args.seconds:g} --threads {args.threads} "
             f"--rounds {args.rounds} --rss-minutes {' '.join(f'{m:g}' for m in args.rss_minutes)}`", "",
             f"Real-time factor (audio seconds per compute second, best of {args.rounds} interleaved rounds), "
             f"{args.seconds:g} s of real speech, {args.bandwidth:g} kbps, {args.threads} threads, "
             "identical random weights:", "",
             "| model | reference enc | neucodec enc | enc ratio | reference dec | neucodec dec | dec ratio |",
             "|---|---|---|---|---|---|---|"]
    for name in ("encodec_24khz", "encodec_48khz") if args.seconds > 0 else ():
        r = speed(name, args.seconds, args.rounds, args.bandwidth)
        lines.append(f"| {name} | {r['ref_enc']:.1f} | {r['ours_enc']:.1f} | **{r['ours_enc'] / r['ref_enc']:.2f}×** | "
                     f"{r['ref_dec']:.1f} | {r['ours_dec']:.1f} | **{r['ours_dec'] / r['ref_dec']:.2f}×** |")
        print(lines[-1], flush=True)
    if args.rss_minutes:
        lines += ["", "Peak RSS of the `neucodec` command, full-size 24 kHz model, generated speech WAV "
                  "(file in, file out):", "", "| input | encode peak RSS | decode peak RSS |", "|---|---|---|"]
        for minutes in args.rss_minutes:
            enc, dec = peak_rss(minutes, args.threads)
            lines.append(f"| {minutes:g} min | {enc:.0f} MB | {dec:.0f} MB |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
