"""Training: windows, packing, loss masking and normalisation, clipping, optimizer groups,
schedule, and in-process error handling. Tiny models on CPU."""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chitchat.config import TrainConfig, parse_config
from chitchat.batching import (build_windows, collate_rows, epoch_rows, pack_rows, plan_steps,
                               utterance_windows, window_example)
from chitchat.dialogue import speaker_token_types
from chitchat.modeling import build_model, load_config, save_model
from chitchat.store import TokenStore
from chitchat.budget import lr_factor
from chitchat.loss import LossModel
from chitchat.train_setup import param_groups
from chitchat.training import train, train_step
from chitchat.utils import ChitchatError


@pytest.fixture(scope="module")
def store(sample_store):
    return TokenStore(sample_store)


@pytest.fixture(scope="module")
def tiny_model(store, tiny_config_path):
    torch.manual_seed(0)
    return build_model(load_config(tiny_config_path, store.tokenizer())).eval()


def cfg_for(sample_store, tiny_config_path, tmp_path, **kw) -> TrainConfig:
    base = dict(train_path=str(sample_store), model_config=str(tiny_config_path),
                save_model_path=str(tmp_path / "runs"), run_name="r", max_len=64,
                batch_size=4, dtype="fp32", device="cpu", log_step=1, quiet=True,
                eval_interval=0)
    base.update(kw)
    return TrainConfig(**base)


# ---- windows ----------------------------------------------------------------------------
def check_windows(lens, max_len):
    wins = utterance_windows(lens, max_len)
    new = [k for _, t, e in wins for k in range(t, e)]
    assert new == list(range(len(lens))), "every utterance is new in exactly one window"
    for first, t, end in wins:
        assert first <= t < end
        if end - first > 1:  # whole utterances that fit (only a lone utterance is cut)
            assert 1 + sum(lens[first:end]) <= max_len
        if first < t:
            assert sum(lens[first:t]) <= (max_len - 1) // 2, "context is at most half"
    assert wins[-1][2] == len(lens), "the tail is kept"
    return wins


def test_windows_keep_tail_and_whole_utterances():
    assert utterance_windows([5, 6, 7], 50) == [(0, 0, 3)]
    wins = check_windows([10, 20, 5, 40, 8, 30], 50)
    assert wins[0] == (0, 0, 3)  # 1 + 35 tokens
    check_windows([60, 3, 3], 20)  # an over-long first utterance
    rng = np.random.default_rng(0)
    for _ in range(300):
        check_windows(list(rng.integers(2, 40, size=rng.integers(1, 15))),
                      int(rng.integers(8, 80)))


@pytest.mark.parametrize("loss_on", ["all", "response"])
def test_store_windows_cover_every_target_once(store, loss_on):
    """Concatenating the target tokens of a dialogue's windows gives back the dialogue
    (after [CLS], or after the first utterance for --loss_on response): nothing lost,
    nothing twice. max_len 16 forces most dialogues into several windows."""
    idx = np.arange(len(store))
    table = build_windows(store, idx, 16, loss_on)
    assert (table.lengths <= 16).all()
    got = {}
    for w in range(len(table)):
        ids, is_t, _ = window_example(store, table, w)
        assert ids[0] == store.tokenizer().cls_id and len(ids) <= 16
        got.setdefault(int(table.dialogue[w]), []).extend(ids[is_t].tolist())
    spans_long = 0
    for d in idx:
        dia = store.dialogue(d).astype(np.int64)
        spans = store.utterance_spans(d)
        if max(b - a for a, b in spans) > 15:
            spans_long += 1
            continue  # a single utterance longer than a window is cut by design
        start = 1 if loss_on == "all" else spans[0][1]
        assert got.get(int(d), []) == dia[start:].tolist(), d
    assert spans_long < len(store) // 4
    if loss_on == "all":  # what the windows leave out is exactly what cut_tokens counts
        left_out = sum(len(store.dialogue(d)) - 1 for d in idx) - sum(map(len, got.values()))
        assert left_out == int(table.cut_tokens.sum()) > 0
        assert int((table.cut_tokens > 0).sum()) == spans_long_utterances(store, idx, 16)


