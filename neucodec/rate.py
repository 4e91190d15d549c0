"""Rate control: `-b KBPS` is the bitrate of the whole file; this picks how to code it.

An operating point is one way to code a channel: a number of codebooks, an envelope correction
table or none, the LM or not. A model package lists its points as measured on the dev split
(`bin/fit_rate.py`): per channel, the payload rate (bits after the header per second) on average
and at its 95th percentile over the clips, and the mean ViSQOL of the decoded clips. Official
EnCodec checkpoints have their natural points: their bandwidths, no correction.

`choose` takes the best-scoring point whose mean rate, for every channel, plus the header spread
over the file's duration, is within the target (+ 0.1 kbps), and whose 95th percentile is within
the tolerance (5 % + 0.1 kbps); the encoder checks the file it wrote against the tolerance and steps down a
point when a file was harder than the dev split (`pipeline.encode_file`).
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

from .errors import UnsupportedSetting, option

HEADER_BYTES = 240  # per file: the header with the correction's settings (135 bytes measured, zlib-compressed),
# the end record, index and trailer (84 bytes and 8 per segment)
RECORD_KBPS = 0.02  # a segment record's head: 24 bytes per 10 s segment
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


def natural_points(bandwidths: tp.Sequence[float], codebook_bps: float, lm: bool,
                   envelope: str | None = None) -> list[OperatingPoint]:
    """A model without measured points: each bandwidth is a point whose rate is that of its codes
    and their records (with the LM, at most that); with `envelope`, they carry that correction at a
    rate not known."""
    points = []
    for b in sorted(bandwidths):
        n_q, kbps = max(1, round(b * 1000 / codebook_bps)), b + RECORD_KBPS
        points.append(OperatingPoint(n_q, envelope, False, kbps, kbps, b))
        if lm:
            points.append(OperatingPoint(n_q, envelope, True, kbps, kbps, b))
    return points


def model_points(codec: tp.Any, envelope: bool | str | None = None) -> tuple[list[OperatingPoint], bool]:
    """The operating points of a loaded codec (`hub.load_codec`) that code with the correction asked
    for (None: as measured, or the package's choice; False: none; True: the package's table; a
    table name), and whether their rates hold: measured, or exact (the codes alone, no correction of
    unknown rate). Rate control checks a file against the target only where they hold."""
    return config_points(getattr(codec, "operating_points", None) or [], codec.config,
                         getattr(codec, "envelope_table", None), envelope)


def config_points(entries: tp.Sequence[dict[str, tp.Any]], config: tp.Any, table: str | None,
                  envelope: bool | str | None = None) -> tuple[list[OperatingPoint], bool]:
    """`model_points` from what a package says: its `operating_points` entries, its codec
    configuration and its envelope table (needs no weights, no torch)."""
    from .envelope import table_names

    if isinstance(envelope, str) and envelope not in table_names():
        raise UnsupportedSetting(f"no envelope table {envelope[:20]!r}; choose one of {', '.join(table_names())}")
    measured = points_from_package(entries)
    if measured:
        if envelope is False:
            measured = [p for p in measured if p.envelope is None]
        elif envelope is True:
            measured = [p for p in measured if p.envelope is not None]
        elif isinstance(envelope, str):
            measured = [p for p in measured if p.envelope == envelope]
        if not measured:
            tables = sorted({str(p.envelope) for p in points_from_package(entries)})
            raise UnsupportedSetting(f"no operating points of this model use envelope table {envelope}; "
                                     f"measured: {', '.join(tables)} (bin/fit_rate.py measures more)")
        return measured, True
    if envelope is False:
        table = None
    elif isinstance(envelope, str):
        table = envelope
    elif envelope is True:
        table = table or "e1"  # as `streamspec.envelope_settings` picks it
    bps = config.sample_rate / math.prod(config.seanet.ratios) * math.log2(config.quantizer.bins)
    return natural_points(config.bandwidths, bps, lm=True, envelope=table), table is None


def frontier(points: tp.Sequence[OperatingPoint], lm: bool = False) -> list[OperatingPoint]:
    """The points worth choosing, by rate: each scores better than every point with a lower rate."""
    best, out = -math.inf, []
    for p in sorted(_eligible(points, lm), key=lambda p: (p.kbps_high, -p.score)):
        if p.score > best:
            out.append(p)
            best = p.score
    return out


def header_kbps(seconds: float | None, header_bytes: int = HEADER_BYTES) -> float:
    """The header's share of a file of `seconds` (None: unknown, long)."""
    return 0.0 if not seconds else 8 * header_bytes / seconds / 1000


