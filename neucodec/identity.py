"""Which weights a stream needs: model ids and fingerprints, and the check, with advice, that weights read a file."""
from __future__ import annotations

import hashlib
import typing as tp

import torch

from .errors import CorruptStream, ModelMismatch, option
from .lm import LanguageModel
from .model import Codec

if tp.TYPE_CHECKING:
    from .streamspec import StreamInfo


def model_identity(model: torch.nn.Module) -> tuple[str, str]:
    """(model_id, fingerprint) of a codec or LM: attributes set by `neucodec.hub`, else derived.

    A model built in code (tests, training) gets the id of its config and a fingerprint from the
    SHA-256 of its state_dict, computed once and cached on the module.
    """
    mid = getattr(model, "model_id", None)
    fp = getattr(model, "fingerprint", None)
    if mid is not None and fp is not None:
        return str(mid), str(fp)
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    mid = mid or getattr(cfg, "name", None) or type(model).__name__.lower()
    fp = "sd:" + h.hexdigest()[:16]
    model.model_id = mid  # type: ignore[assignment]
    model.fingerprint = fp  # type: ignore[assignment]
    return str(mid), fp


def reads(model: torch.nn.Module, wanted: str | None) -> bool:
    """Whether the model holds (or, by its `compatible` list, reads) the file's weights `wanted` (a
    fingerprint; None: any)."""
    return wanted is None or wanted == model_identity(model)[1] or wanted in getattr(model, "compatible", ())


def check_weights(model: torch.nn.Module, kind: tp.Literal["model", "LM"], name: str | None,
                  wanted: str | None) -> str:
    """The model's id, after checking it reads the file's weights `wanted` (`reads`). ModelMismatch
    names the release or weights that read the file."""
    mid, fp = model_identity(model)
    if reads(model, wanted):
        return mid
    what = "encoded" if kind == "model" else "entropy-coded"
    release = getattr(model, "earlier", {}).get(wanted)
    if release:  # an earlier default model
        advice = (f"it is neucodec {release.get('neucodec', '?')}'s default model: decode with that release, or pass "
                  f"its weights (repository commit {release.get('commit', '?')}) with {option('--model')}")
    elif name == mid:  # same name: an earlier release
        advice = f"use the neucodec version that wrote it, or pass those weights with {option('--model')}"
    else:
        advice = f"the given {kind} is {mid}; pass the matching weights"
    raise ModelMismatch(f"this file was {what} with {kind} {name} (weights {wanted}), which these weights "
                        f"({fp}) cannot read; {advice}")


def resolve_codec(codec: Codec | None, info: StreamInfo) -> Codec:
    """The codec that decodes the stream: `codec`, checked, or the one its header names (`hub.load_codec`)."""
    if codec is None:
        from .hub import load_codec_for
        codec = load_codec_for(info.model_id, info.model_fingerprint)
    mid = check_weights(codec, "model", info.model_id, info.model_fingerprint)
    if (codec.sample_rate, codec.channels, codec.hop_length) != (info.sample_rate, info.channels, info.hop_length) \
            or codec.n_q < info.n_q:
        raise ModelMismatch(f"this file needs a {info.sample_rate} Hz, {info.channels}-channel model with hop "
                            f"{info.hop_length} and {info.n_q} codebooks ({info.model_id}); got {mid}")
    return codec


def resolve_lm(lm: LanguageModel | None, info: StreamInfo) -> LanguageModel:
    """The LM that decodes the stream's LM-coded segments: `lm`, checked, or the one its header names."""
    if info.lm_id is None:
        raise CorruptStream("a segment is LM-coded but the header names no LM (file damaged)")
    if lm is None:
        from .hub import load_lm_for
        lm = load_lm_for(info.lm_id, info.lm_fingerprint)
    check_weights(lm, "LM", info.lm_id, info.lm_fingerprint)
    return lm
