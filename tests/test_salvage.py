"""Damaged files: strict errors name the span in seconds; salvage decodes through damage (files, pipes, folders)."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from test_cli import proc

from _bitstream import Pipe, lm_coded_file, skewed_lm, tiny_codec24, tiny_codec48
from neucodec import container, ecdc, pipeline
from neucodec.cli import cli
from neucodec.errors import CorruptStream, DamagedStream
from neucodec.salvage import read_info as salvage_info
from neucodec.streamaudio import FADE_SECONDS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def c24():
    return tiny_codec24()


def _records(data: bytes) -> tuple[list[container.SegmentRecord], container.EndRecord]:
    fo = io.BytesIO(data)
    reader = container.ContainerReader(fo, container.read_prelude(fo))
    records = list(reader)
    assert reader.end is not None
    return records, reader.end


def _flip(data: bytes, *positions: int) -> bytes:
    b = bytearray(data)
    for p in positions:
        b[p] ^= 0x5A
    return bytes(b)


def _salvaged(data: bytes, codec, lm=None, pipe: bool = False) -> tuple[torch.Tensor, list[str]]:
    lines: list[str] = []
    fi = io.BufferedReader(Pipe(data, chunk=13)) if pipe else io.BytesIO(data)
    info, chunks = ecdc.decode_stream(fi, codec, lm, salvage=True, on_lost=lines.append)  # type: ignore[arg-type]
    parts = list(chunks)
    return (torch.cat(parts, -1) if parts else torch.zeros(1, 1, 0)), lines


@pytest.mark.parametrize("envelope", [False, True])
@pytest.mark.parametrize("pipe", [False, True])
def test_lost_segment_is_silence_of_its_length(c24, envelope: bool, pipe: bool) -> None:
    """A damaged payload or record head loses exactly its segment: the audio before it is the clean
    decode bit for bit (but for the envelope correction's last 10 ms, whose STFT frame reaches into
    the span), the span is silent (after a short fade), the length and timing are kept, and the
    stream's own samples after it come back."""
    wav = 0.1 * torch.randn(1, 1, 24000)
    data = ecdc.encode_bytes(c24, wav, 6.0, segment_seconds=0.2, correct_envelope=envelope)
    records, _ = _records(data)
    clean = ecdc.decode_bytes(data, c24)[1]
    seg = 4800  # samples per segment
    fade = round(FADE_SECONDS * 24000)
    payload = records[2].offset + container.RECORD_HEAD_BYTES
    for where in ((payload + 5, payload + 60), (records[2].offset + 6, records[2].offset + 10)):
        bad = _flip(data, *where)  # two damaged bytes: no repair
        with pytest.raises(DamagedStream, match=r"damaged at 0\.4–0\.6 s \(segment 2 at byte "
                                                rf"{records[2].offset}: CRC mismatch.*salvage=True"):
            ecdc.decode_bytes(bad, c24)
        out, lines = _salvaged(bad, c24, pipe=pipe)
        assert out.shape == clean.shape
        keep = 2 * seg - 240 * envelope  # the correction's last STFT frame before the span reaches into it
        assert torch.equal(out[..., :keep], clean[..., :keep])
        assert (out[..., 2 * seg + fade: 3 * seg] == 0).all()
        assert lines == [f"lost 0.4–0.6 s (segment 2 at byte {records[2].offset}: CRC mismatch"
                         f"{' in record head' if where[0] < payload else ''}); "
                         "filled with silence"]
        late = out[..., 3 * seg + 2400:] - clean[..., 3 * seg + 2400:]
        assert late.abs().max() < 1e-3  # the decoder has caught up


def test_end_record_index_and_trailer(c24) -> None:
    """Damage after the last segment loses no audio: an unreadable end record's length comes from the
    segments (exact, with the residue in its intact head); a damaged index or trailer is not needed."""
    data = ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 24000 - 77), 6.0, segment_seconds=0.25)
    _, end = _records(data)
    clean = ecdc.decode_bytes(data, c24)[1]
    cases = {"end payload": (end.offset + 28, end.offset + 30), "end head": (end.offset + 3, end.offset + 9),
             "index": (end.offset + 36 + 30,), "trailer": (len(data) - 3,)}
    for name, where in cases.items():
        bad = _flip(data, *where)
        if name.startswith("end"):
            with pytest.raises(DamagedStream, match="damaged at the end of the stream"):
                ecdc.decode_bytes(bad, c24)
        for pipe in (False, True):
            out, lines = _salvaged(bad, c24, pipe=pipe)
            want = clean.shape[-1] if name != "end head" else 24000  # without the residue: whole frames
            assert out.shape[-1] == want, (name, pipe)
            assert torch.equal(out[..., : clean.shape[-1]], clean[..., : want]), (name, pipe)
            assert len(lines) == name.startswith("end"), (name, lines)


