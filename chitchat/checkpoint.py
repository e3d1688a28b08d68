"""Checkpoints on disk: listing, verifying, choosing the one to resume, publishing.

A checkpoint ``<run>/checkpoints/step-NNNNNNNN/`` is a complete HF model folder plus
``training_state.pt`` (optimizer, scaler, RNG) and ``trainer_state.json`` (step, data
position, options, data fingerprint). ``manifest.json``, written last, lists every file
with its size and SHA-256, so a file truncated or changed after the save (a full disk, a
bad copy, a crash of the file system) is found before anything is loaded from it.

`save_checkpoint` writes one; `load_checkpoint` reads its state for a resumed run, which
keeps the saved options (`merge_resume_options`) and must see the same data
(`check_same_data`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from .config import TrainConfig
from .modeling import save_model
from .utils import (ChitchatError, atomic_dir, atomic_write_text, check_parent_folder,
                    clean_stale_temps, sha256_file, write_json)

CHECKPOINT_FORMAT = 1
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training_state.pt"
MANIFEST = "manifest.json"
RUN_FILES = ("metrics.jsonl", "train.log")

# Options a resumed run may change; the others define the run (data, model, batch, ...)
# and changing them would silently make it a different run.
RESUMABLE = {"device", "no_cuda", "num_workers", "epochs", "max_steps", "eval_interval",
             "save_interval", "keep_checkpoints", "log_step", "patience", "quiet",
             "log_path", "resume", "compile", "dropout_kernel", "dtype", "exact_fp32",
             "fp32_matmul",
             "save_model_path", "run_name", "threads", "max_time",
             # the store may move: check_same_data proves it holds the same tokens
             "train_path"}


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
    check_parent_folder(run_dir)
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


def set_aside(path: Path, prefix: str) -> Path:
    """Rename `path` to ``<prefix>-<name>`` beside it (``-2``, ``-3``... if taken): out of
    the way of the run, and kept for the user to look at or delete."""
    aside = path.with_name(f"{prefix}-{path.name}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{prefix}-{path.name}-{n}")
    os.replace(path, aside)
    return aside


def set_aside_newer(run_dir: Path, ckpt: Path, log) -> None:
    """Resuming from a checkpoint that is not the run's newest abandons what came after
    it. Its checkpoints and best/ are set aside: left in place, the newer checkpoints would
    outrank the resumed run's own (pruning keeps the highest steps, and --resume auto picks
    the highest), and best/ would hold a model of the abandoned steps."""
    # The resumed one's step from its state: a checkpoint named directly may have any name.
    step = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["step"]
    later = [c for c in checkpoints_of(run_dir) if int(c.name.split("-")[1]) > step]
    best = run_dir / "best"
    if is_best_dir(best):
        try:
            best_step = json.loads((best / "best.json").read_text(encoding="utf-8"))["step"]
        except (ValueError, KeyError, TypeError, OSError):
            best_step = None  # unreadable: nothing says it is newer, so it stays
        if isinstance(best_step, int) and best_step > step:
            later.append(best)
    for path in later:
        aside = set_aside(path, "abandoned")
        log.warning(f"resuming from {ckpt.name} abandons the later {path.name}: moved it "
                    f"to {aside} (delete it when you no longer need it)")


def set_aside_unfinished(run_dir: Path, log) -> None:
    """A new run in a folder whose earlier run stopped before its first checkpoint (killed):
    that run's metrics.jsonl and best/ are set aside, so that the new run's curve and
    best model are its own."""
    for name in ("metrics.jsonl", "best"):
        path = run_dir / name
        if path.is_file() or is_best_dir(path):
            aside = set_aside(path, "earlier")
            log.warning(f"{run_dir} holds {name} of an earlier run that left no checkpoint: "
                        f"moved it to {aside}")


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


# ---- writing and reading one -----------------------------------------------------------------
def rng_state() -> dict:
    # CUDA generators are not saved: training reseeds every generator (torch.manual_seed
    # seeds all GPUs) before each step's first random draw, so their state at a checkpoint
    # never matters, and a run may resume with other GPUs visible. Checkpoints of older
    # versions carry a "cuda" entry; it is ignored.
    return {"cpu": torch.get_rng_state()}


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scaler,
                    state: dict, keep: int, last_ckpt: Path | None) -> Path:
    """Write checkpoint ``step-NNNNNNNN`` of `run_dir` (all or nothing), publish its model
    to the run folder and drop all but the newest `keep` checkpoints. `state` is the
    trainer_state.json; `last_ckpt`, the previous checkpoint, is named if this one fails."""
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    try:
        with atomic_dir(path, is_checkpoint, "a train.py checkpoint") as tmp:
            save_model(model, tokenizer, tmp)
            torch.save({"optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": rng_state()}, tmp / TENSORS_FILE)
            write_json(tmp / STATE_FILE, state)
            write_manifest(tmp)
        publish_model(path, run_dir)
    except (OSError, RuntimeError) as e:
        raise save_error(path, last_ckpt, e) from e
    for old in checkpoints_of(run_dir)[:-keep]:
        if old != path:  # never the one just written, whatever else the folder holds
            shutil.rmtree(old)
    return path


def save_error(path: Path, last_ckpt: Path | None, e: Exception) -> ChitchatError:
    try:
        free = f"{shutil.disk_usage(path.parent.parent).free / 2**20:,.0f} MB free"
    except OSError:
        free = "free space unknown"
    kept = (f"The previous checkpoint {last_ckpt} is intact." if last_ckpt else
            "No earlier checkpoint exists.")
    return ChitchatError(f"could not write checkpoint {path} ({free}): {e}. Nothing partial "
                         f"was kept. {kept} Free disk space (or lower --keep_checkpoints) and "
                         "continue with --resume auto.")


def load_checkpoint(ckpt: Path, world: int) -> dict:
    """The trainer state of `ckpt`, checked to be resumable by a run of `world` processes."""
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ChitchatError(f"{ckpt}: checkpoint format {state.get('format')}, this "
                            f"version reads {CHECKPOINT_FORMAT}")
    if state["world_size"] != world:
        raise ChitchatError(f"{ckpt} was written by a run on {state['world_size']} "
                            f"process(es), this one has {world}. Resume with the same "
                            "torchrun --nnodes/--nproc_per_node: the data order depends "
                            "on it.")
    return state


def restore_tensors(ckpt: Path, optimizer, scaler) -> None:
    """Load the optimizer, scaler and CPU random state that `ckpt` saved."""
    tensors = torch.load(ckpt / TENSORS_FILE, map_location="cpu", weights_only=True)
    restore_optimizer(optimizer, tensors["optimizer"])
    if scaler is not None and tensors.get("scaler"):
        scaler.load_state_dict(tensors["scaler"])
    torch.set_rng_state(tensors["rng"]["cpu"])  # CUDA states: see rng_state


def restore_optimizer(optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state but keep this run's kernel choice: the saved
    param groups carry the device's flags of the run that wrote them (a CPU run's
    fused=None, as runs before the fused CPU kernel wrote, would turn the fused kernel off
    for the rest of the run)."""
    kernel = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for g, flags in zip(optimizer.param_groups, kernel):
        g.update(flags)


