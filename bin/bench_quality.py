#!/usr/bin/env python3
"""Quality report: neucodec against Opus and Codec2 on the dev clips, at measured file bitrates -> docs/quality.md.

Every dev clip (speech, music, general sounds; 24 kHz mono) is coded, decoded and scored by:

* neucodec at each `--bandwidths` target, as `neucodec encode -b X` (and `-b X --lm`) writes it:
  `neucodec.encode_file(..., bandwidth=X)`, where rate control picks the codebooks, the envelope
  correction and the LM so that the file meets X; then `neucodec.decode_file`;
* Opus (opusenc, hard CBR, 60 ms frames) at `--opus` rates; Codec2 1200 and 3200.

Scores: ViSQOL v3 speech mode (visqol-python, lattice mapper) at 16 kHz for every category (on music
and general sounds still speech mode: a rough similarity score; `neucodec.train.metrics`); PESQ-WB
(16 kHz) and STOI, speech only; log-mel distance (80 HTK bands, n_fft 1024, hop 256, 24 kHz;
`neucodec.train.losses.mel_distance`); SI-SNR. The decoded signal is aligned to the reference
(cross-correlation of the waveforms, or of their envelopes when the normalised peak is below 0.3)
before STOI, mel distance and SI-SNR; PESQ and ViSQOL align internally.

Bitrates are measured: file kbps counts every byte of the .ecdc / .opus / .c2 file. The
*Opus-equivalent bitrate* of a neucodec row is, per category and metric, the file rate at which
Opus reaches neucodec's mean score (Opus's mean scores per rate made monotone, then interpolated
linearly; `opus_equivalent_rate`), divided by neucodec's mean file rate.

    python bin/bench_quality.py --threads 1
    python bin/bench_quality.py --limit 1 --bandwidths 6 --opus 6 12 --out /tmp/q.md --plots '/tmp/q_*.png'

Needs the `eval` extra (pesq, pystoi, visqol-python[all], matplotlib) and opus-tools, codec2, sox.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import datetime
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CATEGORIES = ("speech", "music", "sfx")
CATEGORY_TITLES = {"speech": "Speech", "music": "Music", "sfx": "General sounds"}
DEFAULT_CLIPS = Path.home() / ".cache/neucodec-train/corpus/dev/clips"
FALLBACK_MODEL = Path.home() / ".cache/neucodec-train/release/neucodec_24khz.json"
SAMPLE_RATE = 24000
METRIC_RATE = 16000  # ViSQOL speech mode and PESQ-WB
MAX_LAG_SECONDS = 0.1
CODEC2_MODES = (1200, 3200)
CODEC2_HEADER_BYTES = 7
OPUS_FRAME_MS = 60
BANDWIDTHS = (1.5, 3.0, 4.5, 6.0, 8.0, 12.0, 16.0)
OPUS_RATES = (1.5, 3.0, 4.5, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)
# (category, metric, higher is better, column title) of the Opus-equivalent table
METRICS = (("speech", "visqol", True, "ViSQOL"), ("speech", "pesq", True, "PESQ-WB"), ("speech", "stoi", True, "STOI"),
           ("speech", "mel", False, "mel"), ("music", "visqol", True, "ViSQOL"), ("music", "mel", False, "mel"),
           ("sfx", "visqol", True, "ViSQOL"), ("sfx", "mel", False, "mel"))
BAR_TARGETS = (1.5, 3.0, 6.0, 12.0)  # Opus-equivalent ratio >= 1 on every metric at these -b ...
BAR_RATIO, BAR_PESQ_TARGET, BAR_PESQ_RATIO = 1.0, 6.0, 1.3  # ... and >= 1.3 on speech PESQ-WB at -b 6


# ---------------------------------------------------------------- pure helpers (tested)
def kbps(n_bytes: int, seconds: float) -> float:
    """Bitrate in kbit/s of `n_bytes` spread over `seconds`."""
    return 8.0 * n_bytes / 1000.0 / seconds


def _xcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full cross-correlation c[k] = sum_n a[n + k] b[n], lags -(len(b) - 1) .. len(a) - 1, via FFT."""
    n = len(a) + len(b) - 1
    size = 1 << max(1, (n - 1).bit_length())
    c = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    return np.concatenate([c[size - (len(b) - 1):], c[: len(a)]])


