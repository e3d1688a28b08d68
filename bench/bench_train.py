"""Training throughput and packing quality, measured side by side in one run.

    # speed: real (non-pad) tokens/s of the fast path vs the classic GPT2-chitchat loop on
    # the small config, and MFU against the fp32 and bf16 matmul peaks measured here (fp32:
    # the best of torch's BLAS, oneDNN and numpy's BLAS); then train.py with its default
    # flags (--dtype auto) and transformers' Trainer (fp32, bf16; needs accelerate) as peers
    python bench/bench_train.py --train_path ../shared/corpora/chitchat50w_slice/train.txt
    python bench/bench_train.py --repeats 5 --steps 8           # final figures (quiet machine)

    # quality: validation loss of --batching pack vs the classic padded batches at the same
    # token budget (tiny config, one epoch of the corpus, both through train.py)
    python bench/bench_train.py --mode quality

    # profile: the top operators of one optimizer step, per dtype (--shapes: split by the
    # operators' input shapes, to tell which tensor an operator's time goes to)
    python bench/bench_train.py --mode profile --dtypes fp32,bf16 --steps 2

    # attention: train.py's attention with dropout, forward and backward, on the corpus's
    # packed masks: whole rows against blocks of queries (chitchat.train_kernels.Q_BLOCK)
    python bench/bench_train.py --mode attention --pack_len 300 --blocks 100,75,50

    # memory: per-step time, page faults and resident heap over many steps; --same_batch
    # repeats one micro-batch, so every allocation's size repeats; --allocator system
    python bench/bench_train.py --mode memory --dtypes bf16 --pack_len 150 --fast_batch 8 \
        --steps 70 --every 5

    # dropout: attention dropout 0.1 vs 0 at the same token budget (validation loss);
    # --compare kernel: PyTorch's dropout vs train.py's cheap masks, same settings
    python bench/bench_train.py --mode dropout --config model_config_dialogue_middle.json
    python bench/bench_train.py --mode dropout --compare kernel --seed 1 \
        --config model_config_dialogue_tiny.json --train_path data/sample/train.txt \
        --epochs_q 40 --eval_every 13 --lr 1e-3

    # time_to_loss: train.py (its defaults, --max_time), the classic loop and Trainer, each
    # for --budget of training time (evaluations paused); the validation loss at the end,
    # and the time each needs to reach the classic loop's final loss
    python bench/bench_train.py --mode time_to_loss --config model_config_dialogue_tiny.json
    python bench/bench_train.py --mode time_to_loss --config model_config_dialogue_middle.json \
        --budget 10m --evals 10
    # the same at another peak lr for every path, without Trainer (an lr sweep)
    python bench/bench_train.py --mode time_to_loss --config model_config_dialogue_middle.json \
        --budget 5m --evals 20 --lr 6e-4 --no_trainer

--train_path takes a train.txt (preprocessed once into --work) or a token store.
Speed: every path is timed over --repeats windows of --steps optimizer steps, after
--warmup untimed steps (rounded up to whole windows; the same for every path), and gives
the median window.
The classic loop: fp32, batches of 8 dialogues cut to --max_len and padded to the longest,
labels -100 on padding, loss = mean over the batch, clip every micro-batch, loss.item()
every step. The fast path is chitchat.training: whole-dialogue windows packed into rows of
--pack_len with a block-diagonal mask, LM head only on target positions, one clip per
step, train.py's training kernels (--dropout_kernel) and fused AdamW, bf16 autocast (and
fp32 for comparison), optional --compile.
Trainer: transformers' Trainer as run_clm sets it up: the training dialogues' ids end to end
in blocks of 128 (labels = inputs; attention crosses dialogue boundaries), about the fast
path's tokens per step, fused AdamW where torch has it, bf16=True or fp32, on the CPU, with
no evaluation, saving or logging. The train.py row runs train.py itself (subprocess, default
flags, --max_steps) and takes the median of the tok/s it logs. train.py sets up its own
process's malloc (--allocator auto; a row with --allocator system shows its share); the
paths run inside this process (classic, fast, Trainer) keep the system's, as they ship, and
one more Trainer row runs in a child process whose environment gives it what --allocator
auto gives train.py (the same lever handed to the peer).
time_to_loss: every path gets train.py's peak lr (2e-4; --lr another) with warmup and
linear decay fitted to the budget (chitchat.budget.TimeBudget, which train.py --max_time
uses); the classic loop and Trainer (bf16 where the CPU has fast bf16, as --dtype auto
picks) pause their clock to evaluate. train.py's --max_time clock runs through its
evaluations, so it is given the time the classic loop's evaluations took on top, and its
curve's clock is rebuilt from the tok/s windows in metrics.jsonl with the evaluations taken
out; it runs with --save_interval 1000000 (the other paths do not checkpoint). Its final
model is evaluated again in float32.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chitchat.allocator import plan_allocator, plan_environment  # noqa: E402
from chitchat.batching import build_windows, collate_rows, pack_rows  # noqa: E402
from chitchat.budget import TimeBudget, parse_duration  # noqa: E402
from chitchat.config import PreprocessConfig, TrainConfig  # noqa: E402
from chitchat.loss import LossModel  # noqa: E402
from chitchat.modeling import build_model, load_config  # noqa: E402
from chitchat.precision import (autocast_ctx, cpu_has_fast_bf16, cpu_vendor,  # noqa: E402
                                fp32_matmul, pick_fp32_matmul, probe_onednn_fp32)
from chitchat.preprocessing import preprocess  # noqa: E402
from chitchat.store import TokenStore  # noqa: E402
from chitchat.train_kernels import use_training_kernels  # noqa: E402
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


def matmul_peak(dtype: torch.dtype, n: int, repeats: int, library: str = "torch") -> float:
    """Median FLOP/s of an n x n x n matmul (the best case for the hardware); library
    "numpy": the same float32 product by numpy's BLAS, which torch does not use."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    mm = torch.matmul
    if library == "numpy":
        a, b, mm = a.numpy(), b.numpy(), np.matmul
    t = time.perf_counter()
    mm(a, b)
    first = time.perf_counter() - t
    if first > 2.0:
        # No fast kernel for this dtype (bf16 on an AVX2-only CPU: 0.3 GFLOP/s, a minute
        # a product): the one product's rate says enough.
        return 2 * n ** 3 / first
    for _ in range(2):
        mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(5):
            mm(a, b)
        times.append((time.perf_counter() - t) / 5)
    return 2 * n ** 3 / statistics.median(times)