# ---- resuming ---------------------------------------------------------------------------------
def merge_resume_options(cfg: TrainConfig, saved: dict, where: Path,
                         given: frozenset[str] | None = None) -> TrainConfig:
    """The run's saved options, with the CLI's values for the few that may change.

    `given`: the flags typed on the command line (`flags.given_flags`), so that a flag set
    back to its default (--patience 0) counts. Without it (train() called from Python) an
    option counts as given when it differs from its default.
    """
    defaults = TrainConfig.__dataclass_fields__
    merged = {k: v for k, v in saved.items() if k in defaults}  # options of newer versions
    for f in dataclasses.fields(TrainConfig):
        if f.name not in saved:
            merged[f.name] = getattr(cfg, f.name)
            continue
        value = getattr(cfg, f.name)
        typed = (f.name in given) if given is not None else value != defaults[f.name].default
        if f.name in RESUMABLE:
            if typed or f.name in ("resume", "quiet"):
                merged[f.name] = value
        elif typed and value != saved[f.name]:
            raise ChitchatError(
                f"--{f.name} {value} differs from the run being resumed ({where}), which "
                f"used {saved[f.name]}. A resumed run keeps it; drop --{f.name}, or start a "
                "new run without --resume.")
    # Where the run is now, which may not be where it was saved (a moved run folder):
    # the end-of-run hint (--resume auto --run_name ... --save_model_path ...) names these.
    merged["run_name"] = where.parent.parent.name
    merged["save_model_path"] = str(where.parent.parent.parent)
    return TrainConfig(**merged)


def check_same_data(state: dict, now: dict, ckpt: Path, store) -> None:
    """A resumed run must see the vocab and token ids its checkpoint was trained on."""
    saved = state.get("data")
    if saved is None:  # a checkpoint from before fingerprints: compare the vocab files
        same_vocab = (ckpt / "vocab.txt").read_bytes() == store.vocab_path.read_bytes()
        same_tokens = True
    else:
        same_vocab = saved["vocab_sha256"] == now["vocab_sha256"]
        same_tokens = saved["tokens_sha256"] == now["tokens_sha256"]
    if not same_vocab:
        raise ChitchatError(
            f"the vocab of {store.path} is not the one {ckpt} was trained with (the store was "
            "rebuilt since); the checkpoint's embeddings belong to its own vocab, so resuming "
            "would train on shuffled token ids. Rebuild the store with the run's vocab: "
            f"python preprocess.py --train_path <train.txt> --save_path {store.path} "
            f"--vocab_path {ckpt / 'vocab.txt'} --force; or start a new run.")
    if not same_tokens:
        raise ChitchatError(
            f"the token ids in {store.path} changed since {ckpt} was saved (the corpus was "
            "rebuilt), so the run's data position means nothing now. To go on training on "
            f"the new data, start a new run from it: --pretrained_model {ckpt}")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after `step`: a resumed run logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if _record_step(line) <= step]
    atomic_write_text(path, "".join(kept))


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line torn by a kill: drop it
