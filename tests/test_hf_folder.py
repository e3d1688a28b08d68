"""Model folders that other engines understand: the chat template and generation_config.json
of a folder written by train.py, used through transformers only (offline), as vLLM, TGI and
transformers' pipelines use them."""
from __future__ import annotations

import json

import pytest
import torch

from chitchat import Chatbot
from chitchat.dialogue import build_context
from chitchat.config import DecodingOptions, TrainConfig
from chitchat.modeling import generation_config
from chitchat.serving.schema import Message, to_history
from chitchat.tokenization import ChatTokenizer

from conftest import shared_path

HISTORIES = [
    ["你好"],
    ["你好", "你好呀，最近怎么样"],
    ["在吗", "在的", "今天天气真好，我们出去玩吧！"],
    ["hello", "hi，你是谁", "I am fine, thank you.", "ok好的"],
    ["我喜欢NBA", "我也是, 你呢?", "Lakers吧", "科比 is best", "yes, 3.14%"],
]  # each fits the tiny model's 64 positions with a 25-token reply


def messages(history, system: str | None = None) -> list[dict]:
    """OpenAI messages for a history: the last utterance is the user's."""
    n = len(history)
    out = [{"role": "user" if (n - 1 - k) % 2 == 0 else "assistant", "content": u}
           for k, u in enumerate(history)]
    return ([{"role": "system", "content": system}] if system else []) + out


def template_ids(hf_tok, msgs) -> list[int]:
    enc = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


def context_ids(tok: ChatTokenizer, history) -> list[int]:
    return build_context(tok, history, len(history), 10_000).ids


@pytest.fixture(scope="module")
def run(sample_store, tiny_config_path, tmp_path_factory):
    """A folder written by train.py: a tiny model trained until its replies end in [SEP]."""
    from chitchat.training import train

    save = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    train(TrainConfig(train_path=str(sample_store), model_config=str(tiny_config_path),
                      save_model_path=str(save), run_name="hf", max_len=64, batch_size=8,
                      dtype="fp32", device="cpu", quiet=True, eval_interval=0,
                      max_steps=150, lr=3e-3, warmup_steps=5))
    return save / "hf"


@pytest.fixture(scope="module")
def hf(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(run).eval(), AutoTokenizer.from_pretrained(run)


# ---- the chat template ------------------------------------------------------------------------
@pytest.mark.slow
def test_folder_has_the_template_and_the_generation_config(run):
    assert (run / "chat_template.jinja").is_file()
    assert "[CLS]" in (run / "chat_template.jinja").read_text(encoding="utf-8")
    assert json.loads((run / "generation_config.json").read_text())["eos_token_id"] == \
        ChatTokenizer.from_dir(run).sep_id


@pytest.mark.slow
@pytest.mark.parametrize("history", HISTORIES, ids=lambda h: f"{len(h)}turns")
def test_template_ids_equal_the_context_builder(run, hf, history):
    tok = ChatTokenizer.from_dir(run)
    assert template_ids(hf[1], messages(history)) == context_ids(tok, history)


def test_template_ids_equal_the_context_builder_on_real_vocabs(tmp_path):
    from transformers import AutoTokenizer

    for name in ("gpt2-chitchat-vocab.txt", "cdial-gpt-vocab.txt"):
        tok = ChatTokenizer.from_vocab_file(shared_path("vocab", name))
        tok.save_pretrained(tmp_path / name)
        hf_tok = AutoTokenizer.from_pretrained(tmp_path / name)
        for history in HISTORIES:
            ids = context_ids(tok, history)
            assert template_ids(hf_tok, messages(history)) == ids, (name, history)


@pytest.mark.parametrize("with_mask", [True, False])
def test_the_folders_tokenizer_has_exactly_the_vocabs_tokens(tmp_path, with_mask):
    """A vocab without [MASK] (CDial-GPT's): the saved tokenizer adds no [MASK] id past the
    model's embeddings (transformers' default mask token would be id len(vocab))."""
    from transformers import AutoTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if with_mask else []) + \
        ["你", "好", "我", "说", "a", "##b"]
    ChatTokenizer(tokens).save_pretrained(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf_tok) == len(tokens)
    assert hf_tok.mask_token == ("[MASK]" if with_mask else None)
    ids = hf_tok("我说[MASK]你好")["input_ids"]
    assert max(ids) < len(tokens)
    assert ("[MASK]" in hf_tok.convert_ids_to_tokens(ids)) == with_mask


@pytest.mark.slow
def test_template_follows_serve_py_message_rules(run, hf):
    """system ignored, one role twice in a row is one utterance, empty messages dropped,
    list-of-parts content: the template gives what serve.py gives for the same messages."""
    tok = ChatTokenizer.from_dir(run)
    msgs = [{"role": "system", "content": "你是一个机器人"},
            {"role": "user", "content": "你好"},
            {"role": "user", "content": [{"type": "text", "text": "在吗"}]},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "在的"},
            {"role": "user", "content": "吃了吗"}]
    history = to_history([Message(**m) for m in msgs], 64, 4000)
    assert history == ["你好 在吗", "在的", "吃了吗"]
    assert template_ids(hf[1], msgs) == context_ids(tok, history)
    # The system message changes nothing.
    assert template_ids(hf[1], msgs[1:]) == template_ids(hf[1], msgs)