def spans_long_utterances(store, idx, max_len) -> int:
    """Utterances (with their [SEP]) that do not fit a window after [CLS]."""
    return sum(b - a > max_len - 1 for d in idx for a, b in store.utterance_spans(d))


def test_speaker_token_types():
    s = (5, 6)
    assert speaker_token_types([2, 3], 0, s).tolist() == [5, 5, 5, 6, 6, 6]
    assert speaker_token_types([2], 1, s).tolist() == [6, 6, 6]
    assert speaker_token_types([2], 0, s, total_len=5).tolist() == [5, 5, 5, 6, 6]


# ---- packing ------------------------------------------------------------------------------
def test_pack_rows_is_complete_and_fits():
    lengths = np.array([30, 50, 20, 64, 10, 5, 40, 33])
    rows = pack_rows(np.arange(8), lengths, 64, open_rows=3)
    assert sorted(w for r in rows for w in r) == list(range(8))
    assert all(lengths[r].sum() <= 64 for r in rows)
    with pytest.raises(ValueError):
        pack_rows([0], np.array([65]), 64)


def test_plan_steps_spreads_the_last_step_over_ranks(store):
    table = build_windows(store, store.train_indices(), 64)
    rows = epoch_rows(table, 0, 1, "pack", 64)
    steps = plan_steps(rows, table, batch_size=3, accum=2, world=2)
    assert all(len(s.micro) == 2 and all(len(r) == 2 for r in s.micro) for s in steps)
    seen = [w for s in steps for r in s.micro for m in r for row in m for w in row]
    assert sorted(seen) == list(range(len(table)))
    assert sum(s.n_targets for s in steps) == int(table.n_targets.sum())
    assert epoch_rows(table, 3, 1, "pack", 64) == epoch_rows(table, 3, 1, "pack", 64)
    assert epoch_rows(table, 3, 1, "pack", 64) != epoch_rows(table, 4, 1, "pack", 64)


def separate_logits(model, ids, types=None):
    with torch.no_grad():
        x = torch.tensor(ids)[None]
        tt = None if types is None else torch.tensor(types)[None]
        return model(input_ids=x, token_type_ids=tt).logits[0]


@pytest.mark.slow
@pytest.mark.parametrize("speakers", [False, True])
def test_packed_logits_equal_per_dialogue_logits(store, tiny_model, speakers):
    """The block-diagonal 4D mask and restarted positions make a packed row compute exactly
    what running each dialogue alone computes (so transformers honours the mask with SDPA)."""
    assert tiny_model.config._attn_implementation == "sdpa"
    spk = store.tokenizer().speaker_ids() if speakers else None
    # windows of <= 24 tokens (long dialogues split) in rows of 96: rows hold several
    # windows, and rows longer than n_positions (64) work as positions restart
    table = build_windows(store, store.train_indices()[:40], 24)
    rows = pack_rows(np.arange(len(table)), table.lengths, 96)
    multi = [r for r in rows if len(r) >= 3][:3]
    assert multi, "some rows must hold several dialogues"
    mb = collate_rows(store, table, multi, store.tokenizer().pad_id, 96, spk)
    assert mb["attention_mask"].shape == (len(multi), 1, 96, 96)
    with torch.no_grad():
        packed = tiny_model(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                            attention_mask=mb["attention_mask"],
                            token_type_ids=mb.get("token_type_ids")).logits
    for b, row in enumerate(multi):
        p = 0
        for w in row:
            ids, _, types = window_example(store, table, w, spk)
            alone = separate_logits(tiny_model, ids, types)
            torch.testing.assert_close(packed[b, p:p + len(ids)], alone, atol=2e-5, rtol=1e-4)
            p += len(ids)
    # without the mask the second window would see the first: the test can tell
    with torch.no_grad():
        leaky = tiny_model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).logits
    n0 = int(table.lengths[multi[0][0]])
    assert not torch.allclose(leaky[0, n0:n0 + 3], packed[0, n0:n0 + 3], atol=1e-3)


