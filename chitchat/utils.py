"""Small shared helpers: the project's error type, logging, atomic writes, hashing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator


class ChitchatError(Exception):
    """A user-facing error: the message says what is wrong, where, and how to fix it.

    Entry points print it without a traceback and exit with status 2.
    """


def get_logger(name: str = "chitchat", log_path: str | os.PathLike | None = None,
               quiet: bool = False) -> logging.Logger:
    """One logger for the whole project: stderr, plus a file when `log_path` is given."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.addHandler(console)
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_path, encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


@contextlib.contextmanager
def out_of_memory_advice(device, doing: str, advice):
    """Turn a CUDA out-of-memory error inside the block into a ChitchatError that says what
    ran out, on which device, doing what, and what to change. `advice` is a string or a
    callable returning one (called only on failure, so it can name the latest state)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        text = advice() if callable(advice) else advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChitchatError(f"out of memory on {device} {doing}. {text} (torch: {first})") \
            from e


def run_cli(main, argv=None) -> int:
    """Run an entry point: ChitchatError becomes a one-line message and exit status 2."""
    try:
        rc = main(argv)
    except ChitchatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success, it replaces `final`.

    On any exception the temporary directory is removed, so a reader never sees a torn
    output: either the old directory or the complete new one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should look normal
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