def _best_lag(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[int, float]:
    """Lag d in [-max_lag, max_lag] maximising |sum_n a[n + d] b[n]|, and its normalised peak."""
    c = _xcorr(a, b)
    lags = np.arange(-(len(b) - 1), len(a))
    keep = np.abs(lags) <= max_lag
    c, lags = c[keep], lags[keep]
    i = int(np.argmax(np.abs(c)))
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return int(lags[i]), (abs(float(c[i])) / norm if norm > 0 else 0.0)


def _envelope(x: np.ndarray, window: int) -> np.ndarray:
    env = np.convolve(np.abs(x), np.ones(window) / window, mode="same")
    return env - env.mean()


def estimate_delay(ref: np.ndarray, deg: np.ndarray, max_lag: int, threshold: float = 0.3,
                   envelope_window: int = 240) -> tuple[int, str]:
    """Delay of `deg` behind `ref` in samples (deg[n + d] ~ ref[n]) and how it was found.

    Cross-correlates the waveforms; when the normalised peak is below `threshold` (codecs that
    do not keep the phase: Codec2, low-rate Opus) it cross-correlates the envelopes (|x| averaged
    over `envelope_window` samples) instead. Returns (0, "silent") for an all-zero signal.
    """
    if not np.any(ref) or not np.any(deg):
        return 0, "silent"
    lag, peak = _best_lag(deg, ref, max_lag)
    if peak >= threshold:
        return lag, "waveform"
    lag, _ = _best_lag(_envelope(deg, envelope_window), _envelope(ref, envelope_window), max_lag)
    return lag, "envelope"


def shift(deg: np.ndarray, delay: int, length: int) -> np.ndarray:
    """deg advanced by `delay` samples (negative: delayed), cut or zero-padded to `length`."""
    out = np.zeros(length, dtype=deg.dtype)
    src = deg[max(delay, 0):]
    dst_start = max(-delay, 0)
    n = max(0, min(len(src), length - dst_start))
    out[dst_start: dst_start + n] = src[:n]
    return out


def align(ref: np.ndarray, deg: np.ndarray, max_lag: int) -> tuple[np.ndarray, int, str]:
    """`deg` shifted onto `ref` and cut to its length, with the delay and method used."""
    delay, how = estimate_delay(ref, deg, max_lag)
    return shift(deg, delay, len(ref)), delay, how


def si_snr(deg: np.ndarray, ref: np.ndarray, eps: float = 1e-8) -> float:
    """Scale-invariant SNR in dB of aligned 1-D signals."""
    deg = deg.astype(np.float64) - deg.mean()
    ref = ref.astype(np.float64) - ref.mean()
    proj = (deg @ ref) / (ref @ ref + eps) * ref
    noise = deg - proj
    return float(10 * np.log10((proj @ proj + eps) / (noise @ noise + eps)))


def ogg_packet_sizes(data: bytes) -> list[int]:
    """Sizes of the packets of the first logical stream in an Ogg file (lacing values summed).

    A packet ends at the first lacing value below 255; one that ends exactly at a page end with
    255 continues on the next page. For Ogg Opus, packets 0 and 1 are OpusHead and OpusTags.
    """
    sizes: list[int] = []
    pos, current, serial = 0, 0, None
    while pos + 27 <= len(data):
        if data[pos: pos + 4] != b"OggS":
            raise ValueError(f"no Ogg page at byte {pos}")
        page_serial = int.from_bytes(data[pos + 14: pos + 18], "little")
        n_seg = data[pos + 26]
        lacing = data[pos + 27: pos + 27 + n_seg]
        body = sum(lacing)
        if serial is None:
            serial = page_serial
        if page_serial == serial:
            for v in lacing:
                current += v
                if v < 255:
                    sizes.append(current)
                    current = 0
        pos += 27 + n_seg + body
    return sizes


def ecdc_payload_bytes(data: bytes) -> int:
    """Bytes of coded codes in an .ecdc stream: the segment payloads, without header and framing."""
    from neucodec import container

    fi = io.BytesIO(data)
    prelude = container.read_prelude(fi)
    return sum(len(r.payload) for r in container.ContainerReader(fi, prelude))


def nanmean(values: tp.Iterable[float]) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")



def opus_equivalent_rate(rates: tp.Sequence[float], scores: tp.Sequence[float], score: float,
                         higher_is_better: bool = True) -> tuple[float, float]:
    """The rate at which a reference codec reaches `score`, from its mean score at each rate.

    The curve is made monotone (the best score at this rate or any lower one) and interpolated
    linearly between measured rates. A NaN score (e.g. silent output, which ViSQOL and PESQ cannot
    score) reaches nothing. Returns (low, high) bounds of the rate, equal when interpolated;
    (rates[-1], inf) when `score` is beyond every rate's; (0, rates[0]) when the lowest rate already
    reaches it; (r_nan, r) between a rate that reaches nothing and the next. (nan, nan) for a NaN
    `score` or no rates.
    """
    if math.isnan(score) or not len(rates):
        return math.nan, math.nan
    sign = 1.0 if higher_is_better else -1.0
    pairs = sorted(zip(rates, scores))
    best, curve = -math.inf, []
    for r, s in pairs:
        if not math.isnan(s):
            best = max(best, sign * s)
        curve.append((r, best))
    want = sign * score
    for i, (r, s) in enumerate(curve):
        if s >= want:
            if i == 0:
                return 0.0, r
            r0, s0 = curve[i - 1]
            if s0 == -math.inf:
                return r0, r
            x = r0 + (want - s0) / (s - s0) * (r - r0)
            return x, x
    return curve[-1][0], math.inf


def ratio_text(low: float, high: float, digits: int = 2) -> str:
    """A ratio or its bounds as the report shows them: '1.34', '> 2.10', '< 0.61', '1.52–2.43'."""
    if math.isnan(low):
        return "—"
    if low == high:
        return f"{low:.{digits}f}"
    if math.isinf(high):
        return f"> {low:.{digits}f}"
    if low <= 0:
        return f"< {high:.{digits}f}"
    return f"{low:.{digits}f}–{high:.{digits}f}"


def meets(low: float, high: float, bar: float) -> bool | None:
    """Whether a ratio known to lie in [low, high] is at least `bar`: True, False, or None (undecided)."""
    if math.isnan(low):
        return None
    if low >= bar:
        return True
    return False if high < bar else None


# ---------------------------------------------------------------- systems
@dataclasses.dataclass
class Coded:
    """One clip through one system: decoded audio at 24 kHz plus measured sizes."""

    audio: np.ndarray
    file_bytes: int
    payload_bytes: int
    point: str | None = None  # neucodec: the operating point rate control chose
    notes: list[str] = dataclasses.field(default_factory=list)  # neucodec: the encoder's notes


@dataclasses.dataclass
class System:
    """A codec at one setting: `run(clip path) -> Coded`."""

    name: str  # "neucodec", "neucodec --lm", "opus", "codec2"
    target_kbps: float
    run: tp.Callable[[Path], Coded]

    @property
    def label(self) -> str:
        if self.name.startswith("neucodec"):
            return f"`-b {self.target_kbps:g}{self.name[len('neucodec'):]}`"
        return f"{'Opus' if self.name == 'opus' else 'Codec2'} {self.target_kbps:g}"


def _sh(cmd: str) -> None:
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"`{cmd}` failed ({res.returncode}): {res.stderr.strip()[-300:]}")


