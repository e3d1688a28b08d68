"""An OpenAI-compatible chat server (FastAPI) and a web chat page for a `Chatbot`.

    from chitchat.server import create_app, ServerOptions
    app = create_app(bot, ServerOptions(api_key="secret"))   # any ASGI server runs it

Endpoints: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /health`` and the chat page at ``/``.

How a request becomes a reply:

* **Stateless history.** The request's ``messages`` are the conversation: user and assistant
  messages become utterances (consecutive messages of one role are joined into one utterance,
  empty ones before the last are dropped), ``system``/``developer`` messages are ignored (the
  model was never trained with instructions). The last message must be the user's. The
  Chatbot's own `context()` trims the history to its budget, exactly as in the REPL.
* **Options.** temperature, top_p, max_tokens (or max_completion_tokens), seed, stop, and the
  extras top_k and repetition_penalty map onto DecodingOptions; top_p 0 means greedy (the
  nucleus of p=0 is the single most likely token). frequency_penalty and presence_penalty are
  validated but ignored (OpenAI's additive penalties have no counterpart here; use
  repetition_penalty). Other OpenAI fields (tools, logprobs, user, ...) are ignored; n must
  be 1. The request's ``model`` is not checked: one model is served.
* **Generation** runs on the engine's thread (chitchat/engine.py), which owns the model, so
  the event loop never waits on torch. It batches continuously: a request joins the running
  batch at the next decoding step and leaves it when its reply ends; a seed reproduces the
  reply `Chatbot.generate` gives with it, whatever else is in the batch.
* **Errors** use OpenAI's JSON shape: 400 bad request, 401 bad key, 404/405, 408 body too
  slow, 413 body too large, 503 loading, overloaded or shutting down, 500 (logged) for bugs.
* **Connections** are not requests: one that sends no complete request headers within
  `--header_timeout` seconds is closed, a body must arrive within `--body_timeout`, and only
  requests in progress count against `--max_connections`; /health is never refused.
* **Shutdown** (SIGTERM, Ctrl-C): new requests get 503 shutting_down, running replies have
  `--shutdown_timeout` seconds to finish, the rest end with an error event and [DONE].
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import DecodingOptions, MMIOptions, ModelOptions, check, opt
from .engine import Engine, EngineError, Job
from .utils import ChitchatError

log = logging.getLogger("chitchat")

STATIC_DIR = Path(__file__).resolve().parent / "static"


# ---- options ------------------------------------------------------------------------------------
@dataclass
class ServerOptions:
    """What the HTTP layer needs; ServeConfig adds the model and decoding options."""
    host: str = opt("127.0.0.1", "address to bind; the default is reachable only from this "
                    "machine. Exposing the server takes an explicit --host 0.0.0.0 (then set "
                    "--api_key)")
    port: int = opt(8000, "TCP port (0: any free port)")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1/*; default: "
                              "the CHITCHAT_API_KEY environment variable, else no key")
    model_name: str = opt("chitchat", "model id reported by /v1/models and in replies")
    max_body_bytes: int = opt(65536, "largest request body; larger ones get 413")
    max_messages: int = opt(64, "most messages per request")
    max_message_chars: int = opt(4000, "most characters per message")
    max_tokens_limit: int = opt(256, "largest max_tokens a request may ask for (also capped "
                                "by the model's n_positions)")
    max_batch: int = opt(8, "rows decoded together (the KV cache holds this many; an MMI "
                         "request takes --num_candidates of them)")
    max_context: int | None = opt(None, "KV cache positions per row (default: the model's "
                                  "n_positions); histories are trimmed to fit with the reply")
    max_queue: int = opt(64, "requests waiting for a free row; more get 503 'overloaded'")
    max_connections: int = opt(128, "requests in progress at once (idle connections do not "
                               "count); more get 503 'overloaded'. /health is always answered")
    header_timeout: float = opt(10.0, "seconds a connection may take to send a request's "
                                "headers (also between requests); then it is closed")
    body_timeout: float = opt(30.0, "seconds to receive a request body; then 408")
    shutdown_timeout: float = opt(10.0, "seconds to let running replies finish after SIGTERM "
                                  "or Ctrl-C; the rest are ended with an error event")
    log_level: str = opt("info", "uvicorn log level",
                         choices=["critical", "error", "warning", "info", "debug"])

    def __post_init__(self):
        check(0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}")
        check(self.api_key is None or len(self.api_key) >= 1, "--api_key must not be empty")
        check(self.max_body_bytes >= 1024, "--max_body_bytes must be at least 1024")
        check(self.max_messages >= 1, "--max_messages must be at least 1")
        check(self.max_message_chars >= 1, "--max_message_chars must be at least 1")
        check(self.max_tokens_limit >= 1, "--max_tokens_limit must be at least 1")
        check(self.max_batch >= 1, "--max_batch must be at least 1")
        check(self.max_queue >= 1, "--max_queue must be at least 1")
        check(self.max_connections >= 1, "--max_connections must be at least 1")
        check(self.max_context is None or self.max_context >= 8,
              "--max_context must be at least 8")
        check(self.header_timeout > 0, "--header_timeout must be > 0")
        check(self.body_timeout > 0, "--body_timeout must be > 0")
        check(self.shutdown_timeout >= 0, "--shutdown_timeout must be >= 0")


@dataclass
class ServeConfig(ServerOptions, DecodingOptions, MMIOptions, ModelOptions):
    """serve.py's options. The decoding options are the defaults of every request."""
    bad_words: str | None = opt(None, "file of words or phrases never to generate, one per line")

    def __post_init__(self):
        ModelOptions.__post_init__(self)
        MMIOptions.__post_init__(self)
        DecodingOptions.__post_init__(self)
        ServerOptions.__post_init__(self)
        check(self.model_path is not None,
              "--model_path is required: a model folder from train.py (e.g. model/<run>/best), "
              "or an old GPT2-chitchat folder together with --vocab_path")
        check(self.max_len <= self.max_tokens_limit,
              f"--max_len {self.max_len} (the default max_tokens) is above --max_tokens_limit "
              f"{self.max_tokens_limit}")
        check(self.max_context is None or self.max_context >= self.max_len + 3,
              f"--max_context {self.max_context} leaves no room for a context with --max_len "
              f"{self.max_len}")

    def server_options(self) -> ServerOptions:
        return ServerOptions(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(ServerOptions)})


