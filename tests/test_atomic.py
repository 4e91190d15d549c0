"""Safe output files (`neucodec.atomic`): nothing half-written and nothing left behind, whatever
stops the writer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neucodec import atomic
from neucodec.errors import OutputError

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from neucodec import atomic
    atomic._TMPFILE = sys.argv[2] == "tmpfile"
    with atomic.atomic_output(Path(sys.argv[1])) as tmp, open(tmp, "wb") as f:
        f.write(b"x" * 100000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("kind", ["tmpfile", "named"])
def test_output_appears_whole_and_only_at_the_end(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "_TMPFILE", kind == "tmpfile" and atomic._TMPFILE)
    target = tmp_path / "out.bin"
    with atomic.atomic_output(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(OutputError, match="appeared while writing"):
        with atomic.atomic_output(target) as tmp, open(tmp, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"abc"
    with atomic.atomic_output(target, force=True) as tmp, open(tmp, "wb") as f:
        f.write(b"forced")
    assert target.read_bytes() == b"forced" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(RuntimeError):
        with atomic.atomic_output(tmp_path / "failed.bin") as tmp, open(tmp, "wb") as f:
            f.write(b"partial")
            raise RuntimeError("the writer failed")
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.skipif(not atomic._TMPFILE, reason="needs O_TMPFILE (Linux)")
def test_sigkill_leaves_nothing_with_a_nameless_file(tmp_path: Path) -> None:
    code = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out.bin"), "tmpfile"]).returncode
    assert code == -signal.SIGKILL
    assert os.listdir(tmp_path) == []


def test_a_killed_writers_named_temporary_is_removed_by_the_next_output(tmp_path: Path) -> None:
    code = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out.bin"), "named"]).returncode
    assert code == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and atomic.TMP_MARK in left[0]
    other = tmp_path / f".someone.else{atomic.TMP_MARK}"  # not neucodec's pattern: left alone
    other.write_bytes(b"")
    with atomic.atomic_output(tmp_path / "next.bin") as tmp, open(tmp, "wb") as f:
        f.write(b"ok")
    assert sorted(os.listdir(tmp_path)) == sorted(["next.bin", other.name])