def _read24(path: Path) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(1)
    return x if sr == SAMPLE_RATE else soxr.resample(x, sr, SAMPLE_RATE).astype(np.float32)


def opus_system(kbps_target: float, tmp: Path) -> System:
    def run(path: Path) -> Coded:
        coded, out = tmp / "x.opus", tmp / "opus.wav"
        _sh(f"opusenc --quiet --bitrate {kbps_target:g} --hard-cbr --framesize {OPUS_FRAME_MS} "
            f"{shlex.quote(str(path))} {coded}")
        _sh(f"opusdec --quiet --rate {SAMPLE_RATE} --no-dither --float {coded} {out}")
        data = coded.read_bytes()
        return Coded(_read24(out), len(data), sum(ogg_packet_sizes(data)[2:]))
    return System("opus", kbps_target, run)


def codec2_system(mode: int, tmp: Path) -> System:
    def run(path: Path) -> Coded:
        coded, out = tmp / "x.c2", tmp / "c2.wav"
        raw = "-t raw -r 8000 -e signed -b 16 -c 1"
        # -D: no dither (sox adds random dither when it writes 16 bits: a new score every run)
        _sh(f"sox -D {shlex.quote(str(path))} {raw} - | c2enc {mode} - {coded}")
        _sh(f"c2dec {mode} {coded} - | sox -D {raw} - -r {SAMPLE_RATE} {out}")
        size = coded.stat().st_size
        return Coded(_read24(out), size, size - CODEC2_HEADER_BYTES)
    return System("codec2", mode / 1000, run)


def neucodec_system(model: Path, lm: tp.Any, bandwidth: float, tmp: Path, envelope: str | None = None) -> System:
    """neucodec as `neucodec encode -b BANDWIDTH [--lm]` writes it (`lm`: the loaded LM, or None for
    no LM) and `neucodec decode` reads it; `envelope`: only points with that correction table."""
    import neucodec

    def run(path: Path) -> Coded:
        coded, out = tmp / "x.ecdc", tmp / "neucodec.wav"
        res = neucodec.encode_file(path, coded, model=model, bandwidth=bandwidth, use_lm=lm is not None, lm=lm,
                                   envelope=envelope, force=True, device="cpu")
        neucodec.decode_file(coded, out, model=model, lm=lm, subtype="FLOAT", force=True, device="cpu")
        data = coded.read_bytes()
        notes = [n.split(": ", 1)[-1] for n in res.notes]  # without the clip's path
        return Coded(_read24(out), len(data), ecdc_payload_bytes(data), res.point.describe() if res.point else None,
                     notes)
    return System("neucodec" + (" --lm" if lm is not None else ""), bandwidth, run)

