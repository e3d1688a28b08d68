"""The LM head and loss alone: chitchat's fused `head_loss` against the plain form.

    python bench/bench_head.py                      # widths 128 and 768, vocab 4386, bf16 and fp32
    python bench/bench_head.py --rows 1100 --widths 384 --vocab 13317 --dtypes bf16

One forward and backward of (targets x width) hidden states through a bias-free head of
`--vocab` outputs and the summed cross-entropy, as a training step runs it (bf16: under
autocast): `chitchat.loss.head_loss` (one autograd node that turns the logits into their
gradient in place, a few rows of fp32 at a time) against `cross_entropy(head(h).float())`.
The two alternate within each round; each figure is the median of --repeats timings, and
the rounds' ratios are printed side by side. The process sets its malloc up as train.py's
--allocator auto does, so fresh (targets x vocab) tensors are not what is measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain(hidden, head, targets):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def timed(fn, hidden, head, targets, amp, repeats: int) -> float:
    """Median seconds of one forward and backward."""
    times = []
    for _ in range(repeats):
        hidden.grad = head.weight.grad = None
        t = time.perf_counter()
        with amp:
            loss = fn(hidden, head, targets)
        loss.backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000, help="target positions (a step's N)")
    ap.add_argument("--widths", default="128,768", help="hidden sizes (tiny: 128, small: 768)")
    ap.add_argument("--vocab", type=int, default=4386)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    from chitchat.allocator import tune_allocator

    tune_allocator("auto")  # before torch is imported, as train.py does
    import torch
    from bench_train import hardware_line

    from chitchat.loss import head_loss

    print(f"{hardware_line()}; {args.rows} targets, vocab {args.vocab}; ms per forward and "
          f"backward, median of {args.repeats}")
    print(f"{'width':>5s} {'dtype':5s} {'round':>5s} {'plain ms':>9s} {'fused ms':>9s} "
          f"{'plain / fused':>13s}")
    for width in (int(w) for w in args.widths.split(",")):
        for dtype in args.dtypes.split(","):
            torch.manual_seed(0)
            head = torch.nn.Linear(width, args.vocab, bias=False)
            hidden = torch.randn(args.rows, width, requires_grad=True)
            targets = torch.randint(0, args.vocab, (args.rows,))
            amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
            ratios = []
            for r in range(args.rounds):
                p = timed(plain, hidden, head, targets, amp, args.repeats)
                f = timed(head_loss, hidden, head, targets, amp, args.repeats)
                ratios.append(p / f)
                print(f"{width:5d} {dtype:5s} {r + 1:5d} {p * 1e3:9.2f} {f * 1e3:9.2f} "
                      f"{p / f:12.2f}x", flush=True)
            print(f"{width:5d} {dtype:5s} median plain / fused {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
