"""convert.py: an old GPT2-chitchat folder (config.json, pytorch_model.bin, a separate vocab)
becomes a complete modern folder; bad input is a clear error and never a torn output."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from chitchat import modeling
from chitchat.dialogue import encode_context
from chitchat.modeling import CONVERT_MARKER, convert_folder
from chitchat.tokenization import ChatTokenizer
from chitchat.utils import ChitchatError

from conftest import ROOT, gpt2_chitchat_folder

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture
def old(tmp_path, tiny_model_dir):
    """GPT2-chitchat's layout with GPT-2's 50256 as bos/eos, and its vocab beside it."""
    vocab = tmp_path / "vocab.txt"
    tok = ChatTokenizer.from_dir(tiny_model_dir)
    tok.save_vocab(vocab)
    folder = gpt2_chitchat_folder(tmp_path / "old", tok.vocab_size, bos_token_id=50256,
                                  eos_token_id=50256)
    return folder, vocab, tok


def convert_cli(*args):
    return subprocess.run([sys.executable, "convert.py", *map(str, args)], cwd=ROOT, env=ENV,
                          text=True, capture_output=True, timeout=300)


@pytest.mark.slow
def test_convert_writes_a_complete_modern_folder(old, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from safetensors.torch import load_file

    folder, vocab, tok = old
    out = tmp_path / "new"
    p = convert_cli("--model_path", folder, "--vocab_path", vocab, "--output_path", out)
    assert p.returncode == 0, p.stderr
    assert "bos_token_id 50256 -> " in p.stdout and "wrote" in p.stdout
    for f in ("config.json", "model.safetensors", "generation_config.json", "vocab.txt",
              "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", CONVERT_MARKER):
        assert (out / f).is_file(), f
    assert not (out / "pytorch_model.bin").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (tok.cls_id, tok.sep_id, tok.pad_id)
    assert "n_ctx" not in config and "output_past" not in config
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.sep_id
    assert (out / "vocab.txt").read_text(encoding="utf-8") == vocab.read_text(encoding="utf-8")

    # The same weights: every tensor of the old state_dict, and the same logits.
    old_state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    new_state = load_file(out / "model.safetensors")
    for k, v in new_state.items():
        assert torch.equal(v, old_state[k]), k
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref, _ = modeling.load_model(folder, vocab_path=vocab)
    hf_tok = AutoTokenizer.from_pretrained(out)
    enc = hf_tok.apply_chat_template([{"role": "user", "content": "你好"}],
                                     add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")
    assert enc["input_ids"][0].tolist() == encode_context(tok, ["你好"])
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, ref(enc["input_ids"]).logits)


@pytest.mark.slow
def test_convert_replaces_its_own_output_and_refuses_other_folders(old, tmp_path):
    folder, vocab, _ = old
    out = tmp_path / "new"
    convert_folder(folder, out, vocab_path=vocab)
    stamp = (out / "config.json").stat().st_mtime_ns
    convert_folder(folder, out, vocab_path=vocab)  # its own folder: replaced whole
    assert (out / CONVERT_MARKER).is_file() and (out / "config.json").stat().st_mtime_ns >= stamp

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    p = convert_cli("--model_path", folder, "--vocab_path", vocab, "--output_path", mine)
    assert p.returncode == 2 and "refusing" in p.stderr and "Traceback" not in p.stderr
    assert [f.name for f in mine.iterdir()] == ["notes.txt"]

    with pytest.raises(ChitchatError, match="not a folder"):
        convert_folder(folder, mine / "notes.txt", vocab_path=vocab)
    with pytest.raises(ChitchatError, match="the model folder itself"):
        convert_folder(folder, folder, vocab_path=vocab)  # the source itself

    empty = tmp_path / "empty"
    empty.mkdir()
    convert_folder(folder, empty, vocab_path=vocab)
    assert (empty / "model.safetensors").is_file()


@pytest.mark.slow
def test_convert_errors_leave_no_output(old, tmp_path, monkeypatch):
    folder, vocab, _ = old
    out = tmp_path / "new"
    p = convert_cli("--model_path", folder, "--output_path", out)  # no vocab
    assert p.returncode == 2 and "--vocab_path" in p.stderr and not out.exists()
    p = convert_cli("--model_path", folder, "--vocab_path", vocab)
    assert p.returncode == 2 and "--output_path is required" in p.stderr

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(modeling, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_folder(folder, out, vocab_path=vocab)
    assert not out.exists() and [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


def test_the_output_may_not_hold_the_model_folder(old, tmp_path):
    folder, vocab, _ = old
    out = tmp_path / "new"
    convert_folder(folder, out, vocab_path=vocab)
    inner = out / "old_src"
    shutil.move(folder, inner)  # a converted folder (replaceable) now holds the source
    with pytest.raises(ChitchatError, match="holds .*old_src"):
        convert_folder(inner, out, vocab_path=vocab)
    with pytest.raises(ChitchatError, match="the model folder itself"):
        convert_folder(out, out, vocab_path=vocab)  # converted, yet still the source
    assert (inner / "pytorch_model.bin").is_file() and (out / CONVERT_MARKER).is_file()


class NotATensor:
    pass


def test_a_pickle_that_is_not_plain_tensors_is_refused(old, tmp_path):
    folder, vocab, _ = old
    torch.save({"x": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(ChitchatError, match="weights_only=True"):
        convert_folder(folder, tmp_path / "new", vocab_path=vocab)
    assert not (tmp_path / "new").exists()


def test_a_speaker_model_converts_with_a_note(tmp_path, tiny_model_dir):
    tok = ChatTokenizer.from_dir(tiny_model_dir)
    folder = gpt2_chitchat_folder(tmp_path / "spk", tok.vocab_size,
                                  speaker_token_ids=list(tok.speaker_ids()))
    notes = convert_folder(folder, tmp_path / "new", vocab_path=tiny_model_dir / "vocab.txt")
    assert any("speaker token types" in n for n in notes)
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["speaker_token_ids"] == list(tok.speaker_ids())