def numpy_blas() -> str:
    """The BLAS numpy was built with (OpenBLAS in pip's wheels), as numpy reports it."""
    try:
        return np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (KeyError, TypeError):  # an older numpy, or one built without a BLAS entry
        return "unknown"


def bench_dtypes(name: str, fast_bf16: bool) -> str:
    """--dtypes auto -> both dtypes where the CPU has fast bf16, else fp32 alone."""
    if name != "auto":
        return name
    return "fp32,bf16" if fast_bf16 else "fp32"


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


def classic_step(model, opt, ids, labels) -> None:
    """GPT2-chitchat's step: mean loss of the batch, clip, step, and the loss read back."""
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    opt.step()
    opt.zero_grad()
    loss.item()


def time_classic(store, config_path, args, rng) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(load_config(config_path, store.tokenizer())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-8)
    batches = classic_batches(store, store.train_indices(), args.max_len, 8, rng)

    def step() -> int:
        ids, labels, n = next(batches)
        classic_step(model, opt, ids, labels)
        return n
    return statistics.median(window_rates(step, args)), 1.0


def warmup_windows(args) -> int:
    """The untimed windows of --steps steps before the timed ones: as many as cover
    --warmup steps, at least one. Every path of the speed mode skips the same number."""
    return max(1, -(-args.warmup // args.steps))


def window_rates(step, args, extra: int = 0) -> list[float]:
    """Real tokens/s over --repeats windows of --steps calls of step() (one optimizer step,
    returning its real tokens), after the warm-up windows and `extra` more."""
    skip = warmup_windows(args) + extra
    rates = []
    for r in range(skip + args.repeats):
        tokens, t = 0, time.perf_counter()
        for _ in range(args.steps):
            tokens += step()
        if r >= skip:
            rates.append(tokens / (time.perf_counter() - t))
    return rates


def time_fast(store, config_path, args, dtype: str, rng) -> tuple[float, float, float]:
    """(real tokens/s, mean window length, share of tokens through the LM head)."""
    torch.manual_seed(0)
    tok = store.tokenizer()
    model = build_model(load_config(config_path, tok)).train()
    use_training_kernels(model, args.dropout_kernel, "cpu")
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, eps=1e-8, fused=True)
    runner = LossModel(model)
    if args.compile:
        runner = torch.compile(runner)
    table = build_windows(store, store.train_indices(), args.max_len)
    rows = pack_rows(rng.permutation(len(table)), table.lengths, args.pack_len)
    amp = autocast_ctx(dtype, torch.device("cpu"))
    with fp32_matmul(train_py_library(dtype, args.fp32_matmul)):
        return _time_fast(store, table, rows, tok, runner, model, opt, amp, args)


def train_py_library(dtype: str, name: str = "auto") -> str:
    """The library of fp32 products that train.py's --fp32_matmul `name` picks here."""
    return pick_fp32_matmul(name, "cpu", dtype, False, cpu_vendor(), probe_onednn_fp32)


def _time_fast(store, table, rows, tok, runner, model, opt, amp, args):
    per_step = args.fast_batch * args.accum
    pos, tgt, toks = 0, 0, 0

    def step() -> int:
        nonlocal pos, tgt, toks
        micro = [collate_rows(store, table, rows[pos + a * args.fast_batch:
                                                 pos + (a + 1) * args.fast_batch],
                              tok.pad_id, args.pack_len) for a in range(args.accum)]
        pos += per_step
        n_t = sum(len(m["target_ids"]) for m in micro)
        train_step(runner, None, model, opt, micro, n_t, 1, amp, None, 2.0,
                   torch.device("cpu"))
        n = sum(m["n_tokens"] for m in micro)
        tgt, toks = tgt + n_t, toks + n
        return n
    # a compiled model's first window also pays for compiling: one more untimed
    rates = window_rates(step, args, extra=int(args.compile))
    return statistics.median(rates), float(table.lengths.mean()), tgt / toks


def speed(args):
    work = Path(args.work)
    store = get_store(args.train_path, work)
    cfg = ROOT / "config" / args.config
    torch.manual_seed(0)
    probe = build_model(load_config(cfg, store.tokenizer()))
    threads = torch.get_num_threads()
    print(f"corpus {store.path} ({len(store)} dialogues), {args.config}, {threads} threads, "
          f"torch {torch.__version__}, AMX {torch.cpu._is_amx_tile_supported()}, "
          f"avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}")
    blas32 = matmul_peak(torch.float32, args.gemm, args.repeats)
    onednn32 = 0.0
    if probe_onednn_fp32()[0]:  # else the switch leaves the products on BLAS
        with fp32_matmul("onednn"):
            onednn32 = matmul_peak(torch.float32, args.gemm, args.repeats)
    # numpy's BLAS is not on torch's path, but it is this CPU's float32 products too (on an
    # AVX2-only AMD CPU OpenBLAS ran 1.4x-1.9x torch's MKL): MFU against the best library
    numpy32 = matmul_peak(torch.float32, args.gemm, args.repeats, "numpy")
    peak32 = max(blas32, onednn32, numpy32)  # no flattering peak
    peak16 = matmul_peak(torch.bfloat16, args.gemm, args.repeats)
    onednn = f"{onednn32 / 1e9:.1f}" if onednn32 else "n/a: it does not take them here"
    print(f"matmul peak ({args.gemm}^3): fp32 {peak32 / 1e9:.1f} GFLOP/s (BLAS "
          f"{blas32 / 1e9:.1f}, oneDNN {onednn}, numpy's {numpy_blas()} "
          f"{numpy32 / 1e9:.1f}), bf16 {peak16 / 1e9:.1f} "
          f"GFLOP/s ({peak16 / peak32:.2f}x); train.py's fp32 products here: "
          f"{train_py_library('fp32')} (cpu vendor {cpu_vendor()})")
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
        lib = (" (oneDNN products)" if train_py_library(dtype, args.fp32_matmul) == "onednn"
               else "")
        print(f"fast     {dtype}{lib}, packed rows of {args.pack_len} x {args.fast_batch}"
              f"{' compiled' if args.compile else ''}: {tps:8.1f} real tok/s  "
              f"{tps / classic:5.2f}x classic  MFU {tps * f / peak32:6.1%} of fp32 peak"
              + (f", {tps * f / peak16:6.1%} of bf16 peak" if dtype == "bf16" else ""))
    best_dtype, best = max(rows, key=lambda r: r[1])
    print(f"best fast path: {best_dtype}, {best / classic:.2f}x the classic loop "
          f"(target >= 6x on an AMX CPU, >= 3x on an fp32-only one)")

    def mfu(tps: float, dtype: str) -> str:
        # train.py trains on the same windows (its --max_len is 150 too): the same useful
        # FLOPs per token, however the windows are packed into rows
        if args.max_len != TrainConfig().max_len:
            return ""
        peak = peak16 if dtype == "bf16" else peak32
        return f"  MFU {tps * f / peak:6.1%} of {dtype} peak"

    trainer_rows(store, cfg, args, classic, dict(rows), mfu)


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
    which costs its masks and the fused attention kernel, earns its time. With --compare
    kernel: the shipped configs under PyTorch's dropout (--dropout_kernel native) vs the
    cheap masks (cheap), everything else equal: does the cheaper mask change the quality?"""
    work = Path(args.work)
    store = get_store(args.train_path, work)
    base = json.loads((ROOT / "config" / args.config).read_text())
    runs = work / "dropout-runs"
    if args.compare == "kernel":
        arms = [(k, 0.1, ["--dropout_kernel", k]) for k in ("native", "cheap")]
    else:
        arms = [(f"attn{p}", p, []) for p in (0.1, 0.0)]
    curves, times = {}, {}
    for name, p, extra in arms:
        cfg = work / f"{Path(args.config).stem}-attn{p}.json"
        cfg.write_text(json.dumps(dict(base, attn_pdrop=p)))
        out = runs / name
        if out.exists():
            import shutil
            shutil.rmtree(out)
        cmd = [sys.executable, str(ROOT / "train.py"), "--train_path", str(store.path),
               "--model_config", str(cfg), "--save_model_path", str(runs), "--run_name", name,
               "--epochs", str(max(1, round(args.epochs_q))), "--eval_interval",
               str(args.eval_every), "--save_interval", "100000", "--log_step", "50",
               "--quiet", "--seed", str(args.seed), *extra]
        if args.lr is not None:
            cmd += ["--lr", str(args.lr)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times[name] = time.perf_counter() - t
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["val_loss"]) for r in recs if r["event"] == "eval"]
        print(f"{name}: {times[name]:.0f} s", flush=True)
    print(f"\n{args.config}, {args.epochs_q} epoch(s) of {store.path.name}, seed {args.seed}; "
          "validation loss by optimizer step")
    for name, pts in curves.items():
        best = min(v for _, v in pts)
        print(f"  {name:8s} best {best:.4f}  " + "  ".join(f"{s}:{v:.3f}" for s, v in pts))
    (a, _, _), (b, _, _) = arms
    best_a, best_b = (min(v for _, v in curves[k]) for k in (a, b))
    print(f"best validation loss: {a} {best_a:.4f}, {b} {best_b:.4f} ({b} - {a}: "
          f"{best_b - best_a:+.4f} nats/token); wall time {b} / {a}: "
          f"{times[b] / times[a]:.2f}x")


def train_py_allocator_env(environ) -> dict[str, str]:
    """The environment variables by which a process gets what train.py's --allocator auto
    sets on this machine, given `environ`: empty once `environ` has them or sets them
    otherwise (glibc and torch read them at a process's start)."""
    return plan_environment(plan_allocator("auto", platform.system(), platform.libc_ver()[0],
                                           environ))


def _fast_steps(args, store, table, dtype: str):
    """train.py's fast path for `dtype` as the profile and memory modes run it: its model,
    training kernels and optimizer; returns step(rows), one optimizer step on a micro-batch
    of packed rows (from row_batches), which returns the batch's real tokens."""
    from chitchat.train_setup import make_optimizer

    tok = store.tokenizer()
    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "config" / args.config, tok)).train()
    use_training_kernels(model, args.dropout_kernel, "cpu")
    cfg = TrainConfig()  # train.py's defaults: optimizer settings and gradient clipping
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    runner = LossModel(model)
    amp = autocast_ctx(dtype, torch.device("cpu"))

    def step(rows):
        micro = [collate_rows(store, table, rows, tok.pad_id, args.pack_len)]
        train_step(runner, None, model, opt, micro, len(micro[0]["target_ids"]), 1, amp,
                   None, cfg.max_grad_norm, torch.device("cpu"))
        return micro[0]["n_tokens"]
    return step


