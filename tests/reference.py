"""Helpers to build the reference implementation (PyPI encodec==0.1.1) with random weights."""
from __future__ import annotations

import sys
import types

import pytest
import torch


def import_encodec() -> types.ModuleType:
    """Import the reference package without torchaudio.

    encodec 0.1.1 imports torchaudio at module level (encodec/utils.py, reached from
    encodec/__init__.py), only to resample and save audio, which we never call. torchaudio's wheel
    does not load with our torch, so an empty stand-in module lets the import succeed; model code,
    compress/decompress and the LM work without it.
    """
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    return pytest.importorskip("encodec")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and random (non-degenerate) codebooks, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("embed") or name.endswith("weight_v") or name.endswith(".weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 if name.endswith("embed") else 0.1))
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.01)
    return model.eval()


def reference_codec(name: str, seed: int = 0) -> torch.nn.Module:
    encodec = import_encodec()
    ctor = {"encodec_24khz": encodec.EncodecModel.encodec_model_24khz,
            "encodec_48khz": encodec.EncodecModel.encodec_model_48khz}[name]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return randomize(ctor(pretrained=False), seed)