# ---- errors -------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _loading() -> ApiError:
    return ApiError(503, "the model is still loading; retry shortly", "server_error",
                    code="model_loading", headers={"Retry-After": "2"})


# ---- the request --------------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    # strict: "0.7" is not a temperature and true is not a max_tokens; clients that send
    # such things have a bug worth hearing about. Unknown fields are OpenAI features this
    # server does not have (tools, logprobs, ...) and are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart",
               "StreamOptions"}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_request(body: bytes):
    """The request body as a validated ChatRequest, or ApiError 400."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON: {e}"[:300]) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        # The loc names the union member tried ("str", "list[TextPart]"); clients want the field.
        param = ".".join(str(p) for p in err["loc"]
                         if isinstance(p, int) or (p.isidentifier() and p not in _UNION_TAGS))
        param = param or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"],
                       param=param) from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None


def _text_of(content, k: int, limit: int) -> str:
    if content is None:
        return ""
    text = content if isinstance(content, str) else " ".join(p.text for p in content)
    if len(text) > limit:
        raise ApiError(400, f"messages.{k}.content has {len(text)} characters; the limit is "
                       f"{limit} (--max_message_chars)", param=f"messages.{k}.content")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates survive json.loads ("\ud800")
        raise ApiError(400, f"messages.{k}.content is not valid Unicode",
                       param=f"messages.{k}.content") from None
    return " ".join(text.split())


def to_history(messages, max_messages: int, max_chars: int) -> list[str]:
    """OpenAI messages -> utterances, oldest first, ending with the user's message."""
    if len(messages) > max_messages:
        raise ApiError(400, f"{len(messages)} messages; the limit is {max_messages} "
                       "(--max_messages)", param="messages")
    turns: list[tuple[str, str]] = []
    for k, m in enumerate(messages):
        text = _text_of(m.content, k, max_chars)
        if m.role in ("system", "developer"):
            continue  # documented: the model has no notion of instructions
        turns.append((m.role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message (system messages aside) must have role 'user'",
                       param="messages")
    if not turns[-1][1]:
        raise ApiError(400, "the last user message is empty", param="messages")
    history: list[str] = []
    last_role = None
    for role, text in turns:
        if not text:
            continue
        if role == last_role:
            # Two turns of one speaker in a row: one utterance, so speakers keep alternating
            # as they did in training.
            history[-1] = f"{history[-1]} {text}"
        else:
            history.append(text)
        last_role = role
    return history


def to_overrides(req, max_tokens_limit: int, defaults: DecodingOptions) -> dict:
    """Request fields -> DecodingOptions overrides for this request."""
    out: dict[str, Any] = {}
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None:
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of "
                           f"{max_tokens_limit}", param="max_tokens")
        out["max_len"] = max_tokens
        if defaults.min_len > max_tokens:  # a short max_tokens wins over the server's --min_len
            out["min_len"] = max_tokens
    if req.temperature is not None:
        out["temperature"] = req.temperature
    if req.top_p is not None:
        if req.top_p == 0:
            out["greedy"] = True
        else:
            out["topp"] = req.top_p
    if req.top_k is not None:
        out["topk"] = req.top_k
    if req.repetition_penalty is not None:
        out["repetition_penalty"] = req.repetition_penalty
    if req.seed is not None:
        out["seed"] = req.seed
    return out


