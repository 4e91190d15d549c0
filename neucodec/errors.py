"""Exception tree of neucodec: every failure a user can cause is one of these, with a one-line message."""
from __future__ import annotations


class NeucodecError(Exception):
    """Base class. The message is one line that says what went wrong and what to do."""


class WeightsUnavailable(NeucodecError):
    """A checkpoint or release package could not be found, downloaded or verified."""


class UnknownModel(NeucodecError):
    """A model name that is neither a known model nor an existing path."""


class UnsupportedAudio(NeucodecError):
    """Audio that cannot be read, or whose shape, rate or channel count does not fit the model."""


class UnsupportedSetting(NeucodecError, ValueError):
    """A setting the model or this neucodec does not offer: a bandwidth, an envelope table, an LM too small."""


class CorruptStream(NeucodecError):
    """An .ecdc file that is truncated, damaged or inconsistent."""


class UnsupportedFormatVersion(CorruptStream):
    """An .ecdc file written by a newer (or unknown) version of the format."""


class ModelMismatch(NeucodecError):
    """An .ecdc file that needs other weights than the ones given."""


class OutputError(NeucodecError):
    """An output that cannot or must not be written: it exists (no --force), equals the input, disk full."""


class DeviceUnavailable(NeucodecError):
    """A requested compute device (e.g. CUDA) that this machine does not have."""
