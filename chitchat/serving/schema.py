"""The OpenAI chat completions request and reply: parsing and validating a request, mapping
it onto a history and DecodingOptions overrides, cutting text at stop sequences, and errors in
OpenAI's JSON shape. See the package docstring for the rules."""
from __future__ import annotations

import json
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import DecodingOptions
from ..tokenization import Detokenizer
from ..utils import ChitchatError
from .engine import EngineError


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


def loading_error() -> ApiError:
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
        out["max_new_tokens"] = max_tokens
        if defaults.min_len > max_tokens:  # a short max_tokens wins over the server's --min_len
            out["min_len"] = max_tokens
    if req.temperature is not None:
        out["temperature"] = req.temperature
    if req.top_p is not None:  # 0 and 1 both turn nucleus sampling off, as --topp does
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
def reply_tokens(reply, matcher: StopMatcher, vocab: Sequence[str]) -> int:
    """The reply's tokens in the text the client got. After a stop sequence the engine
    keeps decoding until the cancel reaches it (how far depends on timing), so the tokens
    counted are those whose text begins before the cut: the same for every identical
    seeded request, streamed or not."""
    if not matcher.hit:
        return len(reply.token_ids)
    detok, shown, n = Detokenizer(), 0, 0
    for t in reply.token_ids:
        if shown >= len(matcher.text):
            break
        shown += len(detok.push(vocab[t]))
        n += 1
    return n


def usage_of(reply, matcher: StopMatcher, vocab: Sequence[str]) -> dict:
    n = reply_tokens(reply, matcher, vocab)
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": n,
            "total_tokens": reply.prompt_tokens + n}


def finish_reason(reply, matcher: StopMatcher) -> str:
    if matcher.hit:
        return "stop"
    return "length" if reply.finish_reason == "length" else "stop"


def sse(obj) -> str:
    # JSON escapes CR and LF, so no model text can end an event early or forge one.
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_for(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineError):
        return ApiError(503, str(exc), "server_error", code=exc.code,
                        headers={"Retry-After": "1"})
    if isinstance(exc, ChitchatError):
        return ApiError(400, str(exc))
    return ApiError(500, "the model failed to generate a reply; see the server log",
                    "server_error")
