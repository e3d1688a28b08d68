"""The token store: a preprocessed corpus on disk, memory-mapped for training.

Layout of a store directory (written by ``preprocess.py``, see docs/formats.md)::

    tokens.bin                 every dialogue's ids back to back, uint16 (or uint32 for a
                               vocab over 65,535), ``[CLS] u1 [SEP] u2 [SEP] ...``
    dialogue_offsets.npy       int64 [D+1]: dialogue i is tokens[off[i]:off[i+1]]
    utterance_ends.npy         int64 [U]: absolute index one past each utterance's [SEP]
    dialogue_utterances.npy    int64 [D+1]: utterances of dialogue i are
                               utterance_ends[du[i]:du[i+1]]
    split.npy                  uint8 [D]: 1 = validation, 0 = training
    vocab.txt  meta.json  report.json

Usage::

    store = TokenStore("data/train")
    ids = store.dialogue(0)                  # np.ndarray view, nothing copied
    for start, end in store.utterance_spans(0): ...
    train, valid = store.train_indices(), store.valid_indices()
    tok = store.tokenizer()
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .tokenization import ChatTokenizer
from .utils import ChitchatError

FORMAT_VERSION = 1
STORE_FILES = ("tokens.bin", "dialogue_offsets.npy", "utterance_ends.npy",
               "dialogue_utterances.npy", "split.npy", "vocab.txt", "meta.json")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def validation_size(n_dialogues: int, val_num: int | None, val_fraction: float) -> int:
    """How many dialogues to hold out; a request that does not fit says what would."""
    if val_num is not None:
        if n_dialogues > 1 and val_num < n_dialogues:
            return val_num
        if val_num == 0:
            return 0
        suggest = max(1, n_dialogues // 10)
        raise ChitchatError(
            f"--val_num {val_num} does not fit a corpus of {n_dialogues} dialogue(s): at least "
            f"one must stay for training. Try --val_num {suggest if n_dialogues > 1 else 0}"
            f"{' or --val_fraction 0.1' if n_dialogues > 1 else ''}.")
    if val_fraction <= 0 or n_dialogues < 2:
        return 0
    return min(n_dialogues - 1, max(1, round(n_dialogues * val_fraction)))


def split_mask(n_dialogues: int, n_valid: int, seed: int) -> np.ndarray:
    """uint8 mask, 1 for the `n_valid` validation dialogues: a seeded, deterministic choice."""
    mask = np.zeros(n_dialogues, dtype=np.uint8)
    if n_valid:
        mask[np.random.default_rng(seed).permutation(n_dialogues)[:n_valid]] = 1
    return mask


class TokenStore:
    """Read-only view of a token store. Arrays are memory-mapped, not read into RAM."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        hint = (f"HINT: build it with: python preprocess.py --train_path <train.txt> "
                f"--save_path {self.path}")
        if not meta_path.is_file():
            if self.path.is_file():
                raise ChitchatError(f"{self.path} is a file, not a token store directory. "
                                    f"{hint}")
            raise ChitchatError(f"no token store at {self.path}. {hint}")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ChitchatError(
                f"{self.path} has token store format {self.meta.get('format_version')}, this "
                f"version reads format {FORMAT_VERSION}. Rebuild it with --force. {hint}")
        missing = [f for f in STORE_FILES if not (self.path / f).is_file()]
        if missing:
            raise ChitchatError(f"{self.path} is incomplete (missing {', '.join(missing)}). "
                                f"{hint} --force")
        self.vocab_size: int = self.meta["vocab_size"]
        dtype = np.dtype(self.meta["token_dtype"])
        n_tokens = self.meta["counts"]["tokens"]
        self.tokens = (np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r",
                                 shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype))
        load = lambda name: np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        self.dialogue_offsets = load("dialogue_offsets.npy")
        self.utterance_ends = load("utterance_ends.npy")
        self.dialogue_utterances = load("dialogue_utterances.npy")
        self.split = load("split.npy")
        if int(self.dialogue_offsets[-1]) != n_tokens:
            raise ChitchatError(f"{self.path}: offsets and tokens.bin disagree; the store is "
                                f"damaged. {hint} --force")

    def __len__(self) -> int:
        return len(self.dialogue_offsets) - 1

    @property
    def vocab_path(self) -> Path:
        return self.path / "vocab.txt"

    def tokenizer(self) -> ChatTokenizer:
        return ChatTokenizer.from_vocab_file(self.vocab_path)

    def dialogue(self, i: int) -> np.ndarray:
        """Ids of dialogue i: ``[CLS] u1 [SEP] ... un [SEP]``."""
        return self.tokens[self.dialogue_offsets[i]:self.dialogue_offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.dialogue_offsets)

    def utterance_spans(self, i: int) -> list[tuple[int, int]]:
        """(start, end) of each utterance within dialogue i, end just past its [SEP].

        Dialogue-relative: the first utterance starts at 1, after [CLS].
        """
        base = int(self.dialogue_offsets[i])
        ends = self.utterance_ends[self.dialogue_utterances[i]:self.dialogue_utterances[i + 1]]
        ends = [int(e) - base for e in ends]
        return list(zip([1] + ends[:-1], ends))

    def train_indices(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.split) == 0)

    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.split) == 1)
