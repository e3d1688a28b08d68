"""The server under a real uvicorn on loopback: the official openai client, concurrent
clients, the event loop staying free during generation, and serve.py's SIGTERM shutdown."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from chitchat.server import ServerOptions, create_app  # noqa: E402
from serve_support import LiveServer, wait_ready  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"


@pytest.fixture(scope="module")
def live_bot(tiny_model_dir):
    from chitchat.chat import Chatbot

    return Chatbot.from_pretrained(tiny_model_dir, device="cpu", max_len=16)


@pytest.fixture(scope="module")
def server(live_bot):
    with LiveServer(create_app(live_bot, ServerOptions(api_key=KEY, max_batch=4))) as url:
        yield url


def test_openai_client(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["chitchat"]
    r = client.chat.completions.create(
        model="chitchat", messages=[{"role": "system", "content": "ignored"},
                                    {"role": "user", "content": "你好"}],
        temperature=0.7, top_p=0.9, max_tokens=10, seed=5, extra_body={"top_k": 5})
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and isinstance(text, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 10 and r.usage.prompt_tokens >= 3

    stream = client.chat.completions.create(
        model="chitchat", messages=[{"role": "user", "content": "你好"}], temperature=0.7,
        top_p=0.9, max_tokens=10, seed=5, extra_body={"top_k": 5}, stream=True,
        stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == text  # same seed, same reply, streamed or not
    assert finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chitchat", messages=[])
    assert e.value.status_code == 400
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="chitchat",
                                    messages=[{"role": "user", "content": "hi"}])


def stream_reply(url: str, text: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "stream": True,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        raw = "".join(r.iter_text())
    events = [block[6:] for block in raw.split("\n\n") if block]
    assert events[-1] == "[DONE]", raw[-200:]
    chunks = [json.loads(e) for e in events[:-1]]
    return {"text": "".join(c["choices"][0]["delta"].get("content", "")
                            for c in chunks if c["choices"]),
            "finish": [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1],
            "usage": chunks[-1]["usage"], "seconds": time.perf_counter() - t0}


def test_concurrent_clients_all_get_complete_replies(server):
    n = 8
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda k: stream_reply(server, f"第{k}个问题", 12), range(n)))
    for res in results:
        assert res["finish"] in ("stop", "length")
        assert res["usage"]["completion_tokens"] >= 1
        if res["finish"] == "length":
            assert res["usage"]["completion_tokens"] == 12
    assert max(r["seconds"] for r in results) < 30


class SlowBot:
    """The tiny bot with each token taking 50 ms, as a large model on a busy CPU would, and
    every reply max_tokens long (min_len = max_len), so a generation's length is known."""

    def __init__(self, bot):
        self.bot = bot
        self.options = bot.options

    def __getattr__(self, name):
        return getattr(self.bot, name)

    def start(self, history, **overrides):
        max_len = overrides.get("max_len", self.bot.options.max_len)
        rs = self.bot.start(history, **{**overrides, "min_len": max_len})

        class Slow:
            def __iter__(self):
                return self

            def __next__(self):
                time.sleep(0.05)
                return next(rs)

            def close(self):
                rs.close()

            @property
            def reply(self):
                return rs.reply
        return Slow()


def test_generation_does_not_block_the_event_loop(live_bot):
    app = create_app(SlowBot(live_bot), ServerOptions(max_batch=1))
    with LiveServer(app) as url:
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 16}
        t = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions",
                                                       json=body, timeout=30))
        t.start()
        time.sleep(0.2)  # generation is now running on the worker thread
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 0.5
        t.join(30)


def test_client_disconnect_stops_generation(live_bot):
    slow = SlowBot(live_bot)
    app = create_app(slow, ServerOptions(max_batch=1))
    with LiveServer(app) as url:
        body = {"messages": [{"role": "user", "content": "你好"}], "stream": True,
                "max_tokens": 40}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            next(r.iter_raw())  # the first chunk, then hang up
        # The worker notices within a token and is free for the next request at once.
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
        assert time.perf_counter() - t0 < 1.5  # not the 40 * 50 ms of the abandoned reply


# ---- serve.py ---------------------------------------------------------------------------------
def run_serve(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_serve_cli_sigterm_is_clean(tiny_model_dir):
    proc = run_serve("--model_path", str(tiny_model_dir), "--port", "0", "--device", "cpu",
                     "--max_len", "8")
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            url = m and m.group(1)
        assert url, "".join(lines)
        wait_ready(url, proc=proc)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       content='{"messages":[{"role":"user","content":"你好"}]}',
                       headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = "".join(lines) + out
    assert proc.returncode == 0, log
    assert "server stopped" in log and "stopped by SIGTERM" in log
    assert "Traceback" not in log


def test_serve_cli_bad_model_path(tmp_path):
    proc = run_serve("--model_path", str(tmp_path / "missing"), "--port", "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "does not exist" in out, out
