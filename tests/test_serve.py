"""The OpenAI-compatible server: API shapes, options, errors, limits, fuzzing, shutdown.

In-process through Starlette's TestClient on the tiny untrained model (replies are
gibberish, which is all the API needs). test_serve_live.py covers a real uvicorn server.
"""
from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from chitchat.serving.app import create_app  # noqa: E402
from chitchat.config import DecodingOptions, ModelOptions  # noqa: E402
from chitchat.serving.options import ServeConfig, ServerOptions  # noqa: E402
from chitchat.serving.schema import ApiError, ChatRequest, StopMatcher, to_history  # noqa: E402
from chitchat.utils import ChitchatError  # noqa: E402

URL = "/v1/chat/completions"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.fixture(scope="session")
def tiny_bot(tiny_model_dir):
    from chitchat.chat import Chatbot

    return Chatbot.from_pretrained(tiny_model_dir, device="cpu", max_len=12)


@pytest.fixture(scope="module")
def client(tiny_bot):
    with TestClient(create_app(tiny_bot, ServerOptions(max_body_bytes=4096, max_messages=8,
                                                       max_message_chars=200,
                                                       max_tokens_limit=40))) as c:
        yield c


def sse_events(text: str) -> list[str]:
    """The data of each server-sent event, in order."""
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines), block
        events.append("\n".join(line[6:] for line in lines))
    return events


