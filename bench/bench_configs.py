"""Which model config fits which time budget: params, real tokens/s of train.py as users run
it (its default flags), and hours per epoch of a corpus, for every config in config/.

    python bench/bench_configs.py                    # chitchat50w_slice, 8 steps per config
    python bench/bench_configs.py --steps 12 --repeats 3

Each config trains in a fresh `train.py` process for --steps optimizer steps; the speed is
the median of the logged tokens/s after the first step (which pays for warm-up), and the
median of --repeats such runs. Hours per epoch = real tokens of one epoch / that speed.
The README's config table comes from this script's output.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chitchat.batching import build_windows  # noqa: E402
from chitchat.config import PreprocessConfig  # noqa: E402
from chitchat.preprocessing import preprocess  # noqa: E402
from chitchat.store import TokenStore  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "chitchat50w_slice" / "train.txt"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = [f for f in ("amx_tile", "avx512_bf16", "avx512f", "avx2") if f" {f}" in text]
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines()
                  if l.startswith("model name")), "?")
    return f"{model}; flags: {' '.join(flags) or 'none of amx_tile/avx512_bf16/avx512f/avx2'}"


def params_of(config: Path, vocab: int) -> int:
    c = json.loads(config.read_text())
    d, n, L = c["n_embd"], c["n_positions"], c["n_layer"]
    return vocab * d + n * d + L * (12 * d * d + 13 * d) + 2 * d


def speed(store: Path, config: Path, steps: int, work: Path) -> float:
    """Median logged real tokens/s of steps 2..N of one train.py process."""
    run = work / "runs"
    name = config.stem
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--train_path", str(store),
                    "--model_config", str(config), "--save_model_path", str(run),
                    "--run_name", name, "--max_steps", str(steps), "--log_step", "1",
                    "--eval_interval", "0", "--save_interval", str(steps + 1), "--quiet"],
                   check=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    recs = [json.loads(l) for l in (run / name / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in recs if r["event"] == "train" and r["step"] > 1]
    subprocess.run(["rm", "-rf", str(run / name)], check=True)
    return statistics.median(tps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train_path", default=str(DEFAULT_CORPUS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--configs", nargs="*",
                    default=[str(p) for p in sorted((ROOT / "config").glob("*.json"))])
    args = ap.parse_args()
    if not Path(args.train_path).is_file():
        sys.exit(f"no corpus at {args.train_path} (the shared corpora are beside the project)")
    print(f"cpu: {cpu_flags()}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store_dir = work / "store"
        preprocess(PreprocessConfig(train_path=args.train_path, save_path=str(store_dir),
                                    quiet=True))
        store = TokenStore(store_dir)
        # train.py's default --max_len 150 windows over the training split
        epoch_tokens = int(build_windows(store, store.train_indices(), 150).lengths.sum())
        print(f"corpus {Path(args.train_path).parent.name}: {len(store):,} dialogues, "
              f"{epoch_tokens:,} real tokens per epoch; vocab {store.vocab_size:,}; "
              f"{args.steps} steps per run, median of {args.repeats} run(s)")
        print("| config | params | real tok/s | hours per epoch |")
        print("|---|---:|---:|---:|")
        for c in map(Path, args.configs):
            s = statistics.median(speed(store_dir, c, args.steps, work)
                                  for _ in range(args.repeats))
            print(f"| {c.name} | {params_of(c, store.vocab_size) / 1e6:.1f}M | {s:,.0f} | "
                  f"{epoch_tokens / s / 3600:.2f} |", flush=True)


if __name__ == "__main__":
    main()
