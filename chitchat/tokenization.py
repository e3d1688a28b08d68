"""BERT-style vocab tokenization of utterances.

The tokenizer is built exactly as transformers' ``BertTokenizerFast(vocab=...)`` builds it
(BertNormalizer with lowercasing, BertPreTokenizer, WordPiece with ``##`` pieces), so ids are
identical; the tests check this on real vocab files. `char_table` is the vectorised fast path
for the common all-CJK utterance, with the same ids (tested over every shared corpus). How
utterances become a dialogue, ``[CLS] u1 [SEP] u2 [SEP] ...``, is chitchat.dialogue's.
"""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from .utils import ChitchatError, atomic_write_text, locate_decode_error
from .wordpiece import count_words, train_wordpiece

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# Speaker tokens for token_type_ids (CDial-GPT's names). A built vocab has them at ids 5, 6;
# a vocab without them falls back to [unused1]/[unused2].
SPEAKER_TOKENS = ("[speaker1]", "[speaker2]")
# Tokens that must never be generated as reply text.
NEVER_GENERATE = (PAD, UNK, CLS, MASK)

# The chat template saved with every model folder (chat_template.jinja), so that
# transformers' apply_chat_template, pipelines, vLLM and TGI build the prompt exactly as
# chitchat.dialogue.build_context does for a history that fits (tests/test_hf_folder.py). Its
# messages rules are serve.py's (chitchat.serving.schema.to_history), so the same request gives
# the same ids. Literal special-token text in a message is split ("[SEP]" -> "[ SEP ]", which
# tokenizes to the same plain-text ids) because HF tokenizers would read it as the token.
CHAT_TEMPLATE = """\
{#- chitchat dialogue format: [CLS] u1 [SEP] u2 [SEP] ... un [SEP].
    The reply begins right after the last [SEP], so add_generation_prompt adds nothing.
    user and assistant messages are the utterances; consecutive messages of one role form
    one utterance (joined by a space); empty ones are dropped. system, developer and tool
    messages are ignored: the model was never trained with instructions or a persona.
    No trimming: the client keeps the last max_history_len utterances and fits the prompt
    plus max_new_tokens into n_positions (chitchat's own Chatbot and serve.py do this). -#}
{%- set ns = namespace(role=none) -%}
{{- '[CLS]' -}}
{%- for message in messages -%}
    {%- set content = message['content'] or '' -%}
    {%- if content is not string -%}
        {%- set content = content | selectattr('type', 'equalto', 'text')
                                  | map(attribute='text') | join(' ') -%}
    {%- endif -%}
    {%- if message['role'] in ['user', 'assistant'] and content | trim -%}
        {%- if ns.role is not none -%}
            {{- ' ' if message['role'] == ns.role else '[SEP]' -}}
        {%- endif -%}
        {{- content | replace('[PAD]', '[ PAD ]') | replace('[UNK]', '[ UNK ]')
                    | replace('[CLS]', '[ CLS ]') | replace('[SEP]', '[ SEP ]')
                    | replace('[MASK]', '[ MASK ]') -}}
        {%- set ns.role = message['role'] -%}
    {%- endif -%}
{%- endfor -%}
{%- if ns.role is not none -%}
    {{- '[SEP]' -}}
{%- endif -%}
"""


def _bert_normalizer() -> normalizers.Normalizer:
    """BertTokenizerFast's normalizer (clean_text drops NUL, U+FFFD and every control or
    format character, such as U+200B and the BOM)."""
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=None, lowercase=True)


_NORMALIZER = _bert_normalizer()


def is_blank(text: str) -> bool:
    """True when `text` gives no token at all: only whitespace is left once normalized."""
    text = text.strip()
    # A letter or digit always survives normalization; most lines start with one, so the
    # Rust normalizer runs only on the rare line that starts otherwise.
    return not text or not text[0].isalnum() and not _NORMALIZER.normalize_str(text).split()


def read_vocab(path: str | os.PathLike) -> list[str]:
    """Tokens in id order, read exactly as BERT's ``load_vocab`` reads them: the id is the
    line number, blank lines included, so `ChatTokenizer.save_vocab` writes the file back
    line for line. Only a leading UTF-8 BOM is dropped (BERT would read it as part of the
    first token).

    Only ``\\n``, ``\\r\\n`` and ``\\r`` end a line: a vocab entry may itself be an exotic
    Unicode separator such as U+2028, and a missing newline after the last line is fine.
    """
    path = Path(path)
    if not path.is_file():
        raise ChitchatError(f"vocab file not found: {path}. Pass a BERT-style vocab.txt "
                            "(one token per line) with --vocab_path, or leave it out to "
                            "build a vocab from the corpus.")
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            tokens = [t.rstrip("\n") for t in f.readlines()]
    except UnicodeDecodeError:
        raise _vocab_decode_error(path) from None
    _check_special_tokens(path, tokens)
    return tokens