def stop_strings(req) -> list[str]:
    stop = req.stop
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise ApiError(400, f"stop has {len(stops)} sequences; at most 4 are allowed",
                       param="stop")
    for s in stops:
        if len(s) > 200:
            raise ApiError(400, "a stop sequence may have at most 200 characters", param="stop")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "stop is not valid Unicode", param="stop") from None
    return [s for s in stops if s]


class StopMatcher:
    """Cuts streamed text at the first stop sequence, which is not part of the reply.

    Text that could be the beginning of a stop sequence is held back until the next piece
    shows whether it is one, so a stream never sends what the full reply would not contain.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.hit = False

    def push(self, piece: str) -> str:
        if self.hit:
            return ""
        self.text += piece
        if not self.stops:
            self.sent = len(self.text)
            return piece
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            self.text = self.text[:min(found)]
            return self._take(len(self.text))
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self._take(len(self.text) - hold)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


# ---- responses ----------------------------------------------------------------------------------
def _usage(reply) -> dict:
    n = len(reply.token_ids)
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": n,
            "total_tokens": reply.prompt_tokens + n}


def _finish_reason(reply, matcher: StopMatcher) -> str:
    if matcher.hit:
        return "stop"
    return "length" if reply.finish_reason == "length" else "stop"


def _sse(obj) -> str:
    # JSON escapes CR and LF, so no model text can end an event early or forge one.
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_for(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineError):
        return ApiError(503, str(exc), "server_error", code=exc.code,
                        headers={"Retry-After": "1"})
    if isinstance(exc, ChitchatError):
        return ApiError(400, str(exc))
    return ApiError(500, "the model failed to generate a reply; see the server log",
                    "server_error")


# ---- the app ------------------------------------------------------------------------------------
class _State:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.status = "loading"
        self.error: str | None = None
        self.bot = None
        self.engine: Engine | None = None
        self.created = int(time.time())

    def ready(self, bot) -> None:
        self.bot = bot
        self.engine = Engine(bot, self.options.max_batch, self.options.max_queue,
                             self.options.max_context)
        self.status = "ready"
        log.info("model ready: serving %r", self.options.model_name)

    def begin_shutdown(self) -> None:
        """Stop taking requests and give running replies --shutdown_timeout to finish."""
        if self.status == "stopping":
            return
        self.status = "stopping"
        if self.engine is not None:
            self.engine.drain(self.options.shutdown_timeout)

    def load(self, loader: Callable[[], Any], on_error: Callable[[BaseException], None] | None):
        try:
            self.ready(loader())
        except BaseException as e:
            self.status, self.error = "failed", str(e)
            if isinstance(e, ChitchatError):
                log.error("error: %s", e)
            else:
                log.exception("loading the model failed")
            if on_error is not None:
                on_error(e)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def create_app(bot=None, options: ServerOptions | None = None, *,
               loader: Callable[[], Any] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None):
    """The FastAPI app serving `bot` (a chitchat.Chatbot).

    Give `bot` to serve a loaded model, or `loader` (a function returning one) to load it on
    a background thread at startup: until it returns, /health and the API answer 503.
    `on_load_error` is called (on that thread) if the loader raises.
    """
    if (bot is None) == (loader is None):
        raise ValueError("give exactly one of bot and loader")
    options = options or ServerOptions()
    state = _State(options)

    @asynccontextmanager
    async def lifespan(app):
        if bot is not None:
            state.ready(bot)
        else:
            threading.Thread(target=state.load, args=(loader, on_load_error),
                             name="chitchat-load", daemon=True).start()
        try:
            yield
        finally:
            # uvicorn has already let running requests finish (--shutdown_timeout).
            state.close()
            log.info("server stopped")

    app = FastAPI(title="chitchat", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.chitchat = state

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error_response(ApiError(exc.status_code, str(exc.detail),
                                       code=str(exc.status_code), headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):  # routes parse their own bodies; a safety net
        return error_response(ApiError(400, str(exc)[:300]))

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        # Starlette logs the traceback after this answer; the client sees OpenAI's shape.
        return error_response(ApiError(500, "internal server error; see the server log",
                                       "server_error"))

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        # Header values arrive decoded as latin-1; encoding back gives the raw bytes.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.strip().encode("latin-1"), options.api_key.encode("utf-8")):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                           "with the key given to serve.py --api_key", code="invalid_api_key")

    def engine() -> Engine:
        if state.status == "failed":
            raise ApiError(503, f"the model failed to load: {state.error}", "server_error",
                           code="model_load_failed")
        if state.engine is None:
            raise _loading()
        return state.engine

    async def read_body(request: Request) -> bytes:
        limit = options.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than {limit} bytes "
                           "(--max_body_bytes)", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "bad Content-Length header")
            if int(declared) > limit:
                raise too_big
        chunks, size = [], 0
        try:
            async with asyncio.timeout(options.body_timeout):  # a half-sent body is not held
                async for chunk in request.stream():  # also bounds chunked bodies
                    size += len(chunk)
                    if size > limit:
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within "
                           f"{options.body_timeout:g} s (--body_timeout)",
                           code="request_timeout", headers={"Connection": "close"}) from None
        return b"".join(chunks)

    # -- routes --
    @app.get("/health")
    async def health():
        body = {"status": state.status, "model": options.model_name}  # ready | loading | ...
        if state.status == "failed":
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": options.model_name, "object": "model",
                                            "created": state.created, "owned_by": "chitchat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        eng = engine()
        # Any Content-Type is read as JSON: `curl -d` sends form-encoded by default.
        req = parse_request(await read_body(request))
        if req.n not in (None, 1):
            raise ApiError(400, "n must be 1", param="n")
        history = to_history(req.messages, options.max_messages, options.max_message_chars)
        overrides = to_overrides(req, options.max_tokens_limit, state.bot.options)
        stops = stop_strings(req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            # Validate here, so a bad request is a 400 before anything is queued.
            prep = state.bot.prepare(history, max_context=options.max_context, **overrides)
            job = Job(prep, asyncio.get_running_loop(), rid)
            eng.submit(job)
        except ChitchatError as e:
            raise _error_for(e) from None
        created = int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, rid, created, options.model_name, StopMatcher(stops), usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(job, request, rid, created, options.model_name,
                               StopMatcher(stops))

    async def _complete(job: Job, request: Request, rid, created, model,
                        matcher: StopMatcher):
        # Nothing else listens to a plain request's connection while it waits for the
        # model: without this watcher an abandoned reply would be generated to the end.
        gone = asyncio.create_task(_disconnected(request))
        gone.add_done_callback(lambda t: t.cancelled() or job.cancel())
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    matcher.push(value)
                    if matcher.hit:
                        job.cancel()
                elif kind == "error":
                    return error_response(_error_for(value))
                else:
                    reply = value
                    break
        finally:
            gone.cancel()
            job.cancel()  # the reply is complete, or the client is gone: stop the worker
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "logprobs": None,
                             "message": {"role": "assistant", "content": matcher.text},
                             "finish_reason": _finish_reason(reply, matcher)}],
                "usage": _usage(reply)}

    async def _stream(job: Job, rid, created, model, matcher: StopMatcher, usage: bool):
        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                         "model": model, "system_fingerprint": None,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    text = matcher.push(value)
                    if text:
                        yield chunk({"content": text})
                    if matcher.hit:
                        job.cancel()
                elif kind == "error":
                    # Headers are sent: report the error in-band, as OpenAI does.
                    yield _sse(_error_for(value).body())
                    break
                else:
                    tail = matcher.flush()
                    if tail:
                        yield chunk({"content": tail})
                    yield chunk({}, _finish_reason(value, matcher))
                    if usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk",
                                    "created": created, "model": model, "choices": [],
                                    "usage": _usage(value)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # finished, or the client went away: either way stop generating

    # -- the page --
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_PageHeaders)
    app.add_middleware(_Admission, state=state, error_response=error_response)
    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Admission:
    """Counts the requests in progress against --max_connections, /health aside, and
    refuses API requests once the server is stopping. Counting here rather than in uvicorn
    (whose limit counts open connections) keeps idle connections from locking everyone out.
    """

    def __init__(self, app, state: "_State", error_response):
        self.app, self.state, self.error_response = app, state, error_response
        self.limit = state.options.max_connections
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        err = None
        if self.state.status == "stopping" and scope["path"].startswith("/v1/"):
            err = ApiError(503, "the server is shutting down", "server_error",
                           code="shutting_down")
        elif self.active >= self.limit:
            err = ApiError(503, f"{self.active} requests are in progress (--max_connections); "
                           "retry shortly", "server_error", code="overloaded",
                           headers={"Retry-After": "1"})
        if err is not None:
            return await self.error_response(err)(scope, receive, send)
        self.active += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.active -= 1


class _PageHeaders:
    """Security headers on everything but the API. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would sit between the SSE stream and the client."""

    HEADERS = [
        # Only this origin's own files may run or load: an injected tag could do nothing.
        (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                     b"object-src 'none'; base-uri 'none'; "
                                     b"frame-ancestors 'none'"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


# ---- running it ---------------------------------------------------------------------------------
def _guarded_protocol(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request's
    headers `header_timeout` seconds after it opened or after its last response (uvicorn
    itself waits forever for the rest of a half-sent request line or header block)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is in progress: the body has its own timeout

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def _arm(self):
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self):
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and \
                    not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def make_server(app, log_level: str = "info"):
    """The uvicorn.Server that serve.py runs `app` (from create_app) with: its limits come
    from the app's ServerOptions. Tests run the same server."""
    import uvicorn

    state: _State = app.state.chitchat
    options = state.options

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            state.begin_shutdown()
            await super().shutdown(sockets)

    # uvicorn cancels what still runs after its own timeout; the engine has ended every
    # reply by then (error event, [DONE]), so the margin only covers sending those.
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", server_header=False,
                            http=_guarded_protocol(options.header_timeout),
                            timeout_keep_alive=min(5, options.header_timeout),
                            timeout_graceful_shutdown=options.shutdown_timeout + 5)
    return Server(config)


