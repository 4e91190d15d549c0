"""Exception tree of neucodec: every failure a user can cause is one of these, with a one-line message.

A message that names a setting names it as the caller gave it: `force=True` from Python, `-f/--force`
from the `neucodec` command (`option`, `command_line`).
"""
from __future__ import annotations

import contextlib
import contextvars
import typing as tp

#: a setting's name on the command line -> how Python code passes it
_PYTHON = {"-f/--force": "force=True", "-m/--model": "model=", "--model": "model=", "--device": "device=",
           "--subtype": "subtype=", "--no-lm": "use_lm=False", "--no-envelope": "envelope=False",
           "--salvage": "salvage=True", "-b": "bandwidth="}
_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("neucodec_command_line", default=False)


def option(flag: str, value: str | float | None = None) -> str:
    """A setting as a message names it: `flag` (e.g. "-f/--force", "--device" with value "cpu") while
    the `neucodec` command runs, else the Python argument ("force=True", "device='cpu'")."""
    if _COMMAND_LINE.get():
        return flag if value is None else f"{flag} {value}"
    python = _PYTHON[flag]
    return python if value is None else f"{python}{value!r}"


@contextlib.contextmanager
def command_line(active: bool = True) -> tp.Iterator[None]:
    """Within this block, messages name settings as command-line options (`option`)."""
    token = _COMMAND_LINE.set(active)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def in_command_line() -> bool:
    """Whether messages name settings as command-line options now (for worker processes to inherit)."""
    return _COMMAND_LINE.get()


class NeucodecError(Exception):
    """Base class. The message is one line that says what went wrong and what to do."""


class WeightsUnavailable(NeucodecError):
    """A checkpoint or release package could not be found, downloaded or verified."""


class UnknownModel(NeucodecError):
    """A model name that is neither a known model nor an existing path."""


class UnsupportedAudio(NeucodecError):
    """Audio that cannot be read, or whose shape, rate or channel count does not fit the model."""


class UsageError(NeucodecError):
    """A request that cannot work as made, whatever the input: the command line exits 2 for it."""


class UnsupportedSetting(UsageError, ValueError):
    """A setting the model or this neucodec does not offer: a bandwidth, an envelope table, an LM too small,
    a device name."""


class CorruptStream(NeucodecError):
    """An .ecdc file that is truncated, damaged or inconsistent."""


class DamagedStream(CorruptStream):
    """Damage confined to part of an .ecdc file (a segment, a record head, the end record, a cut-off
    tail): strict decoding stops there, salvage decoding goes on around it. `segment` and `offset`
    (byte) say where it starts, `reason` what was found there; `located` whether the message already
    names the span in seconds (`neucodec.salvage.located`)."""

    def __init__(self, message: str, segment: int | None = None, offset: int | None = None,
                 reason: str = "", located: bool = False) -> None:
        super().__init__(message)
        self.segment, self.offset, self.reason, self.located = segment, offset, reason, located


class UnsupportedFormatVersion(CorruptStream):
    """An .ecdc file written by a newer (or unknown) version of the format."""


class ModelMismatch(NeucodecError):
    """An .ecdc file that needs other weights than the ones given."""


class OutputError(NeucodecError):
    """An output that cannot or must not be written: it exists (no --force), equals the input, disk full."""


class DeviceUnavailable(NeucodecError):
    """A requested compute device (e.g. CUDA) that this machine does not have."""
