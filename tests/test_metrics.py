"""Reply metrics against values worked out by hand."""
import math

import pytest

from chitchat.metrics import (bleu, distinct, has_char_run, repeats_context, reply_metrics,
                              sentence_bleu, units)


def test_units_are_characters_for_chinese_and_words_for_latin():
    assert units("我喜欢 Cats, 3只!") == ["我", "喜", "欢", "cats", ",", "3", "只", "!"]


def test_bleu_by_hand():
    # hyp 我喜欢猫 (4 units), ref 我也喜欢猫 (5 units)
    # p1 = 4/4, p2 = 2/3 (喜欢, 欢猫), p3 = 1/2 (喜欢猫), p4 = 0 -> smoothed 0.1/1
    # brevity penalty = exp(1 - 5/4)
    bp = math.exp(-0.25)
    assert sentence_bleu("我喜欢猫", "我也喜欢猫", 1) == pytest.approx(bp)
    assert sentence_bleu("我喜欢猫", "我也喜欢猫", 2) == pytest.approx(bp * (2 / 3) ** 0.5)
    assert sentence_bleu("我喜欢猫", "我也喜欢猫", 4) == pytest.approx(
        bp * (1 * 2 / 3 * 1 / 2 * 0.1) ** 0.25)
    assert sentence_bleu("你好", "你好", 4) == pytest.approx((1 * 1 * 0.1 * 0.1) ** 0.25)
    assert sentence_bleu("", "你好") == 0.0
    # no unit in common: 0 at every order (smoothing would have given 0.1 to a one-unit reply,
    # more than the partly right 好 vs 你好吗 gets)
    for n in (1, 2, 4):
        assert sentence_bleu("哈", "嘿", n) == sentence_bleu("我很好", "你呢", n) == 0.0
    assert sentence_bleu("好", "你好吗", 4) > 0
    # clipping: 的的的 vs 的 -> p1 = 1/3, no brevity penalty (hyp longer)
    assert sentence_bleu("的的的", "的", 1) == pytest.approx(1 / 3)
    assert bleu(["我喜欢猫", "的的的"], ["我也喜欢猫", "的"], 1) == pytest.approx(
        (math.exp(-0.25) + 1 / 3) / 2)


def test_distinct_by_hand():
    replies = ["哈哈哈", "哈哈", "好的"]
    # unigrams: 哈 x5, 好, 的 -> 3 distinct of 7; bigrams: 哈哈 x3, 好的 -> 2 of 4
    assert distinct(replies, 1) == pytest.approx(3 / 7)
    assert distinct(replies, 2) == pytest.approx(2 / 4)
    assert distinct([], 2) == 0.0


def test_repetition_shares():
    assert repeats_context("你好 呀", ["你好呀", "嗯"]) and not repeats_context("你好", ["你好呀"])
    assert has_char_run("哈哈哈哈") and not has_char_run("哈哈哈") and has_char_run("好啊啊啊啊")
    m = reply_metrics(["哈哈哈哈", "你好"], ["嗯", "你好"], [["你好"], ["在吗", "你好"]])
    assert m["char_run_4"] == 0.5 and m["repeats_context"] == 0.5
    assert m["mean_reply_length"] == 3.0 and m["replies"] == 2