def test_one_damaged_byte_is_repaired(c24) -> None:
    """One damaged byte in a record head, a payload or the end record: the CRCs locate it, and the
    output is the clean decode."""
    data = ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 24000 - 77), 6.0, segment_seconds=0.2,
                             correct_envelope=True)
    records, end = _records(data)
    clean = ecdc.decode_bytes(data, c24)[1]
    for where in (records[1].offset, records[1].offset + 7, records[1].offset + 21, records[3].offset + 100,
                  end.offset + 5, end.offset + 31):
        bad = _flip(data, where)
        with pytest.raises(DamagedStream):
            ecdc.decode_bytes(bad, c24)
        for pipe in (False, True):
            out, lines = _salvaged(bad, c24, pipe=pipe)
            assert torch.equal(out, clean), (where, pipe)
            assert lines == [line for line in lines if line.startswith(f"repaired one damaged byte at byte {where} (")]
            assert len(lines) == 1, lines


def test_truncated_and_unknown_tail(c24) -> None:
    data = ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 24000), 6.0, segment_seconds=0.2)
    records, _ = _records(data)
    with pytest.raises(DamagedStream, match=r"damaged from 0\.4 s on \(segment 2 at byte \d+: file truncated"):
        ecdc.decode_bytes(data[: records[2].offset + 40], c24)
    out, lines = _salvaged(data[: records[2].offset + 40], c24)  # the head of segment 2 says its frames
    assert out.shape[-1] == 14400 and lines[0].startswith("lost 0.4–0.6 s (segment 2") and len(lines) == 2
    out, lines = _salvaged(data[: records[2].offset + 10], c24)  # nothing of it: the output ends before it
    assert out.shape[-1] == 9600 and "breaks off" in lines[0]
    out, lines = _salvaged(data[: records[2].offset], c24)
    assert out.shape[-1] == 9600


def test_several_and_consecutive_losses_keep_timing(c24) -> None:
    """Two neighbouring lost heads and a third loss later: one line per run, the length kept, on a
    file (the index says which segments) and on a pipe (the end record says how many)."""
    data = ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 48000), 6.0, segment_seconds=0.2)
    records, _ = _records(data)
    bad = _flip(data, records[1].offset + 2, records[1].offset + 9, records[2].offset + 2, records[2].offset + 9,
                records[7].offset + 50, records[7].offset + 70)
    clean = ecdc.decode_bytes(data, c24)[1]
    for pipe in (False, True):
        out, lines = _salvaged(bad, c24, pipe=pipe)
        assert out.shape == clean.shape
        assert torch.equal(out[..., :4800], clean[..., :4800])
        assert lines[0].startswith("lost 0.2–0.6 s (") and lines[1].startswith("lost 1.4–1.6 s (segment 7")
        assert len(lines) == 2
    assert "segments 1–2 from byte" in _salvaged(bad, c24)[1][0]


def test_lm_coded_segments(c24) -> None:
    lm = skewed_lm()
    data = lm_coded_file(c24, lm, frames=60, segment_seconds=0.2)
    records, _ = _records(data)
    clean = ecdc.decode_bytes(data, c24, lm)[1]
    out, lines = _salvaged(_flip(data, records[1].offset + 40, records[1].offset + 41), c24, lm)
    assert out.shape == clean.shape and torch.equal(out[..., :4800], clean[..., :4800]) and len(lines) == 1


def test_segmented_codec_loses_one_second() -> None:
    """A segmented codec's lost segment is not decoded: its neighbours fade into it over their overlap
    and are the clean decode elsewhere."""
    c48 = tiny_codec48()
    data = ecdc.encode_bytes(c48, 0.1 * torch.randn(1, 2, 48000 * 3), 6.0)
    records, _ = _records(data)
    clean = ecdc.decode_bytes(data, c48)[1]
    bad = _flip(data, records[1].offset + 100, records[1].offset + 200)
    with pytest.raises(DamagedStream, match=r"damaged at 0\.99–1\.99 s \(segment 1"):
        ecdc.decode_bytes(bad, c48)
    out, lines = _salvaged(bad, c48)
    stride, overlap = 47520, 480
    assert out.shape == clean.shape and lines[0].startswith("lost 0.99–1.99 s (segment 1")
    assert torch.allclose(out[..., :stride], clean[..., :stride], atol=1e-6)
    assert (out[..., stride + overlap: 2 * stride] == 0).all()
    assert torch.allclose(out[..., 2 * stride + overlap:], clean[..., 2 * stride + overlap:], atol=1e-6)


