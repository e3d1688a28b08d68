"""Training throughput and packing quality, measured side by side in one run.

    # speed: real (non-pad) tokens/s of the fast path vs the classic GPT2-chitchat loop on
    # the small config, and MFU against the fp32 and bf16 matmul peaks measured here
    python bench/bench_train.py --train_path ../shared/corpora/chitchat50w_slice/train.txt
    python bench/bench_train.py --repeats 5 --steps 8           # final figures (quiet machine)

    # quality: validation loss of --batching pack vs the classic padded batches at the same
    # token budget (tiny config, one epoch of the corpus, both through train.py)
    python bench/bench_train.py --mode quality

    # profile: the top operators of one optimizer step, per dtype
    python bench/bench_train.py --mode profile --dtypes fp32,bf16 --steps 2

    # dropout: attention dropout 0.1 vs 0 at the same token budget (validation loss)
    python bench/bench_train.py --mode dropout --config model_config_dialogue_middle.json

--train_path takes a train.txt (preprocessed once into --work) or a token store.
The classic loop: fp32, batches of 8 dialogues cut to --max_len and padded to the longest,
labels -100 on padding, loss = mean over the batch, clip every micro-batch, loss.item()
every step. The fast path is chitchat.training: whole-dialogue windows packed into rows of
--pack_len with a block-diagonal mask, LM head only on target positions, one clip per
step, bf16 autocast (and fp32 for comparison), optional --compile.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chitchat.batching import build_windows, collate_rows, pack_rows  # noqa: E402
from chitchat.config import PreprocessConfig  # noqa: E402
from chitchat.loss import LossModel  # noqa: E402
from chitchat.modeling import build_model, load_config  # noqa: E402
from chitchat.precision import autocast_ctx  # noqa: E402
from chitchat.preprocessing import preprocess  # noqa: E402
from chitchat.store import TokenStore  # noqa: E402
from chitchat.train_setup import param_groups  # noqa: E402
from chitchat.training import train_step  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "chitchat50w_slice" / "train.txt"


def get_store(path: str, work: Path) -> TokenStore:
    p = Path(path)
    if (p / "meta.json").is_file():
        return TokenStore(p)
    if not p.is_file():
        sys.exit(f"no corpus or token store at {p}; pass --train_path")
    out = work / (p.parent.name + "-" + p.stem)
    if not (out / "meta.json").is_file():
        preprocess(PreprocessConfig(train_path=str(p), save_path=str(out), quiet=True))
    return TokenStore(out)


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> float:
    """Median FLOP/s of an n x n x n matmul (the best case for the hardware)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        times.append((time.perf_counter() - t) / 5)
    return 2 * n ** 3 / statistics.median(times)


def flops_per_token(model, context: float, lm_head_share: float) -> float:
    """Training FLOPs per token: 6 x matmul params (+ the LM head for the share of tokens
    that go through it) + attention 12 * layers * width * context (PaLM's formula, context =
    the mean window length the tokens attend within)."""
    cfg = model.config
    emb = cfg.vocab_size * cfg.n_embd + cfg.n_positions * cfg.n_embd
    body = sum(p.numel() for p in model.transformer.parameters()) - emb
    head = cfg.vocab_size * cfg.n_embd
    return 6 * (body + head * lm_head_share) + 12 * cfg.n_layer * cfg.n_embd * context


def classic_batches(store, idx, max_len, batch, rng):
    """GPT2-chitchat: shuffled dialogues cut to max_len, 8 per batch, padded to longest."""
    order = rng.permutation(idx)
    for s in range(0, len(order) - batch + 1, batch):
        seqs = [store.dialogue(int(d))[:max_len].astype(np.int64) for d in order[s:s + batch]]
        T = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.from_numpy(x)
            labels[i, :len(x)] = torch.from_numpy(x)
        yield ids, labels, sum(len(x) for x in seqs)