def _vocab_decode_error(path: Path) -> ChitchatError:
    found = locate_decode_error(path, "utf-8")
    where = f"{path}:{found[0]}: byte offset {found[1]}" if found else str(path)
    reason = f" ({found[2].reason})" if found else ""
    return ChitchatError(f"{where}: the vocab file is not UTF-8{reason}. Convert it, e.g. "
                         "iconv -f gbk -t utf-8 vocab.txt > vocab-utf8.txt")


def _check_special_tokens(path: Path, tokens: list[str]) -> None:
    missing = [t for t in (UNK, CLS, SEP, PAD) if t not in tokens]
    if not missing:
        return
    # "[PAD] " is another token to BERT too; say why the line did not count.
    padded = [f"{path.name}:{i} {t!r}" for i, t in enumerate(tokens, 1)
              if t != t.strip() and t.strip() in missing][:4]
    why = (f" These lines hold them with whitespace around: {', '.join(padded)}; a vocab "
           "line is the token exactly, so remove that whitespace." if padded else "")
    raise ChitchatError(f"{path}: vocab lacks the special token(s) {' '.join(missing)}; "
                        f"a BERT-style vocab.txt needs [PAD] [UNK] [CLS] [SEP].{why}")


def check_same_vocab(want: ChatTokenizer, want_file, got: ChatTokenizer, got_file,
                     fix: str) -> None:
    """The one vocab check: the ids of `got_file` must be those of `want_file`."""
    if want.tokens == got.tokens:
        return
    if want.vocab_size != got.vocab_size:
        detail = f"{want.vocab_size} vs {got.vocab_size} tokens"
    else:
        i = next(i for i, (a, b) in enumerate(zip(want.tokens, got.tokens)) if a != b)
        detail = f"same size, but id {i} is {want.tokens[i]!r} vs {got.tokens[i]!r}"
    raise ChitchatError(f"the vocab {got_file} differs from {want_file} ({detail}). {fix}")


