"""A corpus of pure tones in the layout `bin/build_corpus.py` writes and training reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SR = 24000
FREQS = {"speech": (300, 500), "music": (700, 900), "sfx": (1100, 1300)}  # one tone per source


def tone_corpus(root: Path) -> None:
    """`root/{train,dev}/{category}.npy|json`: per category, one 20 s int16 tone per source."""
    t = np.arange(20 * SR) / SR
    for split in ("train", "dev"):
        for cat, freqs in FREQS.items():
            data = np.concatenate([(8000 * np.sin(2 * np.pi * f * t)).astype(np.int16) for f in freqs])
            entries = [{"offset": i * len(t), "length": len(t), "source": f"tone{f}"} for i, f in enumerate(freqs)]
            (root / split).mkdir(parents=True, exist_ok=True)
            np.save(root / split / f"{cat}.npy", data)
            (root / split / f"{cat}.json").write_text(json.dumps({"entries": entries}))
