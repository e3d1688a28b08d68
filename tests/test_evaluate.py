"""evaluate.py: perplexity against a direct computation, and the CLI end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chitchat.config import EvaluateConfig
from chitchat.batching import build_windows, window_example
from chitchat.store import ReversedStore, TokenStore
from chitchat.evaluation import perplexity
from chitchat.modeling import load_model

from conftest import ROOT, SAMPLE

KEYS = {"replies", "bleu_1", "bleu_2", "bleu_4", "distinct_1", "distinct_2",
        "mean_reply_length", "repeats_context", "char_run_4", "empty"}


def direct_ppl(model, store, indices, max_len, loss_on):
    """exp(sum NLL / targets), one window at a time through the plain HF forward."""
    table = build_windows(store, indices, max_len, loss_on)
    nll, n = 0.0, 0
    for w in range(len(table)):
        ids, is_t, _ = window_example(store, table, w)
        with torch.no_grad():
            lp = model(torch.from_numpy(ids)[None]).logits[0].double().log_softmax(-1)
        for j in np.flatnonzero(is_t):
            nll -= float(lp[j - 1, ids[j]])
            n += 1
    return math.exp(nll / n), n


@pytest.mark.slow
@pytest.mark.parametrize("loss_on,max_len", [("all", 64), ("response", 24)])
def test_perplexity_matches_a_direct_computation(sample_store, tiny_model_dir, loss_on,
                                                 max_len):
    model, tok = load_model(tiny_model_dir)
    store = TokenStore(sample_store)
    idx = np.arange(30)
    ref, n = direct_ppl(model, store, idx, max_len, loss_on)
    got = perplexity(model, store, idx, max_len, loss_on, batch_size=3, device="cpu",
                     pad_id=tok.pad_id)
    assert got["targets"] == n
    assert got["ppl"] == pytest.approx(ref, rel=1e-4)
    assert got["cut_tokens"] == sum(max(0, 1 + b - a - max_len) for d in idx
                                    for a, b in store.utterance_spans(d))
    # the reverse order (a reverse model's perplexity) goes through the same code
    rev = ReversedStore(store)
    ref_r, _ = direct_ppl(model, rev, idx, max_len, loss_on)
    got_r = perplexity(model, rev, idx, max_len, loss_on, 3, "cpu", tok.pad_id)
    assert got_r["ppl"] == pytest.approx(ref_r, rel=1e-4)


def test_config_rejects_bad_combinations():
    from chitchat.utils import ChitchatError

    from chitchat.config import MMIOptions, ModelOptions

    m = ModelOptions(model_path="m")
    with pytest.raises(ChitchatError, match="--data_path is required"):
        EvaluateConfig(model=m)
    with pytest.raises(ChitchatError, match="add --generate"):
        EvaluateConfig(model=m, data_path="d", mmi=MMIOptions(mmi_model_path="r"))
    with pytest.raises(ChitchatError, match="nothing to do"):
        EvaluateConfig(model=m, data_path="d", no_perplexity=True)


def test_each_split_has_its_own_default_output():
    """Evaluating a store's valid dialogues, then its train ones, keeps both results."""
    from chitchat.config import ModelOptions
    from chitchat.evaluation import default_output

    cfg = lambda **kw: EvaluateConfig(model=ModelOptions(model_path="m"), data_path="d/store",
                                      **kw)
    names = {split: default_output(cfg(split=split)) for split in ("all", "valid", "train")}
    assert names["all"] == Path("m/eval-store.json")
    assert len(set(names.values())) == 3 and names["valid"].parent == Path("m")
    assert default_output(cfg(split="valid", output_json="x.json")) == Path("x.json")


