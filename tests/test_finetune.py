"""Fine-tuning a pretrained Chinese GPT-2 laid out as uer's (GPT2LMHeadModel, a BERT
vocab.txt, n_positions 1024, GPT-2's 50256 as bos/eos, a tokenizer_config.json naming
BertTokenizer): preprocess --pretrained_model -> train --pretrained_model -> chat ->
AutoModelForCausalLM / AutoTokenizer on the run folder, offline, with random tiny weights."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from chitchat import Chatbot
from chitchat.config import PreprocessConfig, TrainConfig, parse_config
from chitchat.corpus import read_dialogues
from chitchat.dialogue import encode_context
from chitchat.modeling import load_model
from chitchat.preprocessing import preprocess
from chitchat.store import TokenStore
from chitchat.tokenization import ChatTokenizer
from chitchat.training import train
from chitchat.utils import ChitchatError

from conftest import ROOT, SAMPLE, shared_path

N_POSITIONS = 1024


def bert_layout_vocab(path) -> None:
    """A small vocab in bert-base-chinese's order ([PAD], [unused1..99], [UNK] 100, [CLS]
    101, [SEP] 102, [MASK] 103, then characters): the sample corpus's characters."""
    chars = sorted({ch for d in read_dialogues(SAMPLE) for u in d.utterances for ch in u
                    if not ch.isspace()})
    tokens = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
              + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars)
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


