#!/usr/bin/env python
"""Fuzz the .ecdc reader: decode N mutated files, count outcomes by exception type.

Anything other than a clean decode or a `NeucodecError` with a one-line message (a bare exception, a
multi-line message, a hang past --max-seconds) counts as a failure; the exit code is the number of
failures (capped at 100). Base files: packed and LM-coded (exact-v2 LM) 24 kHz-style streams, a
version-2 stream with envelope corrections (LM-coded, two channel groups) and one on the wider bands
of table e4 (plain), a 48 kHz-style segmented
stream and a plain version-0 stream, all from tiny fixed-seed models; the golden files LM-coded by
neucodec 0.1.0 (float32 LM) and 0.2.0 (exact-v1) (tests/golden); and, when the reference `encodec`
package is installed, a version-0 file it LM-coded (random paper-size LM, 2 codebooks).

With --salvage the mutated files are decoded with `salvage=True` instead (every other one through a
pipe that cannot seek, the rest from a seekable buffer): the same rules, and every line it reports
about lost spans must be one line too.

    python bin/fuzz_container.py -n 10000 --seed 0
    python bin/fuzz_container.py -n 10000 --seed 0 --salvage
"""
from __future__ import annotations

import argparse
import collections
import io
import random
import sys
import time
import typing as tp
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _bitstream import lm_coded_file, skewed_lm, tiny_codec24, tiny_codec48  # noqa: E402
from neucodec import container, ecdc, packing  # noqa: E402
from neucodec.errors import NeucodecError  # noqa: E402


def base_files() -> list[tuple[str, bytes, object, object]]:
    torch.manual_seed(0)
    c24, c48, lm = tiny_codec24(), tiny_codec48(), skewed_lm()
    packed = ecdc.encode_bytes(c24, 0.1 * torch.randn(2, 1, 6000), 6.0, segment_seconds=0.1)
    lm_file = lm_coded_file(c24, lm)
    seg48 = ecdc.encode_bytes(c48, 0.1 * torch.randn(1, 2, 50000), 6.0)
    lm4 = skewed_lm(n_q=4)
    corrected = ecdc.encode_bytes(c24, 0.1 * torch.randn(2, 1, 12000), 3.0, lm4, segment_seconds=0.2,
                                  correct_envelope=True)
    wider = ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 12000), 3.0, segment_seconds=0.2, correct_envelope="e4")
    v0 = container.v0_header_bytes({"m": "encodec_24khz", "al": 3000, "nc": 2, "lm": False}) + \
        packing.pack(torch.randint(0, 1024, (1, 2, 10)))
    from neucodec.config import encodec_24khz
    from neucodec.model import Codec

    big24 = Codec(encodec_24khz()).prepare_for_inference()
    golden = ROOT / "tests" / "golden"  # LM-coded files of neucodec 0.1.0 (flags 1) and 0.2.0 (flags 2)
    from neucodec.hub import load_codec, load_lm

    g_codec, g_lm = load_codec(golden / "golden_24khz.json"), load_lm(golden / "golden_24khz.json")
    bases = [("packed", packed, c24, None), ("lm", lm_file, c24, lm), ("envelope", corrected, c24, lm4),
             ("envelope-e4", wider, c24, None), ("segmented", seg48, c48, None),
             ("v0", v0, big24, None), ("lm-float32", (golden / "lm_mono_24khz.ecdc").read_bytes(), g_codec, g_lm),
             ("lm-exact-v1", (golden / "lm_exact_24khz.ecdc").read_bytes(), g_codec, g_lm)]
    v0_lm = reference_v0_lm_file()
    if v0_lm is not None:
        bases.append(("v0-lm", v0_lm[0], big24, v0_lm[1]))
    return bases


