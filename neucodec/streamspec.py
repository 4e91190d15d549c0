"""What an .ecdc stream's header says, checked once: `StreamInfo`, its `EnvelopeSpec`, and the encoder's settings.

`StreamInfo.from_header` turns a header (JSON, docs/FORMAT.md §2) into typed values, checking every
field once: a damaged or hostile header raises `CorruptStream`, one of a newer format
`UnsupportedFormatVersion`. The writer builds a `StreamInfo` from `EncodeSettings` (bandwidth,
codebooks and envelope correction, checked against the codec by `encode_settings`) and writes it
with `StreamInfo.header`. Version-0 headers of the reference tool are read by `neucodec.v0reader`.
"""
from __future__ import annotations

import dataclasses
import functools
import typing as tp

import numpy as np

from . import __version__, envelope
from .errors import CorruptStream, UnsupportedFormatVersion, UnsupportedSetting, option
from .layout import Segment, segment_layout

if tp.TYPE_CHECKING:
    from .lm import LanguageModel
    from .model import Codec

STREAM, OVERLAP = "stream", "overlap"  # segment layouts: consecutive causal segments, or overlap-added ones
MAX_CORRECTIONS = 1 << 20  # envelope corrections per segment (10 s of stereo with table e3: 40,000; e4: 30,000)

_INT_FIELDS = {  # name: (min, max)
    "sample_rate": (1, 1 << 20), "channels": (1, 64), "groups": (1, 1024), "source_sample_rate": (1, 1 << 20),
    "source_channels": (1, 1024), "frame_rate": (1, 1 << 20), "hop_length": (1, 1 << 20), "n_q": (1, 1024),
    "bits_per_code": (1, 16), "segment_frames": (1, 1 << 22),
}
_TOTALS = ("format_version", "length", "source_length", "segments", "lm_segments", "frames", "bytes",
           "envelope_bytes", "header_bytes", "payload_bytes")  # what a reader finds; not in the header


