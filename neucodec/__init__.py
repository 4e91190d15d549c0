"""neucodec: an EnCodec-compatible neural audio codec (library and command-line tool)."""
from __future__ import annotations

__version__ = "0.17.0"

from .config import CodecConfig, LMConfig, RVQConfig, SEANetConfig  # noqa: E402
from .errors import NeucodecError  # noqa: E402
from .hub import load_codec, load_lm  # noqa: E402
from .model import Codec, EncodedAudio  # noqa: E402
from .pipeline import decode_file, encode_file  # noqa: E402

__all__ = ["__version__", "Codec", "CodecConfig", "EncodedAudio", "LMConfig", "NeucodecError",
           "RVQConfig", "SEANetConfig", "decode_file", "encode_file", "load_codec", "load_lm"]