def time_classic(store, config_path, args, rng) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(load_config(config_path, store.tokenizer())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-8)
    batches = classic_batches(store, store.train_indices(), args.max_len, 8, rng)
    results = []
    for r in range(args.repeats + 1):  # the first repeat warms up
        tokens, t = 0, time.perf_counter()
        for _ in range(args.steps):
            ids, labels, n = next(batches)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            opt.step()
            opt.zero_grad()
            loss.item()
            tokens += n
        if r:
            results.append(tokens / (time.perf_counter() - t))
    return statistics.median(results), 1.0


def time_fast(store, config_path, args, dtype: str, rng) -> tuple[float, float, float]:
    """(real tokens/s, mean window length, share of tokens through the LM head)."""
    torch.manual_seed(0)
    tok = store.tokenizer()
    model = build_model(load_config(config_path, tok)).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, eps=1e-8)
    runner = LossModel(model)
    if args.compile:
        runner = torch.compile(runner)
    table = build_windows(store, store.train_indices(), args.max_len)
    rows = pack_rows(rng.permutation(len(table)), table.lengths, args.pack_len)
    amp = autocast_ctx(dtype, torch.device("cpu"))
    per_step = args.fast_batch * args.accum
    pos = 0
    results, tgt, toks = [], 0, 0
    for r in range(args.repeats + 1 + bool(args.compile)):
        tokens, t = 0, time.perf_counter()
        for _ in range(args.steps):
            micro = [collate_rows(store, table, rows[pos + a * args.fast_batch:
                                                     pos + (a + 1) * args.fast_batch],
                                  tok.pad_id, args.pack_len) for a in range(args.accum)]
            pos += per_step
            n_t = sum(len(m["target_ids"]) for m in micro)
            train_step(runner, None, model, opt, micro, n_t, 1, amp, None, 2.0,
                       torch.device("cpu"))
            n = sum(m["n_tokens"] for m in micro)
            tokens += n
            tgt, toks = tgt + n_t, toks + n
        if r > bool(args.compile):
            results.append(tokens / (time.perf_counter() - t))
    return statistics.median(results), float(table.lengths.mean()), tgt / toks


def speed(args):
    work = Path(args.work)
    store = get_store(args.train_path, work)
    cfg = ROOT / "config" / "model_config_dialogue_small.json"
    torch.manual_seed(0)
    probe = build_model(load_config(cfg, store.tokenizer()))
    threads = torch.get_num_threads()
    print(f"corpus {store.path} ({len(store)} dialogues), small config, {threads} threads, "
          f"torch {torch.__version__}, AMX {torch.cpu._is_amx_tile_supported()}, "
          f"avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}")
    peak32 = matmul_peak(torch.float32, args.gemm, args.repeats)
    peak16 = matmul_peak(torch.bfloat16, args.gemm, args.repeats)
    print(f"matmul peak ({args.gemm}^3): fp32 {peak32 / 1e9:.1f} GFLOP/s, "
          f"bf16 {peak16 / 1e9:.1f} GFLOP/s ({peak16 / peak32:.2f}x)")
    rng = np.random.default_rng(0)
    classic, _ = time_classic(store, cfg, args, rng)
    lens = np.minimum(store.lengths()[store.train_indices()], args.max_len)
    f_classic = flops_per_token(probe, float(lens.mean()), 1.0)
    print(f"classic  fp32, 8 dialogues padded, clip per micro-batch: {classic:8.1f} real "
          f"tok/s  MFU {classic * f_classic / peak32:6.1%} of fp32 peak")
    rows = []
    for dtype in args.dtypes.split(","):
        tps, ctx, share = time_fast(store, cfg, args, dtype, rng)
        f = flops_per_token(probe, ctx, share)
        rows.append((dtype, tps))
        print(f"fast     {dtype}, packed rows of {args.pack_len} x {args.fast_batch}"
              f"{' compiled' if args.compile else ''}: {tps:8.1f} real tok/s  "
              f"{tps / classic:5.2f}x classic  MFU {tps * f / peak32:6.1%} of fp32 peak, "
              f"{tps * f / peak16:6.1%} of bf16 peak")
    best_dtype, best = max(rows, key=lambda r: r[1])
    print(f"best fast path: {best_dtype}, {best / classic:.2f}x the classic loop "
          f"(target >= 6x)")


