"""Checkpoints on disk: listing, verifying, choosing the one to resume, publishing.

A checkpoint ``<run>/checkpoints/step-NNNNNNNN/`` is a complete HF model folder plus
``training_state.pt`` (optimizer, scaler, RNG) and ``trainer_state.json`` (step, data
position, options, data fingerprint). ``manifest.json``, written last, lists every file
with its size and SHA-256, so a file truncated or changed after the save (a full disk, a
bad copy, a crash of the file system) is found before anything is loaded from it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .utils import ChitchatError, clean_stale_temps, sha256_file, write_json

CHECKPOINT_FORMAT = 1
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training_state.pt"
MANIFEST = "manifest.json"
RUN_FILES = ("metrics.jsonl", "train.log")


def is_checkpoint(path: Path) -> bool:
    """A folder train.py wrote as a checkpoint (whole or damaged)."""
    return any((path / f).exists() for f in (STATE_FILE, MANIFEST, TENSORS_FILE))


def is_run_dir(path: Path) -> bool:
    """A run folder of train.py: it has checkpoints or a run's log files."""
    return (path / "checkpoints").is_dir() or any((path / f).is_file() for f in RUN_FILES)


def is_best_dir(path: Path) -> bool:
    return (path / "best.json").is_file()


def check_run_dir(run_dir: Path) -> None:
    """A run writes its model files into its folder: never into someone else's folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ChitchatError(f"{run_dir} exists and is a file; choose another --run_name")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise ChitchatError(
            f"{run_dir} already exists and is not a train.py run folder (no checkpoints/, "
            "train.log or metrics.jsonl); training would overwrite its files (config.json, "
            "model.safetensors, vocab.txt). Choose another --run_name or --save_model_path.")


def checkpoints_of(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (not yet verified: see `verify_checkpoint`)."""
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    found = [p for p in ck.iterdir()
             if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def write_manifest(folder: Path) -> None:
    """Sizes and hashes of every file in `folder`; call it after the last file is written."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(folder / MANIFEST, {"format": CHECKPOINT_FORMAT, "files": files})


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with which file.

    Checkpoints from before manifests existed are checked as far as they can be: their
    state file must parse.
    """
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            return f"{manifest} is unreadable ({e})"
        for name, want in files.items():
            f = path / name
            if not f.is_file():
                return f"{f} is missing"
            size = f.stat().st_size
            if size != want["size"]:
                return f"{f} has {size} bytes, {want['size']} were written"
            if sha256_file(f) != want["sha256"]:
                return f"{f} has changed since it was written (checksum mismatch)"
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        return f"{path / STATE_FILE} is unreadable ({e})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{path / STATE_FILE} is not a trainer state"
    return None


def newest_intact(cks: list[Path], log, set_aside: bool) -> Path | None:
    """The newest checkpoint of `cks` that verifies; damaged newer ones are reported and,
    with `set_aside`, renamed ``damaged-step-N`` so that later runs skip them."""
    for ck in reversed(cks):
        problem = verify_checkpoint(ck)
        if problem is None:
            return ck
        log.warning(f"warning: checkpoint {ck.name} is damaged: {problem}. Falling back to "
                    "the previous checkpoint.")
        if set_aside:
            aside = ck.with_name(f"damaged-{ck.name}")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(ck, aside)
            log.warning(f"moved it to {aside} (delete it when you have looked at it)")
    return None


def find_resume_checkpoint(resume: str, save_model_path: str, run_name: str | None,
                           log) -> Path | None:
    """The intact checkpoint --resume points at (None: --resume auto found nothing).

    A checkpoint named directly must be intact; in a run folder, a damaged newest
    checkpoint gives way to the newest intact one.
    """
    if resume != "auto":
        path = Path(resume)
        if (path / STATE_FILE).is_file():
            problem = verify_checkpoint(path)
            if problem:
                raise ChitchatError(f"--resume {path}: the checkpoint is damaged: {problem}. "
                                    f"Resume from an earlier one in {path.parent}, or "
                                    "from the run folder (the newest intact one is chosen).")
            return path
        cks = checkpoints_of(path)
        if not cks:
            raise ChitchatError(f"--resume {path}: not a checkpoint (no {STATE_FILE}) nor a "
                                "run folder with checkpoints/. Use --resume auto, or a folder "
                                "like model/<run>/checkpoints/step-00001000")
        return _intact_or_error(cks, path, log)
    root = Path(save_model_path)
    if run_name:
        cks = checkpoints_of(root / run_name)
        return _intact_or_error(cks, root / run_name, log) if cks else None
    newest = [c for c in (checkpoints_of(d) for d in sorted(root.glob("*")) if d.is_dir())
              if c]
    if not newest:
        return None
    latest = max(newest, key=lambda c: (c[-1] / STATE_FILE).stat().st_mtime)
    return _intact_or_error(latest, latest[-1].parent.parent, log)


def _intact_or_error(cks: list[Path], run_dir: Path, log) -> Path:
    found = newest_intact(cks, log, set_aside=True)
    if found is None:
        raise ChitchatError(f"every checkpoint of {run_dir} is damaged (see the warnings "
                            "above); nothing can be resumed. Start a new run, or fine-tune "
                            f"the last published model: --pretrained_model {run_dir}")
    return found


def publish_model(src: Path, run_dir: Path) -> None:
    """Copy the model files of checkpoint `src` to the run folder, each file atomically,
    so that ``interact.py --model_path <run>`` always finds a whole model."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in (TENSORS_FILE, STATE_FILE, MANIFEST):
            dst = run_dir / f.name
            clean_stale_temps(dst)
            tmp = run_dir / f".{f.name}.tmp-{os.getpid()}"
            try:
                shutil.copyfile(f, tmp)
                os.replace(tmp, dst)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
