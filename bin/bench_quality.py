#!/usr/bin/env python3
"""Quality report: neucodec against Opus and Codec2 on the dev clips, metrics + real bitrates -> docs/quality.md.

For every dev clip (speech, music, general sounds; 24 kHz mono) and every system -- neucodec at
each `--bandwidths` point as `neucodec encode` writes it (with the envelope correction, where the
model takes one) and without the correction, Opus (opusenc, hard CBR, 60 ms frames) at the same
targets, Codec2 1200 and 3200 -- the clip is coded, decoded and scored:

* ViSQOL v3 speech mode (visqol-python, lattice mapper) at 16 kHz, for every category (on music
  and general sounds it is still speech mode: a rough similarity score, not a music MOS;
  `neucodec.train.metrics`, shared with the training evaluation);
* PESQ wideband (16 kHz) and STOI, speech only;
* log-mel distance: mean |log10(1e-5 + mel(x_hat)) - log10(1e-5 + mel(x))| over 80 HTK mel bands
  of a normalised STFT (n_fft 1024, hop 256, Hann) at 24 kHz (`neucodec.train.losses.mel_distance`);
* SI-SNR in dB.

The degraded signal is aligned to the reference (cross-correlation of the waveforms, or of their
envelopes when the normalised peak is below 0.3) before STOI, mel distance and SI-SNR; PESQ and
ViSQOL align internally. Bitrates are measured, not nominal: file kbps counts every byte of the
.ecdc / .opus / .c2 file, payload kbps only the coded data (ecdc segment payloads; Opus audio
packets without Ogg pages and header packets; Codec2 frames without the 7-byte header). The LM
column is the .ecdc size with LM entropy coding, "n/a" when the model ships no LM.

    python bin/bench_quality.py --model ~/.cache/neucodec-train/release/neucodec_24khz.json
    python bin/bench_quality.py --limit 1 --bandwidths 6        # quick check
    python bin/bench_quality.py --envelope-table e3 --out /tmp/q.md --plots '/tmp/q_*.png'   # another table

Needs the `eval` extra (pesq, pystoi, visqol-python[all], matplotlib) and opus-tools, codec2, sox.
"""
from __future__ import annotations

import argparse
import atexit
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


# ---------------------------------------------------------------- systems
@dataclasses.dataclass
class Coded:
    """One clip through one system: decoded audio at 24 kHz plus measured sizes."""

    audio: np.ndarray
    file_bytes: int
    payload_bytes: int
    lm_file_bytes: int | None = None
    lm_payload_bytes: int | None = None


@dataclasses.dataclass
class System:
    """A codec at one operating point: `run(clip path, clip audio [T]) -> Coded`."""

    name: str  # "neucodec", "opus", "codec2"
    target_kbps: float
    run: tp.Callable[[Path, np.ndarray], Coded]

    @property
    def label(self) -> str:
        return f"{self.name} @ {self.target_kbps:g} kbps"


def _sh(cmd: str) -> None:
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"`{cmd}` failed ({res.returncode}): {res.stderr.strip()[-300:]}")


def _read24(path: Path) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(1)
    return x if sr == SAMPLE_RATE else soxr.resample(x, sr, SAMPLE_RATE).astype(np.float32)


def opus_system(kbps_target: float, tmp: Path) -> System:
    def run(path: Path, wav: np.ndarray) -> Coded:
        coded, out = tmp / "x.opus", tmp / "opus.wav"
        _sh(f"opusenc --quiet --bitrate {kbps_target:g} --hard-cbr --framesize {OPUS_FRAME_MS} "
            f"{shlex.quote(str(path))} {coded}")
        _sh(f"opusdec --quiet --rate {SAMPLE_RATE} --no-dither --float {coded} {out}")
        data = coded.read_bytes()
        return Coded(_read24(out), len(data), sum(ogg_packet_sizes(data)[2:]))
    return System("opus", kbps_target, run)


