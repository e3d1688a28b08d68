"""The server under a real uvicorn on loopback: the official openai client, concurrent
clients, the event loop staying free during generation, and serve.py's SIGTERM shutdown."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from chitchat.serving.app import create_app  # noqa: E402
from chitchat.serving.options import ServerOptions  # noqa: E402
from serve_support import LiveServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
pytestmark = pytest.mark.slow  # a real server on loopback, and serve.py as a process


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
            "usage": chunks[-1]["usage"]}


def test_concurrent_clients_all_get_complete_replies(server):
    n = 8
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda k: stream_reply(server, f"第{k}个问题", 12), range(n)))
    for res in results:
        assert res["finish"] in ("stop", "length")
        assert res["usage"]["completion_tokens"] >= 1
        if res["finish"] == "length":
            assert res["usage"]["completion_tokens"] == 12


def slow_bot(model_dir, seconds: float = 0.05, **options):
    """A bot of its own whose every decoding step takes `seconds` more, as a large model on
    a busy CPU would, and whose replies are max_tokens long (min_len follows max_tokens),
    so a generation's length is known. `bot.steps` counts the steps."""
    from chitchat.chat import Chatbot

    bot = Chatbot.from_pretrained(model_dir, device="cpu", **{"max_len": 60, "min_len": 60,
                                                                **options})
    inner = bot.backend.step_rows
    bot.steps = 0

    def step_rows(*a, **kw):
        bot.steps += 1
        threading.Event().wait(seconds)
        return inner(*a, **kw)
    bot.backend.step_rows = step_rows
    return bot


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    """Until predicate() holds; the timeout only keeps a broken server from hanging."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"never happened: {what}")
        time.sleep(0.01)


def test_generation_does_not_block_the_event_loop(tiny_model_dir):
    bot = slow_bot(tiny_model_dir)
    app = create_app(bot, ServerOptions(max_batch=1))
    with LiveServer(app) as url:
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 40}
        t = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions",
                                                       json=body, timeout=30))
        t.start()
        wait_for(lambda: bot.steps >= 1, "generation started")
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert t.is_alive(), "/health waited for the whole reply (40 steps of 50 ms)"
        t.join(30)


def test_client_disconnect_stops_generation(tiny_model_dir):
    bot = slow_bot(tiny_model_dir)
    app = create_app(bot, ServerOptions(max_batch=1))
    engine = lambda: app.state.chitchat.engine  # noqa: E731
    with LiveServer(app) as url:
        body = {"messages": [{"role": "user", "content": "你好"}], "stream": True,
                "max_tokens": 40}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            next(r.iter_raw())  # the first chunk, then hang up
        wait_for(lambda: engine().active == 0, "the abandoned row left")
        assert bot.steps < 39  # not the whole reply


def join_while_running(tiny_model_dir, options: ServerOptions):
    """A reply runs on a live server, and a second request comes meanwhile; both ask for 20
    tokens. Returns the usage of both and, per step that computed joining contexts, its
    (running rows, context tokens)."""
    bot = slow_bot(tiny_model_dir)
    inner, joins = bot.backend.step_and_prefill, []

    def step_and_prefill(cache, tokens, types, contexts, **kw):
        joins.append((tokens.shape[0], sum(len(c) for c in contexts)))
        return inner(cache, tokens, types, contexts, **kw)
    bot.backend.step_and_prefill = step_and_prefill
    with LiveServer(create_app(bot, options)) as url:
        def ask(text):
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 20}
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, "你好")
            wait_for(lambda: bot.steps >= 2, "the first reply is running")
            second = pool.submit(ask, "今天天气不错，我们出去玩吧")
            replies = [first.result(), second.result()]
    return [r["usage"]["completion_tokens"] for r in replies], joins


def test_max_step_tokens_feeds_a_joining_context_in_chunks(tiny_model_dir):
    """serve.py --max_step_tokens reaches the engine: a context that joins a running reply
    goes in over several steps of at most that many tokens, and both replies complete."""
    usage, joins = join_while_running(
        tiny_model_dir, ServerOptions(max_batch=2, max_step_tokens=3, prefill_thread="off"))
    assert usage == [20, 20]
    assert len(joins) >= 5 and max(a + b for a, b in joins) <= 3  # 12+ tokens, 2 a step


@pytest.mark.parametrize("choice", ["on", "off"])
def test_prefill_thread_reaches_the_engine(tiny_model_dir, choice):
    """serve.py --prefill_thread: on, a request that comes while a reply runs has its
    context computed beside the running steps, never inside one; off, in a joining step."""
    usage, joins = join_while_running(tiny_model_dir,
                                      ServerOptions(max_batch=2, prefill_thread=choice))
    assert usage == [20, 20]
    assert len(joins) == (0 if choice == "on" else 1)


def send_raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(data)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def test_abandoned_plain_request_stops_generating(tiny_model_dir):
    """A non-streaming request whose client hangs up stops at the next step (issue 14)."""
    bot = slow_bot(tiny_model_dir)
    app = create_app(bot, ServerOptions(max_batch=1))
    engine = lambda: app.state.chitchat.engine  # noqa: E731
    with LiveServer(app) as url:
        body = json.dumps({"messages": [{"role": "user", "content": "你好"}],
                           "max_tokens": 40}).encode()
        s = send_raw(int(url.rsplit(":", 1)[1]),
                     b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: bot.steps >= 2, "generation started")
        s.close()
        wait_for(lambda: engine().active == 0, "the abandoned row left")
        assert bot.steps < 39


def test_idle_connections_do_not_lock_anyone_out(live_bot):
    """More idle and half-sent connections than --max_connections: /health and real
    requests are still answered, and the idle ones are closed (issue 14)."""
    opts = ServerOptions(max_connections=4, header_timeout=1.0, body_timeout=1.0,
                         api_key=KEY)
    with LiveServer(create_app(live_bot, opts)) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [send_raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n") for _ in range(12)]
        half = send_raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                              b"Authorization: Bearer " + KEY.encode() +
                              b"\r\nContent-Length: 200\r\n\r\n{\"messages\"")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"messages": [{"role": "user", "content": "你好"}],
                             "max_tokens": 3})
        assert r.status_code == 200, r.text
        for s in idle:  # closed by the server, without an answer
            assert read_until_closed(s) == b""
            s.close()
        answer = read_until_closed(half).decode()
        half.close()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert json.loads(answer.split("\r\n\r\n", 1)[1])["error"]["code"] == \
            "request_timeout"


def test_requests_in_progress_are_limited_but_health_is_not(tiny_model_dir):
    bot = slow_bot(tiny_model_dir)
    app = create_app(bot, ServerOptions(max_connections=2, max_batch=4))
    with LiveServer(app) as url:
        streams = [StreamClient(url, "你好", 60) for _ in range(2)]
        for c in streams:
            c.first.wait(60)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        for c in streams:
            c.join()
            assert c.events[-1] == "[DONE]"


class StreamClient(threading.Thread):
    """A streaming request in a thread: `events` (the SSE data, parsed unless [DONE]),
    `first` set once a chunk with content arrived."""

    def __init__(self, url: str, text: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.text, self.max_tokens = url, text, max_tokens
        self.events: list = []
        self.first = threading.Event()
        self.started_stream = threading.Event()
        self.start()

    def run(self):
        body = {"messages": [{"role": "user", "content": self.text}], "stream": True,
                "max_tokens": self.max_tokens}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                              timeout=60) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    self.started_stream.set()
                    if data != "[DONE]" and (self.events[-1].get("choices") or [{}])[0].get(
                            "delta", {}).get("content"):
                        self.first.set()
        finally:
            self.started_stream.set()
            self.first.set()


def test_shutdown_finishes_running_replies_and_ends_the_rest(tiny_model_dir, caplog):
    """SIGTERM (issue 14): a reply that can finish within --shutdown_timeout does; a queued
    one and one too long for it end with a shutting_down error event and [DONE]; one log
    line per cut request, no tracebacks."""
    bot = slow_bot(tiny_model_dir, seconds=0.2)
    app = create_app(bot, ServerOptions(max_batch=2, shutdown_timeout=6))
    engine = lambda: app.state.chitchat.engine  # noqa: E731
    srv = LiveServer(app)
    url = srv.__enter__()
    try:
        long = StreamClient(url, "你好", 60)  # 12 s of steps: more than the 6 s allowed
        long.first.wait(60)
        short = StreamClient(url, "吃了吗", 12)  # 2.4 s: ends in time, after `queued` came
        short.first.wait(60)
        queued = StreamClient(url, "出去玩吗", 4)
        queued.started_stream.wait(60)
        wait_for(lambda: engine().waiting == 1, "the third request queued")
        with caplog.at_level("INFO"):
            srv.stop()
            for c in (long, short, queued):
                c.join(60)
    finally:
        srv.__exit__(None, None, None)
    assert short.events[-1] == "[DONE]"
    assert short.events[-2]["choices"][0]["finish_reason"] == "length"
    for c in (long, queued):
        assert c.events[-1] == "[DONE]", c.events[-3:]
        assert c.events[-2]["error"]["code"] == "shutting_down"
    assert len(long.events) > 3  # it had been replying
    cut = [r.getMessage() for r in caplog.records if "cut after" in r.getMessage()]
    assert len(cut) == 2, cut
    assert not [r for r in caplog.records if r.exc_info or "Cancel" in r.getMessage()]


def test_stopping_server_refuses_new_requests(live_bot):
    app = create_app(live_bot, ServerOptions())
    with LiveServer(app) as url:
        app.state.chitchat.begin_shutdown()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=10,
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503
        assert r.json()["error"] == {"message": "the server is shutting down",
                                     "type": "server_error", "param": None,
                                     "code": "shutting_down"}
        h = httpx.get(f"{url}/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "stopping"


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
        ready = False  # serve.py logs "model ready" when /health turns 200
        while not (url and ready):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            url = url or (m and m.group(1))
            ready = ready or "model ready" in line
        assert url and ready, "".join(lines)
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
