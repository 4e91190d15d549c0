#!/usr/bin/env python
"""Flip one byte of an encoded file; compare `neucodec decode` with and without `--salvage` to the clean decode.

Encodes AUDIO (default: the first 60 s of the dev split's speech) with the `neucodec` command's
defaults, decodes it, then for each damage position flips one byte (or two in one payload: "x2") and
runs the command twice: plain decode must exit non-zero, leave no output and suggest --salvage
(damage to the index or its trailer does not stop it); `--salvage` must write the full length.
Reports, per position, the share of 16-bit samples identical to the clean decode, the lines on
stderr, and how long after each lost span the output took to match again.

    python bin/salvage_bar.py [AUDIO] [--model NAME] [--seconds 60]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from neucodec import container  # noqa: E402

DEV_SPEECH = Path(os.environ.get("NEUCODEC_TRAIN_CACHE", Path.home() / ".cache" / "neucodec-train")) / \
    "corpus" / "dev" / "speech.npy"


def neucodec(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neucodec", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def positions(data: bytes) -> dict[str, tuple[int, ...]]:
    """Bytes to damage: one in each record head and payload (repairable: the CRCs locate one damaged
    byte), two in each payload (not repairable: the segment is lost), the end record, the index and
    its trailer."""
    import io

    fo = io.BytesIO(data)
    reader = container.ContainerReader(fo, container.read_prelude(fo))
    records = list(reader)
    end = reader.end
    assert end is not None
    out: dict[str, tuple[int, ...]] = {}
    for r in records:
        payload = r.offset + container.RECORD_HEAD_BYTES
        out[f"segment {r.index} head"] = (r.offset + 9,)  # in the payload length
        out[f"segment {r.index} payload"] = (payload + len(r.payload) // 2,)
        out[f"segment {r.index} payload x2"] = (payload + len(r.payload) // 3, payload + 2 * len(r.payload) // 3)
    out["end record head"] = (end.offset + 2,)
    out["end record payload x2"] = (end.offset + container.RECORD_HEAD_BYTES + 3,
                                    end.offset + container.RECORD_HEAD_BYTES + 9)
    out["index payload"] = (end.offset + container.RECORD_HEAD_BYTES + 12 + container.RECORD_HEAD_BYTES + 4,)
    out["trailer"] = (len(data) - 6,)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("audio", nargs="?", type=Path, help="audio file [default: 60 s of the dev split's speech]")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="damage only these positions (names as printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="salvage-bar-"))
    src = tmp / "in.wav"
    if args.audio is None:
        x = np.load(DEV_SPEECH, mmap_mode="r")[: int(args.seconds * 24000)].astype(np.float32) / 32767
        sf.write(src, x, 24000, subtype="PCM_16")
    else:
        src = args.audio
    model = ["-m", args.model] if args.model else []
    enc = tmp / "in.ecdc"
    r = neucodec("encode", src, enc, "-q", *model)
    assert r.returncode == 0, r.stderr
    data = enc.read_bytes()
    r = neucodec("decode", enc, tmp / "clean.wav", "-q")
    assert r.returncode == 0, r.stderr
    clean, sr = sf.read(tmp / "clean.wav", dtype="int16")
    print(f"{src.name}: {len(clean) / sr:.1f} s, {len(data):,} bytes; clean decode {len(clean)} samples at {sr} Hz")
    print(f"{'damaged bytes':28s} {'plain':22s} {'salvage':9s} {'identical':>9s}  lost spans (stderr) / samples after "
          "each span until the output matches again")
    worst = {"one byte": 1.0, "two bytes": 1.0}
    for name, where in positions(data).items():
        if args.only and name not in args.only:
            continue
        bad = bytearray(data)
        for pos in where:
            bad[pos] ^= 0xFF
        damaged = tmp / "damaged.ecdc"
        damaged.write_bytes(bytes(bad))
        out = tmp / "out.wav"
        out.unlink(missing_ok=True)
        plain = neucodec("decode", damaged, out, "-q")
        left = out.exists()
        plain_ok = plain.returncode != 0 and not left and "--salvage" in plain.stderr
        t0 = time.perf_counter()
        salv = neucodec("decode", damaged, out, "-q", "--salvage", "-f")
        took = time.perf_counter() - t0
        if salv.returncode != 0 or not out.exists():
            print(f"{name:28s} salvage failed: {salv.stderr.strip()}")
            worst["one byte"] = 0.0
            continue
        y, _ = sf.read(out, dtype="int16")
        full = len(y) == len(clean)
        same = float(np.mean(y[: len(clean)] == clean[: len(y)])) if full else 0.0
        kind = "two bytes" if name.endswith("x2") else "one byte"
        worst[kind] = min(worst[kind], same)
        spans = [line.split("warning: ", 1)[-1] for line in salv.stderr.splitlines() if "warning:" in line]
        plain_text = f"exit {plain.returncode}, no output" if plain_ok else "exit 0, decoded" \
            if plain.returncode == 0 else f"NOT OK: exit {plain.returncode}{', output left' * left}"
        print(f"{name:28s} {plain_text:22s} {'full' if full else 'SHORT':9s} {100 * same:8.2f}%  "
              f"{'; '.join(spans) or '-'} ({took:.1f} s)")
        if plain.returncode and name == "segment 0 payload x2":
            print(f"{'':28s} plain: {plain.stderr.strip()}")
        for line in spans:
            _recovery(line, y, clean, sr)
    print("worst: " + ", ".join(f"{k} {100 * v:.2f}% identical" for k, v in worst.items()))
    return 0 if min(worst.values()) >= 0.8 else 1


def _recovery(line: str, y: np.ndarray, clean: np.ndarray, sr: int) -> None:
    """How long after a lost span ("lost A–B s ...") the salvaged output differs from the clean decode."""
    if " lost " not in f" {line}" or "–" not in line:
        return
    span = line.split("lost ", 1)[1].split(" s ", 1)[0]
    b = int(round(float(span.split("–")[1]) * sr))
    differ = np.nonzero(y[b:] != clean[b:])[0]
    if differ.size:
        print(f"{'':28s} after {span} s: {differ.size} samples differ ({differ.size / sr:.2f} s), "
              f"the last at +{differ[-1] / sr:.2f} s")
    else:
        print(f"{'':28s} after {span} s: identical at once")


if __name__ == "__main__":
    sys.exit(main())