def speed(model: Path, lm: tp.Any, clips: list[tuple[str, Path]], tmp: Path, bandwidth: float = 6.0,
          seconds: float = 60.0, rounds: int = 2) -> dict[str, float]:
    """Real-time factors (audio s per compute s, best of `rounds`) of `encode_file` and `decode_file`
    at `-b bandwidth` on `seconds` of the dev clips joined: as `neucodec encode` codes, without the
    envelope correction ("plain_", `--no-envelope`), and with the LM ("lm_", `--lm`)."""
    import neucodec

    src, coded, out = tmp / "joined.wav", tmp / "speed.ecdc", tmp / "speed.wav"
    audio = np.concatenate([_read24(path) for _, path in clips])
    sf.write(str(src), np.resize(audio, int(seconds * SAMPLE_RATE)), SAMPLE_RATE, subtype="FLOAT")
    rtf: dict[str, float] = {}
    variants = [("", None, None), ("plain_", False, None)] + [("lm_", None, lm)] * (lm is not None)
    for tag, envelope, model_lm in variants:
        best_enc = best_dec = math.inf
        for _ in range(rounds):
            t = time.perf_counter()
            neucodec.encode_file(src, coded, model=model, bandwidth=bandwidth, use_lm=model_lm is not None,
                                 lm=model_lm, envelope=envelope, force=True, device="cpu")
            t1 = time.perf_counter()
            neucodec.decode_file(coded, out, model=model, lm=model_lm, force=True, device="cpu")
            best_enc, best_dec = min(best_enc, t1 - t), min(best_dec, time.perf_counter() - t1)
        rtf[f"{tag}encode"], rtf[f"{tag}decode"] = seconds / best_enc, seconds / best_dec
    return rtf



# ---------------------------------------------------------------- metrics
class Metrics:
    """The metric stack; ViSQOL and PESQ are created once (ViSQOL's first call takes ~10 s)."""

    def __init__(self) -> None:
        from pesq import PesqError, pesq
        from pystoi import stoi

        from neucodec.train.losses import mel_distance
        from neucodec.train.metrics import VisqolSpeech

        self._pesq, self._pesq_error, self._stoi, self._mel = pesq, PesqError, stoi, mel_distance
        self.visqol = VisqolSpeech()

    def pesq_wb(self, ref16: np.ndarray, deg16: np.ndarray) -> float:
        n = min(len(ref16), len(deg16))
        try:
            v = float(self._pesq(METRIC_RATE, ref16[:n], deg16[:n], "wb", on_error=self._pesq_error.RETURN_VALUES))
        except Exception:  # noqa: BLE001 - silent output: PESQ cannot score it
            return float("nan")
        return v if v > 0 else float("nan")

    def score(self, ref: np.ndarray, deg: np.ndarray, category: str) -> dict[str, float | str | int]:
        aligned, delay, how = align(ref, deg, int(MAX_LAG_SECONDS * SAMPLE_RATE))
        ref16 = soxr.resample(ref, SAMPLE_RATE, METRIC_RATE).astype(np.float32)
        deg16 = soxr.resample(deg, SAMPLE_RATE, METRIC_RATE).astype(np.float32)
        out: dict[str, float | str | int] = {
            "delay": delay, "align": how,
            "visqol": self.visqol(ref16, deg16, METRIC_RATE),
            "mel": self._mel(torch.from_numpy(aligned).view(1, 1, -1), torch.from_numpy(ref).view(1, 1, -1),
                             SAMPLE_RATE),
            "si_snr": si_snr(aligned, ref),
        }
        if category == "speech":
            out["pesq"] = self.pesq_wb(ref16, deg16)
            out["stoi"] = (float(self._stoi(ref, aligned, SAMPLE_RATE, extended=False)) if np.any(aligned)
                           else float("nan"))
        return out


# ---------------------------------------------------------------- model
def load_model(spec: str | None) -> tuple[tp.Any, tp.Any, dict[str, tp.Any]]:
    """(codec, lm or None, description) for a name or path; None: the packaged default, else the fallback."""
    import neucodec
    from neucodec.errors import NeucodecError, WeightsUnavailable
    from neucodec.weights import DEFAULT_MODEL, load_weights, resolve

    if spec is None:
        try:
            path = resolve(DEFAULT_MODEL, allow_download=False)
        except NeucodecError:
            if not FALLBACK_MODEL.is_file():
                raise SystemExit(f"no packaged {DEFAULT_MODEL} and no {FALLBACK_MODEL}; pass --model") from None
            path = FALLBACK_MODEL
    else:
        path = resolve(os.path.expanduser(spec), allow_download=False)
    source = path
    if path.suffix == ".json":  # a training job may re-export it any minute: read one consistent copy
        snapshot = Path(tempfile.mkdtemp(prefix="bench_quality_"))
        atexit.register(shutil.rmtree, snapshot, True)
        weights_name = json.loads(path.read_text()).get("weights", path.with_suffix(".safetensors").name)
        shutil.copy2(path, snapshot / path.name)
        shutil.copy2(path.with_name(weights_name), snapshot / weights_name)
        path = snapshot / path.name
    weights = load_weights(path)
    codec = neucodec.load_codec(path)
    try:
        lm = neucodec.load_lm(path)
    except WeightsUnavailable:
        lm = None
    blank = [i for i, layer in enumerate(codec.quantizer.vq.layers) if not layer._codebook.embed.any()]
    info = {"source": str(source), "model_id": codec.model_id, "fingerprint": codec.fingerprint,
            "n_q": codec.n_q, "blank_codebooks": blank,
            "training": weights.metadata, "lm": None if lm is None else f"{lm.model_id} ({lm.fingerprint})",
            "bandwidths": list(codec.config.bandwidths), "path": str(path)}
    return codec, lm, info


