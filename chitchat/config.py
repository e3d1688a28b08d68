"""Typed options for each tool. The argparse parsers are built from these dataclasses,
so each option's type, default and help live in exactly one place.

Each field's metadata may hold:
  help     the --help text (required)
  choices  allowed values
  aliases  extra flag spellings, e.g. ["--no-stream"]
  bool     "flag" (store_true, the default for bools) or "optional" (--x/--no-x)
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .utils import ChitchatError


def opt(default: Any, help: str, **meta) -> Any:
    """A dataclass field carrying its command-line help."""
    return field(default=default, metadata={"help": help, **meta})


def _base_type(tp):
    """Unwrap `X | None` to X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_parser(cls, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or "help" not in f.metadata:
            continue
        meta = f.metadata
        tp = _base_type(hints[f.name])
        names = [f"--{f.name}", *meta.get("aliases", [])]
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = meta["help"] + ("" if tp is bool else f" (default: {default})")
        if tp is bool:
            if meta.get("bool") == "optional":
                parser.add_argument(*names, action=argparse.BooleanOptionalAction,
                                    default=default, help=helptext)
            else:
                parser.add_argument(*names, action="store_true", default=default, help=helptext)
            continue
        parser.add_argument(*names, type=tp, default=default, choices=meta.get("choices"),
                            help=helptext, metavar=meta.get("metavar"))
    return parser


def parse_config(cls, argv=None, description: str = "", epilog: str = ""):
    """Parse argv into `cls`; validation errors from __post_init__ become usage errors."""
    parser = build_parser(cls, description, epilog)
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except ChitchatError as e:
        parser.error(str(e))


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ChitchatError(msg)


@dataclass
class PreprocessConfig:
    train_path: str = opt("data/sample/train.txt",
                          "dialogue corpus: train.txt (blank line between dialogues, one "
                          "utterance per line) or .jsonl (one JSON list of utterances per line)")
    save_path: str | None = opt(None, "output token-store directory "
                                "(default: the corpus path without its extension, e.g. data/train)")
    vocab_path: str | None = opt(None, "existing BERT-style vocab.txt to use as is; without it a "
                                 "WordPiece vocab is built from the corpus")
    vocab_size: int = opt(13000, "size of the vocab built from the corpus (no --vocab_path)")
    min_frequency: int = opt(2, "minimum count for a WordPiece merge when building the vocab")
    encoding: str = opt("utf-8", "text encoding of the corpus, e.g. gbk or gb18030")
    max_len: int = opt(150, "dialogue length (tokens) that the report counts as too long; "
                       "train.py splits longer dialogues into windows, nothing is cut here")
    val_num: int | None = opt(None, "number of dialogues held out for validation")
    val_fraction: float = opt(0.01, "share of dialogues held out for validation when --val_num "
                              "is not given")
    seed: int = opt(42, "seed of the train/validation split")
    batch_dialogues: int = opt(2000, "dialogues encoded per encode_batch call")
    log_path: str | None = opt(None, "also write the log to this file "
                               "(default: <save_path>/preprocess.log)")
    force: bool = opt(False, "rebuild even when the output is up to date")
    quiet: bool = opt(False, "no progress bar, only warnings and errors")

    def __post_init__(self):
        check(self.vocab_size >= 10, f"--vocab_size must be at least 10, got {self.vocab_size}")
        check(self.min_frequency >= 1, "--min_frequency must be at least 1")
        check(self.max_len >= 4, f"--max_len must be at least 4, got {self.max_len}")
        check(self.val_num is None or self.val_num >= 0, "--val_num must be >= 0")
        check(0.0 <= self.val_fraction < 1.0, "--val_fraction must be in [0, 1)")
        check(self.batch_dialogues >= 1, "--batch_dialogues must be at least 1")