def row_batches(args, table):
    """Micro-batches of --fast_batch packed rows, epoch after epoch, each epoch in another
    order as train.py's are (so a long run does not repeat one sequence of batch sizes)."""
    for epoch in itertools.count():
        rows = pack_rows(np.random.default_rng([0, epoch]).permutation(len(table)),
                         table.lengths, args.pack_len)
        for i in range(0, len(rows) - args.fast_batch + 1, args.fast_batch):
            yield rows[i:i + args.fast_batch]


def _memory_line(allocator: str) -> str:
    keys = sorted(train_py_allocator_env({}))
    return f"memory (as train.py --allocator {allocator}): " + (
        " ".join(f"{k}={os.environ.get(k, 'unset')}" for k in keys) or "system malloc")


def profile(args):
    """The top operators of one optimizer step of the fast path, per dtype (torch.profiler,
    self CPU time), after --steps warm-up steps: where the time of a step goes, and the
    step's minor page faults. The process runs with train.py's malloc settings (main
    restarts it with them), so that its page faults are train.py's, not the system
    malloc's."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    store = get_store(args.train_path, Path(args.work))
    print(f"corpus {store.path}, {args.config}, {hardware_line()}")
    print(_memory_line(args.allocator))
    table = build_windows(store, store.train_indices(), args.max_len)
    for dtype in args.dtypes.split(","):
        step, batches = _fast_steps(args, store, table, dtype), row_batches(args, table)
        library = train_py_library(dtype, args.fp32_matmul)
        with fp32_matmul(library):
            for _ in range(args.steps):
                step(next(batches))
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with torch_profile(activities=[ProfilerActivity.CPU],
                               record_shapes=args.shapes) as prof:
                step(next(batches))
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        ops = prof.key_averages(group_by_input_shape=args.shapes)
        total = sum(e.self_cpu_time_total for e in ops)
        print(f"\n{dtype}: one step of {args.fast_batch} packed rows of {args.pack_len}, "
              f"{total / 1e6:.2f} s of operator time, {faults:,} minor page faults"
              + (", fp32 products by oneDNN" if library == "onednn" else ""))
        print(f"{'operator':40s} {'self s':>8s} {'share':>7s} {'calls':>6s}"
              + ("  input shapes" if args.shapes else ""))
        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"{e.key[:40]:40s} {e.self_cpu_time_total / 1e6:8.3f} "
                  f"{e.self_cpu_time_total / total:7.1%} {e.count:6d}"
                  + (f"  {str(e.input_shapes)[:80]}" if args.shapes else ""))


def attention(args):
    """The attention function train.py's CPU runs use with dropout on (cheap masks), forward
    and backward for one micro-batch of --fast_batch packed rows of --pack_len, with the
    config's heads, per dtype: whole rows against blocks of queries. Each layer of a step
    runs it once on the same mask, so the time is per layer; --repeats rounds over 20
    micro-batches (fewer if the corpus has fewer), the variants alternating within a
    round; medians."""
    import chitchat.train_kernels as kernels

    store = get_store(args.train_path, Path(args.work))
    cfg = load_config(ROOT / "config" / args.config, store.tokenizer())
    heads, width, t = cfg.n_head, cfg.n_embd // cfg.n_head, args.pack_len
    print(f"corpus {store.path}, {args.config} ({heads} heads of {width}), {hardware_line()}")
    print(_memory_line(args.allocator))
    table = build_windows(store, store.train_indices(), args.max_len)
    rows = pack_rows(np.random.default_rng(0).permutation(len(table)), table.lengths, t)
    masks = [collate_rows(store, table, rows[i:i + args.fast_batch], 0, t)["attention_mask"]
             for i in range(0, min(20, len(rows) // args.fast_batch) * args.fast_batch,
                            args.fast_batch)]
    default = kernels.query_block(t)
    blocks = [t] + [int(b) for b in args.blocks.split(",") if int(b) < t]
    line = (f"{args.fast_batch} rows of {t}, windows of at most {args.max_len}; train.py's: "
            + ("whole rows" if default >= t else f"blocks of {default}"))
    for b in blocks[1:]:
        area = statistics.mean(sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1
                                   in kernels.attention_blocks(m, b)) for m in masks) / t / t
        line += f"; blocks of {b} compute {area:.0%} of the T x T scores"
    print(line)
    gen = torch.Generator().manual_seed(0)
    for dtype in args.dtypes.split(","):
        dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        qkv = torch.randn(args.fast_batch, t, 3 * heads * width, generator=gen).to(dt)

        def layer(mask, block):
            x = qkv.detach().requires_grad_()
            q, k, v = (y.view(args.fast_batch, t, heads, width).transpose(1, 2)
                       for y in x.split(heads * width, -1))
            start = time.perf_counter()
            out, _ = kernels.cheap_dropout_attention(None, q, k, v, mask, dropout=0.1,
                                                     q_block=block)
            out.backward(torch.ones_like(out))
            return time.perf_counter() - start

        times = {b: [] for b in blocks}
        for _ in range(args.repeats + 1):  # the first round warms up
            for b in blocks:
                times[b].append([layer(m, b) for m in masks])
        whole = statistics.median(sum(times[t][1:], []))
        print(f"\n{dtype}: ms per layer (forward and backward), median of "
              f"{args.repeats} x {len(masks)}")
        for b in blocks:
            ms = statistics.median(sum(times[b][1:], []))
            label = "whole rows" if b >= t else f"blocks of {b}"
            print(f"  {label:16s} {ms * 1e3:7.2f}   {whole / ms:5.2f}x whole rows"
                  + ("   <- train.py" if b == default else ""))


def anon_mb() -> float:
    """This process's resident anonymous memory (heap and tensors, not mapped files), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")  # not Linux