def test_split_valid_follows_the_runs_own_resplit(sample_store, tiny_config_path, tmp_path):
    """A run trained with --val_num validated on its own draw: evaluate.py --split valid on
    that store takes the same dialogues, never ones the run trained on."""
    from chitchat.checkpoint import checkpoints_of
    from chitchat.config import ModelOptions, TrainConfig
    from chitchat.evaluation import evaluate, run_state, select_dialogues
    from chitchat.store import resplit
    from chitchat.training import train
    from chitchat.utils import ChitchatError

    store = TokenStore(sample_store)
    n_valid = len(store.valid_indices()) // 2  # fewer than the store holds out
    run = train(TrainConfig(train_path=str(sample_store), model_config=str(tiny_config_path),
                            save_model_path=str(tmp_path), run_name="best", max_len=64,
                            batch_size=2, dtype="fp32", device="cpu", max_steps=1,
                            val_num=n_valid, eval_interval=0, quiet=True))
    train_idx, valid = resplit(store, n_valid, None, 42)
    assert set(store.valid_indices()) & set(train_idx)  # the store's valid set was trained on
    assert (run / "best" / "best.json").is_file()  # a run folder named best, and its best/
    for folder in (run, run / "best", checkpoints_of(run)[-1]):
        idx, source = select_dialogues(store, "valid", None, run_state(folder))
        assert idx.tolist() == valid.tolist() and "the run's split" in source
    idx, source = select_dialogues(store, "valid", None, run_state(tmp_path / "elsewhere"))
    assert idx.tolist() == store.valid_indices().tolist() and source == "the store's split"
    got = evaluate(EvaluateConfig(model=ModelOptions(model_path=str(run)),
                                  data_path=str(sample_store), split="valid", max_len=64,
                                  quiet=True, output_json=str(tmp_path / "m.json")))
    assert got["perplexity"]["dialogues"] == n_valid
    (checkpoints_of(run)[-1] / "trainer_state.json").write_text("{", encoding="utf-8")
    with pytest.raises(ChitchatError, match="validation split is unknown.*--split all"):
        run_state(run)


def run(args):
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=180)


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tiny_model_dir, tmp_path):
    # a held-out text corpus: the first dialogues of the sample
    text = SAMPLE.read_text(encoding="utf-8").split("\n\n")[:12]
    valid = tmp_path / "valid.txt"
    valid.write_text("\n\n".join(text), encoding="utf-8")
    out = tmp_path / "replies.jsonl"
    p = run(["--model_path", tiny_model_dir, "--data_path", valid, "--generate", out,
             "--batch_size", "5", "--seed", "3", "--reply_len", "8", "--max_len", "64"])
    assert p.returncode == 0, p.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    dialogues = [d.split("\n") for d in text]
    expect = [d for d in dialogues if len(d) >= 2]
    assert len(lines) == len(expect)
    for line, d in zip(lines, expect):
        rec = json.loads(line)
        assert set(rec) == {"context", "reference", "reply"}
        assert rec["context"] == d[:-1] and rec["reference"] == d[-1]
        assert isinstance(rec["reply"], str)
    metrics = json.loads((tmp_path / "replies.metrics.json").read_text())
    assert set(metrics["replies"]) == KEYS and metrics["replies"]["replies"] == len(expect)
    assert metrics["perplexity"]["ppl"] > 1 and metrics["mmi"] is None
    assert "smoothing" in metrics["bleu"] and "method 1" in p.stdout
    assert "perplexity" in p.stdout and "Distinct-2" in p.stdout
    # seeded: the same command gives the same replies
    p2 = run(["--model_path", tiny_model_dir, "--data_path", valid, "--generate",
              tmp_path / "again.jsonl", "--batch_size", "5", "--seed", "3", "--reply_len", "8",
              "--no_perplexity"])
    assert p2.returncode == 0, p2.stderr
    assert (tmp_path / "again.jsonl").read_text(encoding="utf-8") == "\n".join(lines) + "\n"


