"""CPU float32 products by oneDNN or BLAS (--fp32_matmul): the decision, where the switch is
on, a resumed run keeping its library, and training with oneDNN's products as with BLAS's."""
from __future__ import annotations

import json

import pytest
import torch

from chitchat import train_setup, training
from chitchat.precision import EXACT_REL_ERROR, fp32_matmul, pick_fp32_matmul, probe_onednn_fp32
from chitchat.utils import ChitchatError
from test_train import cfg_for

AMD, INTEL = "AuthenticAMD", "GenuineIntel"
EXACT = (True, 3e-7)  # the probe's answer where oneDNN takes fp32 products in full fp32


def never():
    raise AssertionError("the probe ran although the answer did not depend on it")


# ---- the decision ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, device, dtype, exact, vendor, probe, kept, expected", [
    ("auto", "cpu", "fp32", False, AMD, EXACT, None, "onednn"),
    ("auto", "cpu", "fp32", False, INTEL, None, None, "blas"),    # MKL's own CPUs
    ("auto", "cpu", "fp32", False, "unknown", None, None, "blas"),
    ("auto", "cpu", "bf16", False, AMD, None, None, "blas"),      # autocast: oneDNN already
    ("auto", "cuda", "fp32", False, AMD, None, None, "blas"),
    ("auto", "cpu", "fp32", True, AMD, None, None, "blas"),       # --exact_fp32
    ("auto", "cpu", "fp32", False, AMD, (True, 3e-3), None, "blas"),   # bf16 inside (AMX)
    ("auto", "cpu", "fp32", False, AMD, (False, 1e-7), None, "blas"),  # switch does nothing
    ("onednn", "cpu", "fp32", False, INTEL, EXACT, None, "onednn"),
    ("blas", "cpu", "fp32", False, AMD, None, None, "blas"),
    # a resumed run keeps its library under auto; a named library wins over it
    ("auto", "cpu", "fp32", False, INTEL, EXACT, "onednn", "onednn"),
    ("auto", "cpu", "fp32", False, AMD, None, "blas", "blas"),
    ("auto", "cpu", "fp32", False, INTEL, (True, 3e-3), "onednn", "blas"),  # no longer exact
    ("onednn", "cpu", "fp32", False, AMD, EXACT, "blas", "onednn"),
    ("blas", "cpu", "fp32", False, AMD, None, "onednn", "blas"),
])
def test_pick_fp32_matmul(name, device, dtype, exact, vendor, probe, kept, expected):
    ask = (lambda: probe) if probe else never
    assert pick_fp32_matmul(name, device, dtype, exact, vendor, ask, kept) == expected


@pytest.mark.parametrize("probe, exact, message", [
    ((True, 3e-3), False, "not exact fp32"),
    ((False, 1e-7), False, "keeps float32 products on BLAS"),
    (EXACT, True, "exclude each other"),
])
def test_asking_for_onednn_where_it_cannot_serve_says_why(probe, exact, message):
    with pytest.raises(ChitchatError, match=message):
        pick_fp32_matmul("onednn", "cpu", "fp32", exact, AMD, lambda: probe)


# ---- the switch --------------------------------------------------------------------------------
def test_the_switch_is_on_only_inside_and_blas_leaves_the_setting_alone():
    knob = torch.backends.mkldnn.matmul
    before = knob.fp32_precision
    with fp32_matmul("blas"):
        assert knob.fp32_precision == before
    with pytest.raises(KeyError):
        with fp32_matmul("onednn"):
            assert knob.fp32_precision == "bf16"
            raise KeyError("a failing step")
    assert knob.fp32_precision == before
    torch.get_float32_matmul_precision()  # raises if the two precision APIs were left mixed


def test_the_probe_gives_one_answer_and_onednn_is_exact_where_it_takes_the_products():
    routed, err = probe_onednn_fp32()
    assert probe_onednn_fp32() == (routed, err)
    if not routed:
        pytest.skip("oneDNN does not take float32 products on this CPU")
    if err > EXACT_REL_ERROR:
        pytest.skip(f"oneDNN computes float32 products in bf16 here ({err:.1e})")
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 768, generator=g), torch.randn(768, 300, generator=g)
    with fp32_matmul("onednn"):
        got = x @ w
    torch.testing.assert_close(got, x @ w, atol=1e-4, rtol=1e-5)


