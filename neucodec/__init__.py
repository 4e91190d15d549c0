"""neucodec: an EnCodec-compatible neural audio codec (library and command-line tool).

The names below and every submodule (`neucodec.ecdc`, `neucodec.pipeline`, ...) are imported on first
use, so `import neucodec` and the command line's `--help`, `info` and `models` do not load torch.
"""
from __future__ import annotations

import importlib
import pkgutil
import typing as tp

__version__ = "0.17.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "CodecConfig": "config", "LMConfig": "config", "RVQConfig": "config", "SEANetConfig": "config",
    "NeucodecError": "errors", "load_codec": "hub", "load_lm": "hub", "Codec": "model", "EncodedAudio": "model",
    "decode_file": "pipeline", "encode_file": "pipeline",
}
__all__ = ["__version__", "Codec", "CodecConfig", "EncodedAudio", "LMConfig", "NeucodecError",
           "RVQConfig", "SEANetConfig", "decode_file", "encode_file", "load_codec", "load_lm"]

if tp.TYPE_CHECKING:
    from . import ecdc, pipeline  # noqa: F401
    from .config import CodecConfig, LMConfig, RVQConfig, SEANetConfig  # noqa: F401
    from .errors import NeucodecError  # noqa: F401
    from .hub import load_codec, load_lm  # noqa: F401
    from .model import Codec, EncodedAudio  # noqa: F401
    from .pipeline import decode_file, encode_file  # noqa: F401


def __getattr__(name: str) -> tp.Any:
    """Import an exported name's module, or a submodule, when it is first asked for."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _submodules():
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def _submodules() -> set[str]:
    """The package's modules (`neucodec.train`, the training code, is imported explicitly)."""
    return {m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg and not m.name.startswith("_")}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _submodules())