def memory(args):
    """Per-step time, minor page faults and resident anonymous memory of the fast path over
    --steps steps (a line every --every): whether a step still pays for fresh memory, and
    whether the heap stops growing. --same_batch feeds one micro-batch every step, so the
    sizes of every allocation repeat."""
    store = get_store(args.train_path, Path(args.work))
    print(f"corpus {store.path}, {args.config}, {hardware_line()}")
    print(_memory_line(args.allocator)
          + (", the same micro-batch every step" if args.same_batch else ""))
    table = build_windows(store, store.train_indices(), args.max_len)
    for dtype in args.dtypes.split(","):
        step, batches = _fast_steps(args, store, table, dtype), row_batches(args, table)
        if args.same_batch:
            batches = itertools.repeat(next(batches))
        print(f"\n{dtype}: {args.fast_batch} packed rows of {args.pack_len} per step")
        print(f"{'step':>6s} {'ms/step':>8s} {'faults/step':>12s} {'tok/s':>7s} "
              f"{'anon MB':>8s}")
        with fp32_matmul(train_py_library(dtype, args.fp32_matmul)):
            t, f, tokens = time.perf_counter(), resource.getrusage(
                resource.RUSAGE_SELF).ru_minflt, 0
            for k in range(args.steps):
                tokens += step(next(batches))
                if (k + 1) % args.every and k + 1 < args.steps:
                    continue
                n = (k % args.every) + 1
                now, faults = time.perf_counter(), resource.getrusage(
                    resource.RUSAGE_SELF).ru_minflt
                print(f"{k + 1:6d} {(now - t) / n * 1e3:8.0f} {(faults - f) / n:12.0f} "
                      f"{tokens / (now - t):7.0f} {anon_mb():8.0f}", flush=True)
                t, f, tokens = now, faults, 0


# ---- transformers Trainer and train.py as peers ---------------------------------------------
TRAINER_BLOCK = 128  # run_clm's --block_size, near --max_len so attention spans compare
# train.py's default peak lr: what every path of --mode time_to_loss gets unless --lr is given
TTL_LR = TrainConfig.__dataclass_fields__["lr"].default


def hardware_line() -> str:
    return (f"{torch.get_num_threads()} threads, torch {torch.__version__}, AMX "
            f"{torch.cpu._is_amx_tile_supported()}, avx512_bf16 "
            f"{torch.cpu._is_avx512_bf16_supported()}")


