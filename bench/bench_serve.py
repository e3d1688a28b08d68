"""serve.py under load: streaming clients arriving over time, this engine beside another.

    python bench/bench_serve.py                                      # quick look
    python bench/bench_serve.py --baseline_rev 4655e33 --repeats 3   # figures in the docs
    python bench/bench_serve.py --model_path model/<run>/best        # a trained model
    python bench/bench_serve.py --variant "whole=--max_step_tokens 0"  # with other serve flags

Each engine is `python serve.py` as its own process on 127.0.0.1 (so the clients in this
process do not share its interpreter): this checkout's, and with --baseline_rev the serve.py
of that git revision (exported with `git archive`), and each --variant (this checkout's
serve.py with extra flags), run with the same flags one after the other in the same run.
For each client count (--clients, default 1 4 8 16 32) the clients start at even intervals
over --spread seconds, and each streams --requests replies back to back, of 10 to 60 tokens
(--lengths; the same pseudo-random lengths for every engine; the server runs with --min_len
60, so a request for n tokens gets exactly n).

Reported per engine and client count (median of --repeats runs, each on a fresh server):
first-token latency p50/p95, inter-token latency p50/p95 (gaps between a reply's chunks,
all replies pooled) and the worst client's inter-token p95, replies/s and tokens/s, the
longest wait for a first token against the wait the queue position implies, and the
server's RSS after the setting. The decode step of a batch of 8 rows is timed in this
process on the same model before each run (median kept), for the inter-token target, and so
is the step in which a request joins 7 running rows (its context's compute is most of what
the worst client's inter-token p95 waits for). Without --model_path an untrained
model of --model_config (default: GPT2-chitchat's small shape) is built on the sample
corpus's vocab: speed does not depend on the weights. Everything is bounded: at most 64
clients and 20 requests each, and --time_limit seconds per setting.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(config: str, work: Path) -> Path:
    """An untrained model of `config` on the sample corpus's vocab (cached in `work`)."""
    out = work / ("untrained-" + Path(config).stem)
    if (out / "config.json").is_file():
        return out
    import torch

    from chitchat.config import PreprocessConfig
    from chitchat.store import TokenStore
    from chitchat.modeling import build_model as build, load_config, save_model
    from chitchat.preprocessing import preprocess

    store = work / "sample-store"
    if not (store / "meta.json").is_file():
        preprocess(PreprocessConfig(train_path=str(ROOT / "data/sample/train.txt"),
                                    save_path=str(store), quiet=True))
    torch.manual_seed(0)
    tok = TokenStore(store).tokenizer()
    save_model(build(load_config(config, tok)), tok, out)
    return out


def export_rev(rev: str, work: Path) -> Path:
    """The tree of git revision `rev` in `work` (for its serve.py and chitchat package)."""
    out = work / f"rev-{rev}"
    if not (out / "serve.py").is_file():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