def codec2_system(mode: int, tmp: Path) -> System:
    def run(path: Path, wav: np.ndarray) -> Coded:
        coded, out = tmp / "x.c2", tmp / "c2.wav"
        raw = "-t raw -r 8000 -e signed -b 16 -c 1"
        # -D: no dither (sox adds random dither when it writes 16 bits: a new score every run)
        _sh(f"sox -D {shlex.quote(str(path))} {raw} - | c2enc {mode} - {coded}")
        _sh(f"c2dec {mode} {coded} - | sox -D {raw} - -r {SAMPLE_RATE} {out}")
        size = coded.stat().st_size
        return Coded(_read24(out), size, size - CODEC2_HEADER_BYTES)
    return System("codec2", mode / 1000, run)


NEUCODEC = "neucodec"  # as `neucodec encode` writes it: with the envelope correction where the model takes one
PLAIN = "neucodec, no envelope"


def neucodec_system(codec: tp.Any, lm: tp.Any, bandwidth: float, envelope: str | bool, name: str) -> System:
    """neucodec at `bandwidth`; `envelope`: the correction's table, or False for none."""
    from neucodec import ecdc

    def run(path: Path, wav: np.ndarray) -> Coded:
        x = torch.from_numpy(wav).view(1, 1, -1)
        with torch.no_grad():
            data = ecdc.encode_bytes(codec, x, bandwidth, correct_envelope=envelope)
            _, y = ecdc.decode_bytes(data, codec)
            coded = Coded(y.reshape(-1).numpy().astype(np.float32), len(data), ecdc_payload_bytes(data))
            if lm is not None:
                lm_data = ecdc.encode_bytes(codec, x, bandwidth, lm=lm, correct_envelope=envelope)
                coded.lm_file_bytes, coded.lm_payload_bytes = len(lm_data), ecdc_payload_bytes(lm_data)
        return coded
    return System(name, bandwidth, run)


def speed(codec: tp.Any, lm: tp.Any, clips: list[tuple[str, Path]], envelope: str | bool, bandwidth: float = 6.0,
          seconds: float = 60.0, rounds: int = 2) -> dict[str, float]:
    """Real-time factors (audio s per compute s, best of `rounds`) of `encode_bytes` and
    `decode_bytes` at `bandwidth` on `seconds` of the dev clips joined: as `neucodec encode` codes
    (`envelope`: with the correction on that table), without the correction ("plain_"), and with the
    LM ("lm_")."""
    from neucodec import ecdc

    audio = np.concatenate([_read24(path) for _, path in clips])
    x = torch.from_numpy(np.resize(audio, int(seconds * SAMPLE_RATE))).view(1, 1, -1)
    out: dict[str, float] = {}
    variants = [("", None, envelope)] + [("plain_", None, False)] * bool(envelope) \
        + [("lm_", lm, envelope)] * (lm is not None)
    for tag, model_lm, correct in variants:
        best_enc = best_dec = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            data = ecdc.encode_bytes(codec, x, bandwidth, lm=model_lm, correct_envelope=correct)
            t1 = time.perf_counter()
            ecdc.decode_bytes(data, codec, model_lm)
            best_enc, best_dec = min(best_enc, t1 - t), min(best_dec, time.perf_counter() - t1)
        out[f"{tag}encode"], out[f"{tag}decode"] = seconds / best_enc, seconds / best_dec
    return out


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
            "bandwidths": list(codec.config.bandwidths)}
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