# ---------------------------------------------------------------- envelope correction
@dataclasses.dataclass(frozen=True)
class EnvelopeSpec:
    """The envelope correction of a stream (format version 2): the table its corrections are
    range-coded with and the grid of tiles they are measured on (`neucodec.envelope`)."""

    table: str
    grid: envelope.Grid

    @classmethod
    def of(cls, table: str, hop: int, bins: int, hops: int, bands: int, step_db: float,
           wider: tp.Iterable[tp.Sequence[int]] = ()) -> EnvelopeSpec:
        """The spec of a known table on a grid of these sizes (corrections clipped to the table's range)."""
        grid = envelope.Grid(hop=hop, bins=bins, hops=hops, bands=bands, step_db=float(step_db),
                             max_steps=len(envelope.table(table)) // 2, wider=tuple(tuple(pair) for pair in wider))
        return cls(table, grid)

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        """The table `envelope.encode_steps`/`decode_steps` take."""
        return envelope.table(self.table)

    @classmethod
    def from_header(cls, settings: dict[str, tp.Any]) -> EnvelopeSpec:
        """The header's `envelope` object, checked."""
        name = settings.get("table")
        if not isinstance(name, str) or name not in envelope.table_names():
            raise UnsupportedFormatVersion(f"header: unknown envelope table {str(name)[:20]!r}; upgrade neucodec")
        values = {}
        for key, hi in (("hop", 1 << 16), ("bins", 1 << 10), ("hops", 1 << 10), ("bands", 1 << 10)):
            v = settings.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise CorruptStream(f"header: envelope field {key!r} has a bad value {str(v)[:20]!r}")
            values[key] = v
        step = settings.get("step_db")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 < step <= 48:
            raise CorruptStream(f"header: envelope field 'step_db' has a bad value {str(step)[:20]!r}")
        wider = settings.get("wider", [])
        if not (isinstance(wider, list) and len(wider) <= 16 and all(
                isinstance(pair, list) and len(pair) == 2 and all(type(v) is int and lo <= v <= 1 << 16
                                                                  for v, lo in zip(pair, (0, 1)))
                for pair in wider)):
            raise CorruptStream(f"header: envelope field 'wider' has a bad value {str(wider)[:40]!r}")
        return cls.of(name, step_db=step, wider=wider, **values)

    def to_header(self) -> dict[str, tp.Any]:
        g = self.grid
        settings: dict[str, tp.Any] = {"table": self.table, "hop": g.hop, "bins": g.bins, "hops": g.hops,
                                       "bands": g.bands, "step_db": g.step_db}
        if g.wider:
            settings["wider"] = [list(pair) for pair in g.wider]
        return settings

    def fits(self, hop_length: int, segment_frames: int | None = None) -> bool:
        """Whether tiles are whole code frames (and segments whole tiles) and the bands fit the STFT."""
        g = self.grid
        return g.top <= g.hop and not g.tile % hop_length and \
            (segment_frames is None or not segment_frames * hop_length % g.tile)

    def frames_per_tile(self, hop_length: int) -> int:
        return self.grid.tile // hop_length

    def corrections(self, rows: int, frames: int, hop_length: int) -> int:
        """Corrections of a segment of `frames` code frames for `rows` channels (at most MAX_CORRECTIONS)."""
        return rows * self.grid.bands * self.grid.tiles(frames * hop_length)


def envelope_settings(codec: Codec, table: str | None = None) -> EnvelopeSpec | None:
    """The envelope correction a causal codec's files can get: with `table`, else the table its
    package names (`load_codec`'s `.envelope_table`), else "e1", on the grid that table was fitted on
    (`envelope.table_grid`; "e1": 400 Hz x 40 ms tiles to 8 kHz) with a hop of 10 ms at the codec's
    rate; None where tiles are not whole code frames or the codec is segmented."""
    if table is not None and table not in envelope.table_names():
        raise UnsupportedSetting(f"no envelope table {table[:20]!r}; choose one of {', '.join(envelope.table_names())}")
    if codec.config.segment_length is not None or codec.sample_rate % 100:
        return None
    name = table or getattr(codec, "envelope_table", None) or "e1"
    if name not in envelope.table_names():
        raise UnsupportedFormatVersion(f"{codec.config.name} asks for the envelope table {name[:20]!r}, which this "
                                       "neucodec does not have; upgrade neucodec")
    g = dataclasses.replace(envelope.table_grid(name), hop=codec.sample_rate // 100)
    spec = EnvelopeSpec.of(name, g.hop, g.bins, g.hops, g.bands, g.step_db, g.wider)
    return spec if spec.fits(codec.hop_length) else None


def use_envelope(codec: Codec, wanted: bool | str | None) -> EnvelopeSpec | None:
    """The envelope correction to encode with: None if not `wanted`, or if `wanted` is None and the
    codec's package does not opt in to the correction (`.envelope_table`: it is measured per model;
    neucodec's default model opts in); a table name: with that table (`envelope.table_names`);
    UnsupportedSetting if it is wanted and the codec cannot take it."""
    if wanted is None and getattr(codec, "envelope_table", None) is None:
        return None
    spec = None if wanted is False else envelope_settings(codec, wanted if isinstance(wanted, str) else None)
    if wanted and spec is None:
        raise UnsupportedSetting(f"{codec.config.name} cannot take an envelope correction (it needs a causal model "
                                 f"whose code frames tile 40 ms); encode with {option('--no-envelope')}")
    return spec


# ---------------------------------------------------------------- encoder settings
@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """What a stream is encoded with, checked against its codec (`encode_settings`)."""

    bandwidth: float | None  # kbps; None: every codebook
    n_q: int  # codebooks coded
    envelope: EnvelopeSpec | None  # the envelope correction, or None


def encode_settings(codec: Codec, bandwidth: float | None, envelope: bool | str | None = False,
                    lm: LanguageModel | None = None) -> EncodeSettings:
    """Check a bandwidth (one of the codec's, or None for all codebooks), the envelope correction
    asked for (`use_envelope`) and, when given, that the LM models the codebooks coded.

    Raises:
        UnsupportedSetting: with a one-line message saying what the codec offers.
    """
    n_q = codec.n_q_for_bandwidth(bandwidth)
    if lm is not None and lm.cfg.n_q < n_q:
        raise UnsupportedSetting(f"the LM models {lm.cfg.n_q} codebooks but {n_q} are coded; lower the bandwidth")
    return EncodeSettings(bandwidth, n_q, use_envelope(codec, envelope))


# ---------------------------------------------------------------- the header
@dataclasses.dataclass
class StreamInfo:
    """Everything the header says, plus totals found while reading (`length`, `segments`, `bytes`)."""

    format_version: int
    model_id: str
    model_fingerprint: str | None
    lm_id: str | None
    lm_fingerprint: str | None
    sample_rate: int
    channels: int  # channels of the model
    groups: int  # coded channel groups G (a mono model coding stereo: 2)
    source_sample_rate: int
    source_channels: int
    frame_rate: int
    hop_length: int
    n_q: int
    bandwidth: float | None
    bits_per_code: int
    layout: str  # STREAM (causal, consecutive segments) or OVERLAP (1 s segments, overlap-add)
    segment_frames: int  # frames per full segment
    segment_length: int | None  # samples per full segment (OVERLAP)
    segment_stride: int | None  # samples between segment starts (OVERLAP)
    scales: bool  # per-segment volume scales stored
    coder: dict[str, tp.Any] | None  # LM coder settings, None without LM
    envelope: EnvelopeSpec | None = None  # envelope correction (format version 2), or None
    length: int | None = None  # samples per channel at the codec rate (known after the end marker)
    source_length: int | None = None  # of the original file at its rate, when the stream records it
    segments: int = 0
    lm_segments: int = 0
    frames: int = 0
    bytes: int = 0
    envelope_bytes: int = 0  # of the envelope corrections, with their length words
    header_bytes: int = 0  # of the prelude: magic, version, header (`read_info`)
    payload_bytes: int = 0  # of the segments' payloads: codes, scales, corrections (`read_info`)

    @property
    def duration(self) -> float | None:
        return None if self.length is None else self.length / self.sample_rate

    @property
    def lm_span(self) -> int | None:
        """Frames per LM sequence (header `coder.span_frames`); None: one sequence per segment."""
        return (self.coder or {}).get("span_frames")

    def layout_of(self, length: int) -> list[Segment]:
        """The segments of a stream of `length` samples (per channel, at the codec rate)."""
        overlap = self.layout == OVERLAP
        return segment_layout(length, self.hop_length, self.segment_length if overlap else None,
                              self.segment_stride if overlap else None)

    def to_dict(self) -> dict[str, tp.Any]:
        d = dataclasses.asdict(self)
        d["envelope"] = None if self.envelope is None else self.envelope.to_header()
        d["duration"] = self.duration
        d["kbps"] = (8 * self.bytes / 1000 / self.duration) if self.duration else None
        d["envelope_kbps"] = (8 * self.envelope_bytes / 1000 / self.duration) if self.duration else None
        return d

    def header(self) -> dict[str, tp.Any]:
        """The header object a writer stores (a version-1 header has no `envelope` key)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _TOTALS}
        if self.envelope is None:
            d.pop("envelope")
        else:
            d["envelope"] = self.envelope.to_header()
        d["encoder"] = f"neucodec {__version__}"
        return d

    @classmethod
    def from_header(cls, h: dict[str, tp.Any], version: int) -> StreamInfo:
        """The `StreamInfo` of a version-1 or -2 header, every field checked."""
        def need(key: str, types: tuple[type, ...], optional: bool = False) -> tp.Any:
            if key not in h:
                raise CorruptStream(f"header: field {key!r} missing (file damaged or not written by neucodec)")
            value = h[key]
            if value is None and optional:
                return None
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise CorruptStream(f"header: field {key!r} has a bad value {str(value)[:40]!r}")
            return value

        values: dict[str, tp.Any] = {}
        for key, (lo, hi) in _INT_FIELDS.items():
            v = need(key, (int,))
            if not lo <= v <= hi:
                raise CorruptStream(f"header: field {key!r} = {v} out of range [{lo}, {hi}]")
            values[key] = v
        layout = need("layout", (str,))
        if layout not in (STREAM, OVERLAP):
            raise UnsupportedFormatVersion(f"header: unknown segment layout {layout!r}; upgrade neucodec")
        seg_len = need("segment_length", (int,), optional=True)
        seg_stride = need("segment_stride", (int,), optional=True)
        if layout == OVERLAP and not (isinstance(seg_len, int) and isinstance(seg_stride, int)
                                      and 1 <= seg_stride <= seg_len <= 1 << 24):
            raise CorruptStream("header: overlap layout without a valid segment length and stride")
        coder = need("coder", (dict,), optional=True)
        span = (coder or {}).get("span_frames")
        if span is not None and (not isinstance(span, int) or isinstance(span, bool) or not 1 <= span <= 1 << 22):
            raise CorruptStream(f"header: bad coder span_frames {str(span)[:20]!r}")
        bw = need("bandwidth", (int, float), optional=True)
        spec = EnvelopeSpec.from_header(need("envelope", (dict,))) if version >= 2 else None
        if spec is not None and (layout != STREAM or not spec.fits(values["hop_length"], values["segment_frames"])):
            raise CorruptStream("header: envelope tiles do not fit the segments (file damaged)")
        return cls(
            format_version=version, envelope=spec, model_id=need("model_id", (str,)),
            model_fingerprint=need("model_fingerprint", (str,), optional=True),
            lm_id=need("lm_id", (str,), optional=True), lm_fingerprint=need("lm_fingerprint", (str,), optional=True),
            layout=layout, segment_length=seg_len, segment_stride=seg_stride, scales=need("scales", (bool,)),
            coder=coder, bandwidth=None if bw is None else float(bw), **values)
