"""Make a CPU with AVX-512 and bf16 look like an AVX2-only one to torch's checks, for the
benches: with this folder on PYTHONPATH (Python imports sitecustomize at start, in every
child process too) and the libraries limited by their own switches,

    PYTHONPATH=bench/imitate_avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        ONEDNN_MAX_CPU_ISA=AVX2 python bench/bench_train.py --repeats 3 --steps 4

`--dtype auto` picks fp32 (no fast bf16) and `--fp32_matmul auto` keeps BLAS (no oneDNN),
as on a CPU without AVX-512, where PyTorch does not route float32 products to oneDNN. It
imitates the libraries, not the machine: clock, caches and numpy's own BLAS stay as they
are. Not for training runs: it replaces private torch functions.
"""
import torch
import torch.backends.mkldnn

torch.cpu._is_avx512_bf16_supported = lambda: False
torch.cpu._is_amx_tile_supported = lambda: False
torch.backends.mkldnn.is_available = lambda: False
