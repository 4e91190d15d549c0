"""Safe output files: write into a temporary file beside the target and give it its name only when complete.

A crash, Ctrl-C, SIGKILL or full disk leaves either the old state or the complete new file, never a
partial one. On Linux the temporary file has no name at all (`O_TMPFILE`), so nothing is left
whatever kills the process; the complete file is linked into place. Elsewhere it is a hidden file
beside the target whose name holds the writer's process id; the next output into that folder
removes those whose process is gone. Without `force` an existing target is never replaced, even if
it appeared while writing.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import typing as tp
from pathlib import Path

from .errors import OutputError, option

TMP_MARK = ".neucodec-tmp"
_TEMP_PID = re.compile(r"\.(\d+)-[0-9a-f]{8}" + re.escape(TMP_MARK))
_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


def check_target(target: Path, force: bool, source: Path | None = None) -> None:
    """Refuse early: an existing target without `force`, a folder, the input itself, a missing folder."""
    if source is not None and target.exists() and source.exists() and os.path.samefile(source, target):
        raise OutputError(f"{target} is the input file; choose another output name")
    if source is not None and target.resolve() == source.resolve():
        raise OutputError(f"{target} is the input file; choose another output name")
    if target.is_dir():
        raise OutputError(f"{target} is a folder; give a file name (or a folder as input for folder mode)")
    if target.exists() and not force:
        raise OutputError(f"{target} exists; pass {option('-f/--force')} to overwrite it")
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
    """Yield a path to write the output to; on success give the written file the name `target`.

    `suffix` keeps an extension on a named temporary file for writers that pick the format from it.
    """
    target = Path(target)
    remove_stale(target.parent)
    fd = _anonymous_file(target.parent)
    if fd is None:
        with _named_output(target, force, suffix) as tmp:
            yield tmp
        return
    try:
        yield Path(f"/proc/self/fd/{fd}")
        _link(fd, target, force)
    except OSError as e:
        raise disk_error(e, target) from None
    finally:
        os.close(fd)


def _anonymous_file(folder: Path) -> int | None:
    """A file with no name in `folder` (Linux `O_TMPFILE`), or None where that is not available."""
    if not _TMPFILE:
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None  # a filesystem (or kernel) without O_TMPFILE
        raise disk_error(e, folder / "output") from None


def _link(fd: int, target: Path, force: bool) -> None:
    """Give the nameless file `fd` the name `target` (replacing it only with `force`)."""
    os.fsync(fd)
    os.fchmod(fd, 0o666 & ~_UMASK)
    if not force:
        try:
            _link_fd(fd, target)
        except FileExistsError:
            raise OutputError(f"{target} appeared while writing; pass {option('-f/--force')} to overwrite it") from None
        return
    temp = target.parent / _temp_name(target, "")
    _link_fd(fd, temp)
    try:
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _link_fd(fd: int, path: Path) -> None:
    """linkat(2) with AT_SYMLINK_FOLLOW on /proc/self/fd/FD (os.link uses it only given a dir fd)."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def _temp_name(target: Path, suffix: str) -> str:
    return f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_MARK}{suffix}"


def remove_stale(folder: Path) -> None:
    """Delete temporary files of neucodec's own pattern in `folder` whose writing process is gone."""
    try:
        names = [p for p in Path(folder).iterdir() if TMP_MARK in p.name and p.name.startswith(".")]
    except OSError:
        return
    for path in names:
        match = _TEMP_PID.search(path.name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def _named_output(target: Path, force: bool, suffix: str) -> tp.Iterator[Path]:
    tmp = target.parent / _temp_name(target, suffix)
    try:
        tmp.touch(mode=0o600, exist_ok=False)
    except OSError as e:
        raise disk_error(e, target) from None
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
    os.chmod(tmp, 0o666 & ~_UMASK)
    if force:
        os.replace(tmp, target)
        return
    try:  # no-clobber rename: link fails if the target appeared meanwhile
        os.link(tmp, target)
    except FileExistsError:
        raise OutputError(f"{target} appeared while writing; pass {option('-f/--force')} to overwrite it") from None
    except OSError:  # filesystems without hard links
        if target.exists():
            raise OutputError(f"{target} appeared while writing; pass {option('-f/--force')} to overwrite it") from None
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
