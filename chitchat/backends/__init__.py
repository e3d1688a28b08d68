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
           "conv1d_to_linear", "load_for_decoding", "make_backend", "quantize_int8"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_backend(model, kind: str = "fast", pad_id: int = 0) -> Backend:
    if kind == "fast":
        return FastGPT2(model, pad_id)
    if kind == "hf":
        return HFDecoder(model, pad_id)
    raise ChitchatError(f"unknown backend {kind!r}; use fast or hf")


def load_for_decoding(path, vocab_path, dev: torch.device, dtype: str = "float32",
                      quantize: str | None = None, backend: str = "fast"):
    """(model, tokenizer) of a model folder on `dev`, prepared for decoding with `backend`.

    dtype: float32 | bfloat16 | float16. quantize: None | "int8" (CPU, float32).
    """
    from ..modeling import load_model

    if dtype not in DTYPES:
        raise ChitchatError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize not in (None, "int8"):
        raise ChitchatError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and (dev.type != "cpu" or dtype != "float32"):
        raise ChitchatError("--quantize int8 needs --device cpu and --dtype float32")
    model, tok = load_model(path, vocab_path=vocab_path, device=dev, dtype=DTYPES[dtype])
    if quantize == "int8":
        model = quantize_int8(model)
    elif backend == "fast":
        # The lean path wants (out, in) weights; converting the model we own (instead of
        # FastGPT2 keeping transposed copies) saves a second copy of every matrix. The
        # model computes the same; only its state_dict layout differs, so save from the
        # folder, not from the loaded model.
        conv1d_to_linear(model)
    return model, tok
