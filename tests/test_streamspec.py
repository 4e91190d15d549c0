"""Stream spec: headers read into checked, typed values and written back; envelope and bandwidth settings."""
from __future__ import annotations

import io

import pytest
import torch

from _bitstream import tiny_codec24, tiny_codec48
from neucodec import container, ecdc, streamspec
from neucodec.errors import CorruptStream, UnsupportedFormatVersion, UnsupportedSetting
from neucodec.hub import load_codec
from neucodec.streamspec import EnvelopeSpec, StreamInfo


def _header(correct_envelope: bool | str = False) -> tuple[dict, int]:
    data = ecdc.encode_bytes(tiny_codec24(), 0.1 * torch.randn(1, 1, 4800), 3.0, correct_envelope=correct_envelope)
    prelude = container.read_prelude(io.BytesIO(data))
    return prelude.header, prelude.version


@pytest.mark.parametrize("table", [False, "e1", "e4"])
def test_a_header_reads_and_writes_back_as_it_was(table: bool | str) -> None:
    header, version = _header(table)
    info = StreamInfo.from_header(header, version)
    assert info.header() == header and version == (2 if table else 1)
    assert (info.envelope is None) == (not table) == ("envelope" not in header)
    if table:
        spec = info.envelope
        assert isinstance(spec, EnvelopeSpec) and spec.table == table and spec.grid.max_steps == 7
        assert spec.probabilities.shape == (15, 15, 15)


def test_bad_headers_are_named() -> None:
    header, version = _header("e1")
    cases = [
        (dict(header, n_q=0), CorruptStream, "field 'n_q' = 0 out of range"),
        (dict(header, scales=1), CorruptStream, "field 'scales' has a bad value"),
        ({k: v for k, v in header.items() if k != "model_id"}, CorruptStream, "field 'model_id' missing"),
        (dict(header, layout="spiral"), UnsupportedFormatVersion, "unknown segment layout 'spiral'"),
        (dict(header, layout="overlap"), CorruptStream, "overlap layout without a valid segment length"),
        (dict(header, coder={"span_frames": 0}), CorruptStream, "bad coder span_frames '0'"),
        (dict(header, envelope=dict(header["envelope"], step_db=True)), CorruptStream, "'step_db' has a bad value"),
        (dict(header, segment_frames=7), CorruptStream, "envelope tiles do not fit the segments"),
    ]
    for h, error, match in cases:
        with pytest.raises(error, match=match):
            StreamInfo.from_header(h, version)


def test_segment_layout_of_a_stream() -> None:
    c48 = tiny_codec48()
    info = ecdc.decode_bytes(ecdc.encode_bytes(c48, 0.1 * torch.randn(1, 2, 100000), 6.0), c48)[0]
    for length in (1, 47999, 48000, 95040, 95041, 95519, 95520, 100000):
        assert info.layout_of(length) == c48.segments(length)
    stream = StreamInfo.from_header(*_header())
    assert [s.frames for s in stream.layout_of(24001)] == [76]


def test_the_default_model_opts_in_and_others_only_when_asked() -> None:
    assert load_codec().envelope_table == "e4"  # package key "envelope": what `neucodec encode` does by default
    spec = streamspec.use_envelope(load_codec(), None)
    assert spec is not None and spec.to_header() == {"table": "e4", "hop": 240, "bins": 2, "hops": 4, "bands": 60,
                                                     "step_db": 6.0, "wider": [[80, 4]]}
    assert streamspec.use_envelope(load_codec(), "e2").table == "e2"  # any table, asked for by name
    codec = tiny_codec24()  # no package: it could take a correction, but gets one only when asked
    assert streamspec.use_envelope(codec, None) is None and streamspec.use_envelope(codec, True).table == "e1"
    assert streamspec.use_envelope(codec, "e3").grid.bands == 80 and streamspec.use_envelope(codec, False) is None
    with pytest.raises(UnsupportedSetting, match="no envelope table 'e0'; choose one of e1, e2, e3, e4"):
        streamspec.use_envelope(codec, "e0")


def test_a_segmented_model_takes_no_correction() -> None:
    codec = tiny_codec48()
    assert streamspec.envelope_settings(codec) is None and streamspec.use_envelope(codec, None) is None
    with pytest.raises(UnsupportedSetting, match="encode with envelope=False$"):
        ecdc.encode_bytes(codec, torch.zeros(1, 2, 4800), 6.0, correct_envelope=True)


def test_encode_settings() -> None:
    codec = tiny_codec24()
    assert streamspec.encode_settings(codec, None) == streamspec.EncodeSettings(None, 8, None)
    settings = streamspec.encode_settings(codec, 1.5, True)
    assert settings.n_q == 2 and settings.envelope == streamspec.envelope_settings(codec)
    with pytest.raises(UnsupportedSetting, match="tiny24 does not support 2 kbps"):
        streamspec.encode_settings(codec, 2.0)
