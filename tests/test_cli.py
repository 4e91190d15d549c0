"""The `neucodec` command: CliRunner for options and errors, real subprocesses for pipes, folders and signals."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import copy_package

from neucodec.cli import cli

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output  # click >= 8.2: stdout and stderr interleaved


def proc(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "neucodec", *map(str, args)], env=env, **kw)  # type: ignore[call-overload]


def test_version_help_usage() -> None:
    code, out = run("--version")
    assert code == 0 and "neucodec" in out
    code, out = run("encode", "--help")
    assert code == 0 and "--bandwidth" in out and "--device" in out
    assert run("encode", "a.wav")[0] == 2  # missing OUT
    assert run("encode", "a.wav", "b.ecdc", "--bogus")[0] == 2
    assert run("bogus")[0] == 2
    for args in (("encode", "", "b.ecdc"), ("decode", "b.ecdc", ""), ("info", "")):  # an unset shell variable
        code, out = run(*args)
        assert code == 2 and "empty path" in out, (args, out)


def test_encode_info_decode_round_trip(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.ecdc"
    code, text = run("encode", recordings["flac_stereo"], out, "-m", tiny_model, "-b", "6")
    assert code == 0, text
    assert "2 mono streams" in text and "3 kbps of codes in total" in text  # the channels share the target
    code, text = run("info", out)
    assert code == 0 and "tiny_24khz" in text and "44100 Hz, 2 channel" in text
    code, text = run("info", out, "--json")
    assert json.loads(text[text.index("{"):])["source_channels"] == 2
    golden = Path(__file__).parent / "golden"
    for name, arithmetic in (("lm_exact2_24khz.ecdc", "exact-v2"), ("lm_exact_24khz.ecdc", "exact-v1")):
        code, text = run("info", golden / name)
        assert code == 0 and f"in {arithmetic} arithmetic, 3 of 3 segments LM-coded" in text, text
    code, text = run("decode", out, tmp_path / "s.flac", "--subtype", "PCM_24", "-q")
    assert code == 1 and "tiny_24khz" in text and "-m/--model" in text  # not installed by name
    code, text = run("decode", out, tmp_path / "s.flac", "--subtype", "PCM_24", "-m", tiny_model, "-q")
    assert code == 0 and text == ""
    info = sf.info(str(tmp_path / "s.flac"))
    assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_24")
    # OUT a folder: IN's name with the new extension
    code, text = run("decode", out, tmp_path, "-m", tiny_model, "-q")
    assert code == 0 and (tmp_path / "s.wav").is_file()


def test_errors_are_one_line(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    text_file = tmp_path / "notes.wav"
    text_file.write_text("not audio\n")
    corrupt = tmp_path / "x.ecdc"
    corrupt.write_bytes(b"NCDC\x01" + b"\x00" * 100)
    cases = [
        (["encode", tmp_path / "missing.wav", tmp_path / "o.ecdc", "-m", tiny_model], "does not exist"),
        (["encode", text_file, tmp_path / "o.ecdc", "-m", tiny_model], "not audio"),
        (["encode", recordings["wav_mono"], tmp_path / "o.ecdc", "-m", "no_such_model"], "unknown model"),
        (["encode", recordings["wav_mono"], tmp_path / "o.ecdc", "-m", tmp_path / "w.json"], "does not exist"),
        (["encode", recordings["wav_mono"], recordings["wav_mono"], "-m", tiny_model, "-f"], "input file"),
        (["decode", corrupt, tmp_path / "o.wav", "-m", tiny_model], ""),
        (["decode", text_file, tmp_path / "o.wav", "-m", tiny_model], ""),
        (["info", corrupt], ""),
        (["download", "nothing"], "no downloadable model"),
    ]
    if not __import__("torch").cuda.is_available():
        for command in ("encode", "decode"):  # decode too, without -m
            src, dst = (recordings["wav_mono"], "o.ecdc") if command == "encode" else (corrupt, "o.wav")
            cases.append(([command, src, tmp_path / dst, "--device", "cuda"], "--device cuda: CUDA is not available"))
    usage = [  # usage mistakes: exit 2
        (["encode", recordings["wav_mono"], tmp_path / "o.ecdc", "-m", tiny_model, "-b", "0.01"], "0.01"),
        (["encode", recordings["wav_mono"], tmp_path / "o.ecdc", "-m", tiny_model, "--envelope-table", "e9"],
         "no envelope table 'e9'"),
        (["encode", recordings["wav_mono"], tmp_path / "o.ecdc", "-m", tiny_model, "--device", "tpu"], "device"),
        (["encode", recordings["wav_mono"], tmp_path / "o.wav", "-m", tiny_model], f"name it {tmp_path / 'o.ecdc'}"),
        (["decode", corrupt, tmp_path / "o.mp4", "-m", tiny_model], ".wav, .flac or .ogg"),
        (["decode", corrupt, tmp_path / "o.ogg", "-m", tiny_model, "--subtype", "FLOAT"], "no --subtype"),
    ]
    for (args, needle), expected in [(c, 1) for c in cases] + [(c, 2) for c in usage]:
        code, text = run(*args)
        lines = [ln for ln in text.splitlines() if ln.startswith("neucodec: error")]
        assert code == expected and len(lines) == 1 and needle in lines[0], (args, text)
        assert "Traceback" not in text and "force=True" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.wav", "x.ecdc"]
    code, text = run("info", corrupt, "-v")
    assert code == 1 and "Traceback" in text


def test_overwrite_needs_force(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.ecdc"
    out.write_bytes(b"old")
    code, text = run("encode", recordings["wav_mono"], out, "-m", tiny_model)
    assert code == 1 and "pass -f/--force to overwrite it" in text and out.read_bytes() == b"old"
    assert run("encode", recordings["wav_mono"], out, "-m", tiny_model, "-f", "-q")[0] == 0
    assert out.read_bytes() != b"old"


def test_models_lists_official_and_cache(tmp_path: Path) -> None:
    code, text = run("models")
    assert code == 0 and "encodec_24khz" in text and "neucodec download encodec_24khz" in text
    code, text = run("models", "--json")
    rows = {r["name"]: r for r in json.loads(text)}
    assert set(rows) >= {"encodec_24khz", "encodec_48khz", "neucodec_24khz"}
    assert rows["neucodec_24khz"]["envelope"] == "e4" and rows["encodec_24khz"]["envelope"] is None
    assert rows["neucodec_24khz"]["default_bandwidth"] == 3.0 and rows["encodec_24khz"]["default_bandwidth"] is None
    assert rows["neucodec_24khz"]["default_kbps"] == 6.0 and rows["neucodec_24khz"]["measured"]
    assert [p["codebooks"] for p in rows["encodec_24khz"]["operating_points"]] == [2, 4, 8, 16, 32]
    text = run("models")[1]
    assert "neucodec_24khz (default): 24 kHz, 1 ch, streaming; codes at 1.5, 3, 4.5, 6, 9, 12, 24 kbps; -b 6 by " \
        "default" in text and "-> 4 codebooks + e4 correction (about 5.49 kbps)" in text
    code, text = run("download", "encodec_24khz")  # offline in tests
    assert code == 1 and "neucodec: error" in text


def test_folder_tree_with_broken_file(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "a" / "b").mkdir(parents=True)
    (src / "c").mkdir()
    shutil.copy(recordings["wav_mono"], src / "one.wav")
    shutil.copy(recordings["ogg"], src / "a" / "b" / "two.ogg")
    shutil.copy(recordings["flac_stereo"], src / "a" / "three.flac")
    (src / "c" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnope")
    (src / "readme.txt").write_text("ignored")
    dst = tmp_path / "out"
    code, text = run("encode", src, dst, "-m", tiny_model, "-j", "1")
    assert code == 1
    assert "broken.wav" in text and "encoded 3 files" in text and "1 failed" in text
    made = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert made == ["a/b/two.ecdc", "a/three.ecdc", "one.ecdc"]
    (src / "c" / "broken.wav").unlink()
    code, text = run("encode", src, dst, "-m", tiny_model)
    assert code == 0 and "3 skipped" in text
    code, text = run("decode", dst, tmp_path / "dec", "-m", tiny_model, "--format", "flac", "-j", "2")
    assert code == 0, text
    assert sorted(str(p.relative_to(tmp_path / "dec")) for p in (tmp_path / "dec").rglob("*.flac")) == \
        ["a/b/two.flac", "a/three.flac", "one.flac"]
    assert sf.info(str(tmp_path / "dec" / "a" / "three.flac")).channels == 2


def test_folder_gives_many_channels_the_default_target_as_a_file_gets_it(tiny_model: Path, tmp_path: Path) -> None:
    """Without -b, a file whose channels need more than the default target is coded at their minimum,
    in a folder as alone."""
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "five.wav", 0.1 * np.random.default_rng(0).standard_normal((12000, 5)).astype(np.float32), 24000)
    code, text = run("encode", src / "five.wav", tmp_path / "alone.ecdc", "-m", tiny_model)
    assert code == 0 and "5 channels need at least" in text, text
    code, text = run("encode", src, tmp_path / "out", "-m", tiny_model, "-j", "1")
    assert code == 0 and "encoded 1 file" in text, text
    assert (tmp_path / "out" / "five.ecdc").read_bytes() == (tmp_path / "alone.ecdc").read_bytes()


def test_pipes_stream_end_to_end(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    """`encode - - | decode - -` with real processes and pipes: WAV in, WAV out."""
    enc = proc("encode", "-", "-", "-m", tiny_model, "-q", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    dec = proc("decode", "-", "-", "-m", tiny_model, "-q", stdin=enc.stdout, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
    assert enc.stdout is not None and enc.stdin is not None
    enc.stdout.close()
    enc.stdin.write(recordings["flac_stereo"].read_bytes())  # FLAC through a pipe is spooled
    enc.stdin.close()
    out, err = dec.communicate(timeout=120)
    assert enc.wait(timeout=60) == 0 and dec.returncode == 0, err.decode()
    path = tmp_path / "piped.wav"
    path.write_bytes(out)
    info = sf.info(str(path))
    ref = sf.info(str(recordings["flac_stereo"]))
    assert (info.samplerate, info.channels, info.frames) == (ref.samplerate, ref.channels, ref.frames)


def _writing_into(pid: int, folder: Path) -> bool:
    """Whether process `pid` has a file open in `folder` (a nameless O_TMPFILE one shows as
    `folder/#INODE (deleted)`), or a temporary file of neucodec's pattern is there."""
    if list(folder.glob(".*.neucodec-tmp*")):
        return True
    fds = Path(f"/proc/{pid}/fd")
    links = []
    for fd in fds.iterdir() if fds.is_dir() else []:
        try:
            links.append(os.readlink(fd))
        except OSError:
            pass
    return any(link.startswith(str(folder) + "/") for link in links)


