"""The dialogue format (chitchat.dialogue) with a hand-made vocab: no model, no store."""
from __future__ import annotations

from collections import Counter

import pytest

from chitchat.dialogue import (build_context, encode_context, encode_dialogues,
                               reverse_input, reverse_speaker_types, speaker_token_types,
                               split_context)
from chitchat.tokenization import SPECIAL_TOKENS, ChatTokenizer, is_blank
from chitchat.utils import ChitchatError

WORDS = ["你", "好", "吗", "嗯", "是", "的", "hello", "world", "!"]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer([*SPECIAL_TOKENS, "[speaker1]", "[speaker2]", *WORDS])


def ids_of(tok, text: str) -> list[int]:
    return [tok.vocab[t] for t in text.split()]


def test_a_dialogue_is_cls_then_each_utterance_closed_by_sep(tok):
    C, S = tok.cls_id, tok.sep_id
    assert encode_context(tok, ["你好", "嗯"]) == [C, *ids_of(tok, "你 好"), S, tok.vocab["嗯"], S]
    # An utterance with no token is left out, not kept as an empty [SEP].
    assert encode_context(tok, ["你好", "\u0000", "嗯"]) == encode_context(tok, ["你好", "嗯"])


def test_a_batch_encodes_each_dialogue_as_encode_context_does(tok):
    dialogues = [["你好吗", "hello world!"], ["\u0001"], ["嗯", "", "是的"], ["hello 你 xyz"]]
    unk = Counter()
    enc = encode_dialogues(tok, dialogues, unk)
    got = [enc.ids[a:b].tolist() for a, b in zip(enc.offsets[:-1], enc.offsets[1:])]
    assert got[0] == encode_context(tok, dialogues[0])
    assert got[1] == []  # nothing left: length 0, for the store to skip
    assert got[2] == encode_context(tok, ["嗯", "是的"])
    assert got[3] == [tok.cls_id, tok.vocab["hello"], tok.vocab["你"], tok.unk_id, tok.sep_id]
    assert enc.dropped == {1: 1, 2: 1}
    assert unk == Counter({"xyz": 1})


def test_speakers_alternate_by_utterance_and_cls_takes_the_first(tok):
    s = (7, 8)
    # [CLS] + 2 tokens of utterance 0 (speaker 7) + 3 of utterance 1 (speaker 8) + 1 of 2.
    assert speaker_token_types([2, 3, 1], 0, s).tolist() == [7, 7, 7, 8, 8, 8, 7]
    # Starting at utterance 3 of the dialogue: an odd index, so speaker 2 first.
    assert speaker_token_types([1, 2], 3, s).tolist() == [8, 8, 7, 7]
    # A reply being generated continues as the next speaker.
    assert speaker_token_types([2], 0, s, total_len=6).tolist() == [7, 7, 7, 8, 8, 8]


def test_the_context_keeps_whole_recent_utterances_within_the_budget(tok):
    history = ["你好", "嗯", "是的", "你好吗"]  # 2, 1, 2, 3 tokens
    whole = build_context(tok, history, 10, 100)
    assert whole.ids == encode_context(tok, history) and whole.utterances_used == 4
    # [CLS] + (2+1) + (3+1) = 8 holds the last two; the third newest (1+1) needs 10, the
    # oldest (2+1) 13. Whatever does not fit whole is dropped, never cut.
    for budget, n in ((8, 2), (9, 2), (10, 3), (12, 3), (13, 4)):
        ctx = build_context(tok, history, 10, budget)
        assert ctx.ids == encode_context(tok, history[-n:]) and ctx.utterances_used == n
        assert ctx.notice is None
    # max_history_len bounds the utterances whatever the budget.
    assert build_context(tok, history, 1, 100).ids == encode_context(tok, history[-1:])
    with pytest.raises(ChitchatError, match="empty"):
        build_context(tok, [], 5, 100)


def test_context_speakers_follow_the_position_in_the_history(tok):
    ctx = build_context(tok, ["你", "嗯", "是的"], 2, 100, speaker_ids=(7, 8))
    # Utterances 1 and 2 kept: [CLS] takes utterance 1's speaker (8); the reply is
    # utterance 3, speaker 8 again.
    assert ctx.token_types == [8, 8, 8, 7, 7, 7] and ctx.reply_type == 8


def test_the_reversed_form_is_the_reply_then_the_context_newest_first(tok):
    history = ["你好", "嗯", "是的"]
    utts = split_context(encode_context(tok, history), tok.cls_id, tok.sep_id)
    assert utts == [ids_of(tok, "你 好"), ids_of(tok, "嗯"), ids_of(tok, "是 的")]
    reply = ids_of(tok, "hello world")
    ids, first, kept = reverse_input(reply, utts, tok.cls_id, tok.sep_id, 64)
    # The same layout as the reversed dialogue a reverse model is trained on.
    assert ids == encode_context(tok, ["hello world", *history[::-1]])
    assert first == 1 + len(reply) + 1 and kept == 3
    # The reply is utterance 0 of the reversed dialogue.
    types = reverse_speaker_types(len(reply), utts, kept, (7, 8), len(ids))
    assert types == [7, 7, 7, 7, 8, 8, 8, 7, 7, 8, 8, 8]
    with pytest.raises(ValueError):
        split_context([tok.sep_id], tok.cls_id, tok.sep_id)


@pytest.mark.parametrize("text", ["", " \t", "\x00", "\u200b", "\ufeff", "\u3000\x7f",
                                  "\u0301", "\ue000", "\x00你", "\u200b!", "a\u0301", "xyz"])
def test_is_blank_means_the_tokenizer_gives_no_token(tok, text):
    # The corpus reader splits dialogues at such lines: never at a line with a token.
    assert is_blank(text) == (not tok.encode(text))
