"""engine: folders run with their model calls batched across files give the files of a one-by-one run."""
from __future__ import annotations

import shutil
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from _bitstream import tiny_codec24
from neucodec import batch, engine, entropy, load_codec
from neucodec.atomic import TMP_MARK
from neucodec.ecdc import decode_bytes
from neucodec.model import Codec

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ("encode_step", "decode_step", "_encode_segments", "_decode_segments")
CODER = ("encode_segments", "decode_segments")  # entropy: LM coding, batched across files too


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Rows of every codec step that runs, and segments of every LM-coding call (the real calls, only counted)."""
    seen: dict[str, list[int]] = {name: [] for name in STEPS + CODER}
    for name in STEPS:
        real = getattr(Codec, name)

        def spy(self: Codec, x: torch.Tensor, *args: tp.Any, _real: tp.Any = real, _name: str = name) -> tp.Any:
            seen[_name].append(int(x.shape[0]))
            return _real(self, x, *args)

        monkeypatch.setattr(Codec, name, spy)
    for name in CODER:
        real = getattr(entropy, name)

        def coder_spy(segments: list[tp.Any], lm: tp.Any, *args: tp.Any, _real: tp.Any = real, _name: str = name,
                      **kw: tp.Any) -> tp.Any:
            if lm is not None:
                seen[_name].append(len(segments))
            return _real(segments, lm, *args, **kw)

        monkeypatch.setattr(entropy, name, coder_spy)
    return seen


def _folder(root: Path, recordings: dict[str, Path]) -> Path:
    """Files of many lengths, rates and channel counts, one of one sample, and a broken one."""
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, seconds in enumerate([0.3, 0.7, 1.6, 1.6, 2.3, 3.1, 4.4]):
        t = np.arange(int(seconds * 24000)) / 24000
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 900) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(src / f"m{i}.wav", x.astype(np.float32), 24000)
    shutil.copy(recordings["flac_stereo"], src / "sub" / "stereo.flac")
    shutil.copy(recordings["wav_mono"], src / "sub" / "speech.wav")
    sf.write(src / "one.wav", np.array([0.5], np.float32), 24000)
    (src / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnope")
    return src


def _outputs(folder: Path, ext: str) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob(f"*{ext}"))}


@pytest.mark.parametrize("which, use_lm, cap", [
    pytest.param("tiny_model", False, engine.MAX_BATCH_SAMPLES, id="causal"),
    pytest.param("tiny_model", True, 100_000, id="causal-lm-small-batches"),
    pytest.param("tiny_stereo_model", False, engine.MAX_BATCH_SAMPLES, id="segmented"),
])
def test_batched_folder_gives_the_files_of_a_one_by_one_run(
        which: str, use_lm: bool, cap: int, recordings: dict[str, Path], tmp_path: Path,
        calls: dict[str, list[int]], request: pytest.FixtureRequest) -> None:
    weights = str(request.getfixturevalue(which))
    src = _folder(tmp_path, recordings)
    runs = {}
    for name, kw in (("alone", dict(n_jobs=1)), ("batched", dict(n_jobs=4, batched=True, max_batch_samples=cap))):
        for v in calls.values():
            v.clear()
        summary = batch.run(batch.plan(src, tmp_path / name, "encode"), "encode",
                            dict(model=weights, device="cpu", use_lm=use_lm), progress=False, **kw)
        assert [o.job.source.name for o in summary.failed] == ["broken.wav"], [o.error for o in summary.failed]
        assert "not audio" in (summary.failed[0].error or "") and summary.count("done") == 10
        assert not torch.is_inference_mode_enabled()  # the generators' steps left no mode behind
        runs[name] = {k: sum(v) for k, v in calls.items()}, {k: len(v) for k, v in calls.items()}
    alone, batched = _outputs(tmp_path / "alone", ".ecdc"), _outputs(tmp_path / "batched", ".ecdc")
    assert alone.keys() == batched.keys() and len(alone) == 10
    for key in alone:  # byte-identical files: the same codes, scales and header
        assert alone[key].read_bytes() == batched[key].read_bytes(), key
    (rows_alone, n_alone), (rows_batched, n_batched) = runs["alone"], runs["batched"]
    assert rows_alone == rows_batched  # the same work ...
    assert sum(n_batched.values()) < sum(n_alone.values())  # ... in fewer, larger calls
    if use_lm:  # LM coding too: the ten files' segments in fewer calls than files
        assert rows_alone["encode_segments"] >= 10 and n_batched["encode_segments"] < n_alone["encode_segments"]
    assert not list(tmp_path.rglob(f"*{TMP_MARK}*"))

    (tmp_path / "alone" / "corrupt.ecdc").write_bytes(b"NCDC\x01" + bytes(100))
    decoded, lm_calls = {}, {}
    for name, kw in (("alone", dict(n_jobs=1)), ("batched", dict(n_jobs=4, batched=True, max_batch_samples=cap))):
        calls["decode_segments"].clear()
        dst = tmp_path / f"dec_{name}"
        summary = batch.run(batch.plan(tmp_path / "alone", dst, "decode"), "decode",
                            dict(model=weights, device="cpu", subtype="FLOAT"), progress=False, **kw)
        assert [o.job.source.name for o in summary.failed] == ["corrupt.ecdc"] and summary.count("done") == 10
        decoded[name] = {k: sf.read(p, always_2d=True) for k, p in _outputs(dst, ".wav").items()}
        lm_calls[name] = list(calls["decode_segments"])
    if use_lm:
        assert sum(lm_calls["alone"]) == sum(lm_calls["batched"]) and len(lm_calls["batched"]) < len(lm_calls["alone"])
    for key, (audio, rate) in decoded["alone"].items():
        other, other_rate = decoded["batched"][key]
        assert rate == other_rate and audio.shape == other.shape
        assert np.abs(audio - other).max() < 1e-5, key  # float kernels of a batch may round differently


def test_interrupt_leaves_no_partial_output(tiny_model: Path, recordings: dict[str, Path], tmp_path: Path) -> None:
    """Ctrl-C while files are in flight: the files in flight are unwound, their temporary files removed."""
    src = _folder(tmp_path, recordings)
    seen: list[batch.Outcome] = []

    def report(o: batch.Outcome) -> None:
        seen.append(o)
        if o.status == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run(batch.plan(src, tmp_path / "out", "encode"), "encode", dict(model=str(tiny_model), device="cpu"),
                  n_jobs=4, batched=True, progress=False, report=report)
    made = list((tmp_path / "out").rglob("*"))
    assert not [p for p in made if TMP_MARK in p.name]
    assert len([p for p in made if p.suffix == ".ecdc"]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_folder_batched_like_one_by_one(tiny_model: Path, recordings: dict[str, Path], tmp_path: Path) -> None:
    """On a GPU the kernels for a batch may round a row differently from a single signal, so a code
    can flip at a near tie: on an H200, 1 of these 10 files differed from its one-by-one bytes. What
    must hold: the same files, each valid, decoding on the CPU to nearly the same audio."""
    src = _folder(tmp_path, recordings)
    for name, n_jobs in (("alone", 1), ("batched", 8)):
        batch.run(batch.plan(src, tmp_path / name, "encode"), "encode", dict(model=str(tiny_model), device="cuda"),
                  n_jobs=n_jobs, progress=False)
    alone, batched = _outputs(tmp_path / "alone", ".ecdc"), _outputs(tmp_path / "batched", ".ecdc")
    assert alone.keys() == batched.keys() and len(alone) == 10
    codec = load_codec(str(tiny_model))
    same = 0
    for key in alone:
        a, b = (decode_bytes(files[key].read_bytes(), codec)[1] for files in (alone, batched))
        assert a.shape == b.shape, key
        same += alone[key].read_bytes() == batched[key].read_bytes()
        error = float(((a - b) ** 2).sum()) / max(float((a ** 2).sum()), 1e-12)
        assert error < 0.1, (key, error)  # a few flipped codes, not a different signal
    assert same >= len(alone) // 2


def test_a_failing_batch_is_retried_call_by_call() -> None:
    """Stacked calls that fail together run again one at a time: only the file at fault fails."""
    codec = tiny_codec24()
    good = torch.randint(0, 1024, (1, 4, 12), generator=torch.Generator().manual_seed(0))
    bad = good.clone()
    bad[0, 0, 3] = 5000  # no such code: the codebook lookup fails

    def one_file(codes: torch.Tensor) -> tp.Generator[engine.Call, None, tp.Any]:
        call = codec.decode_step_call(codes, None, True)
        yield call
        try:
            return call.result()[0]
        except (IndexError, RuntimeError) as e:  # this file's failure, as the pipeline would report it
            return e

    results: list[tp.Any] = []
    engine.run([lambda: one_file(good), lambda: one_file(bad)], 2, results.append)
    audio, error = results
    assert isinstance(error, (IndexError, RuntimeError))
    with torch.inference_mode():
        assert torch.equal(audio, codec.decode_step(good, None, True)[0])