# ---- loss ---------------------------------------------------------------------------------
def direct_loss(model, store, table, windows, loss_on):
    """Sum of token losses and target count, one dialogue at a time, from the raw store:
    target = every token after [CLS] (all) or after the first utterance (response)."""
    total, count = 0.0, 0
    for w in windows:
        d = int(table.dialogue[w])
        ids = store.dialogue(d).astype(np.int64)
        assert len(ids) <= table.max_len
        first = 1 if loss_on == "all" else store.utterance_spans(d)[0][1]
        logits = separate_logits(model, ids)
        lp = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        total += float(lp[first - 1:].sum())
        count += len(ids) - first
    return total, count


@pytest.mark.slow
@pytest.mark.parametrize("loss_on", ["all", "response"])
def test_loss_masking_matches_direct_computation(store, tiny_model, loss_on):
    table = build_windows(store, store.train_indices()[:30], 64, loss_on)
    rows = pack_rows(np.arange(len(table)), table.lengths, 128)[:4]
    assert max(len(r) for r in rows) > 1
    mb = collate_rows(store, table, rows, store.tokenizer().pad_id, 128)
    pad = store.tokenizer().pad_id
    assert (mb["input_ids"] == pad).any(), "the rows have padding, which must not count"
    with torch.no_grad():
        got = LossModel(tiny_model)(**{k: v for k, v in mb.items() if k != "n_tokens"})
    want, count = direct_loss(tiny_model, store, table, [w for r in rows for w in r], loss_on)
    assert len(mb["target_ids"]) == count
    assert not (mb["target_ids"] == pad).any()
    assert float(got) / count == pytest.approx(want / count, abs=1e-5)


def one_step(model, micro, n_targets, max_grad_norm=0.0, lr=1.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss, norm = train_step(LossModel(model), None, model, opt, micro, n_targets, 1,
                            torch.autocast("cpu", enabled=False), None, max_grad_norm,
                            torch.device("cpu"))
    return loss, norm


@pytest.mark.slow
def test_accumulation_normalises_by_all_targets_of_the_step(store, tiny_config_path):
    """Two micro-batches of very different target counts give exactly the gradient of one
    batch holding both: sum of token losses / total targets, not a mean of means."""
    tok = store.tokenizer()
    table = build_windows(store, store.train_indices()[:40], 64)
    rows = pack_rows(np.arange(len(table)), table.lengths, 128)
    a, b = rows[:1], rows[1:6]
    n = int(sum(table.n_targets[w] for r in a + b for w in r))

    def fresh():
        torch.manual_seed(0)
        return build_model(load_config(tiny_config_path, tok))

    m1, m2, m3 = fresh(), fresh(), fresh()
    col = lambda r: collate_rows(store, table, r, tok.pad_id, 128)
    l1, _ = one_step(m1, [col(a), col(b)], n)
    l2, _ = one_step(m2, [col(a + b)], n)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)
    # a mean of per-micro-batch means would differ: the comparison is sensitive
    ca, cb = col(a), col(b)
    na, nb = len(ca["target_ids"]), len(cb["target_ids"])
    one_step(m3, [ca], na * 2)  # weight 1/(2 na) ...
    one_step(m3, [cb], nb * 2)  # ... and 1/(2 nb): (mean_a + mean_b) / 2
    diff = max(float((p1 - p3).detach().abs().max()) for p1, p3 in zip(m1.parameters(),
                                                              m3.parameters()))
    assert diff > 1e-4


def test_clip_once_per_optimizer_step(store, tiny_config_path, monkeypatch):
    tok = store.tokenizer()
    table = build_windows(store, store.train_indices()[:40], 64)
    rows = pack_rows(np.arange(len(table)), table.lengths, 64)
    micro = [collate_rows(store, table, rows[i:i + 1], tok.pad_id, 64) for i in range(4)]
    n = sum(len(m["target_ids"]) for m in micro)
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        calls.append(sum(float(p.grad.abs().sum()) for p in params if p.grad is not None))
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    torch.manual_seed(0)
    model = build_model(load_config(tiny_config_path, tok))
    loss, norm = one_step(model, micro, n, max_grad_norm=0.01, lr=0.0)
    assert len(calls) == 1, "one clip per optimizer step, after all 4 micro-batches"
    assert float(norm) > 0.01  # pre-clip norm is reported


