"""Number formats of training and evaluation: --dtype auto, TF32, autocast, which
attention kernel the chosen format gets, and which library computes CPU float32 products."""
from __future__ import annotations

import contextlib
import math

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


# ---- which library computes float32 products on a CPU ---------------------------------------
# PyTorch sends CPU float32 products to BLAS (MKL in the pip wheels) unless oneDNN may use
# bf16 inside them: `torch.backends.mkldnn.matmul.fp32_precision = "bf16"` routes mm, addmm
# and bmm, forward and backward, to oneDNN, which may then use bf16 (on CPUs with AMX: what
# the switch is for) and on the CPU measured computed in full fp32. MKL is tuned for
# Intel's CPUs; on the AMD CPU of docs/benchmarks.md a whole fp32 training step ran
# 1.18x-1.50x faster with oneDNN's products. So auto takes oneDNN on AMD CPUs, after a
# check that the switch really moves the products and that they stay full fp32. The rule
# is fixed, not timed at start, so that the same command gives the same numbers every time.
EXACT_REL_ERROR = 1e-4  # the check's product errs 2.5e-7 (MKL), 4.1e-7 (oneDNN), 2.9e-3 (bf16)
ONEDNN_VENDORS = ("AuthenticAMD",)  # where oneDNN was measured faster; elsewhere BLAS


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: the rule falls back to BLAS
        pass
    return "unknown"


def pick_fp32_matmul(name: str, device_type: str, dtype: str, exact_fp32: bool,
                     vendor: str, probe, kept: str | None = None) -> str:
    """--fp32_matmul auto|blas|onednn -> "blas" or "onednn" (pure but for `probe`, called
    only when the answer depends on it and returning (whether oneDNN takes the products,
    its relative error)). Only CPU runs in fp32 are concerned; --exact_fp32 asks for no
    switch that could lower precision anywhere, so it keeps BLAS. `kept`: the library a
    resumed run started with, which auto keeps (its losses go on as they would have)."""
    if name == "onednn" and exact_fp32:
        raise ChitchatError("--fp32_matmul onednn and --exact_fp32 exclude each other")
    if name == "auto":
        want = kept or ("onednn" if vendor in ONEDNN_VENDORS else "blas")
    else:
        want = name
    if device_type != "cpu" or dtype != "fp32" or exact_fp32 or want == "blas":
        return "blas"
    routed, err = probe()
    if routed and err <= EXACT_REL_ERROR:
        return "onednn"
    if name == "onednn":
        raise ChitchatError(
            "--fp32_matmul onednn: " + (f"oneDNN's float32 products on this CPU are not "
                                        f"exact fp32 (relative error {err:.1e}: it uses "
                                        "bf16 inside)" if routed else
                                        "this PyTorch build or CPU keeps float32 products "
                                        "on BLAS") + "; use --fp32_matmul blas")
    return "blas"


@contextlib.contextmanager
def fp32_matmul(library: str):
    """CPU float32 products from `library` ("onednn" or "blas") inside the block; the
    process's setting is restored after. "blas" leaves the setting alone: touching it
    beside torch.set_float32_matmul_precision (the TF32 switch on GPUs) would make
    torch.get_float32_matmul_precision(), which torch.compile calls, raise."""
    if library != "onednn":
        yield
        return
    knob = torch.backends.mkldnn.matmul
    old = knob.fp32_precision
    knob.fp32_precision = "bf16"
    try:
        yield
    finally:
        knob.fp32_precision = old


def probe_onednn_fp32() -> tuple[bool, float]:
    """(whether the switch moves float32 products off BLAS, oneDNN's relative error against
    float64); milliseconds, and the same answer on every call on one machine. The inner
    size is long enough for the two libraries to sum in different orders (at 64 and 128
    their results were bit-equal here, so equality would not show which one ran)."""
    if not torch.backends.mkldnn.is_available():
        return False, math.inf
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g)
    w = torch.randn(1024, 1024, generator=g) / 32
    blas = x @ w
    with fp32_matmul("onednn"):
        got = x @ w
    ref = x.double() @ w.double()
    return not torch.equal(got, blas), float((got.double() - ref).norm() / ref.norm())