def summarise(rows: list[dict[str, tp.Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Mean of every number per (category, system label), plus the clip count."""
    groups: dict[tuple[str, str], list[dict[str, tp.Any]]] = {}
    for r in rows:
        groups.setdefault((r["category"], r["system"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        means: dict[str, float] = {"clips": len(rs)}
        for k in ("file_kbps", "payload_kbps", "lm_file_kbps", "lm_payload_kbps", "visqol", "pesq", "stoi",
                  "mel", "si_snr", "target_kbps"):
            means[k] = nanmean(r.get(k, float("nan")) for r in rs)
        means["name"] = rs[0]["name"]  # type: ignore[assignment]
        out[key] = means
    return out


def _order(summary: dict[tuple[str, str], dict[str, tp.Any]], cat: str) -> list[str]:
    rank = {NEUCODEC: 0, PLAIN: 1, "opus": 2, "codec2": 3}
    labels = [lab for c, lab in summary if c == cat]
    return sorted(labels, key=lambda lab: (rank.get(summary[(cat, lab)]["name"], 9),
                                           summary[(cat, lab)]["target_kbps"]))


def table(summary: dict[tuple[str, str], dict[str, tp.Any]], cat: str, has_lm: bool) -> str:
    head = ("| codec @ target | kbps file (no LM) | kbps payload (no LM) | kbps file (LM) | kbps payload (LM) "
            "| ViSQOL | PESQ-WB | STOI | mel dist ↓ | SI-SNR dB |")
    lines = [head, "|" + "---|" * 10]
    for lab in _order(summary, cat):
        s = summary[(cat, lab)]
        is_neu = s["name"] in (NEUCODEC, PLAIN)
        lm_file = _fmt(s["lm_file_kbps"]) if is_neu and has_lm else ("n/a" if is_neu else "—")
        lm_pay = _fmt(s["lm_payload_kbps"]) if is_neu and has_lm else ("n/a" if is_neu else "—")
        lines.append(f"| {lab} | {_fmt(s['file_kbps'])} | {_fmt(s['payload_kbps'])} | {lm_file} | {lm_pay} "
                     f"| {_fmt(s['visqol'])} | {_fmt(s['pesq'])} | {_fmt(s['stoi'])} | {_fmt(s['mel'], 3)} "
                     f"| {_fmt(s['si_snr'], 1)} |")
    return "\n".join(lines)


def bar_verdict(summary: dict[tuple[str, str], dict[str, tp.Any]], bandwidth: float = 6.0) -> list[str]:
    """One line per category (speech, music): does neucodec, as `neucodec encode` writes it (without
    the LM) at the highest bandwidth whose real payload is no larger than Opus's at `bandwidth`, beat
    Opus at `bandwidth`?"""
    lines = []
    for cat in ("speech", "music"):
        opus = summary.get((cat, f"opus @ {bandwidth:g} kbps"))
        fits = sorted((s["payload_kbps"], lab) for (c, lab), s in summary.items()
                      if c == cat and s["name"] == NEUCODEC and opus and s["payload_kbps"] <= opus["payload_kbps"])
        neu = summary[(cat, fits[-1][1])] if fits else None
        if neu is None or opus is None:
            lines.append(f"* **{CATEGORY_TITLES[cat]}:** not measured (run with speech/music clips, Opus at "
                         f"{bandwidth:g} kbps and a neucodec bandwidth that fits in it).")
            continue
        v_win = neu["visqol"] > opus["visqol"]
        m_win = neu["mel"] < opus["mel"]
        verdict = ("**beats**" if v_win and m_win
                   else "**does not beat**" if not (v_win or m_win) else "**splits with**")
        lines.append(
            f"* **{CATEGORY_TITLES[cat]}:** neucodec {neu['target_kbps']:g} kbps {verdict} Opus {bandwidth:g} kbps — "
            f"ViSQOL {_fmt(neu['visqol'])} vs {_fmt(opus['visqol'])} ({'better' if v_win else 'not better'}), "
            f"mel distance {_fmt(neu['mel'], 3)} vs {_fmt(opus['mel'], 3)} ({'better' if m_win else 'not better'}); "
            f"real payload {_fmt(neu['payload_kbps'])} vs {_fmt(opus['payload_kbps'])} kbps.")
    return lines


def plot(summary: dict[tuple[str, str], dict[str, tp.Any]], metric: str, ylabel: str, path: Path,
         has_lm: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c for c in CATEGORIES if any(k[0] == c for k in summary)]
    fig, axes = plt.subplots(1, len(cats), figsize=(4.6 * len(cats), 3.8), squeeze=False)
    styles = {NEUCODEC: ("tab:blue", "o"), PLAIN: ("lightsteelblue", "o"), "opus": ("tab:orange", "s"),
              "codec2": ("tab:green", "^")}
    for ax, cat in zip(axes[0], cats):
        for name, (color, marker) in styles.items():
            pts = sorted((s["payload_kbps"], s[metric], s.get("lm_payload_kbps")) for (c, _), s in summary.items()
                         if c == cat and s["name"] == name)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, label=name)
            if name == NEUCODEC and has_lm:
                ax.plot([p[2] for p in pts], [p[1] for p in pts], color=color, marker=marker, ls="--",
                        mfc="none", label="neucodec + LM")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 1.5, 3, 6, 12])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("real payload bitrate (kbps)")
        ax.set_ylabel(ylabel)
        ax.set_title(CATEGORY_TITLES[cat] + (" (speech-mode ViSQOL)" if metric == "visqol" and cat != "speech" else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args: argparse.Namespace, model: dict[str, tp.Any], clips: list[tuple[str, Path]],
                 summary: dict[tuple[str, str], dict[str, tp.Any]], plots: dict[str, Path], seconds: float,
                 command: str, rtf: dict[str, float], load: float) -> str:
    train = model["training"] or {}
    how_trained = train.get("history") or \
        f"batch {train.get('batch_size', '?')} × {train.get('segment_seconds', '?')} s"
    has_lm = model["lm"] is not None
    counts = ", ".join(f"{sum(c == cat for c, _ in clips)} {cat}" for cat in CATEGORIES)
    out_dir = Path(args.out).resolve().parent
    parts = [
        "# Quality report",
        "",
        "Objective quality of neucodec against Opus and Codec2 on held-out dev clips, with measured bitrates. "
        "Generated by `bin/bench_quality.py`; do not edit by hand.",
        "",
        f"* **Command:** `{command}`",
        f"* **Date:** {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({seconds / 60:.1f} min on {args.threads} thread(s))",
        f"* **Model:** `{model['model_id']}`, fingerprint `{model['fingerprint']}` (`{_home(model['source'])}`)",
        f"* **Training behind the weights:** {train.get('steps', '?')} steps, {train.get('train_hours', '?')} h "
        f"({how_trained})",
        f"* **Entropy-coding LM:** {model['lm'] or 'none in this package (LM bitrates n/a)'}",
        f"* **Envelope correction:** {_envelope_line(model['envelope'])}",
        *_blank_warning(model["blank_codebooks"], model["n_q"]),
        f"* **Clips:** {counts} × 10 s, 24 kHz mono, from `{_home(str(args.clips))}` (held out from training).",
        f"* **Speed** ({args.threads} thread(s), 60 s of the clips joined, 6 kbps, best of 2; "
        f"load average {load:.1f} at the start): encode {rtf['encode']:.0f}×, decode {rtf['decode']:.0f}× real time"
        + (f"; without the envelope correction encode {rtf['plain_encode']:.0f}×, decode {rtf['plain_decode']:.0f}×"
           if "plain_encode" in rtf else "")
        + (f"; with the LM encode {rtf['lm_encode']:.0f}×, decode {rtf['lm_decode']:.0f}×"
           if "lm_encode" in rtf else "")
        + ".",
        "",
        "## Bar: neucodec vs Opus 6 kbps, at no more real payload",
        "",
        *bar_verdict(summary),
        "",
    ]
    for cat in CATEGORIES:
        if any(c == cat for c, _ in summary):
            n = sum(c == cat for c, _ in clips)
            note = "" if cat == "speech" else " ViSQOL is speech mode here too (a rough similarity score)."
            parts += [f"## {CATEGORY_TITLES[cat]} ({n} clip{'s' if n != 1 else ''}, means)", "",
                      table(summary, cat, has_lm), ""]
            if note:
                parts += [note.strip(), ""]
    parts += ["## Rate–distortion plots", ""]
    for metric, path in plots.items():
        parts.append(f"![{metric} vs bitrate]({os.path.relpath(path.resolve(), out_dir)})")
        parts.append("")
    parts += [
        "## How the numbers are made",
        "",
        "* **Systems.** neucodec: `neucodec.ecdc.encode_bytes` / `decode_bytes` at each bandwidth, "
        "without and (when the package has one) with the LM; *neucodec* as `neucodec encode` writes it, with "
        "the envelope correction (counted in its bitrates), *neucodec, no envelope* without. "
        "The bar compares the highest neucodec bandwidth whose real payload without the LM is no larger "
        "than Opus's. "
        f"Opus: `opusenc --quiet --bitrate B --hard-cbr --framesize {OPUS_FRAME_MS}` on the 24 kHz clip, "
        f"`opusdec --quiet --rate {SAMPLE_RATE} --no-dither --float`. "
        "Codec2 (1.0.5): `sox -D` (no dither) to 8 kHz raw, `c2enc MODE` / `c2dec MODE`, `sox -D` back to 24 kHz.",
        "* **Bitrates** are measured over the clip's duration. *File* counts every byte (.ecdc header, "
        "segment framing, CRCs and index; Ogg pages and Opus header packets; the Codec2 7-byte header). "
        "*Payload* counts only coded audio: ecdc segment payloads, Opus audio packets, Codec2 frames. "
        "Compare payload with payload.",
        "* **ViSQOL** v3 speech mode (visqol-python, deep-lattice mapper), both signals resampled to 16 kHz "
        "with soxr; MOS-LQO 1–5, identical signals score ≈ 4.7.",
        "* **PESQ-WB** (ITU-T P.862.2, `pesq` package) at 16 kHz; **STOI** (`pystoi`, classic) at 24 kHz. "
        "Speech only.",
        "* **Mel distance** (lower is better): mean over frames and bands of "
        "|log10(1e-5 + M(x̂)) − log10(1e-5 + M(x))|, M = 80-band HTK mel filterbank on the magnitude of a "
        "normalised STFT (n_fft 1024, hop 256, Hann, reflect padding) at 24 kHz "
        "(`neucodec.train.losses.mel_distance`).",
        "* **SI-SNR** in dB; meaningless for Codec2 and low-rate Opus, which do not keep the waveform.",
        f"* **Alignment.** Before STOI, mel distance and SI-SNR the decoded signal is shifted onto the "
        f"reference by the lag (within ±{MAX_LAG_SECONDS * 1000:.0f} ms) that maximises the waveform "
        "cross-correlation, or the envelope cross-correlation when the normalised waveform peak is below 0.3. "
        "PESQ and ViSQOL align internally.",
        "* **Scores are means over clips**; a score that cannot be computed (silent output) is left out "
        "of the mean and shown as — when no clip has one.",
        "* **Opus below 6 kbps is unusable** (hard CBR at 1.5 kbps with 60 ms frames decodes to silence; "
        "3 kbps is a narrow-band smear); it is listed for completeness. Codec2 covers 1.2 and 3.2 kbps.",
        "",
    ]
    return "\n".join(parts)


def _envelope_line(settings: dict[str, tp.Any] | None) -> str:
    if not settings:
        return "none (the model takes none)"
    tile_hz, tile_ms = settings["bins"] * 50, settings["hops"] * 10  # STFT bins of 50 Hz, hops of 10 ms
    wider = "".join(f", {w * 50} Hz from {b * 50} Hz" for b, w in settings.get("wider") or ())
    return (f"table `{settings['table']}`, {settings['bands']} bands of {tile_hz} Hz × {tile_ms} ms tiles{wider}, "
            f"{settings['step_db']:g} dB steps (rows *neucodec*)")


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
    p.add_argument("--bandwidths", type=float, nargs="+", default=[1.5, 3.0, 4.5, 6.0, 12.0])
    p.add_argument("--out", type=Path, default=ROOT / "docs/quality.md")
    p.add_argument("--plots", default=str(ROOT / "docs/quality_*.png"), help="'*' becomes visqol / mel")
    p.add_argument("--json", type=Path, default=None, help="also write per-clip results here")
    p.add_argument("--limit", type=int, default=None, help="at most N clips per category")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--envelope-table", default=None, metavar="NAME",
                   help="the envelope correction's table, as `neucodec encode --envelope-table` [default: the model's]")
    args = p.parse_args(argv)
    if "*" not in args.plots:
        p.error("--plots needs a '*' (replaced by the metric name)")
    torch.set_num_threads(args.threads)
    command = "python bin/bench_quality.py " + " ".join(_quote(_home(a)) for a in (argv or sys.argv[1:]))

    t0 = time.time()
    codec, lm, model = load_model(args.model)
    bad = [b for b in args.bandwidths if b not in codec.config.bandwidths]
    if bad:
        p.error(f"bandwidths {bad} not supported by {model['model_id']} ({codec.config.bandwidths})")
    clips = find_clips(args.clips.expanduser(), args.limit)
    load = os.getloadavg()[0]
    from neucodec import ecdc

    spec = ecdc.use_envelope(codec, args.envelope_table)  # as `neucodec encode` decides
    envelope: str | bool = spec.table if spec else False
    model["envelope"] = None if spec is None else spec.to_header()
    rtf = speed(codec, lm, clips, envelope)
    print("speed (x real time): " + ", ".join(f"{k} {v:.1f}" for k, v in rtf.items()), flush=True)
    metrics = Metrics()
    nan = float("nan")
    rows: list[dict[str, tp.Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        systems = [neucodec_system(codec, lm, b, envelope, NEUCODEC) for b in args.bandwidths]
        systems += [neucodec_system(codec, lm, b, False, PLAIN) for b in args.bandwidths if envelope]
        systems += [opus_system(b, tmp) for b in args.bandwidths]
        systems += [codec2_system(m, tmp) for m in CODEC2_MODES]
        for cat, path in clips:
            ref = _read24(path)
            seconds = len(ref) / SAMPLE_RATE
            for system in systems:
                t = time.time()
                coded = system.run(path, ref)
                row: dict[str, tp.Any] = {
                    "clip": path.name, "category": cat, "system": system.label, "name": system.name,
                    "target_kbps": system.target_kbps,
                    "file_kbps": kbps(coded.file_bytes, seconds), "payload_kbps": kbps(coded.payload_bytes, seconds),
                    "lm_file_kbps": kbps(coded.lm_file_bytes, seconds) if coded.lm_file_bytes else nan,
                    "lm_payload_kbps": kbps(coded.lm_payload_bytes, seconds) if coded.lm_payload_bytes else nan,
                }
                row.update(metrics.score(ref, coded.audio, cat))
                rows.append(row)
                print(f"{path.name:14s} {system.label:24s} {row['payload_kbps']:6.2f} kbps  "
                      f"visqol {_fmt(row['visqol'])}  mel {_fmt(row['mel'], 3)}  si-snr {_fmt(row['si_snr'], 1)}  "
                      f"({time.time() - t:.1f} s)", flush=True)

    summary = summarise(rows)
    has_lm = lm is not None
    plots = {}
    for metric, ylabel in (("visqol", "ViSQOL MOS-LQO (speech mode) ↑"), ("mel", "log-mel distance ↓")):
        path = Path(args.plots.replace("*", metric))
        plot(summary, metric, ylabel, path, has_lm)
        plots[metric] = path
    report = write_report(args, model, clips, summary, plots, time.time() - t0, command, rtf, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.json is not None:
        args.json.write_text(json.dumps({"model": model, "rows": rows}, indent=1, default=float) + "\n")
    print("\n".join(bar_verdict(summary)))
    print(f"wrote {args.out} and {', '.join(str(p) for p in plots.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
