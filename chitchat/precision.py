"""Number formats of training and evaluation: --dtype auto, TF32, autocast, and which
attention kernel the chosen format gets."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .utils import ChitchatError


def cpu_has_fast_bf16() -> bool:
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def pick_dtype(name: str, device_type: str, gpu_bf16: bool, cpu_bf16: bool) -> str:
    """--dtype auto -> the fastest safe choice (pure). gpu_bf16: the GPU has bf16 tensor
    cores (Ampere and newer); V100 and T4 only emulate bf16, which is slow there and
    sends SDPA to its slowest kernel, so they get fp16 with a GradScaler."""
    if name != "auto":
        if name == "fp16" and device_type != "cuda":
            raise ChitchatError("--dtype fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
        return name
    if device_type == "cuda":
        return "bf16" if gpu_bf16 else "fp16"
    return "bf16" if cpu_bf16 else "fp32"


def resolve_dtype(name: str, device: torch.device) -> str:
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return pick_dtype(name, device.type, gpu_bf16,
                      device.type == "cpu" and cpu_has_fast_bf16())


def set_fp32_precision(device: torch.device, exact_fp32: bool) -> bool:
    """Let float32 matrix products on a GPU use TF32 (Ampere and newer; older cards ignore
    it): fp32 runs, and the float32 parts of mixed precision, run several times faster at
    a precision training does not notice. --exact_fp32 keeps full fp32. Returns whether
    TF32 was turned on."""
    if device.type != "cuda" or exact_fp32:
        return False
    # The legacy switch, not torch.backends.*.fp32_precision: mixing the two APIs makes
    # torch.get_float32_matmul_precision() raise, and torch.compile calls it.
    torch.set_float32_matmul_precision("high")
    return True


def autocast_ctx(dtype: str, device: torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16"
                          else torch.float16)


def attention_kernel(model, device: torch.device, amp) -> str:
    """The SDPA kernel that training's attention runs, found by running one small call
    shaped like it (a boolean block mask, the model's attention dropout, its head size,
    forward and backward) under the profiler: kernel choices differ by device, dtype, mask
    and dropout, and a silent fall to the math path costs a large share of a step."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    hd = cfg.n_embd // cfg.n_head
    q = torch.randn(1, cfg.n_head, 16, hd, device=device, requires_grad=True)
    k, v = torch.randn(2, 1, cfg.n_head, 16, hd, device=device)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=device).tril()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        with amp:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=cfg.attn_pdrop)
        out.float().sum().backward()
    names = sorted({e.key for e in prof.key_averages()
                    if e.key.startswith("aten::_scaled_dot_product_")
                    and not e.key.endswith("_backward")})
    return ", ".join(n.removeprefix("aten::") for n in names) or "unknown"