def test_no_weight_decay_on_biases_layernorm_embeddings(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    dec = {names[id(p)] for p in decay["params"]}
    nod = {names[id(p)] for p in no_decay["params"]}
    assert dec and all(n.endswith(".weight") and (".attn." in n or ".mlp." in n) for n in dec)
    assert {"transformer.wte.weight", "transformer.wpe.weight",
            "transformer.ln_f.weight", "transformer.ln_f.bias"} <= nod
    assert all("ln_" in n or n.endswith("bias") or n.split(".")[1] in ("wte", "wpe")
               for n in nod)
    assert len(dec) + len(nod) == len(list(tiny_model.parameters()))


def test_schedule_values():
    # warmup 4 steps: 1/4, 2/4, 3/4, 1; decay starts from 1 at step 4, 0 at step 14
    assert [lr_factor(s, 4, 14) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.9]
    assert lr_factor(9, 4, 14) == pytest.approx(0.5)
    assert lr_factor(14, 4, 14) == 0.0 and lr_factor(20, 4, 14) == 0.0
    assert lr_factor(4, 4, 14, "cosine") == 1.0
    assert lr_factor(9, 4, 14, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 4, 14, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(0, 0, 10) == 1.0


# ---- config and input errors ------------------------------------------------------------
def test_utterances_cut_to_max_len_are_pointed_out(sample_store, tiny_config_path, tmp_path,
                                                   store):
    """A single utterance longer than a window is the one thing training cuts: train.py
    says how many and how many tokens, and says nothing when none is cut."""
    idx = np.arange(len(store))
    assert spans_long_utterances(store, idx, 16) > 0
    assert spans_long_utterances(store, idx, 64) == 0
    for name, max_len in (("short", 16), ("fits", 64)):
        train(cfg_for(sample_store, tiny_config_path, tmp_path, run_name=name, max_steps=1,
                      max_len=max_len, val_num=0))
    said = (tmp_path / "runs" / "short" / "train.log").read_text()
    assert re.search(r"[1-9][\d,]* utterances do not fit a window of --max_len 16 on their "
                     r"own and are cut to it \([1-9][\d,]* tokens never trained on\)", said)
    assert "are cut" not in (tmp_path / "runs" / "fits" / "train.log").read_text()


def test_warmup_longer_than_the_run_is_pointed_out(sample_store, tiny_config_path, tmp_path):
    for name, warmup in (("long", 10), ("fits", 1)):
        train(cfg_for(sample_store, tiny_config_path, tmp_path, run_name=name, max_steps=3,
                      warmup_steps=warmup))
    said = (tmp_path / "runs" / "long" / "train.log").read_text()
    assert "--warmup_steps 10 is not below the run's 3 steps" in said and "30% of --lr" in said
    assert "--warmup_steps" not in (tmp_path / "runs" / "fits" / "train.log").read_text()


def test_config_rejects_bad_combinations(capsys):
    for argv, msg in [(["--pack_len", "10", "--max_len", "20"], "--pack_len 10"),
                      (["--no_cuda", "--device", "cuda"], "--no_cuda"),
                      (["--val_num", "5", "--val_fraction", "0.1"], "not both"),
                      (["--dtype", "fp16", "--device", "cpu"], "fp16"),
                      (["--batching", "bucket"], "invalid choice")]:
        with pytest.raises(SystemExit):
            parse_config(TrainConfig, argv)
        assert msg in capsys.readouterr().err


def test_missing_store_says_how_to_build_it(tmp_path, tiny_config_path):
    cfg = cfg_for(tmp_path / "nope", tiny_config_path, tmp_path)
    with pytest.raises(ChitchatError, match="preprocess.py"):
        train(cfg)


def test_bad_config_key(sample_store, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_layer": 2, "n_embd": 64, "n_head": 2, "n_layers": 3}))
    with pytest.raises(ChitchatError, match="n_layers"):
        train(cfg_for(sample_store, bad, tmp_path))


def test_max_len_over_positions(sample_store, tiny_config_path, tmp_path):
    with pytest.raises(ChitchatError, match="n_positions 64"):
        train(cfg_for(sample_store, tiny_config_path, tmp_path, max_len=100))


def test_pretrained_vocab_mismatch_names_both_sizes(sample_store, tiny_config_path, tmp_path):
    from chitchat.tokenization import ChatTokenizer
    tok = TokenStore(sample_store).tokenizer()
    other = ChatTokenizer(tok.tokens + ["extra1", "extra2", "extra3"])
    model = build_model(load_config(tiny_config_path, other))
    save_model(model, other, tmp_path / "m")
    cfg = cfg_for(sample_store, tiny_config_path, tmp_path, pretrained_model=str(tmp_path / "m"))
    with pytest.raises(ChitchatError) as e:
        train(cfg)
    msg = str(e.value)
    assert str(tok.vocab_size + 3) in msg and str(tok.vocab_size) in msg
    assert f"preprocess.py --train_path <train.txt> --pretrained_model {tmp_path / 'm'}" in msg


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(sample_store, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    run = cfg_for(sample_store, "unused.json", tmp_path, pretrained_model=str(tiny_model_dir),
                  max_steps=4, save_interval=2)
    train(run)
    ckpts = sorted((tmp_path / "runs" / "r" / "checkpoints").iterdir())
    assert [p.name for p in ckpts][-1] == "step-00000004"
    # now a model whose weights hold a NaN: the loss is NaN at once
    bad = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, bad)
    w = load_file(bad / "model.safetensors")
    w["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = cfg_for(sample_store, "unused.json", tmp_path, pretrained_model=str(bad),
                  run_name="nan", max_steps=6, save_interval=1, log_step=3)
    with pytest.raises(ChitchatError, match="NaN or inf") as e:
        train(cfg)
    assert "No checkpoint was saved" in str(e.value)
    assert not (tmp_path / "runs" / "nan" / "checkpoints").exists()


def test_early_stopping_with_patience(sample_store, tiny_config_path, tmp_path, monkeypatch):
    import chitchat.training as tr
    losses = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9])
    monkeypatch.setattr(tr, "validate", lambda *a, **k: {"loss": next(losses), "ppl": 1.0,
                                                         "targets": 1})
    run = train(cfg_for(sample_store, tiny_config_path, tmp_path, max_steps=50,
                        eval_interval=1, patience=2))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in recs) == 4, "evals 3 and 4 did not improve on 4.0"
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 2
    assert "step-00000004" in [p.name for p in (run / "checkpoints").iterdir()]