def reference_v0_lm_file() -> tuple[bytes, object] | None:
    """0.4 s of noise LM-coded at 1.5 kbps by the reference `compress`, with a random LM, and that
    LM as a neucodec `LanguageModel`; None without the reference package."""
    import sys as _sys
    import types

    _sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))  # see tests/reference.py
    try:
        from encodec.compress import compress
        from encodec.model import EncodecModel, LMModel
    except ImportError:
        return None
    from neucodec import config
    from neucodec.lm import LanguageModel

    torch.manual_seed(0)
    ref = EncodecModel.encodec_model_24khz(pretrained=False).eval()
    ref.name = "encodec_24khz"
    ref.set_target_bandwidth(1.5)
    rlm = LMModel(ref.quantizer.n_q, 1024, num_layers=5, dim=200, past_context=int(3.5 * ref.frame_rate)).eval()
    ref.get_lm_model = lambda: rlm  # type: ignore[method-assign]  (the real one downloads)
    lm = LanguageModel(config.lm_for(config.encodec_24khz()))
    lm.load_state_dict(rlm.state_dict())
    return compress(ref, 0.1 * torch.randn(1, 9600), use_lm=True), lm.eval()


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "byte", "cut", "insert", "delete", "dup", "int"])
        pos = rng.randrange(max(1, len(b)))
        if not b:
            break
        if op == "flip":
            b[pos] ^= 1 << rng.randrange(8)
        elif op == "byte":
            b[pos] = rng.randrange(256)
        elif op == "cut":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del b[pos: pos + rng.randint(1, 16)]
        elif op == "dup":
            b[pos:pos] = b[pos: pos + rng.randint(1, 64)]
        else:  # a plausible-looking but wrong 32-bit integer
            b[pos: pos + 4] = rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 32)]).to_bytes(4, "little")
    return bytes(b)


class _Pipe(io.RawIOBase):
    """Bytes that cannot seek, a few at a time (as stdin may hand them out)."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: tp.Any) -> int:
        piece = self.data.read(min(len(b), 4096))
        b[: len(piece)] = piece
        return len(piece)


def salvage_decode(data: bytes, codec: object, lm: object, pipe: bool) -> str:
    """Decode with salvage; the outcome ("decoded", or "salvaged" when it reported lost spans or
    repairs). A reported line of more than one line raises."""
    lines: list[str] = []
    fi = io.BufferedReader(_Pipe(data)) if pipe else io.BytesIO(data)
    _, chunks = ecdc.decode_stream(fi, codec, lm, salvage=True, on_lost=lines.append)  # type: ignore[arg-type]
    for _ in chunks:
        pass
    if any("\n" in line or not line for line in lines):
        raise AssertionError(f"bad salvage line in {lines!r}")
    return "salvaged" if lines else "decoded"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=5.0, help="a single decode slower than this is a failure")
    ap.add_argument("--salvage", action="store_true", help="decode with salvage=True (half of them from a pipe)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    bases = base_files()
    counts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    slowest = 0.0
    start = time.perf_counter()
    for i in range(args.n):
        name, data, codec, lm = bases[i % len(bases)]
        bad = mutate(data, rng)
        t0 = time.perf_counter()
        try:
            if args.salvage:
                outcome = salvage_decode(bad, codec, lm, pipe=bool(i // len(bases) % 2))
            else:
                ecdc.decode_bytes(bad, codec, lm)  # type: ignore[arg-type]
                outcome = "decoded"
        except NeucodecError as e:
            outcome = type(e).__name__
            if "\n" in str(e) or not str(e):
                failures.append(f"{name} #{i}: bad message {str(e)!r}")
        except Exception as e:  # noqa: BLE001 - this is what the fuzzer hunts
            outcome = f"FAIL {type(e).__name__}"
            failures.append(f"{name} #{i}: {type(e).__name__}: {str(e)[:200]}")
        dt = time.perf_counter() - t0
        slowest = max(slowest, dt)
        if dt > args.max_seconds:
            failures.append(f"{name} #{i}: took {dt:.1f} s")
        counts[outcome] += 1
    total = time.perf_counter() - start
    print(f"{args.n} mutated files{' decoded with salvage' * args.salvage} in {total:.1f} s "
          f"({1e3 * total / max(1, args.n):.2f} ms each, "
          f"slowest {1e3 * slowest:.0f} ms)")
    for outcome, n in counts.most_common():
        print(f"  {outcome:28s} {n}")
    print(f"failures: {len(failures)}")
    for f in failures[:20]:
        print("  " + f)
    return min(len(failures), 100)


if __name__ == "__main__":
    sys.exit(main())
