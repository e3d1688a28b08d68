"""The lean backend's matrix products in each weight layout (float (out, in), int8 packed,
oneDNN-blocked), when blocking pays, and the MLP's activation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import ChitchatError


# A product of a few rows with a 768-wide weight is memory-bound. At one row MKL's GEMV on the
# (out, in) weight is about as fast as anything; from 2 rows on, oneDNN on weights reordered
# once into its blocked layout is much faster (small config, 8 rows: 33 vs 60 ms per decode
# step, bench/bench_chat.py --mmi; 2 and 3 rows: 33 vs 51-66 ms and 28 vs 65-71 ms, slower
# than 8 rows on the plain weights, on an AMD EPYC with avx512_bf16 and no AMX,
# docs/benchmarks.md). The blocked copy doubles the float weights in memory, so it is made
# only once a batch of that size is decoded. The hint is the row count the layout is tuned
# for; 8 served 4 to 32 rows best in that measurement. oneDNN's call costs ~45 us, more than
# a whole small product: at 8 rows, blocking loses below ~0.5M weights (256 wide: 0.5x),
# breaks even at 384 wide and wins from 512 (1.5x); those smaller matrices stay plain
# (bench/bench_blocked.py).
BLOCKED_MIN_ROWS = 2
_BLOCKED_HINT = 8
_BLOCKED_MIN_WEIGHT = 1 << 19


def activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    from transformers.activations import ACT2FN
    return ACT2FN[name]


def linear_params(m):
    """(weight (out, in), bias) for float layers; packed params for int8 ones."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, Conv1D):
        # A transposed copy: F.linear on an (out, in) weight is the fast single-row
        # product. Chatbot.from_pretrained converts its own model first (no copy).
        return (m.weight.t().contiguous(), m.bias)
    if type(m) is nn.Linear:
        return (m.weight, m.bias)
    packed = getattr(getattr(m, "_packed_params", None), "_packed_params", None)
    if packed is not None and getattr(m, "version", 4) >= 4:
        return packed
    raise ChitchatError(f"unsupported layer {type(m).__name__} for the fast backend")


def lin_float(x, p):
    return F.linear(x, p[0], p[1])


def lin_int8(x, p):
    # Same call as torch.ao's dynamic Linear.forward (reduce_range for x86/fbgemm),
    # without the module dispatch.
    return torch.ops.quantized.linear_dynamic(x, p, True)


def lin_blocked(x, p):
    if not p[0].is_mkldnn:  # a matrix too small to block (see _BLOCKED_MIN_WEIGHT)
        return F.linear(x, p[0], p[1])
    return torch.ops.mkldnn._linear_pointwise(x, p[0], p[1], "none", [], "")


def block_weight(p):
    """A float layer's (weight, bias) with the weight in oneDNN's blocked layout, or as it is
    when the matrix is too small for that to pay."""
    if p[0].numel() < _BLOCKED_MIN_WEIGHT:
        return p
    return (torch.ops.mkldnn._reorder_linear_weight(p[0], _BLOCKED_HINT), p[1])
