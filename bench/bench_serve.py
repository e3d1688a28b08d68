"""serve.py under load: N concurrent streaming clients against one client at a time.

    python bench/bench_serve.py                                   # quick look (~1 min)
    python bench/bench_serve.py --clients 8 --requests 6 --max_len 40 --repeats 3  # final figures
    python bench/bench_serve.py --model_path model/<run>/best     # a trained model

Each setting runs `python serve.py` as its own process on 127.0.0.1 (so the clients in this
process do not share its interpreter), then the clients stream chat completions with httpx:

    sequential   one client, `clients * requests` replies one after another (the baseline)
    serialised   `clients` clients at once, --max_batch 1: one reply at a time on the model
    batched      `clients` clients at once, --max_batch = clients: waiting requests decoded
                 together as one padded batch

Every reply is exactly --max_len tokens (the server runs with --min_len = --max_len), so the
settings do the same work. Reported per setting: replies/s, p50/p95 of the whole reply's
latency and of the time to the first token, and the ratios against `sequential`. Without
--model_path an untrained model of --model_config (default: GPT2-chitchat's small shape) is
built on the sample corpus's vocab: speed does not depend on the weights. Everything is
bounded: at most 64 clients and 50 requests each, and --time_limit seconds per setting.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    from chitchat.data import TokenStore
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


class Server:
    """serve.py in a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, model: Path, max_len: int, max_batch: int, extra: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--model_path", str(model), "--port", "0",
             "--max_len", str(max_len), "--min_len", str(max_len), "--max_batch", str(max_batch),
             "--max_tokens_limit", str(max(max_len, 256)), "--log_level", "warning",
             "--device", "cpu", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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


async def one_reply(client: httpx.AsyncClient, url: str, k: int, max_len: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"第{k}个问题：今天过得怎么样？"}],
            "stream": True, "max_tokens": max_len, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
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
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
        if not done:
            raise RuntimeError("the stream ended without [DONE]")
    if usage["completion_tokens"] != max_len:
        raise RuntimeError(f"a reply of {usage['completion_tokens']} tokens, not {max_len}")
    return {"latency": time.perf_counter() - t0, "ttft": first}


async def drive(url: str, clients: int, requests: int, max_len: int, limit: float) -> dict:
    """`clients` concurrent clients, each sending `requests` replies back to back."""
    results: list[dict] = []

    async def client_loop(c: int, client: httpx.AsyncClient):
        for r in range(requests):
            results.append(await one_reply(client, url, c * requests + r, max_len))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=limit, limits=limits) as client:
        await one_reply(client, url, -1, max_len)  # warm-up, not timed
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(c, client)
                                                for c in range(clients))), limit)
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    return {"replies_per_s": len(results) / wall, "p50": pct(lat, 50), "p95": pct(lat, 95),
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "replies": len(results)}


def pct(xs: list[float], p: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", help="model folder (default: an untrained --model_config)")
    ap.add_argument("--model_config", default=str(ROOT / "config/model_config_dialogue_small.json"))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "chitchat-bench-serve"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=3, help="replies per client")
    ap.add_argument("--max_len", type=int, default=20, help="tokens per reply")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (median kept)")
    ap.add_argument("--time_limit", type=float, default=300, help="seconds per run, at most")
    ap.add_argument("--threads", type=int, help="serve.py --threads")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 50 and args.repeats >= 1):
        ap.error("--clients must be 1..64, --requests 1..50, --repeats >= 1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model_path) if args.model_path else build_model(args.model_config, work)
    extra = ["--threads", str(args.threads)] if args.threads else []
    n, r = args.clients, args.requests
    settings = [("sequential", 1, 1, n * r), ("serialised", n, 1, r), ("batched", n, n, r)]
    print(f"model {model}, {n} clients x {r} replies of {args.max_len} tokens, "
          f"{args.repeats} run(s) per setting", flush=True)
    rows = {}
    for name, clients, max_batch, requests in settings:
        runs = []
        for _ in range(args.repeats):
            with Server(model, args.max_len, max_batch, extra) as url:
                runs.append(asyncio.run(drive(url, clients, requests, args.max_len,
                                              args.time_limit)))
        rows[name] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        print(f"  {name:<11} {rows[name]['replies_per_s']:6.2f} replies/s  "
              f"p50 {rows[name]['p50']:.3f} s  p95 {rows[name]['p95']:.3f} s  "
              f"first token p50 {rows[name]['ttft_p50']:.3f} s", flush=True)
    base = rows["sequential"]
    print("\n| setting | replies/s | p50 latency | p95 latency | first token p50 |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} ({'1 client' if name == 'sequential' else f'{n} clients'}) | "
              f"{row['replies_per_s']:.2f} (x{row['replies_per_s'] / base['replies_per_s']:.2f}) | "
              f"{row['p50']:.3f} s (x{row['p50'] / base['p50']:.2f}) | "
              f"{row['p95']:.3f} s (x{row['p95'] / base['p95']:.2f}) | "
              f"{row['ttft_p50']:.3f} s (x{row['ttft_p50'] / base['ttft_p50']:.2f}) |")


if __name__ == "__main__":
    main()