_CJK_BMP = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_wordish(ch: str) -> bool:
    """Characters of space-separated words: letters and digits of alphabetic scripts (Latin,
    Greek, Cyrillic...) and Hangul; not CJK ideographs, kana or full-width forms."""
    return ch.isalnum() and (ord(ch) < 0x3000 or 0xAC00 <= ord(ch) <= 0xD7AF)


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
        self._plain = self._build()
        self._table: np.ndarray | None = None

    def _build(self) -> Tokenizer:
        # Exactly what BertTokenizerFast(vocab=...) builds, minus its [CLS]/[SEP] template:
        # dialogue layout is ours. No added tokens, so "[SEP]" typed by a user is plain text.
        tok = Tokenizer(WordPiece(self.vocab, unk_token=UNK))
        tok.normalizer = _bert_normalizer()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
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
        tokens = train_wordpiece(count_words(utterances), vocab_size, min_frequency,
                                 [*SPECIAL_TOKENS, *SPEAKER_TOKENS])
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

    def encode_batch(self, texts: Sequence[str]) -> list:
        """`tokenizers` Encodings (ids and character offsets) of many utterances in one call
        of the Rust tokenizer, which uses every core."""
        return self._plain.encode_batch(list(texts), add_special_tokens=False)

    def char_table(self) -> np.ndarray:
        """Code point -> token id for characters that BERT always tokenizes alone.

        CJK ideographs (the normalizer puts spaces around them) and punctuation (the
        pre-tokenizer splits each one off) become a token of their own whatever their
        neighbours are, so a lookup gives exactly the Rust tokenizer's id. Whitespace maps
        to -2 (it only separates). Everything else is -1: such an utterance goes to the Rust
        tokenizer. The tests check parity over every shared corpus.
        """
        if self._table is not None:
            return self._table
        table = np.full(0x110000, -1, dtype=np.int32)
        cjk = [chr(c) for lo, hi in _CJK_BMP for c in range(lo, hi + 1)]
        punct = []
        for cp in range(0x10000):
            ch = chr(cp)
            cat = unicodedata.category(ch)
            if (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
                    or cat[0] == "P") and not _is_cjk(ch):
                punct.append(ch)
            elif ch in " \t\n\r" or cat == "Zs":
                table[cp] = -2
        norm = self._plain.normalizer

        def alone(ch: str) -> bool:
            # A punctuation mark stays alone only if normalizing keeps it one punctuation
            # mark; a CJK character is isolated by the normalizer before anything else.
            n = norm.normalize_str(ch).strip()
            return len(n) == 1 and (n.isascii() and not n.isalnum()
                                    or unicodedata.category(n)[0] == "P")

        punct = [ch for ch in punct if alone(ch)]
        cands = cjk + punct
        for ch, enc in zip(cands, self.encode_batch(cands)):
            if len(enc.ids) == 1:
                table[ord(ch)] = enc.ids[0]
        self._table = table
        return table

    # ---- decoding -----------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Readable text: CJK joined, ``##`` pieces merged, spaces between Latin words."""
        detok = Detokenizer()
        return "".join(detok.push(self.tokens[i]) for i in ids
                       if not (skip_special and self.tokens[i] in SPECIAL_TOKENS))

    # ---- saving -------------------------------------------------------------------------
    @staticmethod
    def _hf_decoder():
        """A `tokenizers` decoder that spaces text as `Detokenizer` does, for engines that
        decode with tokenizer.json (pipelines, vLLM, TGI): BERT's WordPiece decoder puts a
        space between every two tokens ("你 好"). After it, a space survives only between
        two word-like characters, or after , . ! ? ; : that follow a word and precede a
        Latin letter. Unlike Detokenizer it has no address rule ("a@b. com")."""
        from tokenizers import Regex

        # _is_wordish and the Latin letters of Detokenizer, in Oniguruma's syntax.
        word = r"[[\p{L}\p{N}]&&[\x{0}-\x{2FFF}\x{AC00}-\x{D7AF}]]"
        latin = r"[\p{L}&&[\x{0}-\x{24F}]]"
        keep = "\u0001"  # marks the spaces after punctuation that must stay
        return decoders.Sequence([
            decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse(),
            decoders.Replace(Regex(f"(?<={word} [,.!?;:]) (?={latin})"), keep),
            decoders.Replace(Regex(f"(?<!{word}) | (?!{word})"), ""),
            decoders.Replace(keep, " ")])

    def save_vocab(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, "".join(t + "\n" for t in self.tokens))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write vocab.txt plus the files `transformers.AutoTokenizer` loads offline, with
        the chat template (chat_template.jinja)."""
        from transformers import BertTokenizerFast

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # No token_type_ids: BERT's all-zero types would add the [PAD] embedding to every
        # position of a GPT-2 (it embeds token types with wte) in generate() and pipelines.
        # bos/eos name [CLS]/[SEP] for engines that read the stop token from the tokenizer.
        # A vocab without [MASK] (CDial-GPT's) must not get one added past the embeddings.
        hf = BertTokenizerFast(vocab=dict(self.vocab), do_lower_case=True,
                               tokenize_chinese_chars=True, bos_token=CLS, eos_token=SEP,
                               mask_token=MASK if self.mask_id is not None else None,
                               model_input_names=["input_ids", "attention_mask"])
        hf.backend_tokenizer.decoder = self._hf_decoder()
        hf.chat_template = CHAT_TEMPLATE
        hf.save_pretrained(str(directory))
        # BertTokenizer would rebuild its pipeline from vocab.txt, decoder included; the
        # generic class loads tokenizer.json as written (transformers 4.x and 5.x). The
        # template is also kept in tokenizer_config.json for versions that do not read
        # chat_template.jinja.
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
        atomic_write_text(cfg_path, json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
        self.save_vocab(directory / "vocab.txt")  # exact line order, duplicates included
        specials = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS,
                    "bos_token": CLS, "eos_token": SEP}
        if self.mask_id is not None:
            specials["mask_token"] = MASK
        atomic_write_text(directory / "special_tokens_map.json",
                          json.dumps(specials, indent=2) + "\n")


class Detokenizer:
    """Turns WordPiece tokens into text incrementally, for streaming output.

    ``push(token)`` returns the text to append. The tokenizer split text at spaces,
    punctuation and every CJK character, so the spaces to restore are few:

    * a ``##`` piece glues to the word before it ("chit" "##chat" -> "chitchat", "12" "##34");
    * a space goes between two word-like tokens ("hello world", "5 km");
    * a space goes after , . ! ? ; : that follow a word and precede a Latin letter
      ("ok, you"), but not before a digit ("3.14", "10:30"), and not after a "." inside an
      address: a run without spaces that holds "@" or "/" or starts with "www"
      ("a@b.com", "http://x.cn/a", "www.example.com");
    * CJK characters and all other punctuation join without spaces ("你好,世界", "don't").
    """

    _SPACE_AFTER = frozenset(",.!?;:")

    def __init__(self):
        self._last = ""   # last character written
        self._prev = ""   # the one before it
        self._run = ""    # Latin text written since the last space or non-Latin character

    def push(self, token: str) -> str:
        if not token:
            return ""
        if token.startswith("##") and len(token) > 2:
            piece = token[2:]
        elif self._last and _is_wordish(self._last) and _is_wordish(token[0]):
            piece = " " + token
        elif (self._last in self._SPACE_AFTER and self._prev and _is_wordish(self._prev)
              and token[0].isalpha() and ord(token[0]) < 0x250
              and not (self._last == "." and self._in_address())):
            piece = " " + token
        else:
            piece = token
        tail = (self._last + piece)[-2:]
        self._prev, self._last = (tail[0], tail[1]) if len(tail) == 2 else ("", tail)
        for c in piece:
            self._run = "" if c == " " or ord(c) >= 0x250 else (self._run + c)[-64:]
        return piece

    def _in_address(self) -> bool:
        return "@" in self._run or "/" in self._run or self._run.startswith("www.")
