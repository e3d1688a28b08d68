"""Draw a run's loss curves to a PNG.

    python -m chitchat.plot model/<run>             # writes model/<run>/loss.png
    python -m chitchat.plot model/<run> --out curves.png

Reads <run>/metrics.jsonl (written by train.py). Needs matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .utils import ChitchatError, run_cli


def read_metrics(run_dir: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) loss points by step. A resumed run logs some steps twice; the
    later record wins, as it is the one the final model descends from."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ChitchatError(f"no metrics.jsonl in {run_dir}; point at a run folder written "
                            "by train.py, e.g. model/<run>")
    train, valid = {}, {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChitchatError(f"{path}:{n}: not JSON ({e.msg})") from None
            if rec.get("event") == "train":
                train[rec["step"]] = rec["loss"]
            elif rec.get("event") == "eval":
                valid[rec["step"]] = rec["val_loss"]
    return sorted(train.items()), sorted(valid.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="run folder with metrics.jsonl")
    ap.add_argument("--out", default=None, help="PNG path (default: <run_dir>/loss.png)")
    args = ap.parse_args(argv)
    train, valid = read_metrics(args.run_dir)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ChitchatError("plotting needs matplotlib: pip install matplotlib "
                            f"(the numbers are in {Path(args.run_dir) / 'metrics.jsonl'})")
    out = Path(args.out) if args.out else Path(args.run_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(Path(args.run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