def find_clips(folder: Path, limit: int | None) -> list[tuple[str, Path]]:
    """(category, path) of the dev clips, from clips.json when present, else from the file names."""
    manifest = folder / "clips.json"
    if manifest.is_file():
        entries = [(c["category"], folder / c["file"]) for c in json.loads(manifest.read_text())["clips"]]
    else:
        entries = [(p.name.split("_")[0], p) for p in sorted(folder.glob("*.wav"))]
    out: list[tuple[str, Path]] = []
    for cat in CATEGORIES:
        paths = [p for c, p in entries if c == cat]
        out += [(cat, p) for p in paths[:limit]]
    if not out:
        raise SystemExit(f"no dev clips found in {folder}")
    return out


# ---------------------------------------------------------------- report
def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


SCORES = ("file_kbps", "payload_kbps", "visqol", "pesq", "stoi", "mel", "si_snr")
RANK = {"neucodec": 0, "neucodec --lm": 1, "opus": 2, "codec2": 3}


def summarise(rows: list[dict[str, tp.Any]]) -> dict[tuple[str, str], dict[str, tp.Any]]:
    """Per (category, system label): the mean of every score, the clip count, the system's name and
    target, and how often each operating point was chosen."""
    groups: dict[tuple[str, str], list[dict[str, tp.Any]]] = {}
    for r in rows:
        groups.setdefault((r["category"], r["system"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        means: dict[str, tp.Any] = {k: nanmean(r.get(k, math.nan) for r in rs) for k in SCORES}
        means.update(clips=len(rs), name=rs[0]["name"], target_kbps=rs[0]["target_kbps"],
                     points=collections.Counter(r["point"] for r in rs if r.get("point")),
                     notes=collections.Counter(n for r in rs for n in r.get("notes", ())))
        out[key] = means
    return out


def _labels(summary: dict[tuple[str, str], dict[str, tp.Any]], names: tp.Container[str] = RANK) -> list[str]:
    """System labels in report order: neucodec by target, with the LM, Opus, Codec2."""
    first = {lab: s for (_, lab), s in summary.items()}
    return sorted((lab for lab, s in first.items() if s["name"] in names),
                  key=lambda lab: (RANK.get(first[lab]["name"], 9), first[lab]["target_kbps"]))


Ratios = dict[tuple[str, str, str], tuple[float, float]]  # (category, metric, neucodec label) -> bounds


def equivalent_ratios(summary: dict[tuple[str, str], dict[str, tp.Any]]) -> Ratios:
    """(category, metric, neucodec label) -> bounds of its Opus-equivalent ratio: the file rate at which
    Opus reaches neucodec's mean score over neucodec's mean file rate."""
    out = {}
    for cat, metric, higher, _ in METRICS:
        opus = [s for (c, _), s in summary.items() if c == cat and s["name"] == "opus"]
        rates, scores = [s["file_kbps"] for s in opus], [s[metric] for s in opus]
        for (c, lab), s in summary.items():
            if c == cat and s["name"].startswith("neucodec"):
                low, high = opus_equivalent_rate(rates, scores, s[metric], higher)
                out[(cat, metric, lab)] = (low / s["file_kbps"], high / s["file_kbps"])
    return out


def _point_text(counts: collections.Counter[str]) -> str:
    if not counts:
        return "—"
    (top, n), *others = counts.most_common()
    return top + "".join(f"; {p} on {k} clip{'s' if k > 1 else ''}" for p, k in others)


def equivalent_table(summary: dict[tuple[str, str], dict[str, tp.Any]],
                     ratios: Ratios) -> str:
    cats = [c for c in CATEGORIES if any(k[0] == c for k in summary)]
    cols = [m for m in METRICS if m[0] in cats]
    heads = [f"{cat}: {title}" if i == 0 or cols[i - 1][0] != cat else title
             for i, (cat, _, _, title) in enumerate(cols)]
    lines = ["| `-b` | chosen point | file kbps: " + " / ".join(cats) + " | " + " | ".join(heads) + " |",
             "|" + "---|" * (3 + len(cols))]
    for lab in _labels(summary, ("neucodec", "neucodec --lm")):
        points: collections.Counter[str] = collections.Counter()
        for c in cats:
            points.update(summary[(c, lab)]["points"])
        rates = " / ".join(_fmt(summary[(c, lab)]["file_kbps"]) for c in cats)
        cells = [ratio_text(*ratios.get((cat, metric, lab), (math.nan, math.nan))) for cat, metric, _, _ in cols]
        lines.append(f"| {lab} | {_point_text(points)} | {rates} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_verdict(summary: dict[tuple[str, str], dict[str, tp.Any]],
                ratios: Ratios) -> list[str]:
    """One line per neucodec variant (without, with the LM): the bar's cells that fail or are undecided."""
    titles = {(c, m): f"{c} {t}" for c, m, _, t in METRICS}
    lines = []
    for name in ("neucodec", "neucodec --lm"):
        labs = {s["target_kbps"]: lab for (_, lab), s in summary.items() if s["name"] == name}
        if not labs:
            continue
        fail, open_, missing = [], [], [b for b in BAR_TARGETS if b not in labs]
        for b in BAR_TARGETS:
            for cat, metric, _, _ in METRICS:
                if (cat, metric, labs.get(b)) not in ratios:
                    continue
                low, high = ratios[(cat, metric, labs[b])]
                bar = BAR_PESQ_RATIO if (cat, metric, b) == ("speech", "pesq", BAR_PESQ_TARGET) else BAR_RATIO
                ok = meets(low, high, bar)
                cell = f"`-b {b:g}` {titles[(cat, metric)]} {ratio_text(low, high)}"
                cell += f" < {bar:g}" if bar != 1 and ok is False else ""
                if ok is False:
                    fail.append(cell)
                elif ok is None:
                    open_.append(cell)
        verdict = "**not met**" if fail else "**undecided**" if open_ else "**met**"
        what = "; ".join(part for part in (
            ", ".join(fail),
            ", ".join(open_) and ("undecided: " if fail else "") + ", ".join(open_),
            missing and "not measured: " + ", ".join(f"`-b {b:g}`" for b in missing)) if part)
        lines.append(f"* **{'With `--lm`' if name.endswith('lm') else 'Without the LM'}:** {verdict}"
                     + (f" ({what})." if what else "."))
    return lines


def scores_table(summary: dict[tuple[str, str], dict[str, tp.Any]]) -> str:
    cats = [c for c in CATEGORIES if any(k[0] == c for k in summary)]
    cols = [(c, m) for c in cats for m in (("file_kbps", "visqol", "pesq", "stoi", "mel", "si_snr") if c == "speech"
                                          else ("file_kbps", "visqol", "mel"))]
    title = {"file_kbps": "kbps", "visqol": "ViSQOL", "pesq": "PESQ-WB", "stoi": "STOI", "mel": "mel ↓",
             "si_snr": "SI-SNR"}
    digits = {"mel": 3, "si_snr": 1}
    heads = [f"{c}: {title[m]}" if m == "file_kbps" else title[m] for c, m in cols]
    lines = ["| system | " + " | ".join(heads) + " |", "|" + "---|" * (1 + len(cols))]
    for lab in _labels(summary):
        cells = [_fmt(summary[(c, lab)][m], digits.get(m, 2)) if (c, lab) in summary else "—" for c, m in cols]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[tuple[str, str], dict[str, tp.Any]], path: Path) -> None:
    """ViSQOL and mel distance against file kbps, a column per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c for c in CATEGORIES if any(k[0] == c for k in summary)]
    fig, axes = plt.subplots(2, len(cats), figsize=(4.4 * len(cats), 6.6), squeeze=False)
    styles = {"neucodec": dict(color="tab:blue", marker="o"),
              "neucodec --lm": dict(color="tab:blue", marker="o", ls="--", mfc="none"),
              "opus": dict(color="tab:orange", marker="s"), "codec2": dict(color="tab:green", marker="^")}
    for row, (metric, ylabel) in enumerate((("visqol", "ViSQOL (speech mode) ↑"), ("mel", "log-mel distance ↓"))):
        for ax, cat in zip(axes[row], cats):
            for name, style in styles.items():
                pts = sorted((s["file_kbps"], s[metric]) for (c, _), s in summary.items()
                             if c == cat and s["name"] == name)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
            ax.set_xscale("log", base=2)
            ax.set_xticks([1.5, 3, 6, 12, 24])
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("file bitrate (kbps)")
            ax.set_ylabel(ylabel)
            ax.set_title(CATEGORY_TITLES[cat])
            ax.grid(True, alpha=0.3)
            if metric == "mel":
                ax.set_ylim(0, min(1.5, ax.get_ylim()[1]))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_path(args: argparse.Namespace) -> Path:
    """Where the plot goes: `--plots` with its '*' replaced by 'rate'."""
    return Path(args.plots.replace("*", "rate"))


def write_report(args: argparse.Namespace, model: dict[str, tp.Any], clips: list[tuple[str, Path]],
                 summary: dict[tuple[str, str], dict[str, tp.Any]], seconds: float, command: str,
                 rtf: dict[str, float], load: float) -> str:
    ratios = equivalent_ratios(summary)
    counts = ", ".join(f"{sum(c == cat for c, _ in clips)} {cat}" for cat in CATEGORIES)
    out_dir = Path(args.out).resolve().parent
    plot_file = plot_path(args)
    card = os.path.relpath(ROOT / "docs/model-card.md", out_dir)
    bars = ", ".join(f"{b:g}" for b in BAR_TARGETS)
    parts = [
        "# Quality report",
        "",
        "neucodec against Opus and Codec2 on held-out dev clips, every figure at the file's measured bitrate. "
        "Generated by `bin/bench_quality.py`; do not edit by hand.",
        "",
        f"* **Command:** `{command}`",
        f"* **Date:** {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({seconds / 60:.0f} min on {args.threads} thread(s))",
        f"* **Model:** `{model['model_id']}`, fingerprint `{model['fingerprint']}` (`{_home(model['source'])}`; "
        f"training: [model card]({card})); LM: {model['lm'] or 'none (no `--lm` rows)'}"
        + (f"; only points with the `{args.envelope_table}` correction" if args.envelope_table else ""),
        *_blank_warning(model["blank_codebooks"], model["n_q"]),
        f"* **Clips:** {counts} × 10 s, 24 kHz mono, from `{_home(str(args.clips))}` (held out from training).",
        f"* **Speed** (`-b 6`, 60 s of the clips joined, best of 2, load average {load:.1f} at the start): "
        f"encode {rtf['encode']:.0f}×, decode {rtf['decode']:.0f}× real time; `--no-envelope` "
        f"{rtf['plain_encode']:.0f}× / {rtf['plain_decode']:.0f}×"
        + (f"; `--lm` {rtf['lm_encode']:.0f}× / {rtf['lm_decode']:.0f}×" if "lm_encode" in rtf else "") + ".",
        "",
        "## Opus-equivalent bitrate",
        "",
        "Per category and metric: the file rate Opus needs for neucodec's mean score, divided by neucodec's "
        "mean file rate; above 1, neucodec needs fewer bits. `> x`: neucodec scores better than Opus at "
        "its highest rate; `< x`: Opus's lowest rate already scores better; `x–y`: between an Opus rate that "
        "decodes to silence and the next. `-b` is the target; *chosen point*: what rate control picked.",
        "",
        equivalent_table(summary, ratios),
        "",
        *_notes(summary),
        f"Bar: at least {BAR_RATIO:.1f} on every metric at `-b` {bars}, and {BAR_PESQ_RATIO:.1f} on speech PESQ-WB "
        f"at `-b {BAR_PESQ_TARGET:g}`.",
        "",
        *bar_verdict(summary, ratios),
        "",
        "## Scores (means over clips)",
        "",
        scores_table(summary),
        "",
        f"![ViSQOL and mel distance vs file bitrate]({os.path.relpath(plot_file.resolve(), out_dir)})",
        "",
        "## How the numbers are made",
        "",
        "* **neucodec:** `neucodec.encode_file(clip, out, bandwidth=B[, use_lm=True])`, as `neucodec encode -b B "
        "[--lm]`: rate control picks the codebooks, envelope correction and LM that score best within B for a "
        "file of this length (header and index take 0.14–0.2 kbps of a 10 s file), then `neucodec.decode_file`. "
        f"**Opus:** `opusenc --bitrate B --hard-cbr --framesize {OPUS_FRAME_MS}` on the 24 kHz clip, "
        f"`opusdec --rate {SAMPLE_RATE} --no-dither --float`; below 3 kbps it decodes to silence (ViSQOL, PESQ "
        "and STOI cannot score it: such a rate reaches no score). "
        "**Codec2** (1.0.5): `sox -D` to 8 kHz raw, `c2enc MODE` / `c2dec MODE`, `sox -D` back to 24 kHz.",
        "* **Bitrates** are file bitrates over the clip's duration: every byte of the .ecdc file (header, "
        "correction, framing, index), of the .opus file (Ogg pages, header packets) and of the .c2 file.",
        "* **Opus-equivalent rate:** Opus's mean score per file rate, made monotone (the best at that rate or "
        "below), interpolated linearly at neucodec's mean score (`opus_equivalent_rate`).",
        "* **ViSQOL** v3 speech mode (visqol-python, lattice mapper) at 16 kHz (soxr), MOS-LQO 1–5, identical "
        "signals ≈ 4.7; on music and general sounds a rough similarity score. **PESQ-WB** (`pesq`, 16 kHz) and "
        "**STOI** (`pystoi`, classic, 24 kHz): speech only. **Mel distance** (lower is better): mean "
        "|log10(1e-5 + M(x̂)) − log10(1e-5 + M(x))|, M = 80 HTK mel bands of a normalised STFT (n_fft 1024, "
        "hop 256, Hann) at 24 kHz. **SI-SNR** in dB, meaningless for codecs that do not keep the waveform.",
        f"* **Alignment:** before STOI, mel distance and SI-SNR the decoded signal is shifted by the lag (within "
        f"±{MAX_LAG_SECONDS * 1000:.0f} ms) that maximises the waveform cross-correlation, or the envelope's when "
        "the normalised peak is below 0.3. PESQ and ViSQOL align internally. A score that cannot be computed "
        "is left out of the mean (— when no clip has one).",
        "",
    ]
    return "\n".join(parts)


def _notes(summary: dict[tuple[str, str], dict[str, tp.Any]]) -> list[str]:
    """The encoder's notes per neucodec row, with the number of clips each came on, and a blank line."""
    lines = []
    for lab in _labels(summary, ("neucodec", "neucodec --lm")):
        notes: collections.Counter[str] = collections.Counter()
        for (_, label), s in summary.items():
            if label == lab:
                notes.update(s["notes"])
        lines += [f"{lab}: the encoder noted \"{n}\" ({k} clip{'s' if k > 1 else ''})." for n, k in notes.items()]
    return [" ".join(lines), ""] if lines else []


def _blank_warning(blank: list[int], n_q: int) -> list[str]:
    """A warning line when codebooks are all zero (weights exported before the RVQ was switched on)."""
    if not blank:
        return []
    return [f"* **Warning:** {len(blank)} of {n_q} codebooks of these weights are all zero (exported before "
            "the quantizer was trained, e.g. before `quantizer_start`): those codes carry no information"
            + (" and every bandwidth decodes to the same audio." if len(blank) == n_q else ".")]


def _quote(arg: str) -> str:
    """shlex.quote, but a leading ~/ stays unquoted so that the shell still expands it."""
    return "~/" + shlex.quote(arg[2:]) if arg.startswith("~/") else shlex.quote(arg)


def _home(path: str) -> str:
    """A path as the report shows it: relative to the repository, or with ~ for the home folder."""
    root, home = str(ROOT) + "/", str(Path.home())
    if path.startswith(root):
        return path[len(root):]
    return "~" + path[len(home):] if path.startswith(home) else path


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model name or release .json / checkpoint path "
                   f"(default: the packaged default, else {_home(str(FALLBACK_MODEL))})")
    p.add_argument("--clips", type=Path, default=DEFAULT_CLIPS, help="folder of dev clips (+ clips.json)")
    p.add_argument("--bandwidths", type=float, nargs="+", default=list(BANDWIDTHS), metavar="KBPS",
                   help="neucodec targets (`-b`), each also with `--lm` when the model has an LM")
    p.add_argument("--opus", type=float, nargs="+", default=list(OPUS_RATES), metavar="KBPS", help="Opus bitrates")
    p.add_argument("--no-lm", action="store_true", help="no `--lm` rows")
    p.add_argument("--out", type=Path, default=ROOT / "docs/quality.md")
    p.add_argument("--plots", default=str(ROOT / "docs/quality_*.png"), help="the plot; '*' becomes 'rate'")
    p.add_argument("--json", type=Path, default=None, help="also write per-clip results here")
    p.add_argument("--limit", type=int, default=None, help="at most N clips per category")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--envelope-table", default=None, metavar="NAME",
                   help="only operating points with this envelope correction table "
                   "(as `neucodec encode --envelope-table`)")
    args = p.parse_args(argv)
    if "*" not in args.plots:
        p.error("--plots needs a '*' (replaced by 'rate')")
    torch.set_num_threads(args.threads)
    command = "python bin/bench_quality.py " + " ".join(_quote(_home(a)) for a in (argv or sys.argv[1:]))

    t0 = time.time()
    _, lm, model = load_model(args.model)
    if args.no_lm:
        lm = None
    clips = find_clips(args.clips.expanduser(), args.limit)
    load = os.getloadavg()[0]
    metrics = Metrics()
    rows: list[dict[str, tp.Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        path = Path(model["path"])
        rtf = speed(path, lm, clips, tmp)
        print("speed (x real time): " + ", ".join(f"{k} {v:.1f}" for k, v in rtf.items()), flush=True)
        systems = [neucodec_system(path, None, b, tmp, args.envelope_table) for b in args.bandwidths]
        systems += [neucodec_system(path, lm, b, tmp, args.envelope_table) for b in args.bandwidths if lm is not None]
        systems += [opus_system(b, tmp) for b in args.opus]
        systems += [codec2_system(m, tmp) for m in CODEC2_MODES]
        for cat, clip in clips:
            ref = _read24(clip)
            seconds = len(ref) / SAMPLE_RATE
            for system in systems:
                t = time.time()
                coded = system.run(clip)
                row: dict[str, tp.Any] = {
                    "clip": clip.name, "category": cat, "system": system.label, "name": system.name,
                    "target_kbps": system.target_kbps, "point": coded.point, "notes": coded.notes,
                    "file_kbps": kbps(coded.file_bytes, seconds), "payload_kbps": kbps(coded.payload_bytes, seconds),
                }
                row.update(metrics.score(ref, coded.audio, cat))
                rows.append(row)
                print(f"{clip.name:14s} {system.label:18s} {row['file_kbps']:6.2f} kbps  "
                      f"visqol {_fmt(row['visqol'])}  mel {_fmt(row['mel'], 3)}  {coded.point or ''}  "
                      f"({time.time() - t:.1f} s)", flush=True)

    summary = summarise(rows)
    plot(summary, plot_path(args))
    report = write_report(args, model, clips, summary, time.time() - t0, command, rtf, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.json is not None:
        args.json.write_text(json.dumps({"model": model, "rows": rows}, indent=1, default=float) + "\n")
    print(equivalent_table(summary, equivalent_ratios(summary)))
    print("\n".join(bar_verdict(summary, equivalent_ratios(summary))))
    print(f"wrote {args.out} and {plot_path(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