def needs_kbps(point: OperatingPoint, channels: int = 1, seconds: float | None = None) -> float:
    """The lowest target `point` fits: its mean rate within the target plus the slack, and its
    95th percentile within the tolerance (`within_target`)."""
    head = header_kbps(seconds)
    return max(point.kbps * channels + head - SLACK_KBPS, (point.kbps_high * channels + head - SLACK_KBPS) / TOLERANCE)


def minimum_kbps(points: tp.Sequence[OperatingPoint], channels: int = 1, seconds: float | None = None,
                 lm: bool = False) -> float:
    """The lowest target any point fits, rounded up to 0.1 kbps."""
    low = min(needs_kbps(p, channels, seconds) for p in _eligible(points, lm))
    return math.ceil(low * 10 - 1e-9) / 10


def choose(points: tp.Sequence[OperatingPoint], target_kbps: float, *, channels: int = 1,
           seconds: float | None = None, lm: bool = False, below: OperatingPoint | None = None) -> OperatingPoint:
    """The best-scoring point that fits `target_kbps` for the whole file (fewer bits on a tie):
    whose mean rate, for every channel, plus the header, is within the target plus the slack, and
    whose 95th percentile is within the tolerance.

    `lm`: points that use the LM may be chosen (the encoder was asked for it). `below`: only points
    with a lower rate than this one (the step down after a file came out too large).
    Raises UnsupportedSetting, naming the minimum, when no point fits."""
    eligible = _eligible(points, lm)
    if below is not None:
        eligible = [p for p in eligible if p.kbps_high < below.kbps_high]
    fitting = [p for p in eligible if needs_kbps(p, channels, seconds) <= target_kbps + 1e-9]
    if not fitting:
        if below is not None:
            raise UnsupportedSetting(f"no operating point below {below.describe()} fits {target_kbps:g} kbps")
        raise _too_low(target_kbps, channels, minimum_kbps(points, channels, seconds, lm))
    return max(fitting, key=lambda p: (p.score, -p.kbps, p.lm))  # asked for the LM: it wins a tie


def check_target(points: tp.Sequence[OperatingPoint], target_kbps: float, lm: bool = False) -> None:
    """Raise UnsupportedSetting, naming the minimum, for a target below every point even for a long
    mono file: no input could meet it, so it fails before any audio is read."""
    low = minimum_kbps(points, lm=lm)
    if target_kbps < low:
        raise _too_low(target_kbps, 1, low)


def _too_low(target_kbps: float, channels: int, low: float) -> UnsupportedSetting:
    return UnsupportedSetting(f"{option('-b', _kbps(target_kbps))} is below what this model can code "
                              f"({channels} channel{'s' if channels > 1 else ''}): use {option('-b', _kbps(low))} "
                              "or more")


def within_target(file_bytes: int, seconds: float, target_kbps: float) -> bool:
    """Whether a file of `file_bytes` over `seconds` meets `target_kbps` within the tolerance."""
    return seconds <= 0 or 8 * file_bytes / seconds / 1000 <= TOLERANCE * target_kbps + SLACK_KBPS


def _eligible(points: tp.Sequence[OperatingPoint], lm: bool) -> list[OperatingPoint]:
    return [p for p in points if lm or not p.lm]


def _kbps(value: float) -> float | int:
    """A rate as a message shows it: 6, not 6.0."""
    return int(value) if value == int(value) else value