def trainer_missing() -> str | None:
    """Why transformers' Trainer cannot run here, or None."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return ("transformers Trainer rows skipped: accelerate is not installed "
                "(pip install -r requirements-dev.txt)")
    return None


def clm_blocks(store, idx, block: int = TRAINER_BLOCK) -> torch.Tensor:
    """run_clm's group_texts: the dialogues' ids end to end, cut into blocks (the short
    tail is dropped, as run_clm drops it)."""
    ids = np.concatenate([store.dialogue(int(i)) for i in idx]).astype(np.int64)
    n = len(ids) // block * block
    if n == 0:
        sys.exit(f"{store.path}: fewer than {block} training tokens for the Trainer rows")
    return torch.from_numpy(ids[:n].reshape(-1, block))


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def trainer_batch(args) -> int:
    """Blocks per step: about the fast path's tokens per step (rows x --pack_len)."""
    return max(1, round(args.fast_batch * args.accum * args.pack_len / TRAINER_BLOCK))


def make_trainer(model, blocks, out: Path, dtype: str, batch: int, max_steps: int,
                 callbacks, lr: float = 1e-4, schedule: str = "linear"):
    """Trainer as a run_clm user sets it up on a CPU; (trainer, optimizer name). The fused
    AdamW kernel is asked for first, as chitchat's own optimizer uses it."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    last = None
    for optim in ("adamw_torch_fused", "adamw_torch"):
        try:
            targs = TrainingArguments(
                output_dir=str(out), use_cpu=True, bf16=dtype == "bf16",
                per_device_train_batch_size=batch, max_steps=max_steps, learning_rate=lr,
                lr_scheduler_type=schedule, weight_decay=0.01, adam_epsilon=1e-8,
                max_grad_norm=2.0, optim=optim, eval_strategy="no", save_strategy="no",
                logging_strategy="no", report_to=[], dataloader_num_workers=0,
                disable_tqdm=True, remove_unused_columns=False, seed=0)
            trainer = Trainer(model=model, args=targs, train_dataset=_Blocks(blocks),
                              callbacks=callbacks)
            trainer.create_optimizer()
        except (RuntimeError, ValueError, TypeError) as e:  # no fused kernel here
            last = e
            continue
        trainer.remove_callback(PrinterCallback)  # its end-of-run summary would split the table
        return trainer, optim
    raise RuntimeError(f"Trainer: no AdamW could be built: {last}")


def time_trainer(store, config_path, args, dtype: str) -> tuple[float, str, int, float]:
    """(real tokens/s, optimizer, blocks per step, minor page faults per step) of Trainer on
    run_clm-packed blocks: median over --repeats windows of --steps steps after the warm-up
    windows (warmup_windows), timed at step ends (the wall time between them holds the
    data loading and the whole step)."""
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.ends, self.faults = [], []

        def on_step_end(self, targs, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    torch.manual_seed(0)
    model = build_model(load_config(config_path, store.tokenizer())).train()
    batch = trainer_batch(args)
    clock = StepEnds()
    s, w = args.steps, warmup_windows(args)
    trainer, optim = make_trainer(model, clm_blocks(store, store.train_indices()),
                                  Path(args.work) / "trainer-speed", dtype, batch,
                                  (w + args.repeats) * s, [clock])
    trainer.train()
    e = clock.ends
    rates = [s * batch * TRAINER_BLOCK / (e[(r + 1) * s - 1] - e[r * s - 1])
             for r in range(w, w + args.repeats)]
    fused = any(g.get("fused") for g in trainer.optimizer.param_groups)
    faults = (clock.faults[-1] - clock.faults[w * s - 1]) / (args.repeats * s)
    return statistics.median(rates), optim + (" (fused)" if fused else ""), batch, faults


def trainer_child(args):
    """--mode trainer: the Trainer rows alone, one JSON line per dtype. The speed mode runs
    it in a child process whose environment carries train.py's allocator settings, which
    glibc and torch read at a process's start."""
    store = get_store(args.train_path, Path(args.work))
    for dtype in args.dtypes.split(","):
        tps, _, _, faults = time_trainer(store, ROOT / "config" / args.config, args, dtype)
        env = {k: os.environ.get(k) for k in train_py_allocator_env({})}
        print(json.dumps({"dtype": dtype, "tps": tps, "faults": faults, "env": env}),
              flush=True)


def trainer_with_env(args, env: dict[str, str]) -> list[dict]:
    """The Trainer rows of --mode trainer, run in a child process with `env` added to its
    environment: one {"dtype", "tps", "faults", "env"} row per dtype of --dtypes."""
    cmd = [sys.executable, __file__, "--mode", "trainer", "--train_path", args.train_path,
           "--work", args.work, "--config", args.config, "--dtypes", args.dtypes,
           "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--pack_len", str(args.pack_len),
           "--fast_batch", str(args.fast_batch), "--accum", str(args.accum)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})
    rows = [json.loads(l) for l in done.stdout.splitlines() if l.startswith('{"dtype"')]
    if done.returncode or [r["dtype"] for r in rows] != args.dtypes.split(","):
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n"
                 f"{done.stderr[-3000:]}")
    return rows


