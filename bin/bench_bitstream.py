#!/usr/bin/env python
"""Benchmark the bitstream: bits saved by the LM vs plain packing, and LM coding speed vs the reference.

One run on real recordings (default: the corpus dev clips, resampled to 24 kHz and concatenated):

1. For each bandwidth, bits of plain 10-bit packing vs LM range coding of the codec's codes
   (the trained model when `--model` loads, else the encodec_24khz architecture with random
   weights -- then the LM cannot save bits, which the output says).
2. Real-time factor (audio seconds / seconds of work) of LM encode (incl. the writer's check) +
   LM decode at 6 kbps, neucodec vs the reference encodec package (`compress`/`decompress`
   with `use_lm=True`, minus the same calls without the LM), both with the same random
   paper-size LM weights; neucodec with the writer's LM spans and with spans of the whole LM
   context, and with the trained LM too. neucodec runs its LM in exact arithmetic, as its writer
   does (`neucodec.exactlm`: exact-v2, int8 products); exact-v1 (float64 products, files of
   neucodec 0.2.0) is timed for comparison.

    python bin/bench_bitstream.py --seconds 30 [--model neucodec_24khz] [--audio a.wav b.wav]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neucodec import config, container, entropy, exactlm, packing  # noqa: E402
from neucodec.errors import NeucodecError  # noqa: E402
from neucodec.lm import LanguageModel  # noqa: E402
from neucodec.model import Codec  # noqa: E402

DEFAULT_AUDIO = os.path.expanduser("~/.cache/neucodec-train/corpus/dev/clips/speech_*.wav")


def load_audio(paths: list[str], seconds: float, sr: int = 24000) -> torch.Tensor:
    parts, total = [], 0
    for p in paths:
        x, rate = sf.read(p, dtype="float32", always_2d=True)
        x = soxr.resample(x.mean(1), rate, sr).astype(np.float32)
        parts.append(x)
        total += len(x)
        if total >= seconds * sr:
            break
    if not parts:
        raise SystemExit("no audio found; pass --audio FILES")
    return torch.from_numpy(np.concatenate(parts)[: int(seconds * sr)]).view(1, 1, -1)


def best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audio", nargs="*", default=None)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--ref-seconds", type=float, default=10.0, help="audio given to the (slow) reference")
    ap.add_argument("--model", default="neucodec_24khz")
    ap.add_argument("--segment-seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    paths = args.audio or sorted(glob.glob(DEFAULT_AUDIO))
    wav = load_audio(paths, args.seconds)
    dur = wav.shape[-1] / 24000
    print(f"audio: {len(paths)} file(s), {dur:.1f} s at 24 kHz; torch threads 2 (the exact LM: groups of segments "
          f"side by side on {torch.get_num_threads()} Python threads, {entropy.LM_THREADS} torch thread each)")

    trained = True
    try:
        from neucodec.hub import load_codec, load_lm

        codec, lm = load_codec(args.model), load_lm(args.model)
        print(f"model: {args.model} (trained weights)")
    except NeucodecError as e:
        trained = False
        torch.manual_seed(0)
        codec = Codec(config.encodec_24khz()).prepare_for_inference()
        lm = LanguageModel(config.lm_for(codec.config)).eval()
        print(f"model: encodec_24khz architecture with RANDOM weights ({str(e)[:80]}...)")

    seg = round(args.segment_seconds * codec.frame_rate)
    span = entropy.lm_span(seg, lm.cfg.past_context, codec.frame_rate)  # what writer.encode_stream writes
    engine = exactlm.exact(lm)  # the writer's LM arithmetic
    print(f"\nLM spans: {span} frames (writer's choice; LM context {lm.cfg.past_context} frames)")
    print(f"\n| bandwidth | K | packed kbps | LM kbps | saved | saved, {lm.cfg.past_context}-frame spans "
          "| segments LM-coded | exact-v2 bits vs exact-v1 |")
    print("|---|---|---|---|---|---|---|---|")
    for bw in codec.config.bandwidths:
        codes = codec.encode(wav, bw).codes
        items = list(codes.split(seg, -1))
        packed_bits = sum(len(packing.pack(c)) for c in items) * 8
        lm_bits = sum(len(r) for r in entropy.lm_encode_many(engine, items, span=span)) * 8
        long_bits = sum(len(r) for r in entropy.lm_encode_many(engine, items, span=lm.cfg.past_context)) * 8
        n_lm = sum(c.flags in container.LM_FLAGS for c in entropy.encode_segments(items, engine, span=span))
        v1_bits = sum(len(r) for r in entropy.lm_encode_many(exactlm.exact(lm, exactlm.V1), items, span=span)) * 8
        print(f"| {bw:g} | {codes.shape[1]} | {packed_bits / dur / 1000:.2f} | {lm_bits / dur / 1000:.2f} | "
              f"{100 * (1 - lm_bits / packed_bits):+.1f} % | {100 * (1 - long_bits / packed_bits):+.1f} % | "
              f"{n_lm}/{len(items)} | {100 * (lm_bits / v1_bits - 1):+.3f} % |")
    if not trained:
        print("(random LM: no compression expected; sizes show coder overhead only)")

    # ---- speed at 6 kbps: the same random paper-size LM in both implementations
    codes = codec.encode(wav, 6.0).codes
    items = list(codes.split(seg, -1))
    torch.manual_seed(0)
    rand_lm = LanguageModel(config.lm_for(codec.config)).eval()

    def lm_path(model: exactlm.ExactLM, span: int) -> float:
        """Encode (with the writer's check) + decode, every segment LM-coded; returns the RTF."""
        payloads = entropy.lm_encode_many(model, items, span=span)
        flags = container.ARITHMETIC_FLAGS[model.arithmetic]
        records = [(flags, p, tuple(i.shape), "s") for p, i in zip(payloads, items)]
        t_enc = best(lambda: entropy.encode_segments(items, model, span=span), args.repeat)
        t_dec = best(lambda: entropy.decode_segments(records, model, span=span), args.repeat)
        print(f"  {type(model).__name__} {model.arithmetic} dim {model.cfg.dim}, {span}-frame spans: "
              f"encode+check {t_enc:.2f} s, "
              f"decode {t_dec:.2f} s -> RTF {dur / (t_enc + t_dec):.1f}")
        return dur / (t_enc + t_dec)

    print(f"\nneucodec LM path, 6 kbps, {dur:.0f} s, {seg}-frame segments:")
    ours = lm_path(exactlm.exact(rand_lm), span)
    ours_long = lm_path(exactlm.exact(rand_lm), rand_lm.cfg.past_context)
    print("  (exact-v1, float64 products, as files of neucodec 0.2.0 were coded)")
    ours_v1 = lm_path(exactlm.exact(rand_lm, exactlm.V1), span)
    if trained:
        print(f"  (trained LM {args.model})")
        lm_path(engine, span)

    # ---- reference LM path with identical random LM weights
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    import importlib

    ref_compress = importlib.import_module("encodec.compress")
    from encodec.model import EncodecModel, LMModel

    torch.manual_seed(0)
    ref = EncodecModel.encodec_model_24khz(pretrained=False).eval()
    ref.name = "encodec_24khz"
    ref.set_target_bandwidth(6.0)
    ref_lm = LMModel(codec.n_q, 1024, num_layers=5, dim=200, past_context=int(3.5 * 75)).eval()
    ref_lm.load_state_dict(rand_lm.state_dict())
    ref.get_lm_model = lambda: ref_lm  # type: ignore[method-assign]
    ref_compress.MODELS["encodec_24khz"] = lambda: ref  # decompress builds its model from this table
    rwav = wav[0, :, : int(args.ref_seconds * 24000)]
    rdur = rwav.shape[-1] / 24000
    ref_rtf = 0.0
    for threads in (1, 2):  # the reference at its best on the 2 cores (1 thread wins under load)
        torch.set_num_threads(threads)
        t_c_lm = best(lambda: ref_compress.compress(ref, rwav, use_lm=True), 1)
        t_c = best(lambda: ref_compress.compress(ref, rwav, use_lm=False), 1)
        blob_lm = ref_compress.compress(ref, rwav, use_lm=True)
        blob = ref_compress.compress(ref, rwav, use_lm=False)
        t_d_lm = best(lambda blob_lm=blob_lm: ref_compress.decompress(blob_lm), 1)
        t_d = best(lambda blob=blob: ref_compress.decompress(blob), 1)
        rtf = rdur / max(1e-9, (t_c_lm - t_c) + (t_d_lm - t_d))
        print(f"reference LM path, 6 kbps, {rdur:.0f} s, {threads} torch thread(s): compress +{t_c_lm - t_c:.2f} s, "
              f"decompress +{t_d_lm - t_d:.2f} s over no-LM -> RTF {rtf:.2f}")
        ref_rtf = max(ref_rtf, rtf)
    print(f"speed-up: {ours / ref_rtf:.1f}x with {span}-frame spans, {ours_long / ref_rtf:.1f}x with "
          f"{rand_lm.cfg.past_context}-frame spans (target >= 10x; target RTF >= 30); exact-v1 "
          f"{ours_v1 / ref_rtf:.1f}x")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
