"""The token store: a preprocessed corpus on disk, memory-mapped for training. The file
format lives here alone: `TokenStore` reads it, `StoreWriter` (used by preprocess.py) writes it.

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

import array
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .tokenization import ChatTokenizer
from .utils import ChitchatError, sha256_file, write_json

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


STORE_KIND = "chitchat-token-store"


def is_token_store(path: Path) -> bool:
    """True when `path` is a folder preprocess.py wrote (its meta.json says so), complete or
    not: only such a folder may be replaced by a rebuild."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # Stores from before the "kind" key are recognised by the keys only a store has.
    return isinstance(meta, dict) and (meta.get("kind") == STORE_KIND or {
        "format_version", "token_dtype", "vocab_sha256", "counts"} <= meta.keys())


def default_save_path(train_path: str) -> Path:
    """data/train.txt -> data/train: the store sits beside its corpus."""
    src = Path(train_path)
    out = src.with_suffix("")
    return out if out != src else src.with_name(src.name + "_store")


class TokenStore:
    """Read-only view of a token store. Arrays are memory-mapped, not read into RAM."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = self._read_meta()
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ChitchatError(
                f"{self.path} has token store format {self.meta.get('format_version')}, this "
                f"version reads format {FORMAT_VERSION}. Rebuild it with --force. "
                f"{self._hint()}")
        missing = [f for f in STORE_FILES if not (self.path / f).is_file()]
        if missing:
            raise ChitchatError(f"{self.path} is incomplete (missing {', '.join(missing)}). "
                                f"{self._hint()} --force")
        try:
            self.vocab_size: int = int(self.meta["vocab_size"])
            dtype = np.dtype(self.meta["token_dtype"])
            n_tokens = int(self.meta["counts"]["tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise self._damaged(f"meta.json lacks a valid vocab_size, token_dtype or "
                                f"counts.tokens ({type(e).__name__}: {e})") from None
        self.tokens = self._map_tokens(dtype, n_tokens)
        self.dialogue_offsets = self._load("dialogue_offsets.npy")
        self.utterance_ends = self._load("utterance_ends.npy")
        self.dialogue_utterances = self._load("dialogue_utterances.npy")
        self.split = self._load("split.npy")
        self._check_lengths(n_tokens)

    def _hint(self) -> str:
        return (f"HINT: build it with: python preprocess.py --train_path <train.txt> "
                f"--save_path {self.path}")

    def _damaged(self, detail: str) -> ChitchatError:
        return ChitchatError(f"{self.path}: {detail}; the store is damaged. {self._hint()} "
                             "--force")

    def _read_meta(self) -> dict:
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            if self.path.is_file():  # most often the corpus itself
                raise ChitchatError(
                    f"{self.path} is a file, not a token store directory. If it is a corpus, "
                    f"tokenize it first: python preprocess.py --train_path {self.path} "
                    f"(writes {default_save_path(str(self.path))}), then give that folder")
            raise ChitchatError(f"no token store at {self.path}. {self._hint()}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise self._damaged(f"meta.json cannot be read ({e})") from None
        if not isinstance(meta, dict):
            raise self._damaged(f"meta.json holds a {type(meta).__name__}, not an object")
        return meta

    def _map_tokens(self, dtype: np.dtype, n_tokens: int) -> np.ndarray:
        # np.memmap of a short file fails with a bare ValueError; a long one would be read
        # without complaint, with tokens that no offset points at.
        path = self.path / "tokens.bin"
        size, want = path.stat().st_size, n_tokens * dtype.itemsize
        if n_tokens < 0 or size != want:
            raise self._damaged(f"tokens.bin holds {size:,} bytes, but meta.json counts "
                                f"{n_tokens:,} {dtype.name} tokens ({want:,} bytes)")
        if not n_tokens:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))

    def _load(self, name: str) -> np.ndarray:
        try:
            arr = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as e:  # truncated, not .npy, or pickled objects
            raise self._damaged(f"{name} cannot be read ({e})") from None
        if arr.ndim != 1:
            raise self._damaged(f"{name} has shape {arr.shape}, not a 1-D array")
        return arr

    def _check_lengths(self, n_tokens: int) -> None:
        """The indexes must fit each other and tokens.bin, or reads go out of range."""
        off, du = self.dialogue_offsets, self.dialogue_utterances
        if len(off) == 0 or int(off[-1]) != n_tokens:
            raise self._damaged("offsets and tokens.bin disagree")
        if len(du) != len(off) or int(du[-1]) != len(self.utterance_ends):
            raise self._damaged("dialogue_utterances.npy and utterance_ends.npy disagree with "
                                "the dialogue offsets")
        if len(self.split) != len(off) - 1:
            raise self._damaged(f"split.npy has {len(self.split)} entries for "
                                f"{len(off) - 1} dialogues")

    def __len__(self) -> int:
        return len(self.dialogue_offsets) - 1

    @property
    def vocab_path(self) -> Path:
        return self.path / "vocab.txt"

    def tokenizer(self) -> ChatTokenizer:
        tok = ChatTokenizer.from_vocab_file(self.vocab_path)
        top = int(self.tokens.max()) if len(self.tokens) else -1
        if top >= tok.vocab_size:
            raise ChitchatError(
                f"{self.vocab_path} has {tok.vocab_size} tokens but {self.path / 'tokens.bin'} "
                f"holds id {top}: the vocab does not belong to these tokens. Rebuild the "
                f"store: python preprocess.py --train_path <train.txt> --save_path "
                f"{self.path} --force")
        return tok

    def fingerprint(self) -> dict:
        """What a model trained on this store depends on: the vocab and the token ids.

        tokens.bin is hashed once and the result kept in meta.json by preprocess.py; older
        stores are hashed here."""
        tokens = self.meta.get("tokens_sha256") or sha256_file(self.path / "tokens.bin")
        return {"vocab_sha256": sha256_file(self.vocab_path), "tokens_sha256": tokens}

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


class ReversedStore(TokenStore):
    """A token store seen with the utterance order of every dialogue reversed:
    ``[CLS] un [SEP] un-1 [SEP] ... u1 [SEP]`` (train.py --reverse, the MMI reverse model).

    Nothing is rewritten on disk: the dialogue and utterance counts are unchanged, only the
    utterance boundaries are recomputed (one int64 per utterance) and `dialogue` assembles
    the reversed ids on demand. Everything built on the store (windows, packing, speakers,
    the split) then works on the reversed dialogues unchanged.
    """

    def __init__(self, base: TokenStore):
        self.base = base
        self.path, self.meta, self.vocab_size = base.path, base.meta, base.vocab_size
        self.tokens = base.tokens
        self.dialogue_offsets = base.dialogue_offsets
        self.dialogue_utterances = base.dialogue_utterances
        self.split = base.split
        self.utterance_ends = reversed_utterance_ends(
            np.asarray(base.dialogue_offsets), np.asarray(base.dialogue_utterances),
            np.asarray(base.utterance_ends))

    def dialogue(self, i: int) -> np.ndarray:
        dia = self.base.dialogue(i)
        spans = self.base.utterance_spans(i)
        return np.concatenate([dia[:1], *(dia[a:b] for a, b in reversed(spans))])


def reversed_utterance_ends(offsets: np.ndarray, dlg_utts: np.ndarray,
                            ends: np.ndarray) -> np.ndarray:
    """Absolute utterance ends of the reversed dialogues (pure, vectorised).

    In a dialogue at offset o with n utterances and L tokens, reversed utterance k is
    original utterance n-1-k, and everything after it in the original (utterances
    n-1-k.. n-1) now comes before it, so its end is o + L + 1 - start(n-1-k).
    """
    n_utt = np.diff(dlg_utts)
    d_of_u = np.repeat(np.arange(len(n_utt)), n_utt)
    starts = np.empty_like(ends)
    starts[1:] = ends[:-1]
    starts[dlg_utts[:-1][n_utt > 0]] = offsets[:-1][n_utt > 0] + 1  # after each [CLS]
    u = np.arange(len(ends))
    mirror = dlg_utts[d_of_u] + dlg_utts[d_of_u + 1] - 1 - u
    return offsets[d_of_u] + offsets[d_of_u + 1] + 1 - starts[mirror]


def resplit(store: TokenStore, val_num: int | None, val_fraction: float | None,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) dialogue indices: the store's split unless --val_num/--val_fraction
    ask for another, which is then drawn exactly as preprocess.py draws it."""
    if val_num is None and val_fraction is None:
        return store.train_indices(), store.valid_indices()
    n = len(store)
    mask = split_mask(n, validation_size(n, val_num, val_fraction or 0.0), seed)
    return np.flatnonzero(mask == 0), np.flatnonzero(mask == 1)


