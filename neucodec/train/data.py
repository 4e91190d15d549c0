"""Training audio: random crops from the corpus, random gain, and the paper's source mixing, seeded.

The corpus (built by bin/build_corpus.py) holds, per split and category (speech, music, sfx), one
int16 .npy of concatenated 24 kHz mono files plus a JSON index of their offsets. Folders of audio
files in any soundfile format work too (`AudioFolder`), resampled once at load.
"""
from __future__ import annotations

import dataclasses
import json
import typing as tp
from pathlib import Path

import numpy as np
import torch

CATEGORIES = ("speech", "music", "sfx")
CORPUS_RATE = 24000  # the corpus's sample rate (bin/build_corpus.py)
INT16_SCALE = 32767.0  # the corpus stores int16 at this scale (manifest.json)
# full-band speech sources get more weight (audio-sources.md §5)
SOURCE_BOOST = {"tuxpaint-desc": 2.0, "ktuberling": 1.5, "hedgewars-voices": 2.0, "fillets-nl": 0.5}


@dataclasses.dataclass
class Clip:
    data: np.ndarray  # int16 or float32 samples, mono
    offset: int
    length: int
    source: str


class Pool:
    """Clips of one category, sampled source by sqrt(duration) weight, then clip by duration."""

    def __init__(self, clips: list[Clip]) -> None:
        if not clips:
            raise ValueError("empty pool")
        by_source: dict[str, list[Clip]] = {}
        for c in clips:
            by_source.setdefault(c.source, []).append(c)
        self.sources = sorted(by_source)
        self.clips = [by_source[s] for s in self.sources]
        durations = np.array([sum(c.length for c in cs) for cs in self.clips], dtype=np.float64)
        w = np.sqrt(durations) * np.array([SOURCE_BOOST.get(s, 1.0) for s in self.sources])
        self.source_p = w / w.sum()
        self.clip_p = [np.array([c.length for c in cs], dtype=np.float64) / sum(c.length for c in cs)
                       for cs in self.clips]

    def crop(self, rng: np.random.Generator, length: int) -> np.ndarray:
        s = rng.choice(len(self.sources), p=self.source_p)
        clip = self.clips[s][rng.choice(len(self.clips[s]), p=self.clip_p[s])]
        out = np.zeros(length, dtype=np.float32)
        if clip.length >= length:
            start = clip.offset + int(rng.integers(0, clip.length - length + 1))
            out[:] = clip.data[start: start + length]
        else:
            at = int(rng.integers(0, length - clip.length + 1))
            out[at: at + clip.length] = clip.data[clip.offset: clip.offset + clip.length]
        if clip.data.dtype == np.int16:
            out /= INT16_SCALE
        return out


def load_corpus(root: str | Path, split: str) -> dict[str, Pool]:
    """Pools per category from `root/{split}/{category}.npy|json` (memory-mapped)."""
    pools = {}
    for cat in CATEGORIES:
        index = Path(root) / split / f"{cat}.json"
        if not index.is_file():
            continue
        meta = json.loads(index.read_text())
        data = np.load(index.with_suffix(".npy"), mmap_mode="r")
        clips = [Clip(data, e["offset"], e["length"], e["source"]) for e in meta["entries"]]
        if clips:
            pools[cat] = Pool(clips)
    if not pools:
        raise FileNotFoundError(f"no corpus under {Path(root) / split}; run bin/build_corpus.py first")
    return pools


def audio_folder(folder: str | Path, sample_rate: int, category: str = "music") -> dict[str, Pool]:
    """Every soundfile-readable file under `folder`, mono, resampled to `sample_rate` (small sets)."""
    import soundfile as sf
    import soxr

    clips = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            x, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except Exception:
            continue
        x = x.mean(axis=1)
        if sr != sample_rate:
            x = soxr.resample(x, sr, sample_rate).astype(np.float32)
        if len(x):
            clips.append(Clip(x, 0, len(x), path.parent.name))
    return {category: Pool(clips)}


@dataclasses.dataclass
class MixConfig:
    """Paper §4.1 mixing: single music / single other / 2-source mix / 3 non-music sources."""

    p_single_music: float = 0.32
    p_single_other: float = 0.32
    p_mix2: float = 0.24
    p_mix3: float = 0.12
    speech_share: float = 0.67  # of the non-music draws, how many are speech (rest sfx)
    gain_db: tuple[float, float] = (-10.0, 6.0)
    target_rms_db: float = -20.0
    min_rms: float = 1e-4