def _catches_sigint() -> None:
    """As in a terminal: a suite started in the background (`cmd &`) passes SIGINT on ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_leaves_no_output(tiny_model: Path, tmp_path: Path) -> None:
    """Ctrl-C while stdin is still open: exit 130 and no output file, not even a temporary one."""
    out = tmp_path / "o.ecdc"
    p = proc("encode", "-", out, "-m", tiny_model, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
             preexec_fn=_catches_sigint)
    assert p.stdin is not None
    x = (np.random.default_rng(0).standard_normal(24000) * 0.1).astype(np.float32)
    header = __import__("neucodec.audio_io", fromlist=["wav_header"]).wav_header(24000, 1, "PCM_16", None)
    p.stdin.write(header)
    block = __import__("neucodec.audio_io", fromlist=["pcm_bytes"]).pcm_bytes(x[None], "PCM_16")
    deadline = time.time() + 60
    while not _writing_into(p.pid, tmp_path) and time.time() < deadline:  # wait for the temporary file
        p.stdin.write(block)
        p.stdin.flush()
        time.sleep(0.1)
    assert _writing_into(p.pid, tmp_path), "no temporary output appeared"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err.decode()
    assert list(tmp_path.iterdir()) == []


def test_envelope_correction_on_by_default_where_the_model_takes_it(recordings: dict[str, Path], tiny_model: Path,
                                                                   tiny_stereo_model: Path, tmp_path: Path) -> None:
    src = recordings["wav_mono"]
    for flag, version, envelope in ((None, 2, "corrected (e1 table"), ("--no-envelope", 1, "none")):
        out = tmp_path / f"{flag}.ecdc"
        code, text = run("encode", src, out, "-m", tiny_model, *([flag] if flag else []))
        assert code == 0 and (" correction x 1" in text) == (flag is None), text
        code, text = run("info", out)
        assert code == 0 and f"format version  {version}" in text and f"envelope        {envelope}" in text, text
        code, text = run("decode", out, tmp_path / f"{flag}.wav", "-m", tiny_model, "-q")
        assert code == 0 and sf.info(str(tmp_path / f"{flag}.wav")).frames == sf.info(str(src)).frames
    code, text = run("encode", src, tmp_path / "t.ecdc", "-m", tiny_model, "--envelope-table", "e2", "-q")
    assert code == 0
    assert "envelope        corrected (e2 table, 40 bands of 4 bins" in run("info", tmp_path / "t.ecdc")[1]
    code, text = run("encode", src, tmp_path / "u.ecdc", "-m", tiny_model, "--envelope-table", "e9")
    assert code == 2 and "no envelope table 'e9'; choose one of e1, e2" in text and len(text.strip().splitlines()) == 1
    code, text = run("encode", src, tmp_path / "v.ecdc", "-m", tiny_model, "--no-envelope", "--envelope-table", "e2")
    assert code == 2 and "contradict" in text
    assert not (tmp_path / "u.ecdc").exists() and not (tmp_path / "v.ecdc").exists()
    code, text = run("encode", src, tmp_path / "x.ecdc", "-m", tiny_stereo_model, "--envelope")
    assert code == 2 and "cannot take an envelope correction" in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "x.ecdc").exists()
    assert run("encode", src, tmp_path / "y.ecdc", "-m", tiny_stereo_model, "-q")[0] == 0  # default: without


def _encoded(src: Path, tiny_model: Path, folder: Path) -> Path:
    out = folder / "enc" / (src.stem + ".ecdc")
    out.parent.mkdir(exist_ok=True)
    code, text = run("encode", src, out, "-m", tiny_model, "-q")
    assert code == 0, text
    return out


def test_decode_reports_the_rate_it_wrote(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    ecdc = _encoded(recordings["flac_stereo"], tiny_model, tmp_path)  # a 44.1 kHz original
    code, text = run("decode", ecdc, tmp_path / "o.wav", "-m", tiny_model, "--sample-rate", "16000")
    assert code == 0 and "16000 Hz, 2 ch" in text and "44100 Hz" not in text, text
    assert sf.info(str(tmp_path / "o.wav")).samplerate == 16000


def test_format_lists_agree(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    """The formats the help offers are the ones that work: decode writes .ogg, encode reads AIFF."""
    from neucodec import audio_io

    code, text = run("decode", "--help")
    assert code == 0 and f"[{'|'.join(e[1:] for e in audio_io.OUTPUT_FORMATS)}]" in text and "ogg" in text
    code, text = run("encode", "--help")
    assert code == 0 and "AIFF" in " ".join(text.split())
    x, sr = sf.read(recordings["wav_mono"], dtype="float32")
    sf.write(tmp_path / "in.aiff", x, sr, format="AIFF")
    ecdc = tmp_path / "enc" / "in.ecdc"
    ecdc.parent.mkdir()
    assert run("encode", tmp_path / "in.aiff", ecdc, "-m", tiny_model, "-q")[0] == 0
    code, text = run("decode", ecdc.parent, tmp_path / "dec", "-m", tiny_model, "--format", "ogg", "-q")
    assert code == 0, text
    assert sf.info(str(tmp_path / "dec" / "in.ogg")).format == "OGG"
    code, text = run("decode", ecdc, tmp_path / "o.mp3", "-m", tiny_model)
    assert code == 2 and "name the output .wav, .flac or .ogg" in text


def test_progress_bars_only_on_a_terminal(tiny_model: Path, tmp_path: Path) -> None:
    """A long file shows a bar on a terminal; CliRunner's stderr is not one, so a log gets the result alone."""
    sf.write(tmp_path / "long.wav", np.zeros(31 * 8000, np.float32), 8000)
    code, text = run("encode", tmp_path / "long.wav", tmp_path / "long.ecdc", "-m", tiny_model, "--no-envelope")
    assert code == 0 and "%|" not in text and "\r" not in text and len(text.strip().splitlines()) == 2, text