# ---- in training -------------------------------------------------------------------------------
def test_training_runs_its_steps_under_the_chosen_library_and_a_resume_keeps_it(
        monkeypatch, sample_store, tiny_config_path, tmp_path):
    monkeypatch.setattr(train_setup, "cpu_vendor", lambda: AMD)  # auto -> oneDNN
    monkeypatch.setattr(train_setup, "probe_onednn_fp32", lambda: EXACT)
    seen = []
    step = training.train_step

    def spy(*a, **kw):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return step(*a, **kw)

    monkeypatch.setattr(training, "train_step", spy)
    before = torch.backends.mkldnn.matmul.fp32_precision

    def state(run):
        last = sorted((run / "checkpoints").iterdir())[-1]
        return json.loads((last / "trainer_state.json").read_text())["fp32_matmul"]

    run = training.train(cfg_for(sample_store, tiny_config_path, tmp_path, max_steps=3))
    assert seen == ["bf16"] * 3 and state(run) == "onednn"
    assert "(fp32 products by oneDNN)" in (run / "train.log").read_text()
    assert torch.backends.mkldnn.matmul.fp32_precision == before

    seen.clear()  # resumed on a CPU where auto alone would say BLAS: it keeps oneDNN
    monkeypatch.setattr(train_setup, "cpu_vendor", lambda: INTEL)
    training.train(cfg_for(sample_store, tiny_config_path, tmp_path, max_steps=4,
                           resume="auto"))
    assert seen == ["bf16"] and state(run) == "onednn"
    monkeypatch.setattr(train_setup, "cpu_vendor", lambda: AMD)

    seen.clear()  # begun with --fp32_matmul blas: the resumed run keeps the option
    run = training.train(cfg_for(sample_store, tiny_config_path, tmp_path, max_steps=2,
                                 run_name="b", fp32_matmul="blas"))
    training.train(cfg_for(sample_store, tiny_config_path, tmp_path, max_steps=4,
                           run_name="b", resume="auto"))
    assert seen == [before] * 4 and state(run) == "blas"
    assert "(fp32 products by BLAS)" in (run / "train.log").read_text()

    seen.clear()  # begun in bf16, the library did not apply: resumed in fp32, auto decides
    run = training.train(cfg_for(sample_store, tiny_config_path, tmp_path, max_steps=1,
                                 run_name="c", dtype="bf16"))
    assert state(run) is None
    training.train(cfg_for(sample_store, tiny_config_path, tmp_path, max_steps=2,
                           run_name="c", resume="auto"))
    assert seen == [before, "bf16"] and state(run) == "onednn"


WIDE = {"model_type": "gpt2", "n_positions": 64, "n_embd": 256, "n_head": 4, "n_layer": 2,
        "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}


def test_training_with_onednn_products_gives_blas_losses(sample_store, tmp_path):
    """Real products, not faked, in a model wide enough that the libraries' sums differ
    (the logged losses can still come out bit-equal: on one CPU they did, with logits
    ~1e-6 apart)."""
    routed, err = probe_onednn_fp32()
    if not routed or err > EXACT_REL_ERROR:
        pytest.skip("oneDNN does not compute float32 products in full fp32 on this CPU")
    config = tmp_path / "wide.json"
    config.write_text(json.dumps(WIDE))
    losses = {}
    for lib in ("blas", "onednn"):
        run = training.train(cfg_for(sample_store, config, tmp_path, max_steps=6, lr=1e-3,
                                     eval_interval=3, run_name=lib, fp32_matmul=lib))
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses[lib] = [r["loss"] if r["event"] == "train" else r["val_loss"] for r in recs
                       if r["event"] in ("train", "eval")]
        assert f"(fp32 products by {'oneDNN' if lib == 'onednn' else 'BLAS'})" in \
            (run / "train.log").read_text()
    assert len(losses["blas"]) == 8  # 6 steps, 2 validations
    for a, b in zip(losses["onednn"], losses["blas"]):
        assert abs(a - b) <= 1e-4 * abs(b), (losses["onednn"], losses["blas"])