def quality(args):
    """Both paths through train.py, same corpus, config, lr and token budget; validation
    on the same held-out dialogues (the store's split)."""
    work = Path(args.work)
    store = get_store(args.train_path, work)
    cfg = ROOT / "config" / "model_config_dialogue_tiny.json"
    runs = work / "quality-runs"
    budget = int(store.lengths()[store.train_indices()].sum() * args.epochs_q)
    common = ["--train_path", str(store.path), "--model_config", str(cfg),
              "--save_model_path", str(runs), "--max_len", str(args.max_len),
              "--lr", "1e-3", "--warmup_steps", "100", "--dtype", "fp32", "--quiet",
              "--log_step", "50", "--save_interval", "100000", "--device", "cpu"]
    # the same tokens per optimizer step: 8 padded dialogues (8 x mean length) vs packed
    # rows filled to about the same count; a second classic seed measures the noise
    tok_per_step = 8 * float(store.lengths()[store.train_indices()].mean())
    pack_len = max(args.max_len, int(tok_per_step / 2 / 0.97))
    variants = {
        "classic": ["--batching", "pad", "--batch_size", "8", "--seed", "42"],
        "classic-seed2": ["--batching", "pad", "--batch_size", "8", "--seed", "43"],
        "packed": ["--batching", "pack", "--batch_size", "2", "--pack_len", str(pack_len),
                   "--seed", "42"],
    }
    steps = int(budget / tok_per_step)
    curves = {}
    for name, extra in variants.items():
        out = runs / name
        if out.exists():
            import shutil
            shutil.rmtree(out)
        # packed rows hold ~97% real tokens: a few more steps give the same token budget
        n = steps if name != "packed" else int(budget / (2 * pack_len * 0.97))
        cmd = [sys.executable, str(ROOT / "train.py"), *common, *extra, "--run_name", name,
               "--max_steps", str(n), "--eval_interval", str(max(1, n // 8))]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["tokens"], r["val_loss"]) for r in recs if r["event"] == "eval"]
        print(f"{name}: {n} steps in {time.perf_counter() - t:.0f}s", flush=True)
    print(f"\nvalidation loss by training tokens seen (budget {budget:,} tokens)")
    for name, pts in curves.items():
        print(f"  {name:8s} " + "  ".join(f"{t / 1e3:.0f}k:{v:.3f}" for t, v in pts))
    c, c2, p = (curves[k][-1][1] for k in ("classic", "classic-seed2", "packed"))
    print(f"final: classic {c:.4f}  classic (seed 43) {c2:.4f}  packed {p:.4f}; packed - "
          f"classic {p - c:+.4f}, seed noise {abs(c2 - c):.4f} nats/token")


def dropout(args):
    """Attention dropout 0.1 (the shipped configs) vs 0 with everything else equal (residual
    and embedding dropout kept), through train.py as users run it, at the same token budget:
    the validation loss curve of each, and the best. Decides whether attention dropout,
    which costs its masks and the fused attention kernel, earns its time."""
    work = Path(args.work)
    store = get_store(args.train_path, work)
    base = json.loads((ROOT / "config" / args.config).read_text())
    runs = work / "dropout-runs"
    curves, times = {}, {}
    for p in (0.1, 0.0):
        cfg = work / f"{Path(args.config).stem}-attn{p}.json"
        cfg.write_text(json.dumps(dict(base, attn_pdrop=p)))
        name = f"attn{p}"
        out = runs / name
        if out.exists():
            import shutil
            shutil.rmtree(out)
        cmd = [sys.executable, str(ROOT / "train.py"), "--train_path", str(store.path),
               "--model_config", str(cfg), "--save_model_path", str(runs), "--run_name", name,
               "--epochs", str(max(1, round(args.epochs_q))), "--eval_interval",
               str(args.eval_every),
               "--save_interval", "100000", "--log_step", "50", "--quiet", "--seed", "42"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times[name] = time.perf_counter() - t
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["val_loss"]) for r in recs if r["event"] == "eval"]
        print(f"{name}: {times[name]:.0f} s", flush=True)
    print(f"\n{args.config}, {args.epochs_q} epoch(s) of {store.path.name}; validation loss by "
          "optimizer step")
    for name, pts in curves.items():
        best = min(v for _, v in pts)
        print(f"  {name:8s} best {best:.4f}  " + "  ".join(f"{s}:{v:.3f}" for s, v in pts))
    b1, b0 = (min(v for _, v in curves[k]) for k in ("attn0.1", "attn0.0"))
    print(f"best validation loss: attention dropout 0.1 {b1:.4f}, 0 {b0:.4f} (0 - 0.1: "
          f"{b0 - b1:+.4f} nats/token); wall time 0 / 0.1: "
          f"{times['attn0.0'] / times['attn0.1']:.2f}x")


def profile(args):
    """The top operators of one optimizer step of the fast path, per dtype (torch.profiler,
    self CPU time), after --steps warm-up steps: where the time of a step goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from chitchat.config import TrainConfig
    from chitchat.train_setup import make_optimizer

    work = Path(args.work)
    store = get_store(args.train_path, work)
    cfg = ROOT / "config" / args.config
    tok = store.tokenizer()
    print(f"corpus {store.path}, {args.config}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, AMX {torch.cpu._is_amx_tile_supported()}, avx512_bf16 "
          f"{torch.cpu._is_avx512_bf16_supported()}")
    table = build_windows(store, store.train_indices(), args.max_len)
    for dtype in args.dtypes.split(","):
        torch.manual_seed(0)
        model = build_model(load_config(cfg, tok)).train()
        opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
        runner = LossModel(model)
        rng = np.random.default_rng(0)
        rows = pack_rows(rng.permutation(len(table)), table.lengths, args.pack_len)
        amp = autocast_ctx(dtype, torch.device("cpu"))

        def step(k):
            micro = [collate_rows(store, table, rows[k * args.fast_batch:
                                                     (k + 1) * args.fast_batch],
                                  tok.pad_id, args.pack_len)]
            train_step(runner, None, model, opt, micro, len(micro[0]["target_ids"]), 1, amp,
                       None, 2.0, torch.device("cpu"))

        for k in range(args.steps):
            step(k)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(args.steps)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"\n{dtype}: one step of {args.fast_batch} packed rows of {args.pack_len}, "
              f"{total / 1e6:.2f} s of operator time")
        print(f"{'operator':40s} {'self s':>8s} {'share':>7s} {'calls':>6s}")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"{e.key[:40]:40s} {e.self_cpu_time_total / 1e6:8.3f} "
                  f"{e.self_cpu_time_total / total:7.1%} {e.count:6d}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["speed", "quality", "profile", "dropout"],
                    default="speed")
    ap.add_argument("--eval_every", type=int, default=50, help="dropout: validation interval")
    ap.add_argument("--config", default="model_config_dialogue_small.json",
                    help="profile: the model config (in config/)")
    ap.add_argument("--top", type=int, default=15, help="profile: operators shown")
    ap.add_argument("--train_path", default=str(DEFAULT_CORPUS))
    ap.add_argument("--work", default="/tmp/chitchat-bench", help="cache of token stores")
    ap.add_argument("--max_len", type=int, default=150, help="window / classic cut length")
    ap.add_argument("--pack_len", type=int, default=300)
    ap.add_argument("--fast_batch", type=int, default=4, help="packed rows per micro-batch")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gemm", type=int, default=2048)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--epochs_q", type=float, default=1.0, help="quality: token budget")
    args = ap.parse_args()
    {"speed": speed, "quality": quality, "profile": profile, "dropout": dropout}[args.mode](args)


if __name__ == "__main__":
    main()