def test_val_num_resplits_deterministically(sample_store, tiny_config_path, tmp_path):
    from chitchat.store import resplit
    store = TokenStore(sample_store)
    tr1, va1 = resplit(store, 50, None, 7)
    tr2, va2 = resplit(store, 50, None, 7)
    assert len(va1) == 50 and (va1 == va2).all() and len(tr1) + len(va1) == len(store)
    tr0, va0 = resplit(store, None, None, 7)
    assert (va0 == store.valid_indices()).all()
    with pytest.raises(ChitchatError, match="--val_num"):
        resplit(store, len(store), None, 7)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_attention_kernel_is_found_and_dropout_decides_it(sample_store, tmp_path, p):
    """train.py logs the SDPA kernel its attention runs: on a CPU, attention dropout forces
    the unfused math path, and without it the fused kernel runs (torch 2.x)."""
    from chitchat.modeling import build_model, load_config
    from chitchat.precision import attention_kernel, autocast_ctx

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_positions": 64, "n_embd": 64,
                               "n_head": 2, "n_layer": 2, "attn_pdrop": p}))
    model = build_model(load_config(cfg, TokenStore(sample_store).tokenizer()))
    cpu = torch.device("cpu")
    for dtype in ("fp32", "bf16"):
        kernel = attention_kernel(model, cpu, autocast_ctx(dtype, cpu))
        assert kernel.startswith("_scaled_dot_product_")
        assert ("math" in kernel) == (p > 0), (dtype, kernel)