class Server:
    """serve.py in a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, tree: Path, model: Path, max_len: int, max_batch: int,
                 extra: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, str(tree / "serve.py"), "--model_path", str(model), "--port", "0",
             "--max_len", str(max_len), "--min_len", str(max_len), "--max_batch", str(max_batch),
             "--max_tokens_limit", str(max(max_len, 256)), "--log_level", "warning",
             "--device", "cpu", "--max_connections", "256", *extra],
            cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = None
        self.log: list[str] = []

    def __enter__(self) -> str:
        # serve.py logs its address (the real port of --port 0) before it loads the model.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("serve.py exited:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            raise RuntimeError("serve.py did not start:\n" + "".join(self.log))
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("serve.py did not get ready:\n" + "".join(self.log))

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise RuntimeError("serve.py did not stop within 30 s of SIGTERM")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024


def prompt(k: int, chars: int) -> str:
    """Request k's message: a short question, or with `chars` about that many characters
    (a token each: the context's length, up to what the server's trimming keeps)."""
    text = f"第{k}个问题：今天过得怎么样？"
    return (text * (chars // len(text) + 1))[:chars] if chars else text


async def one_reply(client: httpx.AsyncClient, url: str, k: int, n_tokens: int,
                    chars: int = 0) -> dict:
    body = {"messages": [{"role": "user", "content": prompt(k, chars)}],
            "stream": True, "max_tokens": n_tokens, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []  # arrival of each chunk with content
    usage = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
        if not done:
            raise RuntimeError("the stream ended without [DONE]")
    if usage["completion_tokens"] != n_tokens:
        raise RuntimeError(f"a reply of {usage['completion_tokens']} tokens, not {n_tokens}")
    return {"start": t0, "ttft": times[0] - t0, "end": time.perf_counter(),
            "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": n_tokens}


async def drive(url: str, lengths: list[list[int]], spread: float, limit: float,
                chars: int = 0) -> dict:
    """One client per list of `lengths`, started at even intervals over `spread` seconds,
    each streaming its replies back to back."""
    clients = len(lengths)
    results: list[list[dict]] = [[] for _ in range(clients)]

    async def client_loop(c: int, client: httpx.AsyncClient):
        await asyncio.sleep(spread * c / clients)
        for r, n in enumerate(lengths[c]):
            results[c].append(await one_reply(client, url, c * 100 + r, n, chars))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=limit, limits=limits) as client:
        await one_reply(client, url, -1, 10, chars)  # warm-up, not timed
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(c, client)
                                                for c in range(clients))), limit)
        wall = time.perf_counter() - t0
    replies = [r for rs in results for r in rs]
    ttft = sorted(r["ttft"] for r in replies)
    gaps = sorted(g for r in replies for g in r["gaps"])
    # FIFO: a request that started clearly later but got its first token clearly earlier
    # than one still waiting overtook it in the queue.
    overtaken = sum(1 for a in replies for b in replies
                    if b["start"] > a["start"] + 0.05
                    and b["start"] + b["ttft"] < a["start"] + a["ttft"] - 0.05)
    worst_client = max(pct(sorted(g for r in rs for g in r["gaps"]), 95) for rs in results)
    return {"replies": len(replies), "replies_per_s": len(replies) / wall,
            "tokens_per_s": sum(r["tokens"] for r in replies) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "ttft_max": ttft[-1],
            "itl_p50": pct(gaps, 50), "itl_p95": pct(gaps, 95),
            "itl_p95_worst_client": worst_client, "overtaken": overtaken}


def step_time(model: Path, rows: int = 8, context: int = 20, join: int = 17, steps: int = 30,
              threads: int | None = None) -> tuple[float, float]:
    """Median seconds of one decode step of `rows` rows (this checkout's lean backend),
    after a context of `context` tokens, with serve.py's --threads; and, timed after those,
    of the step in which a request with a `join`-token context (a request of this bench is
    16 to 18) joins rows - 1 running rows: the engine's costliest common step, and the
    floor of a client's inter-token tail when joins are frequent."""
    import torch

    from chitchat.chat import Chatbot

    if threads:
        torch.set_num_threads(threads)
    bot = Chatbot.from_pretrained(model, device="cpu")
    be = bot.backend
    cache = be.row_cache(rows, context + 60)
    plain, joined = [], []
    with torch.inference_mode():
        be.prefill(cache, 0, [[5] * context] * rows)
        tokens = torch.full((rows,), 5, dtype=torch.long)
        for _ in range(steps):
            t0 = time.perf_counter()
            be.step_rows(cache, tokens)
            plain.append(time.perf_counter() - t0)
        for _ in range(steps):
            cache.lens[:] = context + steps  # the same positions every time
            t0 = time.perf_counter()
            be.step_and_prefill(cache, tokens[:rows - 1], False, [[5] * join])
            joined.append(time.perf_counter() - t0)
    return statistics.median(plain[5:]), statistics.median(joined[5:])


def pct(xs: list[float], p: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", help="model folder (default: an untrained --model_config)")
    ap.add_argument("--model_config", default=str(ROOT / "config/model_config_dialogue_small.json"))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "chitchat-bench-serve"))
    ap.add_argument("--baseline_rev", help="also run the serve.py of this git revision")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--requests", type=int, default=3, help="replies per client")
    ap.add_argument("--lengths", type=int, nargs=2, default=[10, 60],
                    help="reply lengths in tokens, drawn uniformly from this range")
    ap.add_argument("--spread", type=float, default=2.0,
                    help="seconds over which the clients start")
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (median kept)")
    ap.add_argument("--time_limit", type=float, default=120,
                    help="seconds per client count and run, at most (then the larger client "
                         "counts of that run are skipped)")
    ap.add_argument("--threads", type=int, help="serve.py --threads")
    ap.add_argument("--prompt_chars", type=int, default=0,
                    help="make each request's message this many characters long (default: "
                         "a short question, a context of 16 to 18 tokens)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="also run this checkout's serve.py with these extra flags, e.g. "
                         "'whole=--max_step_tokens 0' (repeatable)")
    args = ap.parse_args(argv)
    lo, hi = args.lengths
    if not (all(1 <= c <= 64 for c in args.clients) and 1 <= args.requests <= 20
            and args.repeats >= 1 and 1 <= lo <= hi <= 250 and 0 <= args.prompt_chars <= 1000):
        ap.error("--clients must be 1..64, --requests 1..20, --repeats >= 1, "
                 "--lengths 1 <= lo <= hi <= 250, --prompt_chars 0..1000")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model_path) if args.model_path else build_model(args.model_config, work)
    extra = ["--threads", str(args.threads)] if args.threads else []
    engines = [("this", ROOT, [])]
    for v in args.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name or name in [e[0] for e in engines] + [args.baseline_rev]:
            ap.error(f"--variant {v!r}: expected NAME=FLAGS with a name of its own")
        engines.append((name, ROOT, flags.split()))
    if args.baseline_rev:
        engines.append((args.baseline_rev, export_rev(args.baseline_rev, work), []))
    rng = random.Random(0)
    lengths = {c: [[rng.randint(lo, hi) for _ in range(args.requests)] for _ in range(c)]
               for c in args.clients}
    print(f"model {model}, clients {args.clients}, {args.requests} replies each of {lo}-{hi} "
          f"tokens, starts over {args.spread} s, --max_batch {args.max_batch}, "
          f"{args.repeats} run(s), messages of {args.prompt_chars or '14 to 16'} characters",
          flush=True)
    rows: dict[tuple[str, int], dict] = {}
    steps = []  # a shared machine's speed can drift over minutes: time the step before each run
    for rep in range(args.repeats):
        steps.append(step_time(model, rows=8, threads=args.threads))
        print(f"  run {rep + 1}: decode step of 8 rows {steps[-1][0] * 1000:.1f} ms; a step in "
              f"which a 17-token context joins 7 running rows {steps[-1][1] * 1000:.1f} ms "
              f"({steps[-1][1] / steps[-1][0]:.2f}x)", flush=True)
        for name, tree, flags in engines:
            server = Server(tree, model, hi, args.max_batch, extra + flags)
            with server as url:
                for c in args.clients:
                    try:
                        res = asyncio.run(drive(url, lengths[c], args.spread,
                                                args.time_limit, args.prompt_chars))
                    except asyncio.TimeoutError:
                        # More clients would take longer still: this server is done.
                        print(f"  run {rep + 1} {name} {c} clients: not finished in "
                              f"{args.time_limit:g} s", flush=True)
                        for more in args.clients[args.clients.index(c):]:
                            rows.setdefault((name, more), []).append(None)
                        break
                    res["rss_mb"] = server.rss_mb()
                    rows.setdefault((name, c), []).append(res)
                    print(f"  run {rep + 1} {name} {c} clients: first token p95 "
                          f"{res['ttft_p95']:.3f} s, {res['replies_per_s']:.2f} replies/s",
                          flush=True)
    step8, join8 = (statistics.median(s[i] for s in steps) for i in (0, 1))
    print_table(rows, engines, args.clients, step8, join8)


