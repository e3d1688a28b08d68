"""Where oneDNN's blocked weights pay off: one GPT-2 matrix product, plain vs blocked.

    python bench/bench_blocked.py                 # widths 128..1024, 1 and 8 rows
    python bench/bench_blocked.py --rows 1 4 8 16 --repeats 7

The fast backend (chitchat/backends/kernels.py) multiplies by the plain (out, in) weight with
F.linear (MKL) for one row, and, once it decodes batches of 4 or more rows, by a copy of
the weight reordered into oneDNN's blocked layout. This times both on each matrix of a
GPT-2 block (qkv D x 3D, MLP D x 4D and 4D x D) and on the LM head (13,317 x D) for several
widths D, and prints plain / blocked (above 1: blocked is faster). The size threshold
`_BLOCKED_MIN_WEIGHT` and the row threshold `BLOCKED_MIN_ROWS` come from this table.
Medians of --repeats timings of --calls calls each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, calls: int, repeats: int) -> float:
    """Median microseconds per call."""
    for _ in range(max(3, calls // 10)):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384, 512, 768, 1024])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--vocab", type=int, default=13317)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        print("this torch build has no oneDNN: nothing to compare", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"microseconds per product, median of {args.repeats} x {args.calls} calls\n")
    print("| width | matrix (in x out) | weights | rows | plain (us) | blocked (us) | "
          "plain / blocked |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for d in args.widths:
            for name, (k, n) in (("qkv", (d, 3 * d)), ("mlp up", (d, 4 * d)),
                                 ("mlp down", (4 * d, d)), ("lm head", (d, args.vocab))):
                w, b = torch.randn(n, k), torch.randn(n)
                wb = torch.ops.mkldnn._reorder_linear_weight(w, 8)
                for m in args.rows:
                    x = torch.randn(m, k)
                    plain = timed(lambda: F.linear(x, w, b), args.calls, args.repeats)
                    blocked = timed(lambda: torch.ops.mkldnn._linear_pointwise(
                        x, wb, b, "none", [], ""), args.calls, args.repeats)
                    print(f"| {d} | {name} ({k} x {n}) | {w.numel() / 1e6:.2f}M | {m} | "
                          f"{plain:.0f} | {blocked:.0f} | {plain / blocked:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
