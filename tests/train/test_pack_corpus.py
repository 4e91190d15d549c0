"""bin/pack_corpus.py: a corpus sample carried as Ogg Opus comes back in the layout training reads."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neucodec.train.data import load_corpus

ROOT = Path(__file__).resolve().parents[2]
SR = 24000
FREQS = {"speech": (300, 500), "music": (700, 900), "sfx": (1100, 1300)}  # one tone per source


def _corpus(root: Path) -> None:
    t = np.arange(20 * SR) / SR
    for split in ("train", "dev"):
        for cat, freqs in FREQS.items():
            data = np.concatenate([(8000 * np.sin(2 * np.pi * f * t)).astype(np.int16) for f in freqs])
            entries = [{"offset": i * len(t), "length": len(t), "source": f"tone{f}"} for i, f in enumerate(freqs)]
            (root / split).mkdir(parents=True, exist_ok=True)
            np.save(root / split / f"{cat}.npy", data)
            (root / split / f"{cat}.json").write_text(json.dumps({"entries": entries}))


@pytest.mark.skipif(shutil.which("opusenc") is None, reason="needs opusenc (opus-tools)")
def test_packed_sample_unpacks_to_the_corpus_layout(tmp_path: Path) -> None:
    _corpus(tmp_path / "corpus")
    script = str(ROOT / "bin" / "pack_corpus.py")
    subprocess.run([sys.executable, script, "pack", str(tmp_path / "corpus"), str(tmp_path / "packed"),
                    "--minutes", "0.5", "0.5", "0.2", "--dev-minutes", "0.1", "0.1", "0.1"], check=True)
    subprocess.run([sys.executable, script, "unpack", str(tmp_path / "packed"), str(tmp_path / "out")], check=True)
    for split, minutes in (("train", {"speech": 0.5, "music": 0.5, "sfx": 0.2}), ("dev", dict.fromkeys(FREQS, 0.1))):
        pools = load_corpus(tmp_path / "out", split)
        assert set(pools) == set(FREQS)
        for cat, pool in pools.items():
            clips = [c for cs in pool.clips for c in cs]
            assert sum(c.length for c in clips) == round(minutes[cat] * 60 * SR)
            for clip in clips:  # each piece is its source's tone, within the lossy coding
                x = clip.data[clip.offset: clip.offset + clip.length].astype(np.float64)
                peak = np.argmax(np.abs(np.fft.rfft(x))) * SR / len(x)
                assert abs(peak - int(clip.source[4:])) < 5, (cat, clip.source, peak)
