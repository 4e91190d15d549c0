"""Rate control: `-b KBPS` is the bitrate of the whole file; this picks how to code it.

An operating point is one way to code a channel: a number of codebooks, an envelope correction
table or none, the LM or not. A model package lists its points as measured on the dev split
(`bin/fit_rate.py`): per channel, the payload rate (bits after the header per second) on average
and at its 95th percentile over the clips, and the mean ViSQOL of the decoded clips. Official
EnCodec checkpoints have their natural points: their bandwidths, no correction.

`choose` takes the best-scoring point whose 95th-percentile rate, for every channel, plus the
header spread over the file's duration, fits the target; the encoder checks the file it wrote
against the target and steps down a point when a file was harder than the dev split
(`pipeline.encode_file`).
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

from .errors import UnsupportedSetting

HEADER_BYTES = 160  # a header with the envelope correction's settings, zlib-compressed: 135 bytes measured
TOLERANCE = 1.05  # a file may exceed its target by this factor ...
SLACK_KBPS = 0.1  # ... plus this


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    codebooks: int
    envelope: str | None  # an envelope table, or None: the codes alone
    lm: bool
    kbps: float  # payload per channel, mean over the dev clips
    kbps_high: float  # its 95th percentile
    score: float  # quality, higher is better (ViSQOL; the bandwidth for natural points)

    def describe(self) -> str:
        env = f" + {self.envelope} correction" if self.envelope else ""
        return f"{self.codebooks} codebooks{env}{' + LM' if self.lm else ''}"


def points_from_package(entries: tp.Sequence[dict[str, tp.Any]]) -> list[OperatingPoint]:
    """Operating points from a package's `operating_points` list (what `bin/fit_rate.py --write` stores)."""
    return [OperatingPoint(int(e["codebooks"]), e.get("envelope"), bool(e.get("lm")), float(e["kbps"]),
                           float(e.get("kbps_high", e["kbps"])), float(e["score"])) for e in entries]


def natural_points(bandwidths: tp.Sequence[float], bits_per_frame: float, lm: bool) -> list[OperatingPoint]:
    """A model without measured points: each bandwidth is a point, and its rate is exact (with the
    LM, at most that)."""
    points = []
    for b in sorted(bandwidths):
        n_q = max(1, round(b * 1000 / bits_per_frame))
        points.append(OperatingPoint(n_q, None, False, b, b, b))
        if lm:
            points.append(OperatingPoint(n_q, None, True, b, b, b))
    return points


def budget_kbps(target_kbps: float, channels: int, seconds: float | None, header_bytes: int = HEADER_BYTES) -> float:
    """Payload kbps per channel that a file of `seconds` (None: unknown, long) may spend."""
    header_kbps = 0.0 if not seconds else 8 * header_bytes / seconds / 1000
    return (target_kbps - header_kbps) / channels


def minimum_kbps(points: tp.Sequence[OperatingPoint], channels: int = 1, seconds: float | None = None,
                 lm: bool = False) -> float:
    """The lowest target any point fits, rounded up to 0.1 kbps."""
    low = min(p.kbps_high for p in _eligible(points, lm))
    header_kbps = 0.0 if not seconds else 8 * HEADER_BYTES / seconds / 1000
    return math.ceil((low * channels + header_kbps) * 10 - 1e-9) / 10


def choose(points: tp.Sequence[OperatingPoint], target_kbps: float, *, channels: int = 1,
           seconds: float | None = None, lm: bool = False, below: OperatingPoint | None = None) -> OperatingPoint:
    """The best-scoring point that fits `target_kbps` for the whole file (fewer bits on a tie).

    `lm`: points that use the LM may be chosen (the encoder was asked for it). `below`: only points
    with a lower rate than this one (the step down after a file came out too large).
    Raises UnsupportedSetting, naming the minimum, when no point fits."""
    budget = budget_kbps(target_kbps, channels, seconds)
    eligible = _eligible(points, lm)
    if below is not None:
        eligible = [p for p in eligible if p.kbps_high < below.kbps_high]
    fitting = [p for p in eligible if p.kbps_high <= budget]
    if not fitting:
        if below is not None:
            raise UnsupportedSetting(f"no operating point below {below.describe()} fits {target_kbps:g} kbps")
        raise UnsupportedSetting(f"-b {target_kbps:g} is below what this model can code "
                         f"({channels} channel{'s' if channels > 1 else ''}): use -b "
                         f"{minimum_kbps(points, channels, seconds, lm):g} or more")
    return max(fitting, key=lambda p: (p.score, -p.kbps, p.lm))  # asked for the LM: it wins a tie


def within_target(file_bytes: int, seconds: float, target_kbps: float) -> bool:
    """Whether a file of `file_bytes` over `seconds` meets `target_kbps` within the tolerance."""
    return 8 * file_bytes / seconds / 1000 <= TOLERANCE * target_kbps + SLACK_KBPS


def _eligible(points: tp.Sequence[OperatingPoint], lm: bool) -> list[OperatingPoint]:
    return [p for p in points if lm or not p.lm]
