"""MMI: the reverse data order, reverse scoring, the pure reranking rules, and MMI through
the Chatbot API and interact.py, on tiny random models."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from chitchat import Chatbot
from chitchat.batching import build_windows, window_example
from chitchat.dialogue import encode_context, reverse_input, split_context
from chitchat.mmi import NEAR_DUPLICATE, combine, mean_logprob, rerank, reverse_scores, similarity
from chitchat.modeling import build_model, is_reverse, load_config, save_model, set_reverse
from chitchat.store import ReversedStore, TokenStore, reversed_utterance_ends
from chitchat.utils import ChitchatError

from conftest import ROOT

HISTORY = ["你好", "你好呀，最近怎么样", "还行吧，你在干嘛"]
CORPUS = "你好\n你好呀\n吃了吗\n\n在吗\n在的\n\n今天天气不错\n是啊\n出去走走吧\n好的走吧\n"


# ---- the reverse data order ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from chitchat.config import PreprocessConfig
    from chitchat.preprocessing import preprocess

    d = tmp_path_factory.mktemp("rev")
    (d / "train.txt").write_text(CORPUS, encoding="utf-8")
    return preprocess(PreprocessConfig(train_path=str(d / "train.txt"), save_path=str(d / "s"),
                                       vocab_size=40, min_frequency=1, val_num=0, quiet=True))


def test_reversed_store_reverses_utterance_order(tiny_store):
    store = TokenStore(tiny_store)
    rev = ReversedStore(store)
    tok = store.tokenizer()
    dialogues = [d.split("\n") for d in CORPUS.strip("\n").split("\n\n")]
    assert len(rev) == len(dialogues)
    for i, utts in enumerate(dialogues):
        assert store.dialogue(i).tolist() == encode_context(tok, utts)
        assert rev.dialogue(i).tolist() == encode_context(tok, utts[::-1])
        # [CLS] un [SEP] un-1 [SEP] ... u1 [SEP]: spans of the reversed dialogue
        spans = rev.utterance_spans(i)
        assert [tok.decode(rev.dialogue(i)[a:b - 1]) for a, b in spans] == utts[::-1]
    # Untouched: offsets, utterance counts, split; the files on disk are not rewritten.
    assert np.array_equal(rev.dialogue_offsets, store.dialogue_offsets)
    assert np.array_equal(rev.split, store.split)


def test_reversed_ends_by_hand():
    # two dialogues: [CLS] a a [SEP] b [SEP] (0..5) and [CLS] c [SEP] (6..8)
    off = np.array([0, 6, 9])
    du = np.array([0, 2, 3])
    ends = np.array([4, 6, 9])
    # reversed first dialogue: [CLS] b [SEP] a a [SEP] -> ends 3, 6
    assert reversed_utterance_ends(off, du, ends).tolist() == [3, 6, 9]


@pytest.mark.parametrize("max_len", [8, 150])  # 8: long dialogues split, no cut
def test_reverse_windows_cover_the_reversed_dialogue(tiny_store, max_len):
    rev = ReversedStore(TokenStore(tiny_store))
    table = build_windows(rev, np.arange(len(rev)), max_len, "all")
    for d in range(len(rev)):
        targets = []
        for w in np.flatnonzero(table.dialogue == d):
            ids, is_t, _ = window_example(rev, table, w)
            assert ids[0] == rev.tokenizer().cls_id and len(ids) <= max_len
            targets.extend(ids[is_t].tolist())
        assert targets == rev.dialogue(d)[1:].tolist()  # every token once, reversed order


def test_train_reverse_records_it_in_config(tiny_store, tiny_config_path, tmp_path):
    from chitchat.config import TrainConfig
    from chitchat.training import train

    run = train(TrainConfig(train_path=str(tiny_store), model_config=str(tiny_config_path),
                            save_model_path=str(tmp_path), run_name="rev", max_steps=2,
                            batch_size=2, max_len=32, device="cpu", quiet=True, reverse=True,
                            eval_interval=0, dtype="fp32"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["reverse"] is True
    log = (run / "train.log").read_text()
    assert "REVERSED utterance order" in log
    # a reverse model cannot chat, and cannot be fine-tuned as a forward one by accident
    with pytest.raises(ChitchatError, match="reverse model"):
        Chatbot.from_pretrained(run)
    with pytest.raises(ChitchatError, match="reverse model"):
        train(TrainConfig(train_path=str(tiny_store), pretrained_model=str(run),
                          save_model_path=str(tmp_path), run_name="fwd", max_steps=1,
                          device="cpu", quiet=True, max_len=32))


# ---- pure reranking ---------------------------------------------------------------------------
def test_combine_and_mean():
    assert combine(-2.0, -4.0, 0.5) == -3.0 and combine(-2.0, -4.0, 0.0) == -2.0
    assert math.isnan(combine(float("nan"), -1.0, 0.5))
    assert math.isnan(combine(-1.0, float("-inf"), 0.5))
    assert mean_logprob([-1.0, -3.0]) == -2.0 and math.isnan(mean_logprob([]))


def test_rerank_picks_the_best_combined_score():
    r = rerank(["好的", "不要", "也许吧"], [-1.0, -2.0, -3.0], [-5.0, -1.0, -1.0], 0.5)
    assert r.choice == 1 and r.fallback is None  # scores -3, -1.5, -2
    assert [c.chosen for c in r.candidates] == [False, True, False]
    assert rerank(["好的", "不要"], [-1.0, -2.0], [-5.0, -1.0], 0.0).choice == 0


def test_rerank_drops_empty_and_nan_candidates():
    nan = float("nan")
    r = rerank(["", "  ", "嗯", "好的"], [0.0, 0.0, nan, -3.0], [0.0, 0.0, -1.0, -3.0], 0.5)
    assert [c.dropped for c in r.candidates] == ["empty", "empty", "nan", None]
    assert r.choice == 3 and r.fallback is None
    r = rerank(["嗯", "好"], [-1.0, -2.0], [nan, float("inf")], 0.5)  # no reverse score at all
    assert r.choice == 0 and r.fallback == "no reverse score"
    r = rerank(["嗯", "好"], [nan, nan], [nan, nan], 0.5)
    assert r.choice == 0 and r.fallback == "no finite score"
    r = rerank(["", " "], [-1.0, -1.0], [-1.0, -1.0], 0.5, token_ids=[[5], [5, 6]])
    assert r.choice == 1 and r.fallback == "all empty"  # never a crash


def test_rerank_drops_near_duplicates_of_the_previous_bot_turn():
    assert similarity("我在吃饭呢", "我在 吃饭呢!") >= NEAR_DUPLICATE
    assert similarity("我在吃饭", "你吃饭了吗") < NEAR_DUPLICATE
    r = rerank(["我在吃饭呢", "看电视", "我在吃饭呢哈"], [-1.0, -3.0, -1.0], [-1.0, -3.0, -1.0],
               0.5, previous="我在吃饭呢")
    assert [c.dropped for c in r.candidates] == ["near-duplicate", None, "near-duplicate"]
    assert r.choice == 1
    # everything is a repeat: the best repeat rather than nothing
    r = rerank(["我在吃饭呢", "我在吃饭呢哈"], [-2.0, -1.0], [-2.0, -1.0], 0.5,
               previous="我在吃饭呢")
    assert r.choice == 1 and r.fallback == "all repetitive or near-duplicates"


def test_rerank_drops_degenerate_character_runs():
    # 哈哈哈哈 has by far the best forward score, as it does with real models
    r = rerank(["哈哈哈哈哈", "好啊", "哈哈哈"], [-0.2, -3.0, -2.0], [-4.0, -4.0, -4.0], 0.5)
    assert [c.dropped for c in r.candidates] == ["repetitive", None, None] and r.choice == 2
    assert rerank(["哈哈哈哈哈", "好啊"], [-0.2, -3.0], [-4.0, -4.0], 0.5,
                  char_run=None).choice == 0
    r = rerank(["哈哈哈哈哈", "啊啊啊啊"], [-0.2, -3.0], [-4.0, -4.0], 0.5)
    assert r.choice == 0 and r.fallback == "all repetitive or near-duplicates"


# ---- reverse inputs and scores ----------------------------------------------------------------
def test_reverse_input_order_budget_and_targets():
    CLS, SEP = 2, 3
    ctx = [[10, 11], [20], [30, 31, 32]]  # u1, u2, u3 (newest)
    ids, first, kept = reverse_input([40, 41], ctx, CLS, SEP, 64)
    assert ids == [CLS, 40, 41, SEP, 30, 31, 32, SEP, 20, SEP, 10, 11, SEP]
    assert first == 4 and kept == 3
    ids, first, kept = reverse_input([40, 41], ctx, CLS, SEP, 10)  # oldest dropped
    assert ids == [CLS, 40, 41, SEP, 30, 31, 32, SEP, 20, SEP] and kept == 2
    ids, first, kept = reverse_input([40, 41], ctx, CLS, SEP, 7)  # newest cut, head kept
    assert ids == [CLS, 40, 41, SEP, 30, 31, SEP] and kept == 1 and len(ids) <= 7
    assert split_context([CLS, 10, 11, SEP, 20, SEP], CLS, SEP) == [[10, 11], [20]]
    # speakers (--speaker_ids models): the reply is utterance 0 of the reversed dialogue
    from chitchat.dialogue import reverse_speaker_types as speaker_types

    ids, first, kept = reverse_input([40, 41], [[10, 11], [20]], CLS, SEP, 64)
    assert speaker_types(first - 2, [[10, 11], [20]], kept, (7, 8), len(ids)) == \
        [7, 7, 7, 7, 8, 8, 7, 7, 7]


@pytest.mark.parametrize("kind", ["fast", "hf"])
def test_reverse_scores_match_a_direct_computation(reverse_dir, kind):
    from chitchat.backends import make_backend
    from chitchat.modeling import load_model

    model, tok = load_model(reverse_dir)
    assert is_reverse(model.config)
    ctx = encode_context(tok, HISTORY)
    utts = split_context(ctx, tok.cls_id, tok.sep_id)
    replies = [tok.encode("我在看书"), tok.encode("嗯"), tok.encode("今天天气很好我们出去玩")]
    inputs = [reverse_input(r, utts, tok.cls_id, tok.sep_id, 64)[:2] for r in replies]
    got = reverse_scores(make_backend(model, kind, tok.pad_id), inputs, tok.pad_id)
    for (ids, first), g in zip(inputs, got):
        with torch.inference_mode():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        ref = torch.stack([lp[j - 1, ids[j]] for j in range(first, len(ids))]).mean()
        assert g == pytest.approx(float(ref), abs=1e-4)


# ---- MMI through the Chatbot ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mmi_bot(tiny_model_dir, reverse_dir):
    return Chatbot.from_pretrained(tiny_model_dir, mmi_model_path=reverse_dir,
                                   num_candidates=6, mmi_weight=0.5, seed=0, max_len=10)


def test_candidates_come_from_one_batched_pass_and_stop_per_row(tiny_model_dir, reverse_dir):
    from chitchat.modeling import load_model

    model, tok = load_model(tiny_model_dir)
    with torch.no_grad():  # a big [SEP] embedding: rows end at different, random steps
        model.transformer.wte.weight[tok.sep_id] *= 4
    rev, _ = load_model(reverse_dir)
    bot = Chatbot(model, tok, mmi_model=rev, num_candidates=8, seed=3, max_len=20)
    calls = {"start": [], "rows": []}
    start, step = bot.backend.start, bot.backend.step

    def spy_start(contexts, **kw):
        calls["start"].append(len(contexts))
        return start(contexts, **kw)

    def spy_step(state, tokens):
        calls["rows"].append(tokens.shape[0])
        return step(state, tokens)

    bot.backend.start, bot.backend.step = spy_start, spy_step
    r = bot.generate(HISTORY)
    cands = r.candidates
    assert calls["start"] == [1]  # one context pass, copied to 8 rows
    lengths = [len(c.token_ids) for c in cands]
    assert len(cands) == 8 and len(set(lengths)) > 1  # rows stopped independently
    assert all(tok.sep_id not in c.token_ids for c in cands)
    assert len(calls["rows"]) == max(lengths) - (max(lengths) == 20)  # none after the last
    # The batch starts with the 8 rows and shrinks as they finish, never below those going.
    assert calls["rows"][0] == 8 and calls["rows"] == sorted(calls["rows"], reverse=True)
    for k, n in enumerate(calls["rows"]):
        assert n >= sum(n_tok > k for n_tok in lengths)
    assert sum(c.chosen for c in cands) == 1
    assert r.token_ids == next(c for c in cands if c.chosen).token_ids


def test_mmi_reply_is_the_best_kept_candidate(mmi_bot):
    r = mmi_bot.generate(HISTORY, seed=5)
    assert len(r.candidates) == 6 and r.text and r.finish_reason in ("stop", "length")
    kept = [c for c in r.candidates if c.dropped is None]
    best = max(kept, key=lambda c: c.score)
    assert best.chosen and r.text == best.text
    for c in r.candidates:
        assert c.score == pytest.approx(0.5 * c.forward + 0.5 * c.reverse)
    # the forward score is the mean log-prob of the reply's tokens (and [SEP] if it ended)
    lps = r.token_logprobs + ([r.stop_logprob] if r.stop_logprob is not None else [])
    assert best.forward == pytest.approx(sum(lps) / len(lps))


def test_mmi_is_deterministic_under_a_seed(mmi_bot):
    a = mmi_bot.generate(HISTORY, seed=11)
    b = mmi_bot.generate(HISTORY, seed=11)
    assert a.text == b.text and a.token_ids == b.token_ids
    assert [(c.text, c.score) for c in a.candidates] == [(c.text, c.score) for c in b.candidates]


def test_mmi_batch_matches_the_candidates_rules(mmi_bot):
    histories = [HISTORY, ["在吗"], ["今天好冷啊", "是啊多穿点"]]
    replies = mmi_bot.generate_batch(histories, seed=2)
    assert len(replies) == 3
    for r in replies:
        assert r.text and len(r.candidates) == 6 and sum(c.chosen for c in r.candidates) == 1
    again = mmi_bot.generate_batch(histories, seed=2)
    assert [r.text for r in again] == [r.text for r in replies]


def test_mmi_session_streams_the_reply_at_once_and_skips_the_previous_turn(mmi_bot):
    mmi_bot.reset()
    mmi_bot.set(seed=4)
    pieces = list(mmi_bot.stream("你好"))
    first = mmi_bot.last_reply
    assert "".join(pieces) == first.text and first.candidates
    second = mmi_bot.reply("你在干嘛")
    cands = mmi_bot.last_reply.candidates
    for c in cands:  # every candidate was checked against the bot's previous turn
        if similarity(c.text, first.text) >= NEAR_DUPLICATE:
            assert c.dropped in ("near-duplicate", "empty", "nan")
    assert second and mmi_bot.history == ["你好", first.text, "你在干嘛", second]


def test_mmi_model_mistakes_are_clear(tiny_model_dir, reverse_dir, sample_store, tmp_path,
                                      tiny_config_path):
    with pytest.raises(ChitchatError, match="not a reverse model"):
        Chatbot.from_pretrained(tiny_model_dir, mmi_model_path=tiny_model_dir)
    with pytest.raises(ChitchatError, match="reverse model .* cannot chat"):
        Chatbot.from_pretrained(reverse_dir, mmi_model_path=reverse_dir)
    # same size, one token different: a vocab mismatch, named
    tok = TokenStore(sample_store).tokenizer()
    tokens = list(tok.tokens)
    tokens[-1], tokens[-2] = tokens[-2], tokens[-1]
    from chitchat.tokenization import ChatTokenizer

    other = ChatTokenizer(tokens)
    model = build_model(load_config(tiny_config_path, other))
    set_reverse(model.config, True)
    save_model(model, other, tmp_path / "other")
    with pytest.raises(ChitchatError, match="MMI model .* differs from the forward model's "
                       "vocab .same size, but id"):
        Chatbot.from_pretrained(tiny_model_dir, mmi_model_path=tmp_path / "other")


def test_mmi_filters_nan_scores_in_the_chatbot(mmi_bot, monkeypatch):
    # A reverse model that gives NaN for every candidate: no crash, no empty reply.
    monkeypatch.setattr(mmi_bot.mmi, "score", lambda ctxs, replies: [float("nan")] * len(replies))
    r = mmi_bot.generate(HISTORY, seed=1)
    assert r.text and r.mmi_fallback == "no reverse score"
    assert all(c.dropped == "nan" for c in r.candidates)


# ---- interact.py ------------------------------------------------------------------------------
@pytest.mark.slow
def test_interact_piped_with_mmi_and_debug(tiny_model_dir, reverse_dir, tmp_path):
    from test_interact import ENV

    proc = subprocess.run(
        [sys.executable, "interact.py", "--model_path", str(tiny_model_dir), "--mmi_model_path",
         str(reverse_dir), "--num_candidates", "4", "--debug", "--seed", "1", "--max_len", "8",
         "--save_samples_path", str(tmp_path)],
        input="你好\n你在干嘛\n", capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(lines)  # stdout: exactly one reply line per turn
    err = proc.stderr
    assert err.count("[mmi] chose") == 2
    cand_lines = [ln for ln in err.splitlines() if " fwd " in ln and " rev " in ln]
    assert len(cand_lines) == 8 and sum(ln.startswith("[mmi] *") for ln in cand_lines) == 2
    for reply in lines:
        assert f"[mmi] chose {reply!r}" in err
    rec = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rec[0]["settings"]["mmi_model_path"] == str(reverse_dir)
    assert rec[0]["settings"]["num_candidates"] == 4


def test_set_changes_the_mmi_settings_and_a_bad_value_changes_nothing(mmi_bot):
    try:
        mmi_bot.set(num_candidates=3, mmi_weight=0.0)
        r = mmi_bot.generate(HISTORY, seed=5)
        kept = [c for c in r.candidates if not c.dropped]
        assert len(r.candidates) == 3 and not r.mmi_fallback
        assert next(c for c in r.candidates if c.chosen) is max(kept, key=lambda c: c.forward)
        mmi_bot.set(mmi_weight=1.0)
        r = mmi_bot.generate(HISTORY, seed=5)
        kept = [c for c in r.candidates if not c.dropped]
        assert next(c for c in r.candidates if c.chosen) is max(kept, key=lambda c: c.reverse)
        for bad in ({"mmi_weight": 1.5}, {"num_candidates": 0}):
            with pytest.raises(ChitchatError, match="mmi_weight|num_candidates"):
                mmi_bot.set(temperature=0.5, **bad)
        assert (mmi_bot.mmi.num_candidates, mmi_bot.mmi.weight) == (3, 1.0)
        assert mmi_bot.options.temperature == 1.0
    finally:
        mmi_bot.set(num_candidates=6, mmi_weight=0.5)


def test_mmi_settings_without_a_reverse_model_are_a_clear_error(tiny_model_dir):
    bot = Chatbot.from_pretrained(tiny_model_dir)
    with pytest.raises(ChitchatError, match="--mmi_model_path"):
        bot.set(mmi_weight=0.2)


@pytest.mark.slow
def test_interact_set_changes_mmi_settings(tiny_model_dir, reverse_dir):
    from test_interact import ENV

    proc = subprocess.run(
        [sys.executable, "interact.py", "--model_path", str(tiny_model_dir), "--mmi_model_path",
         str(reverse_dir), "--debug", "--seed", "1", "--max_len", "8"],
        input="/set num_candidates=3 mmi_weight=1\n你好\n/set\n", capture_output=True,
        text=True, cwd=ROOT, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cand = [ln for ln in proc.stderr.splitlines() if " fwd " in ln and " rev " in ln]
    assert len(cand) == 3
    revs = [float(ln.split(" rev ")[1].split()[0]) for ln in cand if "dropped" not in ln]
    chosen = next(ln for ln in cand if ln.startswith("[mmi] *"))
    assert float(chosen.split(" rev ")[1].split()[0]) == max(revs)
    said = [ln for ln in (proc.stderr + proc.stdout).splitlines()
            if ln.endswith("num_candidates=3 mmi_weight=1.0")]
    assert len(said) == 2 and said[1].startswith("max_new_tokens=")  # /set k=v, then /set


def test_mmi_with_greedy_decoding_is_pointed_out_once(tiny_model_dir, reverse_dir, caplog):
    """Greedy candidates are all the same reply: MMI would rerank nothing, silently."""
    def notes():
        return [r.getMessage() for r in caplog.records if "identical candidates" in r.getMessage()]

    for greedy in ({"greedy": True}, {"temperature": 0.0}):
        bot = Chatbot.from_pretrained(tiny_model_dir, mmi_model_path=reverse_dir,
                                      num_candidates=4, seed=0, max_len=6)
        caplog.clear()
        with caplog.at_level("WARNING", logger="chitchat"):
            bot.generate(HISTORY)  # sampled: nothing to say
            assert notes() == []
            r = bot.generate(HISTORY, **greedy)
            bot.generate(HISTORY, **greedy)
            bot.prepare(HISTORY, **greedy)  # the server's path
        assert len({c.text for c in r.candidates}) == 1
        assert len(notes()) == 1 and "4 identical candidates" in notes()[0]
    server = Chatbot.from_pretrained(tiny_model_dir, mmi_model_path=reverse_dir,
                                     num_candidates=4, max_len=6)
    caplog.clear()
    with caplog.at_level("WARNING", logger="chitchat"):
        server.prepare(HISTORY, temperature=0.0)
    assert len(notes()) == 1


# ---- serve.py ---------------------------------------------------------------------------------
def test_server_decodes_mmi_candidates_as_rows_of_its_batch(mmi_bot):
    from test_engine import run_jobs

    from chitchat.config import parse_config
    from chitchat.serving.options import ServeConfig

    hists = [["你好"], ["吃了吗"], ["今天天气不错", "是啊", "出去玩吗"]]
    out, steps = run_jobs(mmi_bot, [(h, {}) for h in hists], max_batch=12)
    assert max(steps) == 12  # two requests' 6 candidates each; the third waited for rows
    for text, reply in out:
        assert text == reply.text and reply.candidates
    cfg = parse_config(ServeConfig, ["--model_path", "m", "--mmi_model_path", "r"])
    assert cfg.mmi.mmi_model_path == "r"


def test_ctrl_c_while_reranking_interrupts_the_reply(mmi_bot, monkeypatch):
    mmi_bot.reset()

    def interrupted(ctxs, replies):
        raise KeyboardInterrupt

    monkeypatch.setattr(mmi_bot.mmi, "score", interrupted)
    pieces = mmi_bot.stream("你好")  # nothing runs until the reply is read
    with pytest.raises(KeyboardInterrupt):
        next(pieces)
    assert mmi_bot.last_reply.finish_reason == "interrupted" and mmi_bot.history == []