@pytest.mark.slow
def test_evaluate_cli_with_mmi_and_a_store(tiny_model_dir, sample_store, tiny_config_path,
                                           tmp_path):
    from chitchat.modeling import build_model, load_config, save_model, set_reverse

    tok = TokenStore(sample_store).tokenizer()
    torch.manual_seed(1)
    rev = build_model(load_config(tiny_config_path, tok))
    set_reverse(rev.config, True)
    save_model(rev, tok, tmp_path / "rev")
    out = tmp_path / "mmi.jsonl"
    p = run(["--model_path", tiny_model_dir, "--data_path", sample_store, "--split", "valid",
             "--max_dialogues", "6", "--generate", out, "--mmi_model_path", tmp_path / "rev",
             "--num_candidates", "3", "--reply_len", "6", "--max_len", "64",
             "--output_json", tmp_path / "m.json"])
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["mmi"]["num_candidates"] == 3 and set(m["replies"]) == KEYS
    assert m["perplexity"]["dialogues"] == 6 and "MMI: 3 candidates" in p.stdout
    assert all(json.loads(x)["reply"] for x in out.read_text().splitlines())
    # the reverse model's own perplexity is on reversed dialogues; it cannot generate
    p = run(["--model_path", tmp_path / "rev", "--data_path", sample_store, "--max_dialogues",
             "4", "--max_len", "64", "--output_json", tmp_path / "r.json"])
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"]["reverse_model"] is True
    p = run(["--model_path", tmp_path / "rev", "--data_path", sample_store, "--max_dialogues",
             "4", "--generate", tmp_path / "x.jsonl", "--no_perplexity"])
    assert p.returncode == 2 and "reverse model" in p.stderr


@pytest.mark.slow
def test_store_with_another_vocab_is_refused(tiny_model_dir, tmp_path):
    from chitchat.config import PreprocessConfig
    from chitchat.preprocessing import preprocess

    (tmp_path / "t.txt").write_text("你好\n在的\n\n吃了吗\n吃了\n", encoding="utf-8")
    store = preprocess(PreprocessConfig(train_path=str(tmp_path / "t.txt"),
                                        save_path=str(tmp_path / "s"), vocab_size=30,
                                        min_frequency=1, val_num=0, quiet=True))
    p = run(["--model_path", tiny_model_dir, "--data_path", store])
    assert p.returncode == 2 and "another vocab" in p.stderr and "--vocab_path" in p.stderr


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def own_inputs(tiny_model_dir, sample_store, tmp_path):
    """Copies of the model and the store: a regression here would break the session's."""
    import shutil

    model, store = tmp_path / "model", tmp_path / "store"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(sample_store, store)
    return model, store


def test_evaluate_never_writes_inside_the_token_store_it_reads(own_inputs):
    from chitchat.config import ModelOptions
    from chitchat.evaluation import check_outputs, evaluate
    from chitchat.utils import ChitchatError

    model, store = own_inputs
    before = snapshot(store)
    cfg = lambda **kw: EvaluateConfig(model=ModelOptions(model_path=str(model)),
                                      data_path=str(store), max_dialogues=4, max_len=64,
                                      no_perplexity=True, quiet=True, **kw)
    for kw in ({"generate": str(store / "meta.json")}, {"generate": str(store / "new.jsonl")},
               {"generate": str(store.parent / "r.jsonl"),
                "output_json": str(store / "report.json")}):
        with pytest.raises(ChitchatError, match="inside the token store .*--data_path"):
            evaluate(cfg(**kw))
    assert snapshot(store) == before
    check_outputs(cfg(generate=str(store.parent / "replies.jsonl")))


def test_evaluate_never_replaces_a_model_folders_files(own_inputs, reverse_dir):
    from chitchat.config import MMIOptions, ModelOptions
    from chitchat.evaluation import check_outputs, evaluate
    from chitchat.utils import ChitchatError

    model, _ = own_inputs
    (model / "notes.txt").write_text("mine\n", encoding="utf-8")
    before = snapshot(model)
    cfg = lambda **kw: EvaluateConfig(model=ModelOptions(model_path=str(model)),
                                      data_path=str(SAMPLE), max_dialogues=4, max_len=64,
                                      quiet=True, **kw)
    for name in ("chat_template.jinja", "notes.txt"):
        with pytest.raises(ChitchatError, match=f"{name} would overwrite .*model folder"):
            evaluate(cfg(output_json=str(model / name)))
    with pytest.raises(ChitchatError, match="model folder .*--mmi_model_path"):
        check_outputs(cfg(generate=str(reverse_dir / "chat_template.jinja"),
                          mmi=MMIOptions(mmi_model_path=str(reverse_dir))))
    assert snapshot(model) == before
    # The default output goes in the model folder, and a second run replaces it.
    first = evaluate(cfg())
    again = evaluate(cfg())
    assert first["perplexity"] == again["perplexity"]
    assert json.loads((model / f"eval-{SAMPLE.stem}.json").read_text())["model_path"] == str(model)