def test_binary_output_to_a_terminal_is_a_usage_error(recordings: dict[str, Path], tiny_model: Path,
                                                      tmp_path: Path) -> None:
    import pty

    ecdc = _encoded(recordings["wav_mono"], tiny_model, tmp_path)
    master, slave = pty.openpty()
    try:
        p = proc("decode", ecdc, "-", "-m", tiny_model, stdout=slave, stderr=subprocess.PIPE)
        _, err = p.communicate(timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 2 and err.decode().strip().splitlines() == [
        "neucodec: error: refusing to write binary data to a terminal; redirect stdout (> file) or give OUT"]


def test_closed_stdout_exits_141_quietly(recordings: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    """`neucodec decode f.ecdc - | head -c 100`: the status of a process killed by SIGPIPE, no message."""
    ecdc = _encoded(recordings["flac_stereo"], tiny_model, tmp_path)  # 260 kB of WAV: more than a pipe holds
    p = proc("decode", ecdc, "-", "-m", tiny_model, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    assert len(p.stdout.read(100)) == 100
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == b"", err.decode()


def test_piped_decode_without_a_model_takes_it_from_the_header(recordings: dict[str, Path], tiny_model: Path,
                                                               tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    copy_package(tiny_model, cache)
    ecdc = _encoded(recordings["wav_mono"], tiny_model, tmp_path)
    with open(ecdc, "rb") as f:
        p = proc("decode", "-", tmp_path / "o.wav", "--device", "cpu", stdin=f, stderr=subprocess.PIPE,
                 env={"NEUCODEC_CACHE": str(cache)})
        _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert sf.info(str(tmp_path / "o.wav")).frames == sf.info(str(recordings["wav_mono"])).frames


def test_quick_commands_do_not_import_torch(tiny_model: Path, tmp_path: Path) -> None:
    """`--help`, `--version`, `info` and `models` start without torch (importing it takes over a second)."""
    golden = Path(__file__).parent / "golden"
    for args in (["--help"], ["--version"], ["encode", "--help"], ["models"], ["info", golden / "lm_exact2_24khz.ecdc"],
                 ["info", golden / "envelope_e4_2groups_24khz.ecdc", "--json"]):
        script = ("import sys\nfrom neucodec.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
                  "    assert not e.code, e.code\nassert 'torch' not in sys.modules, 'torch imported'\n")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, timeout=120)
        assert r.returncode == 0, (args, r.stderr.decode()[-500:])
