"""Shared fixtures: a tiny vocab, token store and model, built once per test session."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = ROOT / "data" / "sample" / "train.txt"

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CONFIG = {"model_type": "gpt2", "n_positions": 64, "n_embd": 64, "n_head": 2,
               "n_layer": 2, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}


def shared_path(*parts) -> Path:
    """A file under ../shared, or skip the test cleanly when it is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"../shared not available ({'/'.join(parts)})")
    return p


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> Path:
    """The sample corpus preprocessed with a vocab built from it."""
    from chitchat.config import PreprocessConfig
    from chitchat.preprocessing import preprocess

    out = tmp_path_factory.mktemp("store") / "sample"
    preprocess(PreprocessConfig(train_path=str(SAMPLE), save_path=str(out), val_num=20,
                                quiet=True))
    return out


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("config") / "tiny.json"
    p.write_text(json.dumps(TINY_CONFIG))
    return p


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_store, tiny_config_path) -> Path:
    """An untrained 2-layer, 64-wide model folder on the sample vocab (seeded)."""
    import torch
    from chitchat.store import TokenStore
    from chitchat.modeling import build_model, load_config, save_model

    torch.manual_seed(0)
    tok = TokenStore(sample_store).tokenizer()
    model = build_model(load_config(tiny_config_path, tok))
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="session")
def reverse_dir(tmp_path_factory, sample_store, tiny_config_path) -> Path:
    """A tiny random reverse model (MMI) on the sample vocab, seeded apart from the forward."""
    import torch
    from chitchat.store import TokenStore
    from chitchat.modeling import build_model, load_config, save_model, set_reverse

    torch.manual_seed(1)
    tok = TokenStore(sample_store).tokenizer()
    model = build_model(load_config(tiny_config_path, tok))
    set_reverse(model.config, True)
    out = tmp_path_factory.mktemp("model") / "tiny-reverse"
    save_model(model, tok, out)
    return out


def gpt2_chitchat_folder(path, vocab_size: int, **config):
    """A folder laid out as GPT2-chitchat saved its models: config.json (with n_ctx; extra
    keys from `config`) and pytorch_model.bin holding the old attention-mask buffers; no
    tokenizer files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg)
    path.mkdir()
    raw = {"architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
           "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "n_ctx": 64, "n_embd": 32,
           "n_head": 2, "n_layer": 2, "n_positions": 64, "output_past": True,
           "vocab_size": vocab_size, "model_type": "gpt2", **config}
    (path / "config.json").write_text(json.dumps(raw))
    state = model.state_dict()
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path / "pytorch_model.bin")
    return path