# ---- writing (preprocess.py) ------------------------------------------------------------
class StoreWriter:
    """Writes a token store into an empty folder (preprocess.py passes the temporary one that
    is renamed into place), one batch of encoded dialogues at a time: tokens go straight to
    tokens.bin, the indexes grow by 8 bytes per dialogue and per utterance.

    Use it as a context manager; on a clean exit the indexes are written too. Then
    `write_split` and `write_meta` complete the store.
    """

    def __init__(self, folder: str | os.PathLike, vocab_size: int, sep_id: int):
        self.folder = Path(folder)
        self.dtype = token_dtype(vocab_size)
        self.sep_id = sep_id
        self.n_tokens = 0
        self.offsets = array.array("q", [0])
        self.utterance_ends = array.array("q")
        self.dialogue_utterances = array.array("q", [0])
        self._sha = hashlib.sha256()
        self._bin = open(self.folder / "tokens.bin", "wb")

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin.close()
        if exc_type is None:
            for name, values in (("dialogue_offsets.npy", self.offsets),
                                 ("utterance_ends.npy", self.utterance_ends),
                                 ("dialogue_utterances.npy", self.dialogue_utterances)):
                np.save(self.folder / name, np.frombuffer(values, dtype=np.int64))

    @property
    def n_dialogues(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_utterances(self) -> int:
        return len(self.utterance_ends)

    def lengths(self) -> np.ndarray:
        """Tokens of each dialogue written so far."""
        return np.diff(np.frombuffer(self.offsets, dtype=np.int64))

    def add(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Append a batch in which dialogue i is ``ids[offsets[i]:offsets[i+1]]``; a dialogue
        of length 0 (no utterance had a token) is left out. Returns the mask of those kept."""
        keep = np.diff(offsets) > 0
        is_sep = ids == self.sep_id
        self.utterance_ends.extend((np.flatnonzero(is_sep) + 1 + self.n_tokens).tolist())
        # Utterances per kept dialogue, by counting [SEP] inside each span.
        seps_before = np.concatenate(([0], np.cumsum(is_sep)))
        n_utts = seps_before[offsets[1:]] - seps_before[offsets[:-1]]
        self.dialogue_utterances.extend(
            (self.dialogue_utterances[-1] + np.cumsum(n_utts[keep])).tolist())
        self.offsets.extend((self.n_tokens + offsets[1:][keep]).tolist())
        raw = ids.astype(self.dtype).tobytes()
        self._bin.write(raw)
        self._sha.update(raw)
        self.n_tokens += ids.size
        return keep

    def write_split(self, n_valid: int, seed: int) -> None:
        np.save(self.folder / "split.npy", split_mask(self.n_dialogues, n_valid, seed))

    def write_meta(self, tok: ChatTokenizer, source: dict, counts: dict,
                   settings: dict) -> None:
        """vocab.txt and meta.json; tokens.bin's hash is kept there so that a model's
        fingerprint does not re-read the tokens."""
        tok.save_vocab(self.folder / "vocab.txt")
        write_json(self.folder / "meta.json", {
            "kind": STORE_KIND, "format_version": FORMAT_VERSION, "vocab_size": tok.vocab_size,
            "vocab_sha256": sha256_file(self.folder / "vocab.txt"),
            "tokens_sha256": self._sha.hexdigest(), "token_dtype": self.dtype.name,
            "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "cls": tok.cls_id,
                            "sep": tok.sep_id},
            "source": source, "counts": counts, "settings": settings})