def test_salvage_info_reads_the_totals(c24) -> None:
    data = ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 24000), 6.0, segment_seconds=0.25)
    records, end = _records(data)
    info = salvage_info(io.BytesIO(_flip(data, records[1].offset + 50, records[1].offset + 51, end.offset + 28,
                                         end.offset + 30)))
    assert (info.length, info.segments, info.frames) == (24000, 4, 75)


# ------------------------------------------------------------------------------ the command: the bar
@pytest.fixture(scope="module")
def minute(tmp_path_factory: pytest.TempPathFactory, speech: Path) -> Path:
    """60 s of the speech recording, repeated."""
    x, sr = sf.read(speech, dtype="float32")
    path = tmp_path_factory.mktemp("minute") / "minute.wav"
    sf.write(path, np.resize(x, 60 * sr), sr)
    return path


@pytest.fixture(scope="module")
def minute_ecdc(minute: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("minute_ecdc")
    enc, clean = folder / "minute.ecdc", folder / "clean.wav"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (`one_thread`): decoded samples depend on the thread count
    try:
        assert CliRunner().invoke(cli, ["encode", str(minute), str(enc), "-m", str(tiny_model), "-q"]).exit_code == 0
        assert CliRunner().invoke(cli, ["decode", str(enc), str(clean), "-m", str(tiny_model), "-q"]).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    return enc, clean


def test_one_flipped_byte_in_a_minute(minute_ecdc: tuple[Path, Path], tiny_model: Path, tmp_path: Path) -> None:
    """The bar: one flipped byte (in a record head, a payload, the end record or the index) in a 60 s
    file: plain decode exits 1, writes nothing and suggests --salvage; --salvage writes the full
    length with at least 80 % of the 16-bit samples equal to the clean decode's."""
    enc, clean_wav = minute_ecdc
    data = enc.read_bytes()
    records, end = _records(data)
    clean, sr = sf.read(clean_wav, dtype="int16")
    spots = {"head": (records[3].offset + 9,), "first payload": (records[0].offset + 200,),
             "payload": (records[4].offset + 300,), "end record": (end.offset + 30,), "index": (end.offset + 36 + 30,),
             "first payload, two bytes": (records[0].offset + 200, records[0].offset + 201),
             "head, two bytes": (records[3].offset + 9, records[3].offset + 13),
             "payload, two bytes": (records[4].offset + 300, records[4].offset + 900)}
    for name, where in spots.items():
        bad, out = tmp_path / f"{name}.ecdc", tmp_path / f"{name}.wav"
        bad.write_bytes(_flip(data, *where))
        r = CliRunner().invoke(cli, ["decode", str(bad), str(out), "-m", str(tiny_model), "-q"])
        if name == "index":  # not needed to decode: a plain decode is whole
            assert r.exit_code == 0 and np.array_equal(sf.read(out, dtype="int16")[0], clean)
        else:
            assert r.exit_code == 1 and not out.exists(), name
            assert f"error: {bad}: damaged " in r.output and "decode what is intact with --salvage" in r.output
        r = CliRunner().invoke(cli, ["decode", str(bad), str(out), "-m", str(tiny_model), "-q", "--salvage", "-f"])
        assert r.exit_code == 0, r.output
        y, _ = sf.read(out, dtype="int16")
        assert len(y) == len(clean), name
        same = float(np.mean(y == clean))
        if "two bytes" in name:  # a lost segment: 10 s of 60 silent
            assert 0.8 <= same < 0.84, (name, same)
            assert r.output.count("warning:") == 1 and f"warning: {bad}: lost " in r.output, r.output
        else:  # repaired
            assert same == 1.0, name
            repaired = r.output.count("warning:") == 1 and "repaired one damaged byte" in r.output
            assert repaired if name != "index" else not r.output, r.output


def test_salvage_from_python_folders_and_pipes(minute_ecdc: tuple[Path, Path], tiny_model: Path,
                                               tmp_path: Path) -> None:
    enc, clean_wav = minute_ecdc
    data = enc.read_bytes()
    records, _ = _records(data)
    bad = _flip(data, records[2].offset + 100, records[2].offset + 140)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "bad.ecdc").write_bytes(bad)
    (src / "good.ecdc").write_bytes(data)
    # Python: the same error, naming salvage=True; then the lines in the result
    with pytest.raises(DamagedStream, match=r"damaged at 20\.0–30\.0 s .*salvage=True"):
        pipeline.decode_file(src / "sub" / "bad.ecdc", tmp_path / "p.wav", model=tiny_model)
    result = pipeline.decode_file(src / "sub" / "bad.ecdc", tmp_path / "p.wav", model=tiny_model, salvage=True)
    assert len(result.damage) == 1 and "lost 20.0–30.0 s" in result.damage[0] and result.seconds == 60.0
    # folders: without salvage the damaged file fails and the other is decoded; with it, both, and a warning
    r = CliRunner().invoke(cli, ["decode", str(src), str(tmp_path / "out"), "-m", str(tiny_model), "-q"])
    assert r.exit_code == 1 and "1 failed" in r.output and "--salvage" in r.output
    assert not (tmp_path / "out" / "sub" / "bad.wav").exists() and (tmp_path / "out" / "good.wav").exists()
    r = CliRunner().invoke(cli, ["decode", str(src), str(tmp_path / "out"), "-m", str(tiny_model), "-q", "-f",
                                 "--salvage"])
    assert r.exit_code == 0 and r.output.count("warning:") == 1 and "lost 20.0–30.0 s" in r.output
    assert sf.info(tmp_path / "out" / "sub" / "bad.wav").frames == sf.info(clean_wav).frames
    # a pipe: stdin cannot seek, so the scan finds the next record head
    p = proc("decode", "-", tmp_path / "pipe.wav", "-m", tiny_model, "-q", "--salvage", stdin=subprocess.PIPE,
             stderr=subprocess.PIPE)
    _, err = p.communicate(bad, timeout=300)
    assert p.returncode == 0 and b"warning: stdin: lost 20.0" in err, err
    y, _ = sf.read(tmp_path / "pipe.wav", dtype="int16")
    assert np.array_equal(y, sf.read(tmp_path / "p.wav", dtype="int16")[0])


