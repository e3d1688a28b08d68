"""preprocess.py's pipeline: corpus file -> validated token store + data report.

Two streaming passes over the file (one to build the vocab if none is given, one to encode),
so memory stays bounded by a batch of dialogues plus 8-byte-per-dialogue indexes.
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .config import PreprocessConfig
from .corpus import Dialogue, ReadStats, read_dialogues
from .dialogue import encode_dialogues
from .store import (FORMAT_VERSION, StoreWriter, TokenStore, default_save_path, is_token_store,
                    validation_size)
from .tokenization import ChatTokenizer, check_same_vocab
from .utils import (ChitchatError, atomic_dir, check_replaceable, get_logger, sha256_file,
                    write_json)


def check_output_path(src: Path, save: Path) -> None:
    """The store may not be the corpus, nor a folder that holds it: a rebuild replaces the
    whole folder."""
    s, d = src.resolve(), save.resolve()
    if s == d or d in s.parents:
        raise ChitchatError(f"--save_path {save} would replace the corpus {src} (the output "
                            "folder is replaced whole). Choose an output folder that does not "
                            f"hold the corpus, e.g. --save_path {default_save_path(str(src))}")


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names: symlinks resolve alike, hard links share an inode."""
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def check_log_path(log_path: Path, inputs: dict[str, Path], save: Path) -> None:
    """The log is appended to while the inputs are read and the store is replaced whole, so
    it may be neither an input (`inputs`: flag -> file) nor inside the store's folder."""
    beside = save.parent / f"{save.name}.log"
    if log_path.is_dir():
        raise ChitchatError(f"--log_path {log_path} is a folder; give a file, e.g. "
                            f"--log_path {beside}")
    for flag, f in inputs.items():
        if _same_file(log_path, f):
            raise ChitchatError(f"--log_path {log_path} is the {flag} file; the log would be "
                                f"appended to it. Give the log a file of its own, e.g. "
                                f"--log_path {beside}")
    d = save.resolve()
    if d == log_path.resolve() or d in log_path.resolve().parents:
        raise ChitchatError(f"--log_path {log_path} is inside the output folder {save}, "
                            "which preprocess.py replaces whole (the log would be lost). Put "
                            f"the log beside it, e.g. --log_path {beside}")


def _input_files(cfg: PreprocessConfig) -> dict[str, Path]:
    """The files preprocess.py reads, by the flag that names them."""
    files = {"--train_path": Path(cfg.train_path)}
    if cfg.vocab_path:
        files["--vocab_path"] = Path(cfg.vocab_path)
    if cfg.pretrained_model:
        files["--pretrained_model vocab"] = Path(cfg.pretrained_model) / "vocab.txt"
    return files


def given_vocab(cfg: PreprocessConfig) -> Path | None:
    """The vocab to encode with: --vocab_path, or the vocab.txt of --pretrained_model (the
    ids must be the model's, or fine-tuning would start from shuffled embeddings)."""
    if cfg.pretrained_model is None:
        return Path(cfg.vocab_path) if cfg.vocab_path else None
    folder = Path(cfg.pretrained_model)
    vocab = folder / "vocab.txt"
    if not folder.is_dir():
        raise ChitchatError(f"--pretrained_model {folder}: no such folder. Give the local model "
                            "folder you will fine-tune (see the README: Fine-tune a pretrained "
                            "Chinese GPT-2)")
    if not vocab.is_file():
        raise ChitchatError(f"--pretrained_model {folder} has no vocab.txt, so its token ids are "
                            "unknown. Pass the vocab the model was trained with instead: "
                            "--vocab_path <vocab.txt> (without --pretrained_model)")
    if cfg.vocab_path is not None:
        check_same_vocab(ChatTokenizer.from_vocab_file(vocab), vocab,
                         ChatTokenizer.from_vocab_file(cfg.vocab_path), cfg.vocab_path,
                         "Drop --vocab_path: --pretrained_model uses the model's own vocab.")
    return vocab


def _batches(it: Iterator[Dialogue], n: int) -> Iterator[list[Dialogue]]:
    while batch := list(islice(it, n)):
        yield batch


def _dialogue_hash(utts: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b("\n".join(utts).encode(), digest_size=8).digest(),
                          "little")


