"""Build ready-to-use models from a name or path, on a device: `load_codec`, `load_lm`, `pick_device`."""
from __future__ import annotations

import os

import torch

from . import archive
from .errors import DeviceUnavailable, UnsupportedSetting, WeightsUnavailable, option
from .lm import LanguageModel
from .model import Codec
from .weights import DEFAULT_MODEL, LM_FOR, Weights, load_weights, resolve


def _load(name_or_path: str | os.PathLike[str] | None) -> Weights:
    return load_weights(resolve(DEFAULT_MODEL if name_or_path is None else name_or_path))


def _strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise WeightsUnavailable(f"{what} does not match its architecture ({first[:200]})") from None


def load_codec(name_or_path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> Codec:
    """The codec for a model name (`neucodec_24khz`, `encodec_24khz`, `encodec_48khz`) or a path.

    Returns a `Codec` in inference mode (eval, weight norm folded) on `device`, with `.model_id`
    and `.fingerprint` identifying its weights, and `.compatible`, the fingerprints of earlier weights
    whose files it also decodes (`weights.lineage`), `.earlier`, the releases of earlier default
    models by fingerprint (for the advice when a file is not readable), `.envelope_table`, the
    envelope correction its package opts in to (or None), `.default_bandwidth`, the bandwidth its
    package asks for when none is given (or None), and the package's rate control settings
    `.operating_points` and `.default_kbps` (`neucodec.rate`). None loads the packaged default model.
    """
    weights = _load(name_or_path)
    if weights.codec_config is None:
        raise WeightsUnavailable(f"{weights.source} holds LM weights, not a codec; pass a codec checkpoint")
    codec = Codec(weights.codec_config)
    state = weights.state
    if weights.decode_only:  # no encoder: it keeps its initial weights, and the writer refuses the codec
        state = {**{k: v for k, v in codec.state_dict().items() if k.startswith("encoder.")}, **state}
    _strict(codec, state, str(weights.source))
    codec.prepare_for_inference().to(device)
    codec.model_id = weights.name  # type: ignore[assignment]
    codec.fingerprint = weights.fingerprint  # type: ignore[assignment]
    codec.compatible = frozenset(weights.compatible.get("codec", ()))  # type: ignore[assignment]
    codec.earlier = weights.earlier  # type: ignore[assignment]
    codec.envelope_table = weights.envelope  # type: ignore[assignment]
    codec.default_bandwidth = weights.default_bandwidth  # type: ignore[assignment]
    codec.operating_points = weights.operating_points  # type: ignore[assignment]
    codec.default_kbps = weights.default_kbps  # type: ignore[assignment]
    codec.decode_only = weights.decode_only  # type: ignore[assignment]
    return codec


def load_codec_for(name: str, fingerprint: str | None, device: str | torch.device = "cpu") -> Codec:
    """The codec that decodes a file of model `name` whose weights were `fingerprint`: the installed
    `name` when it reads them, else an earlier default's decode side (`neucodec.archive`) that does,
    else the installed one (whose check then says which release reads the file)."""
    codec = load_codec(name, device)
    side = archive.stand_in(codec, name, fingerprint)
    return codec if side is None else load_codec(side, device)


def load_lm(name_or_path: str | os.PathLike[str] | None = None) -> LanguageModel:
    """The entropy-coding LM: for a codec name (its LM), an LM checkpoint, or a release package.

    Always on the CPU in float32 so that coded files decode anywhere.
    """
    key = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    weights = _load(LM_FOR.get(key, name_or_path))
    if weights.lm_config is None or weights.lm_state is None:
        raise WeightsUnavailable(f"{weights.source} has no entropy-coding LM; encode with {option('--no-lm')}")
    lm = LanguageModel(weights.lm_config)
    _strict(lm, weights.lm_state, str(weights.source))
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.model_id = weights.name  # type: ignore[assignment]
    lm.fingerprint = weights.fingerprint  # type: ignore[assignment]
    lm.compatible = frozenset(weights.compatible.get("lm", ()))  # type: ignore[assignment]
    lm.earlier = weights.earlier  # type: ignore[assignment]
    return lm


def load_lm_for(name: str, fingerprint: str | None) -> LanguageModel:
    """`load_codec_for` for the entropy-coding LM."""
    lm = load_lm(name)
    side = archive.stand_in(lm, name, fingerprint, "lm")
    return lm if side is None else load_lm(side)


def pick_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.

    Raises UnsupportedSetting for a name that is none of these, DeviceUnavailable for a GPU this
    machine does not have.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    given, cpu, auto = option("--device", spec), option("--device", "cpu"), option("--device", "auto")
    if spec == "cuda" or spec.startswith("cuda:"):
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise UnsupportedSetting(f"{given} is not a device name; use cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"{given}: CUDA is not available here (no GPU, or torch built without CUDA); "
                                    f"use {cpu} or {auto}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"{given}: this machine has {torch.cuda.device_count()} GPU(s), "
                                    f"numbered 0 to {torch.cuda.device_count() - 1}")
        return device
    raise UnsupportedSetting(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