def test_one_damaged_byte_in_the_header(c24) -> None:
    """The header's CRC locates one damaged byte too (not in its length field): the strict error
    says salvage repairs it, salvage decodes the clean audio; two damaged bytes are beyond it."""
    data = ecdc.encode_bytes(c24, 0.1 * torch.randn(1, 1, 4800), 6.0)
    clean = ecdc.decode_bytes(data, c24)[1]
    size = container.read_prelude(io.BytesIO(data)).size
    for where in (1, 4, 5, 12, size - 10, size - 2):
        bad = _flip(data, where)
        with pytest.raises(CorruptStream, match="not an .ecdc file" if where < 4 else "format version" if where == 4
                           else "header at byte 10: CRC mismatch .*salvage=True repairs"):
            ecdc.decode_bytes(bad, c24)
        for pipe in (False, True):
            out, lines = _salvaged(bad, c24, pipe=pipe)
            assert torch.equal(out, clean) and lines == [f"repaired one damaged byte at byte {where} (header): its "
                                                         "checksum locates it"], (where, lines)
        assert salvage_info(io.BytesIO(bad)).length == 4800
    with pytest.raises(CorruptStream, match="header at byte 10: CRC mismatch \\(file damaged\\)$"):
        _salvaged(_flip(data, 12, 14), c24)


def test_salvage_in_a_batched_folder(speech: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Files decoded together, their model calls batched, salvage as they do alone."""
    from neucodec import batch

    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        pipeline.encode_file(speech, src / f"{k}.ecdc", model=tiny_model, segment_seconds=0.5)
    data = (src / "1.ecdc").read_bytes()
    records, _ = _records(data)
    (src / "1.ecdc").write_bytes(_flip(data, records[1].offset + 40, records[1].offset + 41))
    outputs = {}
    for name, kw in (("alone", dict(n_jobs=1)), ("batched", dict(n_jobs=3, batched=True))):
        summary = batch.run(batch.plan(src, tmp_path / name, "decode"), "decode",
                            dict(model=str(tiny_model), device="cpu", subtype="FLOAT", salvage=True),
                            progress=False, **kw)
        assert summary.count("done") == 3 and not summary.failed
        damage = {o.job.source.name: o.damage for o in summary.outcomes}
        assert not damage["0.ecdc"] and not damage["2.ecdc"], damage
        assert damage["1.ecdc"][0].startswith(f"{src / '1.ecdc'}: lost 0.52–1.04 s"), damage  # whole tiles
        outputs[name] = {k: sf.read(tmp_path / name / f"{k}.wav")[0] for k in range(3)}
    for k in range(3):
        assert np.abs(outputs["alone"][k] - outputs["batched"][k]).max() < 1e-5
