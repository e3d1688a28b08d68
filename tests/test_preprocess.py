"""preprocess.py: input handling, tokenizer parity, the token store, the report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chitchat.config import PreprocessConfig
from chitchat.corpus import read_dialogues
from chitchat.dialogue import encode_context, encode_dialogues
from chitchat.preprocessing import preprocess
from chitchat.store import TokenStore, split_mask, validation_size
from chitchat.tokenization import SPECIAL_TOKENS, ChatTokenizer
from chitchat.utils import ChitchatError
from conftest import ROOT, SAMPLE, shared_path

DIALOGUES = [["你好", "你好呀，吃饭了吗？"], ["今天下雨了", "记得带伞", "好的，ok thanks"],
             ["晚安"]]


def run(tmp_path, src, **kw) -> TokenStore:
    out = tmp_path / "store"
    preprocess(PreprocessConfig(train_path=str(src), save_path=str(out), quiet=True, **kw))
    return TokenStore(out)


def texts(store: TokenStore) -> list[list[str]]:
    tok = store.tokenizer()
    return [[tok.decode(store.dialogue(i)[s:e]) for s, e in store.utterance_spans(i)]
            for i in range(len(store))]


@pytest.mark.parametrize("variant", ["lf", "crlf", "cr", "bom_crlf", "messy", "no_final_nl"])
def test_line_endings_and_whitespace_give_the_same_dialogues(tmp_path, variant):
    body = "\n\n".join("\n".join(d) for d in DIALOGUES)
    if variant == "messy":  # blank runs, whitespace-only "blank" lines, trailing spaces
        body = "\n \t\n\n".join("\n".join(u + "  \t" for u in d) for d in DIALOGUES)
        body = "\n\n\n" + body + "\n\n   \n"
    raw = body + ("" if variant == "no_final_nl" else "\n")
    if "crlf" in variant:
        raw = raw.replace("\n", "\r\n")
    if variant == "cr":
        raw = raw.replace("\n", "\r")
    data = raw.encode("utf-8")
    if variant.startswith("bom"):
        data = b"\xef\xbb\xbf" + data
    src = tmp_path / "train.txt"
    src.write_bytes(data)
    store = run(tmp_path, src)
    assert texts(store) == [[u.lower() for u in d] for d in DIALOGUES]
    tok = store.tokenizer()
    for i in range(len(store)):
        ids = store.dialogue(i).tolist()
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        assert ids.count(tok.sep_id) == len(DIALOGUES[i])
        # No empty utterance: no [SEP] right after [CLS] or another [SEP].
        assert all(not (a in (tok.cls_id, tok.sep_id) and b == tok.sep_id)
                   for a, b in zip(ids, ids[1:]))


def test_jsonl_input(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in DIALOGUES)
                   + '\n\n["  ", "有空"]\n[]\n', encoding="utf-8")
    store = run(tmp_path, src)
    assert texts(store) == [[u.lower() for u in d] for d in DIALOGUES] + [["有空"]]
    report = json.loads((store.path / "report.json").read_text())
    assert report["skipped"]["empty_utterances"] == 1
    assert report["skipped"]["empty_dialogues"] == 1


@pytest.mark.parametrize("line,fragment", [('["a", "b"', "malformed JSON"),
                                           ('{"a": 1}', "JSON list of strings, got an object"),
                                           ('["a", 3]', "utterance 2 is a number, not a string"),
                                           ('["a", null]', "utterance 2 is null")])
def test_malformed_jsonl_names_the_line_and_writes_nothing(tmp_path, line, fragment):
    src = tmp_path / "train.jsonl"
    src.write_text('["你好", "嗨"]\n["在吗"]\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ChitchatError, match=rf"train.jsonl:3: .*{fragment}"):
        run(tmp_path, src)
    assert not (tmp_path / "store").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".store")]


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(ChitchatError, match="corpus not found"):
        run(tmp_path, tmp_path / "nope.txt")
    src = tmp_path / "train.txt"
    src.write_text("\n  \n\t\n\n", encoding="utf-8")
    with pytest.raises(ChitchatError, match="no dialogue"):
        run(tmp_path, src)
    assert not (tmp_path / "store").exists()


def test_non_utf8_names_line_and_byte_offset_and_suggests_gbk(tmp_path):
    src = tmp_path / "train.txt"
    good = "你好\n在吗\n\n".encode("utf-8")
    src.write_bytes(good + "今天很冷\n".encode("gbk"))
    with pytest.raises(ChitchatError) as e:
        run(tmp_path, src)
    msg = str(e.value)
    assert f"train.txt:4: byte offset {len(good)}" in msg
    assert "--encoding gbk" in msg and "iconv" in msg
    assert not (tmp_path / "store").exists()


def test_gbk_file_with_encoding_flag(tmp_path):
    src = tmp_path / "train.txt"
    src.write_bytes("\r\n".join(["你好", "今天很冷", "", "多穿点"]).encode("gbk"))
    store = run(tmp_path, src, encoding="gbk")
    assert texts(store) == [["你好", "今天很冷"], ["多穿点"]]


@pytest.mark.slow
def test_cli_exits_nonzero_with_a_clear_message(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--train_path",
                        str(tmp_path / "missing.txt"), "--save_path", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "corpus not found" in r.stderr and "Traceback" not in r.stderr


def test_two_dialogue_file_and_validation_that_does_not_fit(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("你好\n你好呀\n\n再见\n拜拜", encoding="utf-8")
    store = run(tmp_path, src)  # default 1% still holds out one dialogue
    assert len(store) == 2 and len(store.valid_indices()) == 1
    with pytest.raises(ChitchatError, match=r"--val_num 8000 does not fit .* 2 dialogue.*"
                                            r"Try --val_num 1"):
        run(tmp_path, src, val_num=8000, force=True)
    assert len(TokenStore(tmp_path / "store")) == 2  # the earlier store is untouched


def test_split_is_seeded_and_sized():
    assert validation_size(1000, None, 0.01) == 10
    assert validation_size(1000, 0, 0.5) == 0
    assert validation_size(1, None, 0.1) == 0
    a, b = split_mask(100, 7, seed=3), split_mask(100, 7, seed=3)
    assert a.sum() == 7 and (a == b).all() and not (a == split_mask(100, 7, seed=4)).all()


def test_store_layout_and_memmap(sample_store):
    store = TokenStore(sample_store)
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.uint16
    assert store.meta["counts"]["dialogues"] == len(store) == 339
    tok = store.tokenizer()
    assert tok.tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS) and tok.pad_id == 0
    first = [l.strip() for l in SAMPLE.read_text(encoding="utf-8").split("\n\n")[0].split("\n")]
    ids = store.dialogue(0).tolist()
    assert ids == encode_context(tok, first)
    spans = store.utterance_spans(0)
    assert [tok.decode(ids[s:e]) for s, e in spans] == [tok.decode(tok.encode(u)) for u in first]
    assert all(ids[e - 1] == tok.sep_id for _, e in spans)
    assert len(store.train_indices()) + len(store.valid_indices()) == len(store)
    for name in ("meta.json", "report.json", "vocab.txt"):
        assert (sample_store / name).is_file()
    assert not list(sample_store.glob("*.pkl"))


def test_uint32_tokens_for_a_large_vocab(tmp_path):
    vocab = tmp_path / "vocab.txt"
    extra = [f"w{i}" for i in range(70_000 - 5)]
    vocab.write_text("\n".join(list(SPECIAL_TOKENS) + extra), encoding="utf-8")
    src = tmp_path / "train.txt"
    src.write_text("w69990 w3\nw7\n\nw65600", encoding="utf-8")
    store = run(tmp_path, src, vocab_path=str(vocab))
    assert store.tokens.dtype == np.uint32
    assert store.dialogue(1).tolist()[1] == 65605
    assert texts(store) == [["w69990 w3", "w7"], ["w65600"]]


def test_rerun_skips_unless_forced(tmp_path, capsys):
    src = tmp_path / "train.txt"
    src.write_text("你好\n嗨\n\n在吗\n在", encoding="utf-8")
    store = run(tmp_path, src)
    stamp = (store.path / "tokens.bin").stat().st_mtime_ns
    run(tmp_path, src)
    assert (store.path / "tokens.bin").stat().st_mtime_ns == stamp
    run(tmp_path, src, force=True)
    assert (store.path / "tokens.bin").stat().st_mtime_ns != stamp
    src.write_text("你好\n嗨\n\n在吗\n不在", encoding="utf-8")  # changed input: rebuilt
    assert texts(run(tmp_path, src))[1] == ["在吗", "不在"]


def test_report_counts_unknowns_duplicates_and_skips(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(list(SPECIAL_TOKENS) + list("你好在吗，")), encoding="utf-8")
    src = tmp_path / "train.txt"
    src.write_text("你好\n在吗\n\n你好\n在吗\n\n你好😀\n\x01\x02\n\n\x03\n\n好嘞嘞", encoding="utf-8")
    store = run(tmp_path, src, vocab_path=str(vocab), max_len=5)
    r = json.loads((store.path / "report.json").read_text())
    assert r["counts"]["dialogues"] == 4  # the control-character-only line is no dialogue
    assert r["duplicates"]["count"] == 1 and r["duplicates"]["examples"] == ["train.txt:4"]
    assert r["unk"]["top"][0] == ["嘞", 2] and ["😀", 1] in r["unk"]["top"]
    assert r["unk"]["count"] == 3
    # Lines of control characters only are blank lines: separators, not empty utterances.
    assert r["skipped"]["invisible_lines"] == 2
    assert r["skipped"]["utterances_without_tokens"] == 0
    assert r["dialogue_tokens"]["max"] == 7 and r["dialogue_tokens"]["share_over_max_len"] > 0
    assert texts(store)[2] == ["你好"]  # the empty utterance was dropped, no stray [SEP]


def test_special_token_literals_are_plain_text(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("你好[SEP]呀\n[CLS]\n\n好", encoding="utf-8")
    store = run(tmp_path, src)
    tok = store.tokenizer()
    ids = store.dialogue(0).tolist()
    assert ids.count(tok.sep_id) == 2 and ids.count(tok.cls_id) == 1


TRICKY = [["Hello, WORLD! naïve café 3.14", "unaffable 你好 e-mail", "\u3000全角 ｈｉ"],
          ["好～～", "哈哈😀哈", "豈更車（兼容）", "ｑｑ群", "……！？", "a\u0301b ÀÉ", "\x00你\x7f"],
          ["《三体》第2部", "【广告】", "𠀀𠀁", "ﾊﾝｶｸ", "Ⅻ ① ²", "\u2028行"]]


def _corpus_dialogues():
    corpora = SHARED_CORPORA_FILES
    out = []
    for rel in corpora:
        out += [d.utterances for d in read_dialogues(shared_path("corpora", *rel))]
    return out


SHARED_CORPORA_FILES = [("chitchat50w_slice", "train.txt"), ("lccc_toy", "train.txt"),
                        ("lccc_toy", "valid.txt"), ("cdial_toy_pairs", "train.txt"),
                        ("cdial_toy_pairs", "valid.txt"), ("onelinefun_en", "train.txt")]


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["gpt2-chitchat-vocab.txt", "cdial-gpt-vocab.txt"])
def test_ids_match_bert_tokenizer_fast_on_every_shared_corpus(vocab):
    """The vectorised CJK path plus the Rust path give BertTokenizerFast's ids exactly."""
    from transformers import BertTokenizerFast

    path = shared_path("vocab", vocab)
    tok = ChatTokenizer.from_vocab_file(path)
    n_lines = len(path.read_text(encoding="utf-8").rstrip("\n").split("\n"))
    assert tok.vocab_size == n_lines == (13317 if "chitchat" in vocab else 13088)
    hf = BertTokenizerFast(vocab=str(path))
    assert hf.vocab_size == tok.vocab_size  # len(hf) may add a missing [MASK]
    dialogues = _corpus_dialogues() + TRICKY
    flat = [u for d in dialogues for u in d]
    expected = [e.ids for e in hf.backend_tokenizer.encode_batch(flat, add_special_tokens=False)]
    for u in flat[-20:]:  # the backend is what hf.encode uses
        assert hf.encode(u, add_special_tokens=False) == expected[flat.index(u)]
    got = []
    for i in range(0, len(dialogues), 2000):
        enc = encode_dialogues(tok, dialogues[i:i + 2000])
        for j in range(len(enc.offsets) - 1):
            ids = enc.ids[enc.offsets[j]:enc.offsets[j + 1]].tolist()
            assert ids[0] == hf.cls_token_id and ids[-1] == hf.sep_token_id
            cut = [k for k, t in enumerate(ids) if t == hf.sep_token_id]
            got += [ids[a + 1:b] for a, b in zip([0] + cut[:-1], cut)]
    want = [e for e in expected if e]  # utterances with no token are dropped
    assert len(got) == len(want)
    mismatch = [(k, g, w) for k, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatch, mismatch[:3]


def test_fast_path_equals_rust_path_on_tricky_text():
    tok = ChatTokenizer.from_vocab_file(shared_path("vocab", "gpt2-chitchat-vocab.txt"))
    for d in TRICKY:
        enc = encode_dialogues(tok, [d])
        assert enc.ids.tolist() == encode_context(tok, d)


def test_built_vocab_covers_the_corpus(sample_store):
    r = json.loads((sample_store / "report.json").read_text())
    assert r["unk"]["count"] == 0
    assert r["counts"]["utterances"] == 1520


def test_decode_is_readable():
    tok = ChatTokenizer(list(SPECIAL_TOKENS) + ["你", "好", "hello", "world", "un", "##aff",
                                                "##able", "3", ".", "14", "，", "ok"])
    ids = tok.encode("你好，Hello World unaffable 3.14 ok")
    assert tok.decode(ids) == "你好，hello world unaffable 3.14 ok"


def test_log_path_gets_the_report_and_callers_keep_their_logger(tmp_path):
    import logging

    from chitchat.utils import get_logger

    caller = get_logger(quiet=False)  # e.g. evaluate.py, which preprocesses a text file
    src = tmp_path / "train.txt"
    src.write_text("你好\n嗨\n\n在吗\n在", encoding="utf-8")
    log_file = tmp_path / "logs" / "preprocess.log"
    run(tmp_path, src, log_path=str(log_file))
    text = log_file.read_text(encoding="utf-8")
    assert "dialogues 2" in text and "wrote" in text
    assert [h.level for h in caller.handlers if isinstance(h, logging.StreamHandler)
            and not isinstance(h, logging.FileHandler)] == [logging.INFO]


@pytest.mark.parametrize("kw,warned", [({}, True), ({"val_num": 0}, False),
                                       ({"val_fraction": 0.0}, False)])
def test_a_missing_validation_split_is_a_warning_only_when_one_was_asked_for(tmp_path, kw,
                                                                             warned):
    src = tmp_path / "train.txt"
    src.write_text("你好\n嗨\n", encoding="utf-8")  # one dialogue: nothing to split off
    log_file = tmp_path / "preprocess.log"
    store = run(tmp_path, src, log_path=str(log_file), **kw)
    assert store.valid_indices().size == 0
    text = log_file.read_text(encoding="utf-8")
    assert ("warning: no validation dialogues" in text) == warned
    assert ("no validation dialogues (as asked" in text) == (not warned)


BODY = "你好\n在吗\n\n再见\n拜拜\n"


def small_vocab(path: Path) -> Path:
    ChatTokenizer([*SPECIAL_TOKENS, *"你好在吗再见拜"]).save_vocab(path)
    return path


@pytest.mark.parametrize("which", ["train", "vocab", "link_to_train", "inside_store"])
def test_the_log_may_not_be_an_input_nor_inside_the_store(tmp_path, which):
    src = tmp_path / "train.txt"
    src.write_text(BODY, encoding="utf-8")
    vocab = small_vocab(tmp_path / "vocab.txt")
    vocab_bytes = vocab.read_bytes()
    (tmp_path / "link.txt").symlink_to(src)
    log = {"train": src, "vocab": vocab, "link_to_train": tmp_path / "link.txt",
           "inside_store": tmp_path / "store" / "pre.log"}[which]
    with pytest.raises(ChitchatError, match="--log_path"):
        run(tmp_path, src, vocab_path=str(vocab), log_path=str(log))
    assert src.read_text(encoding="utf-8") == BODY and vocab.read_bytes() == vocab_bytes
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("damage", ["short_tokens", "long_tokens", "meta_not_json",
                                    "meta_a_list", "split_garbage", "offsets_cut"])
def test_a_damaged_store_says_to_rebuild_it(tmp_path, damage):
    src = tmp_path / "train.txt"
    src.write_text(BODY, encoding="utf-8")
    store = run(tmp_path, src).path
    tokens = store / "tokens.bin"
    if damage == "short_tokens":
        os.truncate(tokens, tokens.stat().st_size - 2)
    elif damage == "long_tokens":
        tokens.write_bytes(tokens.read_bytes() + b"\0\0")
    elif damage == "meta_not_json":
        (store / "meta.json").write_text('{"format_version": 1,', encoding="utf-8")
    elif damage == "meta_a_list":
        (store / "meta.json").write_text("[1]", encoding="utf-8")
    elif damage == "split_garbage":
        (store / "split.npy").write_bytes(b"not an array")
    else:
        np.save(store / "dialogue_offsets.npy", np.zeros(0, dtype=np.int64))
    with pytest.raises(ChitchatError, match=r"damaged.*--save_path .*store --force"):
        TokenStore(store)


def test_a_corpus_given_as_a_store_is_told_to_preprocess_itself(tmp_path):
    """train.py --train_path data/train.txt: the hint preprocesses that corpus into the
    folder preprocess.py would write, and never names the corpus as an output."""
    src = tmp_path / "train.txt"
    src.write_text(BODY, encoding="utf-8")
    with pytest.raises(ChitchatError) as e:
        TokenStore(src)
    msg = str(e.value)
    assert f"--train_path {src} (writes {tmp_path / 'train'})" in msg
    assert "--save_path" not in msg
    assert preprocess(PreprocessConfig(train_path=str(src), quiet=True)) == tmp_path / "train"


def test_an_unrelated_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    src = tmp_path / "train.txt"
    src.write_text(BODY, encoding="utf-8")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep", encoding="utf-8")

    def no_work(*args, **kwargs):
        raise AssertionError("the vocab was built before the output was checked")

    monkeypatch.setattr(ChatTokenizer, "train", no_work)
    with pytest.raises(ChitchatError, match="not a token store"):
        preprocess(PreprocessConfig(train_path=str(src), save_path=str(tmp_path / "mine"),
                                    quiet=True))
    assert (tmp_path / "mine" / "notes.txt").read_text(encoding="utf-8") == "keep"


def test_an_output_under_a_file_is_refused(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text(BODY, encoding="utf-8")
    (tmp_path / "afile").write_text("keep", encoding="utf-8")
    with pytest.raises(ChitchatError, match="afile exists and is not a folder"):
        preprocess(PreprocessConfig(train_path=str(src), quiet=True,
                                    save_path=str(tmp_path / "afile" / "sub")))
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "keep"


def test_skips_before_the_first_dialogue_are_counted_once(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text('[]\n["", "你好", "在吗"]\n["再见", "拜拜"]\n', encoding="utf-8")
    r = json.loads((run(tmp_path, src).path / "report.json").read_text())
    assert (r["skipped"]["empty_dialogues"], r["skipped"]["empty_utterances"]) == (1, 1)
    assert r["skipped"]["examples"] == ["train.jsonl:1: dialogue with no utterance",
                                        "train.jsonl:2: empty utterance"]


def test_a_json_document_is_refused_with_the_supported_formats(tmp_path):
    src = tmp_path / "toy_data.json"
    src.write_text(json.dumps({"train": [["你好", "在吗"]]}, ensure_ascii=False, indent=4),
                   encoding="utf-8")
    with pytest.raises(ChitchatError, match=r"\.json file.*train\.txt.*\.jsonl"):
        run(tmp_path, src)
    assert not (tmp_path / "store").exists()


def test_a_corpus_that_is_not_a_regular_file_is_refused(tmp_path):
    # Like a pipe or <(...), a device reads differently each time (here: nothing).
    with pytest.raises(ChitchatError, match="not a regular file"):
        run(tmp_path, os.devnull)


@pytest.mark.parametrize("line", ["\x00", "\u200b", "\ufeff", " \x00\u200b\t"])
def test_a_line_of_invisible_characters_separates_dialogues(tmp_path, line):
    src = tmp_path / "train.txt"
    src.write_text(f"你好\n\u200b在吗\n{line}\n再见\n拜拜\n", encoding="utf-8")
    store = run(tmp_path, src)
    assert texts(store) == [["你好", "在吗"], ["再见", "拜拜"]]  # "\u200b在吗" is kept
    r = json.loads((store.path / "report.json").read_text())
    assert r["skipped"]["invisible_lines"] == 1
    assert r["skipped"]["examples"][0].startswith("train.txt:3: ")


def test_a_utf16_corpus_is_named_and_reads_with_its_encoding(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text(BODY, encoding="utf-16")  # with its byte-order mark
    with pytest.raises(ChitchatError, match="UTF-16 byte-order mark: pass --encoding utf-16"):
        run(tmp_path, src)
    assert texts(run(tmp_path, src, encoding="utf-16")) == [["你好", "在吗"], ["再见", "拜拜"]]


def test_a_vocab_round_trips_through_the_store_line_for_line(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text(BODY, encoding="utf-8")
    vocab = small_vocab(tmp_path / "vocab.txt")
    vocab.write_text(vocab.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    n_lines = vocab.read_text(encoding="utf-8").count("\n")
    store = run(tmp_path, src, vocab_path=str(vocab))
    assert store.vocab_path.read_bytes() == vocab.read_bytes()
    assert store.tokenizer().vocab_size == store.meta["vocab_size"] == n_lines


def test_a_vocab_with_a_bom_reads_as_without(tmp_path):
    plain = small_vocab(tmp_path / "plain.txt")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert ChatTokenizer.from_vocab_file(bom).tokens == ChatTokenizer.from_vocab_file(plain).tokens


def test_vocab_errors_name_the_line(tmp_path):
    padded = tmp_path / "padded.txt"
    padded.write_text("".join(t + " \n" for t in SPECIAL_TOKENS), encoding="utf-8")
    with pytest.raises(ChitchatError, match=r"padded\.txt:1 '\[PAD\] '.*remove that whitespace"):
        ChatTokenizer.from_vocab_file(padded)
    # The bad byte lies past the decoder's first chunk, where offsets used to restart.
    head = "".join(t + "\n" for t in [*SPECIAL_TOKENS, *(f"w{i}" for i in range(3000))])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(head.encode("utf-8") + b"caf\xe9\n")
    with pytest.raises(ChitchatError, match=rf"latin1\.txt:3006: byte offset {len(head) + 3}: "
                                            "the vocab file is not UTF-8"):
        ChatTokenizer.from_vocab_file(latin1)
