"""Read dialogue corpora line by line and validate them.

Two formats:
  * ``train.txt`` (GPT2-chitchat's): one utterance per line, dialogues separated by blank
    lines. LF, CRLF or CR endings, a UTF-8 BOM, runs of blank or whitespace-only lines and
    trailing whitespace are all accepted; a line of characters the tokenizer drops (NUL,
    U+200B, a BOM) is a blank line too.
  * ``.jsonl``: one dialogue per line, a JSON list of utterance strings.

Errors name the file and line, and say how to fix the input.
"""
from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .tokenization import is_blank
from .utils import ChitchatError, locate_decode_error


@dataclass
class Dialogue:
    utterances: list[str]
    line: int  # 1-based line where the dialogue starts


@dataclass
class ReadStats:
    """What the reader passed over, for the data report."""
    empty_utterances: int = 0  # jsonl "" items (train.txt has no such thing: blank = separator)
    empty_dialogues: int = 0   # jsonl [] lines
    invisible_lines: int = 0   # train.txt lines of control/format characters only
    examples: list[str] = field(default_factory=list)

    def skip(self, what: str, where: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {what}")


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def _decode_error(path: Path, encoding: str) -> ChitchatError:
    """Locate the first undecodable byte: line number and absolute byte offset."""
    found = locate_decode_error(path, encoding)
    if found is None:
        return ChitchatError(f"{path}: could not be decoded as {encoding}")
    line_no, offset, e = found
    bad = e.object[e.start:e.end].hex(" ")
    return ChitchatError(f"{path}:{line_no}: byte offset {offset}: bytes {bad} are not valid "
                         f"{encoding} ({e.reason}). {_encoding_hint(path, encoding)}")


_UNICODE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                 (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _encoding_hint(path: Path, encoding: str) -> str:
    name = codecs.lookup(encoding).name
    with open(path, "rb") as f:
        head = f.read(4)
    # Editors on Windows save "Unicode" text as UTF-16 with a byte-order mark.
    bom = next((enc for mark, enc in _UNICODE_BOMS if head.startswith(mark)), None)
    if bom and not name.startswith(bom):
        return (f"The file starts with a {bom.upper()} byte-order mark: pass --encoding {bom}, "
                f"or convert it first: iconv -f {bom} -t utf-8 in.txt > out.txt")
    if name in ("utf-8", "utf-8-sig"):
        return ("If the file is GBK/GB18030 (common for Chinese corpora), pass "
                "--encoding gbk (or gb18030), or convert it first: "
                "iconv -f gbk -t utf-8 in.txt > out.txt")
    if name in ("gbk", "gb2312"):
        # GB18030 extends GBK: rare characters, emoji and 4-byte sequences that GBK cannot
        # decode.
        return ("GB18030 is a superset of GBK: pass --encoding gb18030. If that fails too, "
                "check the file's encoding, or convert it to UTF-8 with iconv.")
    return f"Check that the file really is {encoding}, or convert it to UTF-8 with iconv."


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) with universal newlines, BOM removed, decode errors located."""
    enc = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        with open(path, "r", encoding=enc, newline=None, errors="strict") as f:
            for i, line in enumerate(f, 1):
                yield i, line
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None


def read_dialogues(path: str | os.PathLike, encoding: str = "utf-8",
                   stats: ReadStats | None = None) -> Iterator[Dialogue]:
    """Yield the dialogues of `path` one at a time, in file order (memory is O(1 dialogue))."""
    path = Path(path)
    if not path.exists():
        raise ChitchatError(f"corpus not found: {path}. Pass your dialogue file with "
                            "--train_path (see data/README.md for the format).")
    if path.is_dir():
        raise ChitchatError(f"{path} is a directory; --train_path takes a train.txt or .jsonl "
                            "file")
    if not path.is_file():
        # A pipe or <(...) can be read once, and the corpus is read several times.
        raise ChitchatError(f"{path} is not a regular file (a pipe, a device or a <(...) "
                            "process substitution?); the corpus is read several times. Save "
                            "it to a file first (... > train.txt) and pass that file.")
    if path.suffix.lower() == ".json":
        raise ChitchatError(f"{path}: a .json file (one JSON document) is not a corpus format. "
                            "Use train.txt (one utterance per line, a blank line between "
                            "dialogues) or .jsonl (one dialogue per line, a JSON list such as "
                            '["你好", "你好呀"]); see the README, section Data.')
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ChitchatError(f"unknown --encoding {encoding!r}; try utf-8, gbk or gb18030")
    stats = stats if stats is not None else ReadStats()
    if _is_jsonl(path):
        yield from _read_jsonl(path, encoding, stats)
    else:
        yield from _read_txt(path, encoding, stats)


def _read_txt(path: Path, encoding: str, stats: ReadStats) -> Iterator[Dialogue]:
    utts: list[str] = []
    start = 0
    for i, line in _lines(path, encoding):
        text = line.strip()
        # A line the tokenizer reads as nothing (a NUL, U+200B, a stray BOM) would give no
        # token anyway; as an utterance it would glue the dialogues around it together.
        if text and is_blank(text):
            stats.invisible_lines += 1
            stats.skip("line of invisible characters only, read as a blank line",
                       f"{path.name}:{i}")
            text = ""
        if text:
            if not utts:
                start = i
            utts.append(text)
        elif utts:
            yield Dialogue(utts, start)
            utts = []
    if utts:
        yield Dialogue(utts, start)


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, as the user wrote it."""
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            str: "a string", list: "a list", dict: "an object"}.get(type(value), "a value")


def _read_jsonl(path: Path, encoding: str, stats: ReadStats) -> Iterator[Dialogue]:
    for i, line in _lines(path, encoding):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChitchatError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}). "
                                'Each line must be a JSON list of utterances, e.g. '
                                '["你好", "你好呀"]') from None
        if not isinstance(obj, list):
            raise ChitchatError(f"{path}:{i}: expected a JSON list of strings, got "
                                f"{_json_type(obj)}. Each line must look like "
                                '["你好", "你好呀"]')
        bad = next((k for k, u in enumerate(obj, 1) if not isinstance(u, str)), None)
        if bad is not None:
            raise ChitchatError(f"{path}:{i}: utterance {bad} is {_json_type(obj[bad - 1])}, "
                                'not a string. Each line must look like ["你好", "你好呀"]')
        utts = []
        for k, u in enumerate(obj, 1):
            try:
                u.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ChitchatError(
                    f"{path}:{i}: utterance {k} holds the escape \\u{ord(u[e.start]):04x}, a "
                    "lone UTF-16 surrogate that is not a character (a broken emoji or a "
                    "text cut in the middle of a pair?). Fix or remove that line.") from None
            u = u.strip()
            if u:
                utts.append(u)
            else:
                stats.empty_utterances += 1
                stats.skip("empty utterance", f"{path.name}:{i}")
        if utts:
            yield Dialogue(utts, i)
        else:
            stats.empty_dialogues += 1
            stats.skip("dialogue with no utterance", f"{path.name}:{i}")
