"""Running the app: the uvicorn server serve.py runs (its connection guards and graceful
shutdown), loading the Chatbot a ServeConfig describes, and `serve`, serve.py's whole run."""
from __future__ import annotations

import ipaddress
import logging
import signal
import socket
from pathlib import Path

from ..utils import ChitchatError
from .app import AppState, create_app
from .options import ServeConfig

log = logging.getLogger("chitchat")


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

    state: AppState = app.state.chitchat
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
    from ..chat import Chatbot

    return Chatbot.from_options(cfg.model, cfg.decoding, cfg.mmi, cfg.bad_words)


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

    from ..utils import get_logger

    get_logger()
    server = cfg.server
    if server.api_key is None and os.environ.get("CHITCHAT_API_KEY"):
        server.api_key = os.environ["CHITCHAT_API_KEY"]
    if not Path(cfg.model.model_path).exists():
        raise ChitchatError(f"--model_path {cfg.model.model_path} does not exist; train a "
                            "model with train.py, or point to a model folder")
    if cfg.bad_words and not Path(cfg.bad_words).is_file():
        raise ChitchatError(f"--bad_words file not found: {cfg.bad_words}")
    if not is_loopback(server.host) and server.api_key is None:
        log.warning("warning: listening on %s without --api_key: anyone who can reach this "
                    "port can use the model", server.host)
    failure: list[BaseException] = []
    uv: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failure.append(e)
        if uv is not None:
            uv.should_exit = True

    app = create_app(options=server, loader=lambda: load_chatbot(cfg),
                     on_load_error=on_load_error)
    uv = make_server(app, log_level=server.log_level)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal to the
    # handler that was there before it, which by default would kill the process (SIGTERM) or
    # raise KeyboardInterrupt (SIGINT) after the clean stop. A logging handler there instead
    # lets a stopped server exit with status 0.
    def stopped(sig, frame):
        log.info("stopped by %s", signal.Signals(sig).name)

    # Bound here rather than by uvicorn so the real port of --port 0 is known and logged.
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((server.host, server.port))
    except OSError as e:
        sock.close()
        raise ChitchatError(f"cannot listen on {server.host}:{server.port}: {e.strerror}; pick "
                            "another --port or --host") from None
    port = sock.getsockname()[1]
    host = f"[{server.host}]" if family == socket.AF_INET6 else server.host
    log.info("serving on http://%s:%d (chat page at /, API at /v1)", host, port)
    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uv.run(sockets=[sock])
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
