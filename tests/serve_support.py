"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a thread."""
from __future__ import annotations

import socket
import threading


class LiveServer:
    """``with LiveServer(app) as url:`` runs `app` under the uvicorn server serve.py runs
    (chitchat.serving.run.make_server: its timeouts and limits) on 127.0.0.1 until the block ends,
    then shuts it down the way SIGTERM does (`stop()`: graceful, lifespan shutdown)."""

    def __init__(self, app, startup_timeout: float = 20.0):
        from chitchat.serving.run import make_server

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, log_level="warning")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.startup_timeout = startup_timeout
        # Set when uvicorn's startup has ended, or its thread has: whether it started is
        # then server.started.
        self.startup_ended = threading.Event()
        startup = self.server.startup

        async def startup_then_signal(sockets=None):
            try:
                await startup(sockets=sockets)
            finally:
                self.startup_ended.set()

        self.server.startup = startup_then_signal

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.startup_ended.set()

    def __enter__(self) -> str:
        self.thread.start()
        if not self.startup_ended.wait(self.startup_timeout) or not self.server.started:
            raise RuntimeError("uvicorn did not start")
        return self.url

    def stop(self) -> None:
        """What SIGTERM does: uvicorn's signal handler sets should_exit."""
        self.server.should_exit = True

    def __exit__(self, *exc):
        self.stop()
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"

