"""BERT-style vocab tokenization for dialogues.

A dialogue is encoded as ``[CLS] u1 [SEP] u2 [SEP] ... un [SEP]``. Every utterance ends with
exactly one [SEP] and no utterance contains one, so the [SEP] positions are the utterance
boundaries.

The tokenizer is built exactly as transformers' ``BertTokenizerFast(vocab=...)`` builds it
(BertNormalizer with lowercasing, BertPreTokenizer, WordPiece with ``##`` pieces), so ids are
identical; the tests check this on real vocab files.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from .utils import ChitchatError, atomic_write_text

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# Speaker tokens for token_type_ids (CDial-GPT's names). A built vocab has them at ids 5, 6;
# a vocab without them falls back to [unused1]/[unused2].
SPEAKER_TOKENS = ("[speaker1]", "[speaker2]")
# Tokens that must never be generated as reply text.
NEVER_GENERATE = (PAD, UNK, CLS, MASK)
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def read_vocab(path: str | os.PathLike) -> list[str]:
    """Tokens in id order, read exactly as BERT's ``load_vocab`` reads them.

    Only ``\\n`` (and ``\\r\\n``) end a line: a vocab entry may itself be an exotic Unicode
    separator such as U+2028, and a missing newline after the last line is fine.
    """
    path = Path(path)
    if not path.is_file():
        raise ChitchatError(f"vocab file not found: {path}. Pass a BERT-style vocab.txt "
                            "(one token per line) with --vocab_path, or leave it out to "
                            "build a vocab from the corpus.")
    try:
        with open(path, "r", encoding="utf-8") as f:
            tokens = [t.rstrip("\n") for t in f.readlines()]
    except UnicodeDecodeError as e:
        raise ChitchatError(f"{path}: vocab file is not UTF-8 ({e.reason} at byte {e.start})")
    if tokens and tokens[-1] == "":
        tokens.pop()  # a trailing blank line is an artefact of the final newline
    missing = [t for t in (UNK, CLS, SEP, PAD) if t not in tokens]
    if missing:
        raise ChitchatError(f"{path}: vocab lacks the special token(s) {' '.join(missing)}; "
                            "a BERT-style vocab.txt needs [PAD] [UNK] [CLS] [SEP].")
    return tokens


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_wordish(ch: str) -> bool:
    """Characters that belong to space-separated words (Latin letters, digits...)."""
    return ch.isalnum() and not _is_cjk(ch)


@dataclass
class EncodedBatch:
    """A batch of encoded dialogues: dialogue i is ``ids[offsets[i]:offsets[i+1]]``.

    A dialogue left with no utterance at all has length 0. `dropped` maps a dialogue's
    index to the number of its utterances that had no token and were left out.
    """
    ids: np.ndarray
    offsets: np.ndarray
    dropped: dict[int, int] = field(default_factory=dict)


class ChatTokenizer:
    """A BERT-style WordPiece tokenizer with the dialogue conventions of this project."""

    def __init__(self, tokens: Sequence[str]):
        self.tokens = list(tokens)
        # Later duplicates win, as in BERT's load_vocab.
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.vocab_size = len(self.tokens)
        self.pad_id, self.unk_id = self.vocab[PAD], self.vocab[UNK]
        self.cls_id, self.sep_id = self.vocab[CLS], self.vocab[SEP]
        self.mask_id = self.vocab.get(MASK)
        # Ids never to generate as reply text.
        self.banned_ids = sorted({self.vocab[t] for t in NEVER_GENERATE if t in self.vocab}
                                 | {self.vocab[t] for t in SPEAKER_TOKENS if t in self.vocab})
        self._plain = self._build(with_specials=False)
        self._dialogue = self._build(with_specials=True)

    def _build(self, with_specials: bool) -> Tokenizer:
        tok = Tokenizer(WordPiece(self.vocab, unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        if with_specials:
            tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t in SPECIAL_TOKENS if t in self.vocab])
        return tok

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike) -> "ChatTokenizer":
        return cls(read_vocab(path))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ChatTokenizer":
        vocab = Path(path) / "vocab.txt"
        if not vocab.is_file():
            raise ChitchatError(f"{path} has no vocab.txt; pass the vocab with --vocab_path")
        return cls.from_vocab_file(vocab)

    @classmethod
    def train(cls, utterances: Iterable[str], vocab_size: int = 13000,
              min_frequency: int = 2) -> "ChatTokenizer":
        """Build a WordPiece vocab from text. [PAD] is id 0, then [UNK] [CLS] [SEP] [MASK].

        Every character seen becomes a token (no alphabet limit), so Chinese text has no
        [UNK] at all on the training corpus.
        """
        tok = Tokenizer(WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                   special_tokens=[*SPECIAL_TOKENS, *SPEAKER_TOKENS],
                                   continuing_subword_prefix="##", show_progress=False)
        tok.train_from_iterator(utterances, trainer)
        vocab = tok.get_vocab()
        tokens = sorted(vocab, key=vocab.__getitem__)
        assert tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS), tokens[:5]
        return cls(tokens)

    def speaker_ids(self) -> tuple[int, int]:
        """Token ids that mark speaker 1 and 2 in token_type_ids (``--speaker_ids``)."""
        for pair in (SPEAKER_TOKENS, ("[unused1]", "[unused2]")):
            if all(t in self.vocab for t in pair):
                return self.vocab[pair[0]], self.vocab[pair[1]]
        raise ChitchatError("--speaker_ids needs [speaker1]/[speaker2] (or [unused1]/"
                            "[unused2]) in the vocab; build the vocab from the corpus (no "
                            "--vocab_path) or add those two lines to your vocab.txt")

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of one utterance, without [CLS]/[SEP]. Literal "[SEP]" text is plain text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_dialogues(self, dialogues: Sequence[Sequence[str]],
                         unk_counter: Counter | None = None) -> EncodedBatch:
        """Encode a batch of dialogues to ``[CLS] u1 [SEP] ... un [SEP]``.

        One ``encode_batch`` call over whole dialogues with inline [SEP] (the Rust side uses
        every core), then numpy to add [CLS]/[SEP] and to find the rare dialogue that needs
        the per-utterance path: one whose text holds a special-token literal, or one with an
        utterance that normalizes to no token at all (say, only control characters), which
        is dropped. `unk_counter`, if given, counts the source text of every [UNK].
        """
        texts = [f" {SEP} ".join(d) for d in dialogues]
        encs = self._dialogue.encode_batch(texts, add_special_tokens=False)
        n = len(encs)
        raw_lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=n)
        raw = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int64,
                          count=int(raw_lens.sum()))
        raw_off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(raw_lens, out=raw_off[1:])
        is_sep = raw == self.sep_id
        n_seps = np.add.reduceat(is_sep, raw_off[:-1]) if raw.size else np.zeros(n, np.int64)
        n_seps[raw_lens == 0] = 0
        expected = np.fromiter((len(d) - 1 for d in dialogues), dtype=np.int64, count=n)
        literals = np.fromiter((len(_SPECIAL_RE.findall(t)) for t in texts), dtype=np.int64,
                               count=n)
        bad = (n_seps != expected) | (literals != expected) | (raw_lens == 0)
        nonempty = raw_lens > 0
        bad[nonempty] |= is_sep[raw_off[:-1][nonempty]] | is_sep[raw_off[1:][nonempty] - 1]
        adjacent = np.flatnonzero(is_sep[1:] & is_sep[:-1])  # sep at p and p+1
        if adjacent.size:
            bad[np.searchsorted(raw_off, adjacent, side="right") - 1] = True
        if unk_counter is not None:
            for i in np.unique(np.searchsorted(raw_off, np.flatnonzero(raw == self.unk_id),
                                               side="right") - 1):
                enc, text = encs[i], texts[i]
                unk_counter.update(text[s:e] for t, (s, e) in zip(enc.ids, enc.offsets)
                                   if t == self.unk_id)
        # Fast rows: [CLS] raw [SEP]; the inline seps already close all but the last utterance.
        lens = raw_lens + 2
        lens[bad] = 0
        slow = {int(i): np.asarray(self._encode_slow(dialogues[i]), dtype=np.int64)
                for i in np.flatnonzero(bad)}
        for i, ids in slow.items():
            lens[i] = len(ids) if len(ids) > 1 else 0
        off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=off[1:])
        out = np.empty(int(off[-1]), dtype=np.int64)
        good = np.flatnonzero(~bad)
        out[off[good]] = self.cls_id
        out[off[good + 1] - 1] = self.sep_id
        body = np.ones(out.size, dtype=bool)
        body[off[good]] = False
        body[off[good + 1] - 1] = False
        for i, ids in slow.items():
            body[off[i]:off[i + 1]] = False
            if lens[i]:
                out[off[i]:off[i + 1]] = ids
        keep_raw = np.repeat(~bad, raw_lens)
        out[body] = raw[keep_raw]
        dropped = {i: len(dialogues[i]) - int((ids == self.sep_id).sum())
                   for i, ids in slow.items()}
        return EncodedBatch(out, off, {i: d for i, d in dropped.items() if d})

    def _encode_slow(self, dialogue: Sequence[str]) -> list[int]:
        """Per-utterance path for dialogues whose text holds special-token literals."""
        ids = [self.cls_id]
        for u in dialogue:
            u_ids = self.encode(u)
            if u_ids:
                ids.extend(u_ids)
                ids.append(self.sep_id)
        return ids

    def encode_context(self, utterances: Sequence[str]) -> list[int]:
        """``[CLS] u1 [SEP] ... [SEP]`` for a chat history (reply generation starts after)."""
        return self._encode_slow(utterances)

    # ---- decoding -----------------------------------------------------------------------
    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Readable text: CJK joined, ``##`` pieces merged, spaces between Latin words."""
        detok = Detokenizer()
        return "".join(detok.push(self.tokens[i]) for i in ids
                       if not (skip_special and self.tokens[i] in SPECIAL_TOKENS))

    # ---- saving -------------------------------------------------------------------------
    def save_vocab(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, "".join(t + "\n" for t in self.tokens))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write vocab.txt plus the files `transformers.AutoTokenizer` loads offline."""
        from transformers import BertTokenizerFast

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hf = BertTokenizerFast(vocab=dict(self.vocab), do_lower_case=True,
                               tokenize_chinese_chars=True)
        hf.save_pretrained(str(directory))
        self.save_vocab(directory / "vocab.txt")  # exact line order, duplicates included
        specials = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS}
        if self.mask_id is not None:
            specials["mask_token"] = MASK
        atomic_write_text(directory / "special_tokens_map.json",
                          json.dumps(specials, indent=2) + "\n")


class Detokenizer:
    """Turns WordPiece tokens into text incrementally, for streaming output.

    ``push(token)`` returns the text to append: a ``##`` piece glues to the word before, a
    space goes only between two word-like (Latin/digit) characters, and CJK characters and
    punctuation join without spaces.
    """

    def __init__(self):
        self._last = ""

    def push(self, token: str) -> str:
        if token.startswith("##") and len(token) > 2:
            piece = token[2:]
        elif self._last and _is_wordish(self._last) and token and _is_wordish(token[0]):
            piece = " " + token
        else:
            piece = token
        if piece:
            self._last = piece[-1]
        return piece
