"""Safe output files: write into a temporary file beside the target and rename it only when complete.

A crash, Ctrl-C or full disk leaves either the old state or the complete new file, never a partial
one. Without `force` an existing target is never replaced, even if it appeared while writing.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import typing as tp
from pathlib import Path

from .errors import OutputError

TMP_MARK = ".neucodec-tmp"


def check_target(target: Path, force: bool, source: Path | None = None) -> None:
    """Refuse early: an existing target without `force`, a folder, the input itself, a missing folder."""
    if source is not None and target.exists() and source.exists() and os.path.samefile(source, target):
        raise OutputError(f"{target} is the input file; choose another output name")
    if source is not None and target.resolve() == source.resolve():
        raise OutputError(f"{target} is the input file; choose another output name")
    if target.is_dir():
        raise OutputError(f"{target} is a folder; give a file name (or a folder as input for folder mode)")
    if target.exists() and not force:
        raise OutputError(f"{target} exists; pass -f/--force to overwrite it")
    if not target.parent.is_dir():
        raise OutputError(f"folder {target.parent} does not exist; create it first")


def disk_error(e: OSError, target: Path) -> OutputError:
    """A one-line OutputError for an OSError met while writing `target`."""
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {target}; free some space and run again (nothing was written)")
    if e.errno == errno.EDQUOT:
        return OutputError(f"disk quota exceeded while writing {target}; free some space and run again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write into {target.parent} ({e.strerror}); check its permissions")
    return OutputError(f"cannot write {target} ({e.strerror or e}); check the folder and free space")


@contextlib.contextmanager
def atomic_output(target: Path, force: bool = False, suffix: str = "") -> tp.Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`, else delete it.

    `suffix` keeps an extension on the temporary name for writers that pick the format from it.
    """
    target = Path(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_MARK + suffix, dir=target.parent)
    except OSError as e:
        raise disk_error(e, target) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish(tmp, target, force)
    except OSError as e:
        raise disk_error(e, target) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _publish(tmp: Path, target: Path, force: bool) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    mode = 0o666 & ~_UMASK
    os.chmod(tmp, mode)
    if force:
        os.replace(tmp, target)
        return
    try:  # no-clobber rename: link fails if the target appeared meanwhile
        os.link(tmp, target)
    except FileExistsError:
        raise OutputError(f"{target} appeared while writing; pass -f/--force to overwrite it") from None
    except OSError:  # filesystems without hard links
        if target.exists():
            raise OutputError(f"{target} appeared while writing; pass -f/--force to overwrite it") from None
        os.replace(tmp, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import: os.umask is process-wide


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that `finally` blocks clean up temporary files."""


def raise_on_sigterm() -> None:
    """Turn SIGTERM into a `Terminated` exception (call from the main thread)."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