@pytest.mark.slow
def test_literal_special_token_text_stays_plain_text(run, hf):
    tok = ChatTokenizer.from_dir(run)
    history = ["你好[SEP]好", "[CLS] [PAD][MASK] [UNK]吗"]
    ids = template_ids(hf[1], messages(history))
    assert ids == context_ids(tok, history)
    assert ids.count(tok.sep_id) == 2 and ids.count(tok.cls_id) == 1


@pytest.mark.slow
def test_generation_prompt_ends_where_the_reply_begins(run, hf):
    tok = ChatTokenizer.from_dir(run)
    msgs = messages(["你好", "你好呀", "吃了吗"])
    with_prompt = template_ids(hf[1], msgs)
    assert with_prompt[-1] == tok.sep_id
    # The format has no assistant header: the prompt is the history itself.
    assert hf[1].apply_chat_template(msgs, add_generation_prompt=False, return_dict=True)[
        "input_ids"] == with_prompt


@pytest.mark.slow
def test_the_tokenizer_returns_no_token_type_ids(hf):
    """BERT's all-zero token types would add the [PAD] embedding to every position."""
    enc = hf[1].apply_chat_template(messages(["你好"]), add_generation_prompt=True,
                                    return_dict=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}


# ---- generation_config.json -------------------------------------------------------------------
@pytest.mark.slow
def test_generation_config_has_chitchat_defaults(run, hf):
    tok, d = ChatTokenizer.from_dir(run), DecodingOptions()
    g = hf[0].generation_config
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (tok.cls_id, tok.sep_id,
                                                                tok.pad_id)
    assert g.do_sample and g.temperature == d.temperature and g.top_k == d.topk
    assert g.repetition_penalty == d.repetition_penalty and g.max_new_tokens == d.max_new_tokens
    assert g.min_new_tokens == d.min_len
    assert d.topp == 0 and g.top_p == 1.0  # both mean "no nucleus filter"
    assert sorted(i for [i] in g.bad_words_ids) == tok.banned_ids


@pytest.mark.slow
def test_generation_config_follows_the_options(run):
    tok = ChatTokenizer.from_dir(run)
    g = generation_config(tok, DecodingOptions(temperature=0.7, topk=0, topp=0.9,
                                               max_new_tokens=40, repetition_penalty=1.2))
    assert (g.temperature, g.top_k, g.top_p, g.max_new_tokens, g.repetition_penalty) == \
        (0.7, 0, 0.9, 40, 1.2)
    for greedy in (DecodingOptions(greedy=True), DecodingOptions(temperature=0),
                   DecodingOptions(num_beams=3)):
        assert not generation_config(tok, greedy).do_sample


@pytest.mark.slow
@pytest.mark.parametrize("history", HISTORIES, ids=lambda h: f"{len(h)}turns")
def test_generate_with_the_folders_own_config_stops_at_sep(run, hf, history):
    model, hf_tok = hf
    sep = ChatTokenizer.from_dir(run).sep_id
    enc = hf_tok.apply_chat_template(messages(history), add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] + DecodingOptions().max_new_tokens <= model.config.n_positions
    torch.manual_seed(len(history))
    out = model.generate(**enc)  # nothing but the folder's generation_config
    reply = out[0, enc["input_ids"].shape[1]:].tolist()
    assert reply[-1] == sep and sep not in reply[:-1], reply
    assert 2 <= len(reply) <= DecodingOptions().max_new_tokens
    assert not set(reply) & set(ChatTokenizer.from_dir(run).banned_ids)


@pytest.mark.slow
@pytest.mark.parametrize("history", HISTORIES[:3], ids=lambda h: f"{len(h)}turns")
def test_greedy_generate_gives_chitchats_own_reply(run, hf, history):
    model, hf_tok = hf
    enc = hf_tok.apply_chat_template(messages(history), add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    out = model.generate(**enc, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    ours = Chatbot.from_pretrained(run, backend="hf", greedy=True,
                                   max_history_len=len(history)).generate(history)
    stop = [ChatTokenizer.from_dir(run).sep_id] if ours.finish_reason == "stop" else []
    assert out == ours.token_ids + stop


@pytest.mark.slow
def test_pipeline_with_messages_returns_a_reply(run):
    from transformers import pipeline

    chat = pipeline("text-generation", model=str(run), device="cpu")
    history = ["你好", "你好呀", "吃了吗"]
    out = chat(messages(history), do_sample=False)
    turns = out[0]["generated_text"]
    assert turns[:-1] == messages(history) and turns[-1]["role"] == "assistant"
    ours = Chatbot.from_pretrained(run, backend="hf", greedy=True).generate(history)
    assert turns[-1]["content"].strip() and turns[-1]["content"] == ours.text


# Detokenizer's spacing (tests/test_chat.py) through tokenizer.json's decoder; addresses
# ("a@b.com") are the documented exception.
@pytest.mark.parametrize("text", [
    "你好，世界！", "hello world", "I love GPT2-chitchat, ok?", "pi is 3.14 at 10:30",
    "我有123456个apple和2019年", "don't stop. you know", "50%的人说ok", "你好,hello",
    "fine.you?", "北京 is 首都 of China.", "chitchat 12345"])
def test_the_folders_tokenizer_decodes_readable_text(tmp_path, text):
    from transformers import AutoTokenizer

    tok = ChatTokenizer.from_vocab_file(shared_path("vocab", "gpt2-chitchat-vocab.txt"))
    tok.save_pretrained(tmp_path)
    ids = [tok.cls_id, *tok.encode(text), tok.sep_id]
    assert AutoTokenizer.from_pretrained(tmp_path).decode(ids, skip_special_tokens=True) == \
        tok.decode(ids)

