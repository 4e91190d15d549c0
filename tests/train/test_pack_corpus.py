"""bin/pack_corpus.py: a corpus sample carried as Ogg Opus comes back in the layout training reads."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neucodec.train.data import load_corpus

from ._corpus import FREQS, SR, tone_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("opusenc") is None, reason="needs opusenc (opus-tools)")
def test_packed_sample_unpacks_to_the_corpus_layout(tmp_path: Path) -> None:
    tone_corpus(tmp_path / "corpus")
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
