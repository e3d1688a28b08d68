"""The Chatbot API: context budget, history, options, loading, readable text."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from chitchat import Chatbot
from chitchat.config import DecodingOptions, coerce_option
from chitchat.dialogue import build_context, encode_context
from chitchat.modeling import load_model, set_speaker_token_ids
from chitchat.tokenization import ChatTokenizer
from chitchat.utils import ChitchatError

from conftest import gpt2_chitchat_folder, shared_path


@pytest.fixture(scope="module")
def bot(tiny_model_dir) -> Chatbot:
    return Chatbot.from_pretrained(tiny_model_dir, seed=0)


@pytest.fixture
def fresh(bot) -> Chatbot:
    bot.reset()
    bot.set(**{f: getattr(DecodingOptions(), f) for f in vars(DecodingOptions())})
    bot.set(seed=0)
    return bot


# ---- context budget ---------------------------------------------------------------------------
def test_context_keeps_the_newest_utterances_that_fit(bot):
    tok = bot.tokenizer
    history = ["你好啊", "我很好谢谢你", "今天天气怎么样", "还不错吧", "那我们出去玩"]
    lens = [len(tok.encode(u)) for u in history]
    full = build_context(tok, history, 5, 10_000)
    assert full.ids == encode_context(tok, history) and full.utterances_used == 5
    # max_history_len counts utterances, newest included.
    assert build_context(tok, history, 2, 10_000).ids == encode_context(tok, history[-2:])
    # A budget that fits exactly the last three drops the two oldest.
    budget = 1 + sum(n + 1 for n in lens[-3:])
    ctx = build_context(tok, history, 5, budget)
    assert ctx.ids == encode_context(tok, history[-3:]) and len(ctx.ids) == budget
    assert build_context(tok, history, 5, budget - 1).ids == encode_context(tok, history[-2:])
    assert ctx.notice is None


def test_an_over_long_message_is_cut_from_the_front_with_a_notice(bot):
    tok = bot.tokenizer
    long = "".join("我是一个很长的句子") * 10
    ids = tok.encode(long)
    ctx = build_context(tok, ["你好", "嗯", long], 3, 30)
    assert len(ctx.ids) == 30 and ctx.utterances_used == 1
    assert ctx.ids == [tok.cls_id, *ids[-28:], tok.sep_id]  # the end is what gets answered
    assert "cut" in ctx.notice and str(len(ids)) in ctx.notice


def test_the_model_never_sees_a_position_beyond_n_positions(fresh):
    bot = fresh
    n = bot.n_positions  # 64 in the tiny config
    seen = []
    step, start = bot.backend.step, bot.backend.start

    def spy_start(*a, **k):
        st, logits = start(*a, **k)
        seen.append(st.length)
        return st, logits

    def spy_step(state, tokens):
        out = step(state, tokens)
        seen.append(state.length)
        return out

    bot.backend.start, bot.backend.step = spy_start, spy_step
    try:
        for max_len in (1, 20, n - 3):
            seen.clear()
            r = bot.generate(["很长的一句话" * 30], max_len=max_len, min_len=max_len)
            assert len(r.token_ids) == max_len and r.finish_reason == "length"
            assert r.prompt_tokens == n - max_len  # the budget is used to the last token
            assert max(seen) == n - 1  # positions 0 .. n-2 fed; the last token never is
            assert r.notice
    finally:
        del bot.backend.start, bot.backend.step
    with pytest.raises(ChitchatError, match="n_positions"):
        bot.generate(["你好"], max_len=n - 2)


def test_speaker_types_follow_training(bot):
    tok = bot.tokenizer
    h = ["a", "b", "c", "d"]
    ctx = build_context(tok, h, 3, 100, speaker_ids=(5, 6))
    # Utterances 1..3 kept: utterance k is speaker k % 2, [CLS] takes the first one's.
    assert ctx.token_types == [6, 6, 6, 5, 5, 6, 6] and ctx.reply_type == 5


def test_a_speaker_model_gets_token_types_in_both_backends(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    set_speaker_token_ids(model.config, tok.speaker_ids())
    fast = Chatbot(model, tok, greedy=True)
    hf = Chatbot(model, tok, backend="hf", greedy=True)
    h = ["你好", "你好呀", "在干嘛"]
    assert fast.context(h).token_types is not None
    assert fast.generate(h).token_ids == hf.generate(h).token_ids
    plain = Chatbot(*load_model(tiny_model_dir), greedy=True)
    assert plain.context(h).token_types is None


# ---- the session API --------------------------------------------------------------------------
def test_reply_and_stream_keep_history(fresh):
    bot = fresh
    a = bot.reply("你好")
    assert isinstance(a, str) and a and bot.history == ["你好", a]
    pieces = list(bot.stream("你在干嘛"))
    b = "".join(pieces)
    assert len(pieces) == len(bot.last_reply.token_ids) and b == bot.last_reply.text
    assert b == bot.tokenizer.decode(bot.last_reply.token_ids)
    assert bot.history == ["你好", a, "你在干嘛", b]
    bot.reset()
    assert bot.history == [] and bot.last_reply is None


def test_generate_is_stateless_and_reports_usage(fresh):
    bot = fresh
    r = bot.generate(["你好", "你好呀", "吃了吗"], max_len=7, min_len=7)
    assert bot.history == []
    assert len(r.token_ids) == 7 and r.finish_reason == "length"
    assert r.prompt_tokens == len(encode_context(bot.tokenizer, ["你好", "你好呀", "吃了吗"]))
    assert r.first_token_s is not None and r.total_s >= r.first_token_s


def test_history_window(fresh):
    bot = fresh
    bot.set(max_history_len=2)
    bot.reply("你好")
    bot.reply("今天天气")
    r = bot.last_reply
    tok = bot.tokenizer
    assert r.utterances_used == 2
    assert r.prompt_tokens == len(encode_context(tok, [bot.history[1], "今天天气"]))


def test_same_seed_same_replies_and_per_call_seed(tiny_model_dir):
    a = Chatbot.from_pretrained(tiny_model_dir, seed=7)
    b = Chatbot.from_pretrained(tiny_model_dir, seed=7)
    c = Chatbot.from_pretrained(tiny_model_dir, seed=8)
    ra = [a.reply(t) for t in ("你好", "你是谁")]
    assert ra == [b.reply(t) for t in ("你好", "你是谁")]
    assert ra != [c.reply(t) for t in ("你好", "你是谁")]
    h = ["你好"]
    assert a.generate(h, seed=3).text == c.generate(h, seed=3).text


def test_stopping_a_stream_keeps_the_partial_reply(fresh):
    bot = fresh
    gen = bot.stream("你好")
    first = next(gen) + next(gen)
    gen.close()
    assert bot.last_reply.finish_reason == "interrupted"
    assert bot.history == ["你好", first] and len(bot.last_reply.token_ids) == 2


def test_ctrl_c_inside_the_model_keeps_the_partial_reply(fresh, monkeypatch):
    bot = fresh
    calls = []
    real = bot.backend.step

    def step(state, tokens):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(state, tokens)

    monkeypatch.setattr(bot.backend, "step", step)
    with pytest.raises(KeyboardInterrupt):
        for _ in bot.stream("你好"):
            pass
    assert bot.last_reply.finish_reason == "interrupted" and len(bot.last_reply.token_ids) == 3
    assert bot.history[0] == "你好" and bot.history[1] == bot.last_reply.text


def test_options_are_validated_and_aliases_accepted(fresh):
    bot = fresh
    assert bot.set(top_k=5, top_p=0.9, temperature=0.5).topk == 5
    with pytest.raises(ChitchatError, match="unknown"):
        bot.set(tempreature=1.0)
    with pytest.raises(ChitchatError, match="topp"):
        bot.set(topp=1.5)
    assert bot.options.topp == 0.9  # a failed set changes nothing
    with pytest.raises(ChitchatError, match="empty"):
        bot.reply("   ")
    assert coerce_option("greedy", "on") == ("greedy", True)
    assert coerce_option("seed", "none") == ("seed", None)
    assert coerce_option("top_k", "3") == ("topk", 3)
    with pytest.raises(ChitchatError, match="int"):
        coerce_option("topk", "many")


@pytest.mark.parametrize("t", [1e-39, 1e-40])
def test_a_vanishing_temperature_replies_greedily(fresh, t):
    greedy = fresh.generate(["你好"], greedy=True, max_len=8)
    tiny = fresh.generate(["你好"], temperature=t, max_len=8)
    assert tiny.token_ids == greedy.token_ids and tiny.text == greedy.text
    assert not set(tiny.token_ids) & set(fresh.tokenizer.banned_ids)
    with pytest.raises(ChitchatError, match="--temperature must be a finite number"):
        fresh.generate(["你好"], temperature=float("inf"))


def test_bad_words_are_never_generated(tiny_model_dir):
    probe = Chatbot.from_pretrained(tiny_model_dir, greedy=True, max_len=10)
    said = probe.generate(["你好"]).token_ids
    words = [probe.tokenizer.tokens[t] for t in said[:3] if not probe.tokenizer.tokens[t].startswith("##")]
    bot = Chatbot.from_pretrained(tiny_model_dir, greedy=True, max_len=10, bad_words=words)
    out = bot.generate(["你好"]).token_ids
    assert not set(probe.tokenizer.vocab[w] for w in words) & set(out)
    assert out != said


def test_num_beams_is_deterministic(fresh):
    a = fresh.generate(["你好"], num_beams=3, max_len=8)
    b = fresh.generate(["你好"], num_beams=3, max_len=8)
    assert a.token_ids == b.token_ids and a.token_ids


# ---- loading all three folder kinds -----------------------------------------------------------
def test_loads_an_hf_folder_with_pytorch_model_bin(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    d = tmp_path / "hf_bin"
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    shutil.copy(tiny_model_dir / "vocab.txt", d / "vocab.txt")
    a = Chatbot.from_pretrained(d, greedy=True).generate(["你好"])
    b = Chatbot.from_pretrained(tiny_model_dir, greedy=True).generate(["你好"])
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("tied", [True, False])
def test_a_pytorch_model_bin_without_lm_head_needs_tied_embeddings(tiny_model_dir, tmp_path,
                                                                   tied):
    """Without lm_head.weight the head is the embeddings only when the config ties them;
    an untied config would leave a random head, so it is refused."""
    model, _ = load_model(tiny_model_dir)
    d = tmp_path / "no_head"
    model.config.tie_word_embeddings = tied
    model.config.save_pretrained(d)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, d / "pytorch_model.bin")
    shutil.copy(tiny_model_dir / "vocab.txt", d / "vocab.txt")
    if tied:
        loaded, _ = load_model(d)
        assert torch.equal(loaded.lm_head.weight, model.transformer.wte.weight)
    else:
        with pytest.raises(ChitchatError, match=r"missing \['lm_head.weight'\]"):
            load_model(d)


def test_loads_a_gpt2_chitchat_folder_with_vocab_path(tmp_path):
    vocab = shared_path("vocab", "gpt2-chitchat-vocab.txt")
    d = gpt2_chitchat_folder(tmp_path / "old", 13317)
    with pytest.raises(ChitchatError, match="--vocab_path"):
        Chatbot.from_pretrained(d)
    bot = Chatbot.from_pretrained(d, vocab_path=vocab, seed=1)
    assert bot.tokenizer.vocab_size == 13317
    assert bot.reply("你好")


def test_vocab_size_mismatch_is_a_clear_error(tmp_path, tiny_model_dir):
    d = gpt2_chitchat_folder(tmp_path / "old", 13317)
    with pytest.raises(ChitchatError, match=r"vocab size mismatch.*13317"):
        Chatbot.from_pretrained(d, vocab_path=tiny_model_dir / "vocab.txt")


@pytest.mark.slow
def test_int8_and_bf16_chatbots_run(tiny_model_dir):
    q = Chatbot.from_pretrained(tiny_model_dir, quantize="int8", seed=0)
    assert q.backend.int8 and q.reply("你好")
    b = Chatbot.from_pretrained(tiny_model_dir, dtype="bfloat16", seed=0)
    assert b.backend.dtype == torch.bfloat16 and b.reply("你好")
    with pytest.raises(ChitchatError, match="float32"):
        Chatbot.from_pretrained(tiny_model_dir, quantize="int8", dtype="bfloat16")


def test_from_options_builds_what_the_front_ends_describe(tiny_model_dir, tmp_path):
    from chitchat.config import MMIOptions, ModelOptions

    bad = tmp_path / "bad.txt"
    bad.write_text("你好\n\n哈哈\n", encoding="utf-8")
    threads = torch.get_num_threads()
    try:
        bot = Chatbot.from_options(ModelOptions(model_path=str(tiny_model_dir), threads=1),
                                   DecodingOptions(topk=3, max_new_tokens=7, seed=5),
                                   MMIOptions(), bad_words_path=bad)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert (bot.options.topk, bot.options.max_new_tokens, bot.options.seed) == (3, 7, 5)
    assert bot.bad_words == ["你好", "哈哈"] and bot.mmi is None
    # the same bot as the library call with the same options: the same seeded reply
    same = Chatbot.from_pretrained(tiny_model_dir, bad_words=["你好", "哈哈"], topk=3,
                                   max_new_tokens=7, seed=5)
    assert bot.reply("今天天气怎么样") == same.reply("今天天气怎么样")
    with pytest.raises(ChitchatError, match="bad_words file not found"):
        Chatbot.from_options(ModelOptions(model_path=str(tiny_model_dir)),
                             bad_words_path=tmp_path / "missing.txt")


# ---- readable text ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("你好，世界！", "你好，世界！"),
    ("hello world", "hello world"),
    ("I love GPT2-chitchat, ok?", "i love gpt2-chitchat, ok?"),
    ("pi is 3.14 at 10:30", "pi is 3.14 at 10:30"),
    ("我有123456个apple和2019年", "我有123456个apple和2019年"),
    ("don't stop. you know", "don't stop. you know"),
    ("50%的人说ok", "50%的人说ok"),
    ("你好,hello", "你好,hello"),
    ("mail a@b.com ok", "mail a@b.com ok"),
    ("看www.example.com和http://x.cn/a.html吧", "看www.example.com和http://x.cn/a.html吧"),
    ("fine.you?", "fine. you?"),
])
def test_decode_is_readable(text, expected):
    tok = ChatTokenizer.from_vocab_file(shared_path("vocab", "gpt2-chitchat-vocab.txt"))
    ids = tok.encode(text)
    assert tok.decode(ids) == expected


def test_decode_merges_wordpieces_and_skips_specials():
    tok = ChatTokenizer.from_vocab_file(shared_path("vocab", "gpt2-chitchat-vocab.txt"))
    ids = [tok.cls_id, *tok.encode("chitchat"), tok.sep_id, *tok.encode("12345")]
    assert any(tok.tokens[i].startswith("##") for i in ids)
    assert tok.decode(ids) == "chitchat 12345"


# ---- batches ----------------------------------------------------------------------------------
HISTORIES = [["你好"], ["你好", "你好呀", "吃了吗"], ["今天天气不错，我们出去走走吧"]]


def test_a_batch_decodes_like_single_rows(fresh):
    bot = fresh
    single = [bot.generate(h, greedy=True, max_len=12).token_ids for h in HISTORIES]
    batch = bot.generate_batch(HISTORIES, greedy=True, max_len=12)
    assert [r.token_ids for r in batch] == single
    assert [r.prompt_tokens for r in batch] == [len(bot.context(h).ids) for h in HISTORIES]
    # Rows may be read in any order: reading one buffers the others.
    streams = bot.start_batch(HISTORIES, greedy=True, max_len=12)
    texts = {b: "".join(streams[b]) for b in (2, 0, 1)}
    assert [texts[b] for b in range(3)] == [r.text for r in batch]
    with pytest.raises(ChitchatError, match="num_beams"):
        bot.start_batch(HISTORIES, num_beams=2)


def test_copies_with_scores_give_candidates_and_their_logprobs(fresh):
    bot = fresh
    cands = bot.generate_batch([["你好", "你好呀", "吃了吗"]], copies=4, scores=True, max_len=8,
                               seed=1)
    assert len(cands) == 4 and len({tuple(c.token_ids) for c in cands}) > 1
    ctx = bot.context(["你好", "你好呀", "吃了吗"]).ids
    for c in cands:
        assert len(c.token_logprobs) == len(c.token_ids)
        ids = torch.tensor([ctx + c.token_ids])
        with torch.inference_mode():
            lp = bot.model(ids).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)
        ref = lp.gather(-1, torch.tensor(c.token_ids).view(-1, 1)).view(-1)
        torch.testing.assert_close(torch.tensor(c.token_logprobs), ref, rtol=1e-4, atol=1e-4)