@pytest.mark.slow
def test_dropout_kernels_train_alike_and_say_so(sample_store, tmp_path):
    """--dropout_kernel cheap (the CPU default) only changes how masks are drawn: with every
    dropout rate 0 it trains exactly as native; train.log says which attention runs; the
    saved model is a plain GPT-2 either way."""
    def run(kernel, p, name):
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps({"model_type": "gpt2", "n_positions": 64, "n_embd": 64,
                                   "n_head": 2, "n_layer": 2, "attn_pdrop": p,
                                   "resid_pdrop": p, "embd_pdrop": p}))
        train(cfg_for(sample_store, cfg, tmp_path, run_name=name, max_steps=3,
                      dropout_kernel=kernel))
        out = tmp_path / "runs" / name
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                         .splitlines()) if "loss" in r]
        return out, losses

    (_, native), (out, cheap) = run("native", 0.0, "n0"), run("cheap", 0.0, "c0")
    assert len(native) == 3 and native == pytest.approx(cheap, abs=1e-6)
    out, dropped = run("cheap", 0.1, "c1")
    assert all(math.isfinite(x) for x in dropped) and dropped != pytest.approx(cheap)
    log = (out / "train.log").read_text()
    assert "cheap dropout masks" in log and "math path" in log and "blocks of" in log
    _, nat = run("native", 0.1, "n1")
    assert "SDPA's unfused path" in (tmp_path / "runs" / "n1" / "train.log").read_text()
    model_dir = next(p for p in out.rglob("config.json") if (p.parent / "model.safetensors")
                     .exists()).parent
    assert "chitchat" not in (model_dir / "config.json").read_text()


