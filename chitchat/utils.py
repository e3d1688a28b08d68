"""Small shared helpers: the project's error type, logging, atomic writes, hashing."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator


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
        check_parent_folder(Path(log_path))
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
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop quietly, as Unix tools do. stdout is
        # pointed at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ChitchatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in REQUIRED_MODULES:
            raise
        print(f"error: {missing_module_message(e.name)}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in _OS_HINTS:
            raise  # not a fault of the disk or of permissions: keep the traceback
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 1
    return 0 if rc is None else int(rc)


# Top-level modules of requirements.txt: a script that misses one was started outside the
# project's environment.
REQUIRED_MODULES = {"torch", "transformers", "tokenizers", "safetensors", "numpy", "tqdm",
                    "fastapi", "uvicorn"}


def missing_module_message(name: str) -> str:
    """One line that says how to get into the environment where the module is installed."""
    venv = Path(__file__).resolve().parents[1] / ".venv"
    try:
        shown = venv.relative_to(Path.cwd().resolve())
    except ValueError:
        shown = venv
    fix = (f"activate the project's environment first: . {shown}/bin/activate (or run the "
           f"script with {shown}/bin/python)" if (venv / "bin" / "python").exists() else
           "set up the environment first: make setup, then . .venv/bin/activate (or pip "
           "install torch==2.13.0 && pip install -r requirements.txt && pip install -e . "
           "--no-deps)")
    return f"this Python ({sys.executable}) has no module {name!r}: {fix}"


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space (old checkpoints, --keep_checkpoints) or "
                  "write elsewhere; the last complete output is kept",
    errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
    errno.EACCES: "permission denied: check the path's owner and mode, or write elsewhere",
    errno.EPERM: "operation not permitted: check the path's owner and mode",
    errno.EROFS: "the file system is read-only: write to another path",
}


def os_error_message(e: OSError) -> str:
    """One line: the path, the cause, what to do."""
    where = e.filename if e.filename is not None else "(unknown path)"
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{where}: {e.strerror or e}. {_OS_HINTS.get(e.errno, '')}".rstrip()


def python_command() -> str:
    """How the user's shell starts this Python: `python` when that is this interpreter (an
    active venv), else its path (`.venv/bin/python`), so that a printed hint works as is."""
    exe = Path(sys.executable)
    found = shutil.which("python")
    if found and Path(found).absolute().parent == exe.absolute().parent:
        return "python"
    try:
        return str(exe.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def locate_decode_error(path: str | os.PathLike,
                        encoding: str) -> tuple[int, int, UnicodeDecodeError] | None:
    """(line, absolute byte offset, error) of the first bytes of `path` that `encoding`
    cannot decode, or None. Lines end as Python's text mode ends them: LF, CRLF or a lone CR.
    (A UnicodeDecodeError's own offset counts from the start of a read chunk.)"""
    offset, line_no = 0, 1
    with open(path, "rb") as f:
        for raw in f:
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as e:
                head = raw[: e.start]
                line_no += head.count(b"\r") - head.count(b"\r\n")
                return line_no, offset + e.start, e
            offset += len(raw)
            line_no += 1 + raw.count(b"\r") - raw.count(b"\r\n")
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale_temps(final: Path) -> list[Path]:
    """Remove the temporaries that a killed writer of `final` left beside it.

    Names carry the writer's pid (``.NAME.tmp-PID-*``, ``.NAME.old-PID``,
    ``.NAME.tmp-PID``), so a live writer's work in progress is never touched.
    """
    removed = []
    if not final.parent.is_dir():
        return removed
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)(?:-.*)?")
    for p in final.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_parent_folder(path: Path) -> None:
    """`path`'s nearest existing ancestor must be a folder, or it cannot be created (mkdir
    would fail with a bare FileExistsError or NotADirectoryError)."""
    parent = path.parent
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ChitchatError(f"{path} cannot be created: {parent} exists and is not a "
                            "folder. Choose a path under a folder.")


def check_replaceable(final: Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace anything but a folder this project wrote (`ours`) or an empty one.

    `what` names the kind of folder that may be replaced, for the message.
    """
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise ChitchatError(f"{final} exists and is not a folder; it would be replaced by "
                            f"{what}. Choose another output path.")
    check_parent_folder(final)
    if final.is_dir() and any(final.iterdir()) and not ours(final):
        raise ChitchatError(f"{final} is a non-empty folder that is not {what}; refusing "
                            "to replace it (nothing was changed). Choose a new or empty "
                            "output path.")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, ours: Callable[[Path], bool],
               what: str) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success, it replaces `final`.

    Only an empty folder or one that `ours` recognises (`what`: its kind, for errors) is
    ever replaced. On any exception the temporary directory is removed, so a reader never
    sees a torn output: either the old directory or the complete new one.
    """
    final = Path(final)
    check_replaceable(final, ours, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should look normal
    try:
        yield tmp
        check_replaceable(final, ours, what)  # it may have changed while we worked
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
    check_parent_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise ChitchatError(f"{path} is a folder; give a file path for this output")
    clean_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_bad_words(path: str | os.PathLike) -> list[str]:
    """A --bad_words file: words or phrases, one per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ChitchatError(f"--bad_words file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ChitchatError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return [ln.strip() for ln in lines if ln.strip()]