def print_table(rows, engines, clients, step8, join8):
    print("\n| engine | clients | first token p50 / p95 (max) | inter-token p50 / p95 (worst "
          "client) | replies/s | tokens/s | overtaken | RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for name, *_ in engines:
        for c in clients:
            runs = [r for r in rows[(name, c)] if r is not None]
            if len(runs) < len(rows[(name, c)]):
                print(f"| {name} | {c} | not finished within --time_limit in "
                      f"{len(rows[(name, c)]) - len(runs)} of {len(rows[(name, c)])} runs |")
                continue
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"| {name} | {c} | {m['ttft_p50']:.3f} / {m['ttft_p95']:.3f} "
                  f"({m['ttft_max']:.2f}) s | "
                  f"{m['itl_p50'] * 1000:.0f} / {m['itl_p95'] * 1000:.0f} "
                  f"({m['itl_p95_worst_client'] * 1000:.0f}) ms | {m['replies_per_s']:.2f} | "
                  f"{m['tokens_per_s']:.0f} | {m['overtaken']:.0f} | {m['rss_mb']:.0f} MB |")
    print(f"\ndecode step of 8 rows (this checkout, median of the runs): {step8 * 1000:.1f} ms; "
          f"with a context joining: {join8 * 1000:.1f} ms ({join8 / step8:.2f}x)")
    for name, *_ in engines:
        med = {c: {k: statistics.median(r[k] for r in rows[(name, c)])
                   for k in rows[(name, c)][0]} for c in clients
               if None not in rows[(name, c)]}
        if 1 in med and 8 in med:
            print(f"{name}: 8 clients: first-token p95 {med[8]['ttft_p95'] / med[1]['ttft_p95']:.2f}x "
                  f"a lone client's (target <= 3x, moonshot 1.5x); replies/s "
                  f"{med[8]['replies_per_s'] / med[1]['replies_per_s']:.2f}x sequential "
                  f"(target >= 4x); worst client's inter-token p95 "
                  f"{med[8]['itl_p95_worst_client'] / step8:.2f}x the 8-row step (target <= 2x), "
                  f"{med[8]['itl_p95_worst_client'] / join8:.2f}x the join step")
        if 8 in med and 32 in med:
            print(f"{name}: 32 clients: RSS {med[32]['rss_mb'] / med[8]['rss_mb']:.2f}x the "
                  f"8-client RSS (target <= 1.2x), {med[32]['overtaken']:.0f} overtaken")


if __name__ == "__main__":
    main()