@pytest.mark.slow
def test_bf16_trains_as_fp32_does_within_bf16_tolerance(sample_store, tmp_path):
    """--dtype bf16 (what --dtype auto picks on a CPU with AVX512-BF16 or AMX) changes only
    the precision of the forward and backward: the same seed, data and dropout masks give
    the fp32 run's losses to within bf16's rounding, step by step and at validation."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_positions": 64, "n_embd": 64,
                               "n_head": 2, "n_layer": 2}))  # GPT-2's dropout 0.1 everywhere

    def run(dtype):
        train(cfg_for(sample_store, cfg, tmp_path, run_name=dtype, dtype=dtype, max_steps=8,
                      lr=1e-3))
        rows = [json.loads(l) for l in
                (tmp_path / "runs" / dtype / "metrics.jsonl").read_text().splitlines()]
        return ([r["loss"] for r in rows if "loss" in r],
                [r["val_loss"] for r in rows if "val_loss" in r])

    (f_loss, f_val), (b_loss, b_val) = run("fp32"), run("bf16")
    assert len(f_loss) == 8 and len(f_val) == 1
    assert f_loss[-1] < f_loss[0] - 0.2  # it learns, so the comparison is not of noise
    # bf16 keeps 8 significant bits (rounding up to 2^-8 relative); a loss averages tokens
    assert b_loss == pytest.approx(f_loss, rel=5e-3)
    assert b_val == pytest.approx(f_val, rel=5e-3)
    assert b_loss != f_loss  # the bf16 run did compute in bf16


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_a_plain_model(monkeypatch, sample_store,
                                                                 tiny_config_path, tmp_path):
    """--compile wraps the loss model in torch.compile: the same steps give the same losses
    (to float rounding: inductor fuses the elementwise work), the run resumes, and the saved
    folder is the plain model (no compiled wrapper's `_orig_mod.` names in it)."""
    from safetensors import safe_open

    def losses(name):
        return [r["loss"] for r in map(json.loads, (tmp_path / "runs" / name / "metrics.jsonl")
                                       .read_text().splitlines()) if "loss" in r]

    compiles, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiles.append(1) or real(m, **kw))
    for name, compiled in (("eager", False), ("compiled", True)):  # 2 steps, then resumed
        train(cfg_for(sample_store, tiny_config_path, tmp_path, run_name=name, max_steps=2,
                      compile=compiled, save_interval=2))
        train(cfg_for(sample_store, tiny_config_path, tmp_path, run_name=name, max_steps=4,
                      compile=compiled, resume="auto"))
    assert len(compiles) == 2 and len(losses("compiled")) == 4
    assert "torch.compile" in (tmp_path / "runs" / "compiled" / "train.log").read_text()
    assert "torch.compile" not in (tmp_path / "runs" / "eager" / "train.log").read_text()
    assert losses("compiled") == pytest.approx(losses("eager"), rel=1e-4)
    with safe_open(tmp_path / "runs" / "compiled" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and not any("_orig_mod" in n for n in names)
    with safe_open(tmp_path / "runs" / "eager" / "model.safetensors", "pt") as f:
        assert sorted(names) == sorted(f.keys())


# ---- the fused LM head and loss -----------------------------------------------------------
def plain_head_loss(hidden, head, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def head_grads(fn, hidden, head, targets, amp, scale=0.37):
    hidden.grad = head.weight.grad = None
    with amp:
        loss = fn(hidden, head, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_head_loss_equals_cross_entropy_of_the_head(monkeypatch, dtype):
    """The fused head and loss give the plain form's loss and gradients, over several
    chunks of rows with a short last one, the loss's scale applied."""
    import chitchat.loss as loss_mod
    monkeypatch.setattr(loss_mod, "CHUNK_FLOATS", 3 * 53 + 7)  # 3 rows of 53 per chunk
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 53, bias=False)
    hidden = torch.randn(11, 16, requires_grad=True)  # chunks of 3, 3, 3, 2 rows
    targets = torch.randint(0, 53, (11,))
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16"
           else torch.autocast("cpu", enabled=False))
    want = head_grads(plain_head_loss, hidden, head, targets, amp)
    got = head_grads(loss_mod.head_loss, hidden, head, targets, amp)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    torch.testing.assert_close(got[2], want[2], **tol)


def test_head_loss_is_exact_where_the_targets_probability_underflows():
    """A target 600 below the top logit has probability 0 in fp32; its loss is still 600
    (the log-sum-exp comes from the top probability, not from the target's)."""
    import chitchat.loss as loss_mod
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 1.0], [-100.0, 0.0]]))
    hidden = torch.tensor([[3.0, 0.0], [0.0, 2.0]], requires_grad=True)  # logits +-300; 0, 2
    targets = torch.tensor([2, 1])
    amp = torch.autocast("cpu", enabled=False)
    want = head_grads(plain_head_loss, hidden, head, targets, amp)
    got = head_grads(loss_mod.head_loss, hidden, head, targets, amp)
    assert 600 < float(want[0]) < 601  # 600 + log(2 + e^2) - 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_head_loss_without_gradients_is_the_plain_form():
    """Validation (no_grad) and a frozen input take the plain path or skip its gradient."""
    import chitchat.loss as loss_mod
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        assert float(loss_mod.head_loss(hidden, head, targets)) == pytest.approx(
            float(plain_head_loss(hidden, head, targets)), rel=1e-6)
    loss_mod.head_loss(hidden, head, targets).backward()  # hidden needs no gradient
    head.weight.grad, want = None, head.weight.grad
    plain_head_loss(hidden, head, targets).backward()
    torch.testing.assert_close(want, head.weight.grad, rtol=1e-5, atol=1e-6)


def test_loss_model_gradients_with_the_fused_head(store, tiny_config_path, monkeypatch):
    """Through a whole GPT-2 (LM head tied to the embedding), the training loss and every
    parameter's gradient are the plain cross-entropy's."""
    import chitchat.loss as loss_mod
    table = build_windows(store, store.train_indices()[:20], 64)
    rows = pack_rows(np.arange(len(table)), table.lengths, 128)[:3]
    mb = collate_rows(store, table, rows, store.tokenizer().pad_id, 128)
    mb = {k: v for k, v in mb.items() if k != "n_tokens"}
    torch.manual_seed(0)
    model = build_model(load_config(tiny_config_path, store.tokenizer())).eval()
    assert model.lm_head.weight is model.transformer.wte.weight

    def run():
        model.zero_grad(set_to_none=True)
        loss = LossModel(model)(**mb)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_loss, fused = run()
    monkeypatch.setattr(loss_mod, "head_loss", plain_head_loss)
    plain_loss, plain = run()
    assert float(fused_loss) == pytest.approx(float(plain_loss), rel=1e-6)
    for name in plain:
        scale = float(plain[name].abs().max())  # a sum over every target: large gradients
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-6 * scale,
                                   msg=name)
