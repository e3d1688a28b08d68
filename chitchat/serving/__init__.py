"""An OpenAI-compatible chat server (FastAPI) and a web chat page for a `Chatbot`.

    from chitchat.serving.app import create_app
    from chitchat.serving.options import ServerOptions
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
  extras top_k and repetition_penalty map onto DecodingOptions (max_tokens onto
  max_new_tokens); top_p 0 or 1 is no nucleus sampling, as ``--topp 0`` (greedy decoding is
  temperature 0). frequency_penalty and presence_penalty are
  validated but ignored (OpenAI's additive penalties have no counterpart here; use
  repetition_penalty). Other OpenAI fields (tools, logprobs, user, ...) are ignored; n must
  be 1. The request's ``model`` is not checked: one model is served.
* **Generation** runs on the engine's thread (engine.py), which owns the model, so
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

Modules: options.py (ServerOptions, ServeConfig), schema.py (the request, its validation and
mapping onto decoding options, OpenAI-shaped errors), engine.py (continuous batching),
app.py (routes, streaming, limits, shutdown), run.py (the uvicorn server, `serve`).
"""