def stream_chunks(client, body: dict) -> tuple[list[dict], str]:
    r = client.post(URL, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return chunks, "".join(c["choices"][0]["delta"].get("content", "")
                           for c in chunks if c["choices"])


# ---- happy paths ------------------------------------------------------------------------------
def test_completion_shape_and_usage(client, tiny_bot):
    msgs = [{"role": "system", "content": "ignored"}, user("你好"),
            {"role": "assistant", "content": "你好呀"}, user("吃了吗")]
    r = client.post(URL, json={"model": "anything", "messages": msgs, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "chitchat"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    ctx = tiny_bot.context(["你好", "你好呀", "吃了吗"])
    reply = tiny_bot.generate(["你好", "你好呀", "吃了吗"], seed=3)
    assert choice["message"]["content"] == reply.text  # the same history and seed
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(ctx.ids)
    assert usage["completion_tokens"] == len(reply.token_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_chunk_format(client):
    body = {"messages": [user("你好")], "seed": 7, "stream_options": {"include_usage": True}}
    chunks, text = stream_chunks(client, body)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final = chunks[-2]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    whole = client.post(URL, json={"messages": [user("你好")], "seed": 7}).json()
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks, _ = stream_chunks(client, {"messages": [user("hi")]})
    assert all(c["choices"] for c in chunks) and "usage" not in chunks[-1]


def test_options_map_to_decoding(client, tiny_bot):
    hist = ["今天天气不错"]
    r = client.post(URL, json={"messages": [user(hist[0])], "temperature": 0,
                               "max_tokens": 30}).json()
    assert r["choices"][0]["message"]["content"] == \
        tiny_bot.generate(hist, greedy=True, max_len=30).text
    for top_p in (0, 1):  # both mean no nucleus sampling, as --topp 0 does
        r = client.post(URL, json={"messages": [user(hist[0])], "top_p": top_p, "seed": 5,
                                   "max_completion_tokens": 30}).json()
        assert r["choices"][0]["message"]["content"] == \
            tiny_bot.generate(hist, seed=5, topp=0, max_len=30).text
    r = client.post(URL, json={"messages": [user(hist[0])], "max_tokens": 2, "top_k": 3,
                               "top_p": 0.9, "repetition_penalty": 1.3,
                               "frequency_penalty": 0.5, "presence_penalty": -1,
                               "tools": [], "user": "x"}).json()
    assert r["usage"]["completion_tokens"] <= 2
    if r["usage"]["completion_tokens"] == 2:
        assert r["choices"][0]["finish_reason"] == "length"
    a, b = (client.post(URL, json={"messages": [user("你好")], "seed": 11,
                                   "temperature": 1.5}).json() for _ in range(2))
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_history_is_trimmed_like_the_repl(client, tiny_bot):
    msgs = []
    for k in range(3):  # 7 messages: within --max_messages, beyond max_history_len
        msgs += [user(f"第{k}句话说了一些事情"), {"role": "assistant", "content": f"回答{k}"}]
    msgs.append(user("最后"))
    hist = [m["content"] for m in msgs]
    r = client.post(URL, json={"messages": msgs}).json()
    assert r["usage"]["prompt_tokens"] == len(tiny_bot.context(hist).ids)
    assert tiny_bot.context(hist).utterances_used < len(hist)


def test_to_history_mapping():
    msgs = ChatRequest.model_validate({"messages": [
        {"role": "developer", "content": "be nice"}, user("a"), user(" b  c "),
        {"role": "assistant", "content": ""}, {"role": "assistant", "content": None},
        {"role": "system", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "d"}, {"type": "text", "text": "e"}]},
    ]}).messages
    # consecutive user turns merge (the empty assistant turns between them are dropped)
    assert to_history(msgs, 10, 100) == ["a b c d e"]
    msgs = ChatRequest.model_validate({"messages": [user("a"), {"role": "assistant",
                                                                "content": "b"}, user("c")]})
    assert to_history(msgs.messages, 10, 100) == ["a", "b", "c"]
    with pytest.raises(ApiError, match="must have role 'user'"):
        to_history(ChatRequest.model_validate(
            {"messages": [user("a"), {"role": "system", "content": "s"}] * 1 +
             [{"role": "assistant", "content": "b"}]}).messages, 10, 100)


@pytest.mark.parametrize("pieces,stops,expect,hit", [
    (["ab", "c", "de"], [], "abcde", False),
    (["ab", "c", "de"], ["cd"], "ab", True),
    (["ab", "c", "de"], ["x", "bc"], "a", True),
    (["a<", "/", "s>", "z"], ["</s>"], "a", True),
    (["a<", "/", "x"], ["</s>"], "a</x", False),
    (["你好", "吗？", "好"], ["？"], "你好吗", True),
])
def test_stop_matcher(pieces, stops, expect, hit):
    m = StopMatcher(stops)
    sent = "".join(m.push(p) for p in pieces) + m.flush()
    assert sent == expect == m.text and m.hit is hit


def test_stop_sequence_cuts_the_reply(client):
    base = {"messages": [user("今天天气不错")], "temperature": 0, "max_tokens": 30}
    full = client.post(URL, json=base).json()["choices"][0]["message"]["content"]
    if len(full) < 4:
        pytest.skip(f"the tiny model's greedy reply {full!r} is too short to cut")
    stop = full[2:4]
    cut = full[:full.index(stop)]
    r = client.post(URL, json={**base, "stop": [stop, "never-seen"]}).json()
    assert r["choices"][0]["message"]["content"] == cut
    assert r["choices"][0]["finish_reason"] == "stop"
    _, text = stream_chunks(client, {**base, "stop": stop})
    assert text == cut


def test_usage_counts_the_reply_up_to_the_stop_sequence(client, tiny_bot):
    """The engine decodes on until the stop's cancel reaches it; usage must not count that
    (it varied between identical requests): only the tokens whose text the reply shows."""
    hist, base = ["你好"], {"messages": [user("你好")], "max_tokens": 30}
    for seed in range(20):
        pieces = list(tiny_bot.start(hist, seed=seed, max_new_tokens=30))
        if len(pieces) >= 6 and all(pieces[:4]):
            break
    text, stop = "".join(pieces), pieces[2] + pieces[3]
    cut = text[:text.index(stop)]
    starts = [len("".join(pieces[:i])) for i in range(len(pieces))]
    expect = sum(1 for a in starts if a < len(cut))
    assert expect < 4  # the tokens that completed the stop are not the reply's
    body = {**base, "seed": seed, "stop": stop, "stream_options": {"include_usage": True}}
    for _ in range(3):
        r = client.post(URL, json=body).json()
        assert r["choices"][0]["message"]["content"] == cut
        assert r["usage"]["completion_tokens"] == expect
        assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + expect
        chunks, streamed = stream_chunks(client, body)
        assert streamed == cut and chunks[-1]["usage"] == r["usage"]


def test_models_health_and_page(client):
    assert client.get("/health").json() == {"status": "ready", "model": "chitchat"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "chitchat"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "static/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")
    js = client.get("/static/app.js").text
    assert "innerHTML" not in js and "textContent" in js
    assert client.get("/static/style.css").status_code == 200


# ---- errors -----------------------------------------------------------------------------------
def assert_error(r, status: int, param: str | None = "-"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "-":
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body,param", [
    (b"{", None), (b"", None), (b"\xff\xfe", None), (b"[1]", None), (b"null", None),
    (b'{"messages": []}', "messages"),
    (b'{"messages": "hi"}', "messages"),
    (b'{"model": "m"}', "messages"),
    (b'{"messages": [{"role": "user"}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": "   "}]}', "messages"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},'
     b' {"role": "assistant", "content": "x"}]}', "messages"),
    (b'{"messages": [{"role": "tool", "content": "hi"}]}', "messages.0.role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 41}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1e3}', "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 99999999999999999999999}',
     "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}',
     "stop"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": -1}', "top_k"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}',
     "repetition_penalty"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * 201 + b'"}]}', "messages.0.content"),
    (json.dumps({"messages": [user("a")] * 9}).encode(), "messages"),
    (b"[" * 2000 + b"]" * 2000, None),
])
def test_bad_requests_are_400(client, body, param):
    err = assert_error(client.post(URL, content=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_message_without_tokens_is_400(client, tiny_bot):
    # Zero-width spaces are not whitespace to Python but encode to nothing: the Chatbot's
    # own check rejects the history, answered as a 400 before anything is queued.
    assert tiny_bot.tokenizer.encode("\u200b") == []
    err = assert_error(client.post(URL, json={"messages": [user("\u200b\u200b")]}), 400)
    assert "no tokens" in err["message"]


def test_limits(client):
    assert_error(client.post(URL, content=b"{" + b" " * 5000 + b"}"), 413)

    def chunked():  # no Content-Length: the limit must hold while reading
        for _ in range(10):
            yield b" " * 1000
    assert_error(client.post(URL, content=chunked()), 413)
    assert_error(client.get("/nowhere"), 404)
    assert_error(client.get(URL), 405)


def test_api_key(tiny_bot):
    with TestClient(create_app(tiny_bot, ServerOptions(api_key="s3cret-ключ"))) as c:
        body = {"messages": [user("hi")], "max_tokens": 2}
        assert_error(c.post(URL, json=body), 401)["code"] == "invalid_api_key"
        assert_error(c.post(URL, json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        ok = {"Authorization": "Bearer s3cret-ключ".encode()}  # raw UTF-8 bytes on the wire
        assert c.post(URL, json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key
        assert c.get("/").status_code == 200


def test_503_while_loading(tiny_bot):
    go = threading.Event()

    def loader():
        assert go.wait(30)
        return tiny_bot

    with TestClient(create_app(loader=loader)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        err = assert_error(c.post(URL, json={"messages": [user("hi")]}), 503)
        assert err["code"] == "model_loading"
        go.set()
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert c.post(URL, json={"messages": [user("hi")]}).status_code == 200


def test_failed_load_is_503_and_reported(tiny_bot):
    seen = []

    def loader():
        raise ChitchatError("no model here")

    with TestClient(create_app(loader=loader, on_load_error=seen.append)) as c:
        for _ in range(100):
            if seen:
                break
            threading.Event().wait(0.05)
        assert c.get("/health").json() == {"status": "failed", "model": "chitchat",
                                           "error": "no model here"}
        assert "no model here" in assert_error(c.post(URL, json={"messages": [user("x")]}),
                                               503)["message"]
    assert isinstance(seen[0], ChitchatError)


def test_serve_config_validation(tmp_path):
    with pytest.raises(ChitchatError, match="--model_path is required"):
        ServeConfig()
    model = ModelOptions(model_path=str(tmp_path))
    with pytest.raises(ChitchatError, match="max_tokens_limit"):
        ServeConfig(model=model, decoding=DecodingOptions(max_new_tokens=300),
                    server=ServerOptions(max_tokens_limit=100))
    assert ServeConfig(model=model).server.host == "127.0.0.1"


# ---- fuzz -------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | json_values},
    optional={"content": st.text(max_size=30) | json_values}), max_size=5)
option_values = st.fixed_dictionaries({}, optional={
    k: json_values | st.integers(-5, 50) | st.floats(-3, 3)
    for k in ("temperature", "top_p", "max_tokens", "seed", "stop", "n", "top_k",
              "repetition_penalty", "frequency_penalty", "stream", "stream_options")})
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda m, o: json.dumps({"messages": m, **o}).encode(), messages, option_values),
)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies)
def test_fuzz_never_500(client, body):
    r = client.post(URL, content=body)
    assert r.status_code in (200, 400, 413), (body, r.status_code, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert sse_events(r.text)[-1] == "[DONE]"


def test_server_answers_after_fuzz(client):
    r = client.post(URL, json={"messages": [user("你好")], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_sse_framing_survives_any_model_text():
    from chitchat.serving.schema import sse as _sse

    evil = "a\n\ndata: [DONE]\r\n\r\nb\u2028c\x00"
    frame = _sse({"content": evil})
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    assert frame.count("\n") == 2 and "\r" not in frame
    assert json.loads(frame[6:])["content"] == evil
