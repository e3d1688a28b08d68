"""Weight conversions done once after loading a model.

`quantize_int8` converts GPT-2's Conv1D layers to nn.Linear (torch.ao's dynamic quantization
only knows nn.Linear, so on a stock GPT-2 it silently does nothing) and then applies dynamic
int8 quantization with per-channel weight scales.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..utils import ChitchatError


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers Conv1D in `model` by an equivalent nn.Linear, in place.

    Conv1D computes ``x @ W + b`` with W of shape (in, out); nn.Linear stores W transposed.
    """
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.nx, child.nf, bias=child.bias is not None,
                                device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every Linear layer (including the LM head), in place.

    Weights are int8 with one scale per output channel; activations are quantized per call.
    The embeddings stay float32, so the LM head gets its own int8 copy of the tied weight.
    CPU only (fbgemm/x86 kernels).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if next(model.parameters()).device.type != "cpu":
        raise ChitchatError("--quantize int8 runs on CPU only; add --device cpu")
    conv1d_to_linear(model)
    model.float()
    with warnings.catch_warnings():
        # torch 2.13 announces that eager-mode quantization will move to torchao; the API
        # still works and is what the pinned torch ships. Only that notice is silenced.
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", message=r"(?s).*migrat.*torchao.*")
        warnings.filterwarnings("ignore", message=r"(?s).*_per_tensor.*|.*quantize_per_tensor.*")
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                         inplace=True)
    return model