class Batches:
    """Infinite seeded stream of training batches [B, 1, T] float32."""

    def __init__(self, pools: dict[str, Pool], batch_size: int, length: int, seed: int = 0,
                 mix: MixConfig | None = None) -> None:
        self.pools, self.batch_size, self.length = pools, batch_size, length
        self.mix = mix or MixConfig()
        self.rng = np.random.default_rng(seed)

    def state(self) -> dict[str, tp.Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, tp.Any]) -> None:
        self.rng.bit_generator.state = state

    def _category(self, music: bool | None) -> str:
        cats = list(self.pools)
        if music is True and "music" in self.pools:
            return "music"
        non_music = [c for c in cats if c != "music"] or cats
        if music is False or "music" not in self.pools:
            if "speech" in non_music and "sfx" in non_music:
                return "speech" if self.rng.random() < self.mix.speech_share else "sfx"
            return non_music[int(self.rng.integers(len(non_music)))]
        return cats[int(self.rng.integers(len(cats)))]

    def _source(self, music: bool | None) -> np.ndarray:
        for _ in range(8):  # avoid (near) silent crops
            x = self.pools[self._category(music)].crop(self.rng, self.length)
            rms = float(np.sqrt(np.mean(x ** 2)))
            if rms > self.mix.min_rms:
                return x * (10 ** (self.mix.target_rms_db / 20) / rms)
        return x

    def item(self) -> np.ndarray:
        m = self.mix
        u = self.rng.random() * (m.p_single_music + m.p_single_other + m.p_mix2 + m.p_mix3)
        if u < m.p_single_music:
            parts = [self._source(True)]
        elif u < m.p_single_music + m.p_single_other:
            parts = [self._source(False)]
        elif u < m.p_single_music + m.p_single_other + m.p_mix2:
            parts = [self._source(None), self._source(None)]
        else:
            parts = [self._source(False) for _ in range(3)]
        x = sum(p * 10 ** (self.rng.uniform(-5, 0) / 20) for p in parts) if len(parts) > 1 else parts[0]
        x = x * 10 ** (self.rng.uniform(*m.gain_db) / 20)
        if self.rng.random() < 0.5:
            x = -x
        peak = float(np.abs(x).max())
        if peak > 0.99:  # the paper rejects clipped items; rescaling keeps the draw
            x = x * (0.99 / peak)
        return x.astype(np.float32)

    def __iter__(self) -> tp.Iterator[torch.Tensor]:
        while True:
            yield self.next()

    def next(self) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.item() for _ in range(self.batch_size)]))[:, None]


class _WorkerStream(torch.utils.data.IterableDataset):
    """Each loader worker draws from its own generator, seeded by (seed, worker id)."""

    def __init__(self, batches: Batches, seed: int) -> None:
        self.batches, self.seed = batches, seed

    def __iter__(self) -> tp.Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        self.batches.rng = np.random.default_rng([self.seed, info.id if info else 0])
        return iter(self.batches)


class Prefetched:
    """`Batches` made by `workers` processes ahead of the training loop (for a GPU, which outpaces one
    process drawing crops). Same interface as `Batches`; a resumed run restores the generator the
    workers' seeds are drawn from, so it continues deterministically but not with the same crops."""

    def __init__(self, batches: Batches, workers: int) -> None:
        self.batches, self.workers = batches, workers
        self._it: tp.Iterator[torch.Tensor] | None = None

    def state(self) -> dict[str, tp.Any]:
        return self.batches.state()

    def set_state(self, state: dict[str, tp.Any]) -> None:
        self.batches.set_state(state)

    def next(self) -> torch.Tensor:
        if self._it is None:  # started at the first batch, after any set_state of a resume
            seed = int(self.batches.rng.integers(2 ** 63))
            loader = torch.utils.data.DataLoader(_WorkerStream(self.batches, seed), batch_size=None,
                                                 num_workers=self.workers, prefetch_factor=4,
                                                 pin_memory=torch.cuda.is_available())
            self._it = iter(loader)
        return next(self._it)