def _settings(cfg: PreprocessConfig, source_hash: str, vocab_hash: str | None) -> dict:
    """Everything the output depends on: equal settings mean the store is up to date."""
    return {"format_version": FORMAT_VERSION, "source_sha256": source_hash,
            "given_vocab_sha256": vocab_hash, "encoding": cfg.encoding,
            "vocab_size": None if vocab_hash else cfg.vocab_size,
            "min_frequency": None if vocab_hash else cfg.min_frequency,
            "val_num": cfg.val_num, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
            "max_len": cfg.max_len}


STORE_KIND = "a token store (preprocess.py's output)"


def preprocess(cfg: PreprocessConfig) -> Path:
    """Build the token store for `cfg.train_path`; returns its directory."""
    save = Path(cfg.save_path) if cfg.save_path else default_save_path(cfg.train_path)
    src = Path(cfg.train_path)
    check_output_path(src, save)
    check_replaceable(save, is_token_store, STORE_KIND)  # now, not after minutes of work
    if cfg.log_path:
        check_log_path(Path(cfg.log_path), _input_files(cfg), save)
    # Its own logger, so a caller (evaluate.py) keeps its log settings.
    log = get_logger("chitchat.preprocess", log_path=cfg.log_path, quiet=cfg.quiet)
    stats = ReadStats()
    # Fail on a missing or unreadable file before hashing or touching the output. Its own
    # stats: the encode pass reads these dialogues again and counts their skips then.
    next(iter(read_dialogues(src, cfg.encoding, ReadStats())), None)
    source_hash = sha256_file(src)
    vocab_path = given_vocab(cfg)
    vocab_hash = sha256_file(vocab_path) if vocab_path else None
    settings = _settings(cfg, source_hash, vocab_hash)
    if (save / "meta.json").is_file() and not cfg.force:
        try:
            old = json.loads((save / "meta.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        if old.get("settings") == settings:
            TokenStore(save)  # complete and readable, or this raises
            log.info(f"{save} is up to date with {src}; nothing to do (--force rebuilds).")
            return save

    show = not cfg.quiet and sys.stderr.isatty()
    if vocab_path:
        tok = ChatTokenizer.from_vocab_file(vocab_path)
        log.info(f"vocab: {vocab_path} ({tok.vocab_size} tokens)")
    else:
        utts = (u for d in tqdm(read_dialogues(src, cfg.encoding), desc="vocab", unit=" dlg",
                                disable=not show) for u in d.utterances)
        tok = ChatTokenizer.train(utts, cfg.vocab_size, cfg.min_frequency)
        log.info(f"vocab: built from {src} ({tok.vocab_size} tokens)")

    with atomic_dir(save, is_token_store, STORE_KIND) as tmp:
        with StoreWriter(tmp, tok.vocab_size, tok.sep_id) as writer:
            report = _encode_corpus(cfg, src, tok, writer, stats, show)
        n = writer.n_dialogues
        n_valid = validation_size(n, cfg.val_num, cfg.val_fraction)
        writer.write_split(n_valid, cfg.seed)
        if n_valid == 0 and cfg.val_num is None and cfg.val_fraction > 0:  # asked, got none
            log.warning("warning: no validation dialogues (a single dialogue cannot be "
                        "split); training will not report a validation loss.")
        elif n_valid == 0:
            log.info("no validation dialogues (as asked: --val_num 0 or --val_fraction 0)")
        counts = {"dialogues": n, "utterances": writer.n_utterances, "tokens": writer.n_tokens,
                  "valid_dialogues": n_valid, "train_dialogues": n - n_valid}
        writer.write_meta(tok, {"path": src.name, "sha256": source_hash,
                                "encoding": cfg.encoding}, counts, settings)
        write_json(tmp / "report.json", report)
    _print_report(report, log)
    log.info(f"wrote {save}")
    return save


@dataclass
class _Findings:
    """What the data report tells beyond the store's own counts, gathered batch by batch."""
    unk: Counter = field(default_factory=Counter)
    skipped_utterances: int = 0
    skipped_dialogues: list[str] = field(default_factory=list)  # "file:line"
    hashes: array.array = field(default_factory=lambda: array.array("Q"))  # kept dialogues'
    lines: array.array = field(default_factory=lambda: array.array("q"))   # and their lines


def _encode_corpus(cfg, src: Path, tok: ChatTokenizer, writer: StoreWriter, stats: ReadStats,
                   show: bool) -> dict:
    """Encode the corpus into `writer`; returns the data report."""
    found = _Findings()
    reader = read_dialogues(src, cfg.encoding, stats)
    bar = tqdm(desc="encode", unit=" dlg", disable=not show)
    for batch in _batches(reader, cfg.batch_dialogues):
        enc = encode_dialogues(tok, [d.utterances for d in batch], found.unk)
        keep = writer.add(enc.ids, enc.offsets)
        for i, n_drop in enc.dropped.items():
            found.skipped_utterances += n_drop
            if not keep[i]:
                found.skipped_dialogues.append(f"{src.name}:{batch[i].line}")
        for d, k in zip(batch, keep):
            if k:
                found.hashes.append(_dialogue_hash(d.utterances))
                found.lines.append(d.line)
        bar.update(len(batch))
    bar.close()
    if writer.n_dialogues == 0:
        raise ChitchatError(f"{src}: the corpus holds no dialogue. train.txt needs one "
                            "utterance per line and a blank line between dialogues.")
    return _data_report(cfg, src, writer, stats, found)


def _data_report(cfg, src: Path, writer: StoreWriter, stats: ReadStats,
                 found: _Findings) -> dict:
    n, n_tokens, n_utts = writer.n_dialogues, writer.n_tokens, writer.n_utterances
    lens = writer.lengths()
    text_tokens = n_tokens - n - n_utts  # without [CLS]/[SEP]
    h = np.frombuffer(found.hashes, dtype=np.uint64)
    order = np.argsort(h, kind="stable")
    dup = np.zeros(n, dtype=bool)
    dup[order[1:]] = h[order[1:]] == h[order[:-1]]
    line_arr = np.frombuffer(found.lines, dtype=np.int64)
    total_unk = sum(found.unk.values())
    return {
        "source": str(src.name),
        "counts": {"dialogues": n, "utterances": n_utts, "tokens": n_tokens,
                   "text_tokens": text_tokens},
        "dialogue_tokens": {
            "mean": round(float(lens.mean()), 2),
            **{f"p{q}": int(np.percentile(lens, q)) for q in (50, 90, 99)},
            "max": int(lens.max()),
            "max_len": cfg.max_len,
            "share_over_max_len": round(float((lens > cfg.max_len).mean()), 6),
        },
        "unk": {"count": total_unk,
                "rate": round(total_unk / max(1, text_tokens), 6),
                "top": [[s, c] for s, c in found.unk.most_common(20)]},
        "duplicates": {"count": int(dup.sum()),
                       "examples": [f"{src.name}:{int(l)}" for l in line_arr[dup][:10]]},
        "skipped": {
            "empty_utterances": stats.empty_utterances,
            "empty_dialogues": stats.empty_dialogues,
            "invisible_lines": stats.invisible_lines,
            "utterances_without_tokens": found.skipped_utterances,
            "dialogues_without_tokens": len(found.skipped_dialogues),
            "examples": stats.examples + [f"{w}: dialogue with no token"
                                          for w in found.skipped_dialogues[:10]],
        },
    }


def _print_report(r: dict, log) -> None:
    c, L, u = r["counts"], r["dialogue_tokens"], r["unk"]
    s = r["skipped"]
    log.info(f"dialogues {c['dialogues']:,}  utterances {c['utterances']:,}  "
             f"tokens {c['tokens']:,}")
    log.info(f"tokens per dialogue: mean {L['mean']}  p50 {L['p50']}  p90 {L['p90']}  "
             f"p99 {L['p99']}  max {L['max']};  {100 * L['share_over_max_len']:.2f}% over "
             f"--max_len {L['max_len']} (train.py splits those into windows)")
    top = " ".join(f"{ch}×{n}" for ch, n in u["top"][:10])
    log.info(f"[UNK] rate {100 * u['rate']:.3f}% ({u['count']:,})" + (f": {top}" if top else ""))
    log.info(f"duplicate dialogues: {r['duplicates']['count']:,}")
    skipped = {k: v for k, v in s.items() if k != "examples" and v}
    if skipped:
        log.info("skipped: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in
                                         skipped.items()))
        for ex in s["examples"][:5]:
            log.info(f"  {ex}")