def load_chatbot(cfg: ServeConfig):
    """The Chatbot described by `cfg` (model, device, precision, decoding defaults)."""
    from .chat import Chatbot, read_bad_words

    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    bad = read_bad_words(cfg.bad_words) if cfg.bad_words else ()
    return Chatbot.from_pretrained(cfg.model_path, cfg.vocab_path, device=cfg.device,
                                   no_cuda=cfg.no_cuda, dtype=cfg.dtype, quantize=cfg.quantize,
                                   backend=cfg.backend, bad_words=bad, **cfg.mmi_kwargs(),
                                   **dataclasses.asdict(cfg.decoding()))


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost are reachable only from this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serve(cfg: ServeConfig) -> int:
    """Run the server until SIGTERM or Ctrl-C. The model loads while the server already
    answers (503 until ready). Returns 0, or raises ChitchatError if the model fails to load."""
    import os

    import uvicorn

    from .utils import get_logger

    get_logger()
    if cfg.api_key is None and os.environ.get("CHITCHAT_API_KEY"):
        cfg.api_key = os.environ["CHITCHAT_API_KEY"]
    if not Path(cfg.model_path).exists():
        raise ChitchatError(f"--model_path {cfg.model_path} does not exist; train a model "
                            "with train.py, or point to a model folder")
    if cfg.bad_words and not Path(cfg.bad_words).is_file():
        raise ChitchatError(f"--bad_words file not found: {cfg.bad_words}")
    if not is_loopback(cfg.host) and cfg.api_key is None:
        log.warning("warning: listening on %s without --api_key: anyone who can reach this "
                    "port can use the model", cfg.host)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(options=cfg.server_options(), loader=lambda: load_chatbot(cfg),
                     on_load_error=on_load_error)
    server = make_server(app, log_level=cfg.log_level)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal to the
    # handler that was there before it, which by default would kill the process (SIGTERM) or
    # raise KeyboardInterrupt (SIGINT) after the clean stop. A logging handler there instead
    # lets a stopped server exit with status 0.
    def stopped(sig, frame):
        log.info("stopped by %s", signal.Signals(sig).name)

    # Bound here rather than by uvicorn so the real port of --port 0 is known and logged.
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise ChitchatError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}; pick "
                            "another --port or --host") from None
    port = sock.getsockname()[1]
    host = f"[{cfg.host}]" if family == socket.AF_INET6 else cfg.host
    log.info("serving on http://%s:%d (chat page at /, API at /v1)", host, port)
    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if failure:
        e = failure[0]
        if isinstance(e, ChitchatError):
            raise e
        raise ChitchatError(f"loading the model failed: {e!r}") from e
    return 0
