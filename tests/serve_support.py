"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a thread."""
from __future__ import annotations

import socket
import threading
import time

import httpx


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
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        """What SIGTERM does: uvicorn's signal handler sets should_exit."""
        self.server.should_exit = True

    def __exit__(self, *exc):
        self.stop()
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


def wait_ready(url: str, timeout: float = 60.0, proc=None) -> None:
    """Until /health says ready; `proc`: the server's process, which must not exit first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready in {timeout} s")
