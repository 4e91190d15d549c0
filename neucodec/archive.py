"""Decode sides of earlier default models, shipped so that their files keep decoding after an upgrade.

A decode side is a release package without the encoder: the decoder, the codebooks and the LM of
the weights it stands in for, whose fingerprint (what their files carry) its JSON names (`decodes`),
with their `compatible` list. `write_decode_side` makes one from a release package
(`bin/archive_model.py`); `hub.load_codec_for`, `hub.load_lm_for` and `pipeline.get_codec` reach for one
(`stand_in`) when the installed model of a file's name cannot read it. Decode sides are looked for in the cache
folder's `archive/` and in the package's `models/archive/`.
"""
from __future__ import annotations

import json
import typing as tp
from pathlib import Path

from .weights import PACKAGED_DIR, cache_dir, package_info, sha256, write_package

ARCHIVE_DIR = PACKAGED_DIR / "archive"
#: What a decode side keeps of a release package's tensors.
KEPT = ("codec.decoder.", "codec.quantizer.", "lm.")


def folders() -> list[Path]:
    return [cache_dir() / "archive", ARCHIVE_DIR]


def find(name: str, fingerprint: str, part: str = "codec") -> Path | None:
    """The decode side (its JSON) of model `name` whose `part` ("codec" or "lm") reads the files of
    the weights `fingerprint`, or None."""
    for folder in folders():
        for path in sorted(folder.glob(f"{name}-*.json")):
            package = package_info(path)
            if package.name == name and fingerprint in (package.decodes, *package.compatible.get(part, ())):
                return path
    return None


def stand_in(model: tp.Any, name: str, fingerprint: str | None, part: str = "codec") -> Path | None:
    """The decode side to load instead of the loaded `model` (of the installed `name`) for a file of
    the weights `fingerprint`: None when `model` reads that file itself (`identity.reads`) or no
    decode side does."""
    from .identity import reads

    return None if fingerprint is None or reads(model, fingerprint) else find(name, fingerprint, part)


def write_decode_side(package: Path, folder: Path) -> Path:
    """Write the decode side of the release `package` into `folder` as `{name}-{fingerprint}.json` and
    `.safetensors`; its path."""
    from safetensors.torch import load_file

    info = package_info(package)
    fingerprint = sha256(info.weights)[:16]
    tensors = {k: v for k, v in load_file(str(info.weights)).items() if k.startswith(KEPT)}
    meta = json.loads(Path(package).read_text())
    stem = f"{info.name}-{fingerprint}"
    meta = {key: meta[key] for key in ("format", "version", "name", "codec", "lm", "compatible")
            if meta.get(key) is not None}
    meta.update(weights=f"{stem}.safetensors", decodes=fingerprint)
    return write_package(Path(folder), stem, tensors, meta)
