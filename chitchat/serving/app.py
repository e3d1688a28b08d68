"""The FastAPI app: routes, server-sent event streaming, admission limits, body timeouts and
shutdown (see the package docstring for the whole story)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
import torch

from ..utils import ChitchatError
from .engine import Engine, Job, use_prefill_thread
from .options import ServerOptions
from .schema import (ApiError, StopMatcher, error_for, finish_reason, loading_error,
                     parse_request, sse, stop_strings, to_history, to_overrides, usage_of)

log = logging.getLogger("chitchat")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


# ---- the app ------------------------------------------------------------------------------------
class AppState:
    """What the routes share: the options, the model's status, the bot and its engine."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.status = "loading"
        self.error: str | None = None
        self.bot = None
        self.engine: Engine | None = None
        self.created = int(time.time())

    def ready(self, bot) -> None:
        self.bot = bot
        opts = self.options
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count())  # the cores this process may run on
        worker = use_prefill_thread(opts.prefill_thread, bot.backend.device.type,
                                    torch.get_num_threads(), cores)
        self.engine = Engine(bot, opts.max_batch, opts.max_queue, opts.max_context,
                             step_tokens=opts.max_step_tokens, prefill_thread=worker)
        self.status = "ready"
        log.info("model ready: serving %r%s", opts.model_name,
                 " (prefill thread on)" if worker else "")

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
    state = AppState(options)
    app = FastAPI(title="chitchat", lifespan=_lifespan(state, bot, loader, on_load_error),
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.chitchat = state
    _add_error_handlers(app)
    _add_routes(app, state)

    # -- the page --
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_PageHeaders)
    app.add_middleware(_Admission, state=state)
    return app


def _lifespan(state: AppState, bot, loader, on_load_error):
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
    return lifespan


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _add_error_handlers(app: FastAPI) -> None:
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


def _authorize(request: Request, options: ServerOptions) -> None:
    if options.api_key is None:
        return
    got = request.headers.get("authorization", "")
    scheme, _, key = got.partition(" ")
    # Header values arrive decoded as latin-1; encoding back gives the raw bytes.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode("latin-1"), options.api_key.encode("utf-8")):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                       "with the key given to serve.py --api_key", code="invalid_api_key")


def _engine(state: AppState) -> Engine:
    if state.status == "failed":
        raise ApiError(503, f"the model failed to load: {state.error}", "server_error",
                       code="model_load_failed")
    if state.engine is None:
        raise loading_error()
    return state.engine


async def _read_body(request: Request, options: ServerOptions) -> bytes:
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


def _add_routes(app: FastAPI, state: AppState) -> None:
    options = state.options

    @app.get("/health")
    async def health():
        body = {"status": state.status, "model": options.model_name}  # ready | loading | ...
        if state.status == "failed":
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request, options)
        return {"object": "list", "data": [{"id": options.model_name, "object": "model",
                                            "created": state.created, "owned_by": "chitchat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _chat_completion(request, state)


async def _chat_completion(request: Request, state: AppState):
    options = state.options
    _authorize(request, options)
    eng = _engine(state)
    # Any Content-Type is read as JSON: `curl -d` sends form-encoded by default.
    req = parse_request(await _read_body(request, options))
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
        raise error_for(e) from None
    created = int(time.time())
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream(job, rid, created, options.model_name, StopMatcher(stops), usage,
                    state.bot.tokenizer.tokens),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(job, request, rid, created, options.model_name,
                           StopMatcher(stops), state.bot.tokenizer.tokens)


async def _complete(job: Job, request: Request, rid, created, model, matcher: StopMatcher,
                    vocab: list[str]):
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
                return error_response(error_for(value))
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
                         "finish_reason": finish_reason(reply, matcher)}],
            "usage": usage_of(reply, matcher, vocab)}


async def _stream(job: Job, rid, created, model, matcher: StopMatcher, usage: bool,
                  vocab: list[str]):
    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
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
                yield sse(error_for(value).body())
                break
            else:
                tail = matcher.flush()
                if tail:
                    yield chunk({"content": tail})
                yield chunk({}, finish_reason(value, matcher))
                if usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk",
                               "created": created, "model": model, "choices": [],
                               "usage": usage_of(value, matcher, vocab)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # finished, or the client went away: either way stop generating


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Admission:
    """Counts the requests in progress against --max_connections, /health aside, and
    refuses API requests once the server is stopping. Counting here rather than in uvicorn
    (whose limit counts open connections) keeps idle connections from locking everyone out.
    """

    def __init__(self, app, state: AppState):
        self.app, self.state = app, state
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
            return await error_response(err)(scope, receive, send)
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