def train_py(store, config_path, out: Path, name: str, extra: list[str]) -> Path:
    """Run train.py as a user does (its defaults, plus `extra`); returns the run folder."""
    import shutil

    run = out / name
    if run.exists():
        shutil.rmtree(run)
    cmd = [sys.executable, str(ROOT / "train.py"), "--train_path", str(store.path),
           "--model_config", str(config_path), "--save_model_path", str(out),
           "--run_name", name, "--device", "cpu", "--quiet", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return run


def run_records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def run_dtype(run: Path) -> str:
    """The dtype train.py resolved (its --dtype auto choice), from its last checkpoint."""
    states = sorted(run.glob("checkpoints/*/trainer_state.json"))
    return json.loads(states[-1].read_text())["dtype"] if states else "?"


def time_train_py(store, config_path, args, extra=()) -> tuple[float, str]:
    """(real tokens/s, dtype) of train.py with its default flags (--dtype auto) plus
    `extra`: the median of its logged tok/s over --repeats windows of --steps steps, after
    the warm-up windows (warmup_windows). The final evaluation and save come after the
    last logged window."""
    w = warmup_windows(args)
    n = (w + args.repeats) * args.steps
    run = train_py(store, config_path, Path(args.work) / "speed-runs", "train_py",
                   ["--max_steps", str(n), "--log_step", str(args.steps), *extra])
    tps = [r["tokens_per_s"] for r in run_records(run) if r["event"] == "train"][w:]
    return statistics.median(tps), run_dtype(run)


def trainer_rows(store, cfg, args, classic: float, fast: dict, mfu) -> None:
    """The speed mode's Trainer and train.py rows, and the issue's ratios; mfu(tok/s,
    dtype) is the text that gives a train.py row's MFU."""
    tp, tp_dtype = time_train_py(store, cfg, args)
    print(f"train.py, default flags (--dtype auto -> {tp_dtype}): {tp:8.1f} real tok/s  "
          f"{tp / classic:5.2f}x classic{mfu(tp, tp_dtype)}")
    native, _ = time_train_py(store, cfg, args, ["--dropout_kernel", "native"])
    print(f"train.py --dropout_kernel native (PyTorch's dropout): {native:8.1f} real tok/s  "
          f"{native / classic:5.2f}x classic; the defaults are {tp / native:.2f}x this")
    system, _ = time_train_py(store, cfg, args, ["--allocator", "system"])
    print(f"train.py --allocator system (malloc as it is): {system:8.1f} real tok/s  "
          f"{system / classic:5.2f}x classic; the defaults are {tp / system:.2f}x this")
    by_dtype = {tp_dtype: tp}
    for dtype in args.dtypes.split(","):
        if dtype not in by_dtype:  # train.py at the dtype auto did not pick, for its ratio
            by_dtype[dtype], _ = time_train_py(store, cfg, args, ["--dtype", dtype])
            print(f"train.py --dtype {dtype}: {by_dtype[dtype]:8.1f} real tok/s  "
                  f"{by_dtype[dtype] / classic:5.2f}x classic{mfu(by_dtype[dtype], dtype)}")
    onednn = "fp32" in by_dtype and train_py_library("fp32") == "onednn"
    if onednn:  # what the oneDNN products give train.py, side by side
        blas, _ = time_train_py(store, cfg, args, ["--dtype", "fp32", "--fp32_matmul", "blas"])
        print(f"train.py --dtype fp32 --fp32_matmul blas: {blas:8.1f} real tok/s  "
              f"{blas / classic:5.2f}x classic; with oneDNN's products train.py --dtype "
              f"fp32 is {by_dtype['fp32'] / blas:.2f}x this")
    missing = trainer_missing()
    if missing:
        print(missing)
        return
    trainer = {}
    for dtype in args.dtypes.split(","):
        tps, optim, batch, faults = time_trainer(store, cfg, args, dtype)
        trainer[dtype] = tps
        vs = f"  fast {dtype} {fast[dtype] / tps:5.2f}x Trainer" if dtype in fast else ""
        print(f"trainer  {dtype}, run_clm blocks of {TRAINER_BLOCK} x {batch}, {optim}: "
              f"{tps:8.1f} real tok/s  {tps / classic:5.2f}x classic{vs}  train.py "
              f"{dtype} {by_dtype[dtype] / tps:5.2f}x Trainer  ({faults:,.0f} faults/step)")
    # a peer given what --allocator auto gives train.py: how much of the lead is malloc
    env = train_py_allocator_env({})
    if env:
        for row in trainer_with_env(args, env):
            d, tps = row["dtype"], row["tps"]
            print(f"trainer  {d} with train.py's allocator settings (environment "
                  f"{' '.join(f'{k}={v}' for k, v in env.items())}): {tps:8.1f} real tok/s  "
                  f"train.py {d} {by_dtype[d] / tps:5.2f}x this  ({row['faults']:,.0f} "
                  "faults/step)")
    if onednn:  # a peer given the same switch: how much of the lead is the library
        with fp32_matmul("onednn"):
            tps = time_trainer(store, cfg, args, "fp32")[0]
        print(f"trainer  fp32 with oneDNN's products (not its default): {tps:8.1f} real "
              f"tok/s  train.py fp32 {by_dtype['fp32'] / tps:5.2f}x this")
    # the targets: >= 1.3x Trainer fp32 where the CPU has only fp32, >= 1.6x
    # Trainer bf16 on AMX; a CPU with avx512_bf16 alone sits between the two. Each ratio
    # compares the same dtype; train.py's is against Trainer at the dtype --dtype auto chose.
    for ref, goal, where in (("fp32", 1.3, "fp32-only CPU"), ("bf16", 1.6, "AMX CPU")):
        if ref not in trainer:
            continue
        parts = [f"fast {ref} {fast[ref] / trainer[ref]:.2f}x"] if ref in fast else []
        parts.append(f"train.py {by_dtype[ref] / trainer[ref]:.2f}x"
                     + (" (its --dtype auto)" if tp_dtype == ref else ""))
        print(f"vs Trainer {ref} (target on an {where}: >= {goal}x): {', '.join(parts)}")


# ---- time to loss -------------------------------------------------------------------------
def heldout_loss(model, store, max_len: int) -> float:
    """Mean next-token cross-entropy over the windows of the store's validation
    dialogues, in float32: evaluate.py's perplexity, the same function for every path."""
    from chitchat.evaluation import perplexity

    return perplexity(model, store, store.valid_indices(), max_len, "all", 8, "cpu",
                      store.tokenizer().pad_id)["loss"]


class BudgetClock:
    """Training wall time with evaluations paused, an lr schedule fitted to it (warmup
    then linear decay to zero at the budget, chitchat's TimeBudget as train.py --max_time
    uses it) and the validation loss every `seconds / evals` of training time."""

    def __init__(self, seconds: float, evals: int, evaluate):
        self.budget = TimeBudget(seconds, cap=10 ** 9)
        self.every = seconds / evals
        self.next_eval = self.every
        self.evaluate = evaluate
        self.start = self.first = 0.0
        self.paused = 0.0
        self.done = 0
        self.curve: list[tuple[float, float]] = []

    def begin(self):
        self.start = time.perf_counter()

    def factor(self) -> float:
        return self.budget.factor(self.done, "linear")

    def after_step(self, model) -> bool:
        """Count a step; evaluate when due; True once the budget is spent (the model is
        then evaluated at that point)."""
        self.done += 1
        elapsed = time.perf_counter() - self.start - self.paused
        if self.done == 1:
            self.first = elapsed
        self.budget.update(self.done, elapsed, self.first)
        over = self.budget.expired(elapsed)
        if over or elapsed >= self.next_eval:
            t = time.perf_counter()
            self.curve.append((elapsed, self.evaluate(model)))
            self.paused += time.perf_counter() - t
            while self.next_eval <= elapsed:
                self.next_eval += self.every
        return over

    @property
    def eval_seconds(self) -> float:
        return self.paused / max(1, len(self.curve))


def classic_to_budget(store, cfg, args, clock: BudgetClock, lr: float):
    """The classic loop (see time_classic) until the budget is spent, epoch after epoch."""
    torch.manual_seed(0)
    model = build_model(load_config(cfg, store.tokenizer())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-8)
    rng = np.random.default_rng(0)
    clock.begin()
    while True:
        for ids, labels, _ in classic_batches(store, store.train_indices(), args.max_len, 8,
                                              rng):
            for g in opt.param_groups:
                g["lr"] = lr * clock.factor()
            classic_step(model, opt, ids, labels)
            if clock.after_step(model):
                return


def trainer_to_budget(store, cfg, args, dtype: str, clock: BudgetClock, lr: float) -> str:
    """Trainer on run_clm blocks until the budget is spent; the lr follows the clock's
    schedule (Trainer's own schedules count steps, which a time budget does not know)."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            clock.begin()

        def on_step_begin(self, targs, state, control, optimizer=None, **kw):
            for g in optimizer.param_groups:
                g["lr"] = lr * clock.factor()

        def on_step_end(self, targs, state, control, model=None, **kw):
            if clock.after_step(model):
                control.should_training_stop = True

    torch.manual_seed(0)
    model = build_model(load_config(cfg, store.tokenizer())).train()
    trainer, optim = make_trainer(model, clm_blocks(store, store.train_indices()),
                                  Path(args.work) / "trainer-ttl", dtype, trainer_batch(args),
                                  10 ** 9, [Budget()], lr, "constant")
    trainer.train()
    return optim


def train_py_step_seconds(store, cfg, work: Path) -> float:
    """Seconds per step of train.py on this config, from the second half of 20 logged
    steps (the first ones pay for warm-up): sets its --eval_interval to about the others'
    wall-clock one."""
    run = train_py(store, cfg, work, "probe", ["--max_steps", "20", "--log_step", "1",
                                               "--eval_interval", "0"])
    recs = [r for r in run_records(run) if r["event"] == "train"]
    secs = [(b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(recs, recs[1:])]
    return statistics.median(secs[len(secs) // 2:])


def train_py_curve(recs: list[dict]) -> tuple[list[tuple[float, float]], float, float]:
    """(training seconds, val_loss) at each evaluation of a train.py run, the training
    seconds in all, and the seconds its evaluations took. train.py's logged tok/s windows
    tile its run; a window that follows an evaluation also holds that evaluation, so its
    training time is re-estimated from its tokens at the median speed of the clean
    windows."""
    clean = [r["tokens_per_s"] for p, r in zip([{}] + recs, recs)
             if r["event"] == "train" and p.get("event") != "eval"]
    typical = statistics.median(clean)
    t, evals, tokens, after_eval, curve = 0.0, 0.0, 0, False, []
    for r in recs:
        if r["event"] == "train":
            n = r["tokens"] - tokens
            t += n / typical if after_eval else n / r["tokens_per_s"]
            if after_eval:
                evals += max(0.0, n / r["tokens_per_s"] - n / typical)
            tokens, after_eval = r["tokens"], False
        elif r["event"] == "eval":
            curve.append((t, r["val_loss"]))
            after_eval = True
    return curve, t, evals


def reach_time(curve, target: float) -> float | None:
    """Training seconds at which the loss first reaches `target` (linear between
    evaluations; the first evaluation's time when it is already there)."""
    prev = None
    for t, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return t
            return prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - v)
        prev = (t, v)
    return None


def time_to_loss(args):
    """Fast path (train.py, its defaults), classic loop and Trainer, each for --budget of
    training time; validation loss on the store's split at regular training-time
    intervals; the loss at the budget's end and the time each needs to reach the classic
    loop's final loss."""
    work = Path(args.work)
    store = get_store(args.train_path, work)
    cfg = ROOT / "config" / args.config
    seconds = parse_duration(args.budget)
    n_valid = len(store.valid_indices())
    if n_valid == 0:
        sys.exit(f"{store.path} has no validation dialogues")
    lr = TTL_LR if args.lr is None else args.lr
    print(f"corpus {store.path} ({len(store)} dialogues, {n_valid} held out), {args.config}, "
          f"{hardware_line()}")
    print(f"budget {seconds:.0f} s of training per path (evaluation not counted), "
          f"{args.evals} evaluations; loss: mean next-token cross-entropy over the windows "
          f"of <= {args.max_len} tokens of the held-out dialogues, float32 "
          f"(chitchat.evaluation.perplexity); peak lr {lr:g} for all, warmup and linear "
          "decay fitted to the budget", flush=True)

    def evaluate(model):
        return heldout_loss(model, store, args.max_len)

    results = {}  # name -> (curve, trained seconds, final loss)
    clock = BudgetClock(seconds, args.evals, evaluate)
    classic_to_budget(store, cfg, args, clock, lr)
    results["classic fp32"] = (clock.curve, clock.curve[-1][0], clock.curve[-1][1])
    eval_s = clock.eval_seconds
    print(f"classic: {clock.done} steps", flush=True)

    missing = "Trainer path skipped (--no_trainer)" if args.no_trainer else trainer_missing()
    if missing:
        print(missing)
    else:
        dtype = "bf16" if cpu_has_fast_bf16() else "fp32"
        clock = BudgetClock(seconds, args.evals, evaluate)
        optim = trainer_to_budget(store, cfg, args, dtype, clock, lr)
        results[f"trainer {dtype}"] = (clock.curve, clock.curve[-1][0], clock.curve[-1][1])
        print(f"trainer: {clock.done} steps, {optim}", flush=True)

    # train.py's --max_time clock runs through its evaluations; they get the time the
    # classic loop's took, so that it too trains for about the budget
    runs = work / "ttl-runs"
    per_step = train_py_step_seconds(store, cfg, runs)
    log_step = 10 if seconds / args.evals / per_step >= 10 else 1
    every = max(1, round(seconds / args.evals / per_step / log_step)) * log_step
    run = train_py(store, cfg, runs, "train_py",
                   ["--max_time", f"{seconds + args.evals * eval_s:.1f}s", "--eval_interval",
                    str(every), "--log_step", str(log_step), "--save_interval", "1000000",
                    "--lr", str(lr)])
    curve, trained, in_clock = train_py_curve(run_records(run))
    from chitchat.modeling import load_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    final_model, _ = load_model(run, None, "cpu")
    own = curve[-1][1]
    final = evaluate(final_model)
    tp_name = f"train.py {run_dtype(run)}"
    results[tp_name] = (curve, trained, final)
    print(f"train.py: eval every {every} steps; {len(curve)} evaluations took {in_clock:.1f} s "
          f"of its --max_time (given {args.evals * eval_s:.1f} s more for them); its last "
          f"validation loss {own:.4f} (under its training dtype), {final:.4f} in float32",
          flush=True)

    target = results["classic fp32"][2]
    t_classic = reach_time(results["classic fp32"][0], target)
    print(f"\n{'path':16s} {'trained s':>9s} {'final loss':>10s}   reaches the classic "
          f"loop's final loss {target:.4f} at")
    for name, (curve, trained, final) in results.items():
        t = reach_time(curve, target)
        when = (f"{t:7.1f} s  {t / t_classic:5.2f}x classic" if t is not None else
                "    not within the budget")
        print(f"{name:16s} {trained:9.1f} {final:10.4f}   {when}")
    fast = reach_time(results[tp_name][0], target)
    print(f"train.py / classic time to the classic loop's final loss: "
          + (f"{fast / t_classic:.2f} (target <= 0.25)" if fast is not None else "not reached"))
    print("\ncurves (training seconds: validation loss)")
    places = 0 if seconds >= 100 else 1
    for name, (curve, _, _) in results.items():
        print(f"  {name:16s} " + "  ".join(f"{t:.{places}f}:{v:.3f}" for t, v in curve))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["speed", "quality", "profile", "memory", "dropout",
                                       "time_to_loss", "trainer", "attention"], default="speed",
                    help="trainer: the speed mode's Trainer rows alone (JSON lines)")
    ap.add_argument("--budget", default="600s",
                    help="time_to_loss: training time per path, e.g. 90s, 10m")
    ap.add_argument("--evals", type=int, default=10,
                    help="time_to_loss: validations per path within the budget")
    ap.add_argument("--eval_every", type=int, default=50, help="dropout: validation interval")
    ap.add_argument("--lr", type=float, default=None,
                    help="dropout: train.py --lr; time_to_loss: the peak lr of every path "
                    "(default: train.py's own)")
    ap.add_argument("--no_trainer", action="store_true",
                    help="time_to_loss: leave out the Trainer path (for an lr sweep)")
    ap.add_argument("--seed", type=int, default=42, help="dropout: train.py --seed")
    ap.add_argument("--compare", choices=["attn", "kernel"], default="attn",
                    help="dropout: attn_pdrop 0.1 vs 0, or --dropout_kernel native vs cheap")
    ap.add_argument("--config", default="model_config_dialogue_small.json",
                    help="the model config (in config/)")
    ap.add_argument("--top", type=int, default=15, help="profile: operators shown")
    ap.add_argument("--shapes", action="store_true",
                    help="profile: one row per operator and input shapes (which tensor)")
    ap.add_argument("--blocks", default="100,75,50",
                    help="attention: query blocks timed against whole rows")
    ap.add_argument("--every", type=int, default=10, help="memory: steps per line")
    ap.add_argument("--same_batch", action="store_true",
                    help="memory: the same micro-batch every step")
    ap.add_argument("--allocator", choices=["auto", "system"], default="auto",
                    help="profile/memory/attention: malloc settings as train.py's flag of that "
                    "name")
    ap.add_argument("--train_path", default=str(DEFAULT_CORPUS))
    ap.add_argument("--work", default="/tmp/chitchat-bench", help="cache of token stores")
    ap.add_argument("--max_len", type=int, default=150, help="window / classic cut length")
    ap.add_argument("--pack_len", type=int, default=300)
    ap.add_argument("--fast_batch", type=int, default=4, help="packed rows per micro-batch")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4,
                    help="timed optimizer steps per repeat (profile: warm-up steps before "
                    "the profiled one; memory: all the steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=20,
                    help="speed: untimed steps before the timed windows, rounded up to whole "
                    "windows of --steps, the same for every path (a run's first ~20 steps "
                    "fault in the heap's fresh memory: --mode memory)")
    ap.add_argument("--gemm", type=int, default=2048)
    ap.add_argument("--dtypes", default="auto",
                    help="comma-separated fp32,bf16; auto: both where the CPU has fast bf16 "
                    "(AMX or avx512_bf16), else fp32 (bf16 steps there take many times "
                    "an fp32 step)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fp32_matmul", default="auto", choices=["auto", "blas", "onednn"],
                    help="speed/profile: fp32 products of the fast path, as train.py's flag")
    ap.add_argument("--dropout_kernel", default="auto", choices=["auto", "native", "cheap"],
                    help="the fast path's and profile's dropout (train.py's flag of that "
                    "name; auto = cheap on a CPU)")
    ap.add_argument("--epochs_q", type=float, default=1.0, help="quality: token budget")
    args = ap.parse_args()
    if args.every < 1:
        ap.error("--every must be at least 1")
    if args.mode in ("speed", "trainer") and (args.steps < 1 or args.warmup < 0):
        ap.error("--steps must be at least 1 and --warmup at least 0")
    # the profile and memory modes restart once with train.py's malloc settings
    restart = (train_py_allocator_env(os.environ)
               if args.mode in ("profile", "memory", "attention") and args.allocator == "auto"
               else {})
    if restart:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **restart})
    dtypes = bench_dtypes(args.dtypes, cpu_has_fast_bf16())
    if dtypes != args.dtypes and "bf16" not in dtypes and args.mode in ("speed", "profile",
                                                                        "memory"):
        print("no AMX or avx512_bf16 here: bf16 rows skipped (--dtypes fp32,bf16 runs them)")
    args.dtypes = dtypes
    {"speed": speed, "quality": quality, "profile": profile, "memory": memory,
     "dropout": dropout, "attention": attention,
     "time_to_loss": time_to_loss, "trainer": trainer_child}[args.mode](args)


if __name__ == "__main__":
    main()