def uer_folder(path, vocab_file, weights: str):
    """What `huggingface-cli download uer/gpt2-chinese-cluecorpussmall` gives, shrunk: its
    config keys (50256 as bos/eos, the legacy n_ctx, tokenizer_class BertTokenizer), the
    vocab, BERT tokenizer files and no generation_config.json."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir()
    shutil.copyfile(vocab_file, path / "vocab.txt")
    n_vocab = ChatTokenizer.from_dir(path).vocab_size
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=n_vocab, n_positions=N_POSITIONS,
                                       n_embd=64, n_layer=2, n_head=2,
                                       bos_token_id=None, eos_token_id=None))
    if weights == "safetensors":
        model.save_pretrained(path, safe_serialization=True)
        os.remove(path / "generation_config.json")
    else:
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    config = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
              "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1,
              "eos_token_id": 50256, "gradient_checkpointing": False,
              "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
              "n_ctx": N_POSITIONS, "n_embd": 64, "n_head": 2, "n_inner": None, "n_layer": 2,
              "n_positions": N_POSITIONS, "output_past": True, "resid_pdrop": 0.1,
              "task_specific_params": {"text-generation": {"do_sample": True,
                                                           "max_length": 320}},
              "tokenizer_class": "BertTokenizer", "vocab_size": n_vocab}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": False,
         "model_max_length": N_POSITIONS}))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
         "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    return path


@contextmanager
def transformers_warnings():
    """The messages transformers logs (it does not propagate to pytest's caplog)."""
    from transformers.utils import logging as hf_logging

    # warning_once remembers what it said in this process; forget it so a repeat shows.
    hf_logging.warning_once.cache_clear()
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


@pytest.fixture(scope="module", params=["built", "shared"])
def finetuned(request, tmp_path_factory):
    """preprocess --pretrained_model, then a few fine-tuning steps: (pretrained, store, run).
    "built": a BERT-layout vocab made here, pytorch_model.bin (runs without ../shared);
    "shared": the real gpt2-chitchat vocab, model.safetensors."""
    tmp = tmp_path_factory.mktemp(f"finetune-{request.param}")
    if request.param == "shared":
        vocab, weights = shared_path("vocab", "gpt2-chitchat-vocab.txt"), "safetensors"
    else:
        vocab, weights = tmp / "bert-vocab.txt", "bin"
        bert_layout_vocab(vocab)
    pretrained = uer_folder(tmp / "gpt2-chinese", vocab, weights)
    store = preprocess(parse_config(PreprocessConfig, [
        "--train_path", str(SAMPLE), "--save_path", str(tmp / "train"),
        "--pretrained_model", str(pretrained), "--val_num", "20", "--quiet"]))
    run = train(TrainConfig(train_path=str(store), pretrained_model=str(pretrained),
                            save_model_path=str(tmp / "model"), run_name="ft", max_len=64,
                            batch_size=4, max_steps=3, lr=5e-5, dtype="fp32", device="cpu",
                            log_step=1, eval_interval=0, quiet=True))
    return pretrained, store, run


def test_preprocess_encodes_with_the_model_vocab(finetuned):
    pretrained, store, _ = finetuned
    tok = ChatTokenizer.from_dir(pretrained)
    assert ChatTokenizer.from_dir(store).tokens == tok.tokens
    first = next(iter(read_dialogues(SAMPLE))).utterances
    assert TokenStore(store).dialogue(0).tolist() == encode_context(tok, first)


def test_run_folder_has_the_vocab_special_ids_and_chitchat_tokenizer(finetuned):
    pretrained, _, run = finetuned
    tok = ChatTokenizer.from_dir(pretrained)
    config = json.loads((run / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (tok.cls_id, tok.sep_id, tok.pad_id)
    assert config["n_positions"] == N_POSITIONS and config["vocab_size"] == tok.vocab_size
    for stale in ("n_ctx", "output_past", "gradient_checkpointing", "tokenizer_class",
                  "task_specific_params"):
        assert stale not in config, stale
    generation = json.loads((run / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.sep_id
    tok_config = json.loads((run / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (run / "chat_template.jinja").is_file() and (run / "tokenizer.json").is_file()
    assert ChatTokenizer.from_dir(run).tokens == tok.tokens
    # Trained from the pretrained weights, not from scratch.
    before, after = load_model(pretrained)[0], load_model(run)[0]
    w0, w1 = before.transformer.wpe.weight.detach(), after.transformer.wpe.weight.detach()
    assert w0.shape == w1.shape == (N_POSITIONS, 64)
    delta = (w1 - w0).abs().max().item()
    assert 0 < delta < 0.01, delta  # a few small steps away from the start


def test_transformers_loads_the_run_without_the_50256_warning(finetuned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pretrained, _, run = finetuned
    with transformers_warnings() as said:
        AutoModelForCausalLM.from_pretrained(pretrained)
    assert any("50256" in m for m in said), said  # the capture sees the warning
    with transformers_warnings() as said:
        model = AutoModelForCausalLM.from_pretrained(run).eval()
        hf_tok = AutoTokenizer.from_pretrained(run)
    assert not [m for m in said if "50256" in m or "token_id" in m], said
    tok = ChatTokenizer.from_dir(run)
    assert hf_tok.encode("你好，在吗", add_special_tokens=False) == tok.encode("你好，在吗")
    enc = hf_tok.apply_chat_template([{"role": "user", "content": "你好"}],
                                     add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")
    assert enc["input_ids"][0].tolist() == encode_context(tok, ["你好"])
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_chat_with_the_finetuned_model(finetuned):
    from transformers import AutoModelForCausalLM

    _, _, run = finetuned
    with transformers_warnings() as said:
        bot = Chatbot.from_pretrained(run, greedy=True, max_len=6)
    assert not said, said
    assert bot.n_positions == N_POSITIONS
    reply = bot.reply("你好")
    assert isinstance(reply, str) and bot.history == ["你好", reply]
    # The reply is transformers' greedy decoding of the same context.
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    tok = bot.tokenizer
    ids = torch.tensor([encode_context(tok, ["你好"])])
    banned = set(tok.banned_ids) | {i for i, t in enumerate(tok.tokens)
                                    if t.startswith("[unused")}
    out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=1,
                         bad_words_ids=[[i] for i in sorted(banned)])
    new = out[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.sep_id)] if tok.sep_id in new else new
    assert reply == tok.decode(new)
    # A long history is trimmed to n_positions minus the reply, not to the training windows.
    history = ["今天天气怎么样，我们出去走走吧"] * 80
    ctx = bot.context(history, bot.resolve(max_history_len=80))
    assert 64 < len(ctx.ids) <= N_POSITIONS - 6


@pytest.mark.slow
def test_interact_cli_chats_with_the_run(finetuned):
    _, _, run = finetuned
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "interact.py", "--model_path", str(run), "--greedy",
                        "--max_len", "5", "--save_samples_path", ""],
                       input="你好\n你在干嘛\n", cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len([line for line in p.stdout.splitlines() if line.strip()]) == 2, p.stdout
    assert "50256" not in p.stderr


def test_the_pretrained_folder_itself_chats(finetuned):
    """The downloaded folder loads as is (before any fine-tuning), whatever its tokenizer
    files say, and without transformers' warning about 50256."""
    pretrained, _, _ = finetuned
    with transformers_warnings() as said:
        bot = Chatbot.from_pretrained(pretrained, greedy=True, max_len=4)
    assert not said, said
    assert bot.tokenizer.cls_id == ChatTokenizer.from_dir(pretrained).cls_id
    assert bot.model.config.bos_token_id == bot.tokenizer.cls_id
    assert isinstance(bot.reply("你好"), str)


def test_max_len_beyond_n_positions_is_refused(finetuned, tmp_path):
    pretrained, store, _ = finetuned
    with pytest.raises(ChitchatError, match=rf"--max_len 2000 exceeds the model's "
                                            rf"n_positions {N_POSITIONS}"):
        train(TrainConfig(train_path=str(store), pretrained_model=str(pretrained),
                          save_model_path=str(tmp_path), run_name="x", max_len=2000,
                          max_steps=1, dtype="fp32", device="cpu", quiet=True))


# ---- preprocess --pretrained_model: bad input ------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    """A folder with just a vocab.txt: all preprocess reads of a model folder."""
    d = tmp_path / "gpt2-chinese"
    d.mkdir()
    bert_layout_vocab(d / "vocab.txt")
    return d


def run_preprocess(tmp_path, *args):
    return preprocess(parse_config(PreprocessConfig, [
        "--train_path", str(SAMPLE), "--save_path", str(tmp_path / "store"), "--quiet",
        *map(str, args)]))


def test_preprocess_pretrained_model_without_vocab_is_an_error(tmp_path, model_dir):
    os.remove(model_dir / "vocab.txt")
    with pytest.raises(ChitchatError, match=r"has no vocab\.txt.*--vocab_path"):
        run_preprocess(tmp_path, "--pretrained_model", model_dir)
    with pytest.raises(ChitchatError, match=r"no such folder"):
        run_preprocess(tmp_path, "--pretrained_model", tmp_path / "missing")
    assert not (tmp_path / "store").exists()


def test_preprocess_pretrained_model_and_another_vocab_is_an_error(tmp_path, model_dir,
                                                                     sample_store):
    with pytest.raises(ChitchatError, match=r"differs from .*Drop --vocab_path"):
        run_preprocess(tmp_path, "--pretrained_model", model_dir,
                       "--vocab_path", sample_store / "vocab.txt")
    assert not (tmp_path / "store").exists()
    # The model's own vocab, named twice, is fine.
    copy = tmp_path / "same.txt"
    shutil.copyfile(model_dir / "vocab.txt", copy)
    store = run_preprocess(tmp_path, "--pretrained_model", model_dir, "--vocab_path", copy)
    assert (store / "vocab.txt").read_bytes() == copy.read_bytes()


def test_train_on_a_store_with_another_vocab_says_how_to_fix(tmp_path, model_dir,
                                                            sample_store):
    pretrained = uer_folder(tmp_path / "uer", model_dir / "vocab.txt", "bin")
    with pytest.raises(ChitchatError, match=r"preprocess\.py .*--pretrained_model "):
        train(TrainConfig(train_path=str(sample_store), pretrained_model=str(pretrained),
                          save_model_path=str(tmp_path / "model"), run_name="x", max_len=64,
                          max_steps=1, dtype="fp32", device="cpu", quiet=True))
