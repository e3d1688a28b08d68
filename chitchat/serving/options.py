"""serve.py's options: the HTTP layer's (`ServerOptions`) and the whole command line's
(`ServeConfig`, which adds the model and the decoding defaults of every request)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import (REPLY_LEN_ALIAS, DecodingOptions, MMIOptions, ModelOptions, check,
                      group, opt)


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
    max_step_tokens: int = opt(0, "most tokens a decoding step computes while replies "
                               "stream (their rows plus chunks of joining contexts): smoother "
                               "streams beside long contexts, later first tokens. 0: a "
                               "joining context goes in whole. For the contexts the engine "
                               "computes in its steps: MMI requests, or every request with "
                               "the prefill thread off")
    prefill_thread: str = opt("auto", "compute the context of a request that comes while "
                              "replies stream on a second thread, so the streams never wait "
                              "for it (MMI requests excepted). auto: on a CPU with a core "
                              "that --threads leaves free (e.g. --threads 1 on 2 cores)",
                              choices=["auto", "on", "off"])
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
        check(self.max_step_tokens >= 0, "--max_step_tokens must be >= 0")
        check(self.max_connections >= 1, "--max_connections must be at least 1")
        check(self.max_context is None or self.max_context >= 8,
              "--max_context must be at least 8")
        check(self.header_timeout > 0, "--header_timeout must be > 0")
        check(self.body_timeout > 0, "--body_timeout must be > 0")
        check(self.shutdown_timeout >= 0, "--shutdown_timeout must be >= 0")


@dataclass
class ServeConfig:
    """serve.py's options. The decoding options are the defaults of every request."""
    model: ModelOptions = group(ModelOptions)
    mmi: MMIOptions = group(MMIOptions)
    decoding: DecodingOptions = group(DecodingOptions, aliases=REPLY_LEN_ALIAS)
    server: ServerOptions = group(ServerOptions)
    bad_words: str | None = opt(None, "file of words or phrases never to generate, one per line")

    def __post_init__(self):
        check(self.model.model_path is not None,
              "--model_path is required: a model folder from train.py (e.g. model/<run>/best), "
              "or an old GPT2-chitchat folder together with --vocab_path")
        n, server = self.decoding.max_new_tokens, self.server
        check(n <= server.max_tokens_limit,
              f"--max_new_tokens {n} (the default max_tokens) is above --max_tokens_limit "
              f"{server.max_tokens_limit}")
        check(server.max_context is None or server.max_context >= n + 3,
              f"--max_context {server.max_context} leaves no room for a context with "
              f"--max_new_tokens {n}")
