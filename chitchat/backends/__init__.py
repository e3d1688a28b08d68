"""Inference backends: run a GPT-2 model one token at a time with a KV cache.

Two backends share one small interface (base.py: `start`, `step`, `reorder`, ...), so the
decoding loop in generation.py does not care which one runs: `FastGPT2` (fast.py, the
default; its matrix products per weight layout in kernels.py) and `HFDecoder` (hf.py,
transformers' own forward, the reference). weights.py converts and quantizes weights.
"""
from __future__ import annotations

import torch

from ..utils import ChitchatError
from .base import Backend, DecodeState
from .fast import FastGPT2, RowCache
from .hf import HFDecoder
from .weights import conv1d_to_linear, quantize_int8

__all__ = ["DTYPES", "Backend", "DecodeState", "FastGPT2", "HFDecoder", "RowCache",
           "conv1d_to_linear", "make_backend", "quantize_int8"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_backend(model, kind: str = "fast", pad_id: int = 0) -> Backend:
    if kind == "fast":
        return FastGPT2(model, pad_id)
    if kind == "hf":
        return HFDecoder(model, pad_id)
    raise ChitchatError(f"unknown backend {kind!r}; use fast or hf")
