"""The fault cases of docs/reliability.md: each test plays one fault and checks the promise
(clear error, nothing lost, or a documented recovery). Tiny models, a few steps each."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chitchat.chat import Chatbot
from chitchat.checkpoint import MANIFEST, STATE_FILE, TENSORS_FILE, verify_checkpoint
from chitchat.config import EvaluateConfig, ModelOptions, PreprocessConfig, TrainConfig
from chitchat.preprocessing import preprocess
from chitchat.store import TokenStore
from chitchat.repl import Repl, Transcript
from chitchat.utils import ChitchatError, atomic_dir, run_cli
from conftest import ROOT, SAMPLE, TINY_CONFIG
from test_train_cli import ENV, base_args, run_train

PY = [sys.executable]


def run_preprocess(*args, env=None):
    return subprocess.run([*PY, str(ROOT / "preprocess.py"), *map(str, args), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, env=env or ENV,
                          timeout=300)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def user_data(tmp_path) -> Path:
    """A user's data folder as a fresh clone has it: a README and the corpus."""
    d = tmp_path / "data"
    (d / "sample").mkdir(parents=True)
    (d / "README.md").write_text("my notes\n")
    shutil.copy(SAMPLE, d / "sample" / "train.txt")
    return d


# ---- 1. preprocess never replaces what it did not write -------------------------------------
@pytest.mark.slow
def test_save_path_holding_other_files_is_refused_and_untouched(user_data):
    before = snapshot(user_data)
    r = run_preprocess("--train_path", user_data / "sample" / "train.txt",
                       "--save_path", user_data)
    assert r.returncode == 2, r.stderr
    assert "refusing" in r.stderr or "would replace the corpus" in r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(user_data) == before
    assert sorted(p.name for p in user_data.iterdir()) == ["README.md", "sample"]


@pytest.mark.slow
def test_save_path_that_is_the_corpus_file_is_refused(user_data):
    corpus = user_data / "sample" / "train.txt"
    before = corpus.read_bytes()
    r = run_preprocess("--train_path", corpus, "--save_path", corpus)
    assert r.returncode == 2 and "would replace the corpus" in r.stderr
    assert corpus.is_file() and corpus.read_bytes() == before


@pytest.mark.slow
def test_save_path_of_an_unrelated_folder_is_refused_even_with_force(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    r = run_preprocess("--train_path", SAMPLE, "--save_path", other, "--force")
    assert r.returncode == 2 and "not a token store" in r.stderr
    assert snapshot(other) == {"cat.jpg": b"\xff\xd8"}


def test_a_store_or_an_empty_folder_is_replaced(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    preprocess(PreprocessConfig(train_path=str(SAMPLE), save_path=str(empty), quiet=True))
    assert TokenStore(empty).meta["kind"] == "chitchat-token-store"
    # a rebuild replaces the store it wrote
    preprocess(PreprocessConfig(train_path=str(SAMPLE), save_path=str(empty), quiet=True,
                                force=True, val_num=3))
    assert TokenStore(empty).meta["counts"]["valid_dialogues"] == 3


def test_default_save_path_of_a_corpus_without_extension_is_not_the_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copy(SAMPLE, corpus)
    out = preprocess(PreprocessConfig(train_path=str(corpus), quiet=True))
    assert out == tmp_path / "corpus_store" and corpus.is_file()


def test_stale_temporaries_of_a_killed_run_are_cleaned_live_ones_kept(tmp_path):
    out = tmp_path / "store"
    dead = tmp_path / f".store.tmp-{2**22 + 12345}-abc"  # above pid_max: never alive
    live = tmp_path / ".store.tmp-1-xyz"  # pid 1 is always alive
    dead.mkdir()
    live.mkdir()
    (dead / "tokens.bin").write_bytes(b"x")
    preprocess(PreprocessConfig(train_path=str(SAMPLE), save_path=str(out), quiet=True))
    assert not dead.exists() and live.exists()


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", lambda p: True, "x") as tmp:
            (tmp / "half").write_text("partial")
            raise RuntimeError("disk fell off")
    assert list(tmp_path.iterdir()) == []


# ---- 2. the built vocab is repeatable -------------------------------------------------------
@pytest.mark.slow
def test_the_same_corpus_gives_byte_identical_stores(tmp_path):
    outs = []
    for seed in ("1", "2", "3"):  # different hash seeds: nothing may depend on set order
        out = tmp_path / f"s{seed}"
        r = run_preprocess("--train_path", SAMPLE, "--save_path", out,
                           env=dict(ENV, PYTHONHASHSEED=seed))
        assert r.returncode == 0, r.stderr
        outs.append(out)
    for name in ("vocab.txt", "tokens.bin", "split.npy", "dialogue_offsets.npy"):
        first = (outs[0] / name).read_bytes()
        assert all((o / name).read_bytes() == first for o in outs[1:]), name


def test_vocab_trainer_is_deterministic_and_keeps_every_character():
    from chitchat.corpus import read_dialogues
    from chitchat.tokenization import ChatTokenizer

    utts = [u for d in read_dialogues(SAMPLE) for u in d.utterances]
    a = ChatTokenizer.train(utts, 13000, 2).tokens
    assert all(ChatTokenizer.train(utts, 13000, 2).tokens == a for _ in range(3))
    assert a[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(set(a)) == len(a)
    chars = {c for u in utts for c in u.lower() if not c.isspace()}
    tok = ChatTokenizer(a)
    assert sum(tok.encode(c) == [tok.unk_id] for c in chars) == 0


# ---- 3. resume refuses changed data ----------------------------------------------------------
def _store_from(tmp_path, name, vocab=None, corpus=SAMPLE) -> Path:
    out = tmp_path / name
    preprocess(PreprocessConfig(train_path=str(corpus), save_path=str(out), quiet=True,
                                val_num=20, vocab_path=str(vocab) if vocab else None,
                                force=True))
    return out


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY_CONFIG))
    return p


@pytest.mark.slow
def test_resume_with_a_rebuilt_same_size_vocab_is_refused(tmp_path, tiny_config):
    store = _store_from(tmp_path, "store")
    run_train(base_args(store, tiny_config, tmp_path / "m", "r", max_steps=2, save_interval=2))
    tokens = (store / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokens[10], tokens[11] = tokens[11], tokens[10]  # same size, two ids swapped
    shuffled = tmp_path / "vocab2.txt"
    shuffled.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    _store_from(tmp_path, "store", vocab=shuffled)  # rebuilt in place (--force)
    r = run_train(["--resume", "auto", "--run_name", "r", "--save_model_path", str(tmp_path / "m"),
                   "--max_steps", "4"], check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "vocab" in r.stderr and "not the one" in r.stderr and "Traceback" not in r.stderr
    # the run folder still holds the old vocab, beside its embeddings
    assert (tmp_path / "m" / "r" / "vocab.txt").read_text(encoding="utf-8").splitlines() != tokens


@pytest.mark.slow
def test_resume_with_changed_token_ids_is_refused(tmp_path, tiny_config):
    store = _store_from(tmp_path, "store")
    run_train(base_args(store, tiny_config, tmp_path / "m", "r", max_steps=2, save_interval=2))
    smaller = tmp_path / "half.txt"
    text = SAMPLE.read_text(encoding="utf-8")
    smaller.write_text(text[: len(text) // 2].rsplit("\n\n", 1)[0] + "\n", encoding="utf-8")
    _store_from(tmp_path, "store", vocab=store / "vocab.txt", corpus=smaller)
    r = run_train(["--resume", "auto", "--run_name", "r", "--save_model_path", str(tmp_path / "m"),
                   "--max_steps", "4"], check=False)
    assert r.returncode == 2 and "token ids" in r.stderr and "--pretrained_model" in r.stderr


def test_a_different_vocab_for_a_model_folder_is_refused(tiny_model_dir, tmp_path):
    from chitchat.modeling import load_model

    tokens = (tiny_model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokens[20], tokens[21] = tokens[21], tokens[20]
    other = tmp_path / "vocab.txt"
    other.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(ChitchatError, match="id 20"):
        load_model(tiny_model_dir, other)
    load_model(tiny_model_dir, tiny_model_dir / "vocab.txt")  # the same vocab is fine


def test_a_vocab_shorter_than_the_token_ids_is_a_clear_error(sample_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(sample_store, store)
    lines = (store / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (store / "vocab.txt").write_text("\n".join(lines[:50]) + "\n", encoding="utf-8")
    with pytest.raises(ChitchatError, match="holds id"):
        TokenStore(store).tokenizer()


# ---- 4. a damaged checkpoint does not block resume ------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("victim", ["model.safetensors", TENSORS_FILE, STATE_FILE])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(sample_store, tiny_config,
                                                                   tmp_path, victim):
    save = tmp_path / "m"
    run_train(base_args(sample_store, tiny_config, save, "r", max_steps=4, save_interval=2,
                        eval_interval=0))
    cks = save / "r" / "checkpoints"
    newest = cks / "step-00000004"
    assert verify_checkpoint(newest) is None and (newest / MANIFEST).is_file()
    f = newest / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert victim in verify_checkpoint(newest)
    r = run_train(["--resume", "auto", "--run_name", "r", "--save_model_path", str(save),
                   "--max_steps", "6"], check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"step-00000004 is damaged: {f}" in r.stderr and "Falling back" in r.stderr
    assert "from step-00000002" in r.stderr
    assert (cks / "damaged-step-00000004").is_dir()  # kept for a look, out of the way
    assert verify_checkpoint(cks / "step-00000006") is None
    # metrics.jsonl holds each step once: the replayed steps 3 and 4 replaced the old ones
    steps = [(rec["event"], rec["step"]) for rec in
             map(json.loads, (save / "r" / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps)) and ("train", 6) in steps


@pytest.mark.slow
def test_a_named_damaged_checkpoint_is_an_error_naming_the_file(sample_store, tiny_config,
                                                                tmp_path):
    save = tmp_path / "m"
    run_train(base_args(sample_store, tiny_config, save, "r", max_steps=2, save_interval=2,
                        eval_interval=0))
    ck = save / "r" / "checkpoints" / "step-00000002"
    (ck / STATE_FILE).write_text('{"step": 2, "form')
    r = run_train(["--resume", str(ck)], check=False)
    assert r.returncode == 2 and str(ck / STATE_FILE) in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_out_of_disk_space_while_saving_keeps_the_last_checkpoint(sample_store, tiny_config,
                                                                   tmp_path, monkeypatch):
    from chitchat import checkpoint as ckmod
    from chitchat.config import parse_config
    from chitchat.training import train

    calls = []
    real = ckmod.write_manifest

    def full_disk(folder):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / MANIFEST))
        real(folder)

    monkeypatch.setattr("chitchat.checkpoint.write_manifest", full_disk)
    cfg = parse_config(TrainConfig, base_args(sample_store, tiny_config, tmp_path / "m", "r",
                                              max_steps=4, save_interval=2, eval_interval=0))
    with pytest.raises(ChitchatError) as e:
        train(cfg)
    msg = str(e.value)
    assert "could not write checkpoint" in msg and "No space left" in msg
    assert "step-00000002 is intact" in msg
    cks = tmp_path / "m" / "r" / "checkpoints"
    assert [p.name for p in cks.iterdir()] == ["step-00000002"]  # no torn step-4 or temp
    assert verify_checkpoint(cks / "step-00000002") is None


# ---- 4b. resuming elsewhere or earlier loses nothing and mixes nothing ---------------------
def _train_in_process(args, given=None):
    from chitchat.config import parse_config
    from chitchat.training import train

    return train(parse_config(TrainConfig, [str(a) for a in args]), given=given)


def _options(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["options"]


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(sample_store, tiny_config,
                                                                   tmp_path):
    """Resuming from step 2 of a run saved at 2, 4 and 6 abandons steps 3-6: their
    checkpoints and best/ move aside, the resumed run's own checkpoint survives pruning
    (even with --keep_checkpoints 1), and --resume auto then continues the resumed run."""
    from chitchat.checkpoint import checkpoints_of

    save = tmp_path / "m"
    run = save / "r"
    _train_in_process(base_args(sample_store, tiny_config, save, "r", max_steps=6,
                                save_interval=2, eval_interval=2))
    assert json.loads((run / "best" / "best.json").read_text())["step"] > 2
    renamed = run / "checkpoints" / "from-here"  # a checkpoint named directly: any name
    (run / "checkpoints" / "step-00000002").rename(renamed)
    with pytest.raises(ChitchatError, match="--max_len 32 differs"):  # a resume that fails
        _train_in_process(["--resume", renamed, "--max_len", 32])
    assert [c.name for c in checkpoints_of(run)] == ["step-00000004", "step-00000006"]
    _train_in_process(["--resume", renamed, "--max_steps", 3, "--keep_checkpoints", 1,
                       "--eval_interval", 1000])
    assert [c.name for c in checkpoints_of(run)] == ["step-00000003"]
    aside = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert aside == ["abandoned-step-00000004", "abandoned-step-00000006", "from-here",
                     "step-00000003"]
    assert json.loads((run / "abandoned-best" / "best.json").read_text())["step"] > 2
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 3  # its own
    _train_in_process(["--resume", "auto", "--run_name", "r", "--save_model_path", save,
                       "--max_steps", 4])
    assert [c.name for c in checkpoints_of(run)] == ["step-00000004"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == [1, 2, 3, 4]  # the abandoned steps' records are gone from the curve


def test_a_new_run_that_fails_before_its_first_step_leaves_no_folder(sample_store, tiny_config,
                                                                     tmp_path):
    """A missing store or a bad option: the run folder this call made goes again (with
    its train.log); a folder that was there before stays."""
    save = tmp_path / "m"
    with pytest.raises(ChitchatError, match="no token store"):
        _train_in_process(base_args(tmp_path / "missing", tiny_config, save, "r"))
    with pytest.raises(ChitchatError, match="exceeds the model's n_positions"):
        _train_in_process(base_args(sample_store, tiny_config, save, "r", max_len=100000))
    assert not (save / "r").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the data loads

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("chitchat.train_setup.TokenStore", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _train_in_process(base_args(sample_store, tiny_config, save, "r"))
    assert not (save / "r").exists()
    (save / "mine").mkdir(parents=True, exist_ok=True)
    with pytest.raises(ChitchatError, match="no token store"):
        _train_in_process(base_args(tmp_path / "missing", tiny_config, save, "mine"))
    assert (save / "mine").is_dir()


@pytest.mark.slow
def test_a_new_run_does_not_inherit_a_killed_runs_curve_or_best(sample_store, tiny_config,
                                                                tmp_path):
    run = tmp_path / "m" / "r"
    (run / "best").mkdir(parents=True)
    (run / "best" / "best.json").write_text('{"step": 2, "val_loss": 6.79}')
    old_curve = '{"event": "train", "step": 1, "loss": 9.0}\n'
    (run / "metrics.jsonl").write_text(old_curve)  # a run killed before its first checkpoint
    _train_in_process(base_args(sample_store, tiny_config, tmp_path / "m", "r", max_steps=2,
                                save_interval=2, eval_interval=1000, val_num=0))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
    assert all(r.get("loss") != 9.0 for r in records)
    assert not (run / "best").exists()  # no validation in this run: no best/ of another
    assert (run / "earlier-metrics.jsonl").read_text() == old_curve
    assert (run / "earlier-best" / "best.json").is_file()


@pytest.mark.slow
def test_a_flag_typed_at_its_default_counts_on_resume(sample_store, tiny_config, tmp_path):
    """--log_step 10 is the default; typed on a resumed run that used 2, it is honoured (it
    used to be taken for "not given")."""
    from chitchat.cli import train_main

    save = tmp_path / "m"
    _train_in_process(base_args(sample_store, tiny_config, save, "r", max_steps=2,
                                save_interval=2, eval_interval=0, log_step=2))
    train_main(["--resume", "auto", "--run_name", "r", "--save_model_path", str(save),
                "--max_steps", "4", "--log_step", "10", "--quiet"])
    assert _options(save / "r" / "checkpoints" / "step-00000004")["log_step"] == 10


def test_pruning_never_removes_the_checkpoint_just_written(tiny_model_dir, tmp_path):
    import torch

    from chitchat.checkpoint import checkpoints_of, save_checkpoint
    from chitchat.modeling import load_model

    model, tok = load_model(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "r"
    for step in (9, 3):  # a higher step already there, as after a manual copy
        save_checkpoint(run, step, model, tok, opt, None, {"step": step}, keep=1,
                        last_ckpt=None)
    assert "step-00000003" in [c.name for c in checkpoints_of(run)]


def test_given_flags_are_the_typed_ones():
    from chitchat.flags import given_flags

    assert given_flags(TrainConfig, ["--patience", "0", "--quiet", "--resume", "auto"]) == {
        "patience", "quiet", "resume"}
    assert given_flags(TrainConfig, []) == frozenset()


def test_merge_keeps_saved_options_unless_typed(tmp_path):
    import dataclasses

    from chitchat.checkpoint import merge_resume_options

    where = tmp_path / "m" / "r" / "checkpoints" / "step-00000002"
    saved = dataclasses.asdict(TrainConfig(patience=3, log_step=2))
    now = TrainConfig(resume="auto")  # every option at its default
    assert merge_resume_options(now, saved, where, frozenset({"resume"})).patience == 3
    assert merge_resume_options(now, saved, where, frozenset({"patience"})).patience == 0
    assert merge_resume_options(now, saved, where).patience == 3  # from Python: by value


@pytest.mark.slow
def test_a_moved_store_and_a_moved_run_folder_resume(sample_store, tiny_config, tmp_path):
    """The store and the run folder may move between sessions: the data is checked by its
    fingerprint, and the resumed run's options name where the run is now (the end-of-run
    hint builds its --resume command from them)."""
    store = tmp_path / "store"
    shutil.copytree(sample_store, store)
    save = tmp_path / "m"
    _train_in_process(base_args(store, tiny_config, save, "r", max_steps=2, save_interval=2,
                                eval_interval=0))
    store.rename(tmp_path / "store2")
    (tmp_path / "elsewhere").mkdir()
    (save / "r").rename(tmp_path / "elsewhere" / "r")
    _train_in_process(["--resume", tmp_path / "elsewhere" / "r", "--max_steps", 4,
                       "--train_path", tmp_path / "store2", "--quiet"])
    opts = _options(tmp_path / "elsewhere" / "r" / "checkpoints" / "step-00000004")
    assert opts["save_model_path"] == str(tmp_path / "elsewhere")
    assert opts["train_path"] == str(tmp_path / "store2")


def test_bad_run_paths_are_clear_errors(sample_store, tiny_config, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ChitchatError, match="cannot be created: .*afile exists and is not a"):
        _train_in_process(base_args(sample_store, tiny_config, afile, "r", max_steps=1))
    with pytest.raises(ChitchatError, match="--log_path .* is a folder"):
        _train_in_process(base_args(sample_store, tiny_config, tmp_path / "m", "r",
                                    max_steps=1, log_path=tmp_path))


# ---- the run folder and other outputs -------------------------------------------------------
@pytest.mark.slow
def test_run_name_of_a_foreign_folder_is_refused(sample_store, tiny_config, tiny_model_dir,
                                                 tmp_path):
    save = tmp_path / "models"
    shutil.copytree(tiny_model_dir, save / "pretrained")
    before = snapshot(save / "pretrained")
    r = run_train(base_args(sample_store, tiny_config, save, "pretrained", max_steps=1),
                  check=False)
    assert r.returncode == 2 and "not a train.py run folder" in r.stderr
    assert snapshot(save / "pretrained") == before


def test_evaluate_never_writes_over_its_inputs(tiny_model_dir, sample_store, tmp_path):
    from chitchat.evaluation import check_outputs

    corpus = tmp_path / "held_out.txt"
    shutil.copy(SAMPLE, corpus)
    with pytest.raises(ChitchatError, match="--data_path"):
        check_outputs(EvaluateConfig(model=ModelOptions(model_path=str(tiny_model_dir)), data_path=str(corpus),
                                     generate=str(corpus)))
    with pytest.raises(ChitchatError, match="model folder"):
        check_outputs(EvaluateConfig(model=ModelOptions(model_path=str(tiny_model_dir)), data_path=str(corpus),
                                     output_json=str(tiny_model_dir / "config.json")))
    check_outputs(EvaluateConfig(model=ModelOptions(model_path=str(tiny_model_dir)), data_path=str(corpus),
                                 generate=str(tmp_path / "replies.jsonl")))


def test_os_errors_are_one_line_naming_the_path(capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "model/run/x.tmp")

    assert run_cli(main) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model/run/x.tmp: No space left" in err and "disk" in err

    def bug(argv):
        raise FileNotFoundError(errno.ENOENT, "gone", "f")  # not a disk fault: traceback

    with pytest.raises(FileNotFoundError):
        run_cli(bug)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["interact.py", "evaluate.py"])
def test_a_reader_that_goes_away_ends_a_tool_quietly(script, tiny_model_dir, tmp_path):
    """`... | head -1`: the tool stops with status 0 and no traceback (it printed one)."""
    args = {"interact.py": ["--model_path", tiny_model_dir, "--save_samples_path", "",
                            "--max_len", "20"],
            "evaluate.py": ["--model_path", tiny_model_dir, "--data_path", SAMPLE,
                            "--max_dialogues", "3", "--max_len", "64", "--quiet",
                            "--output_json", tmp_path / "metrics.json"]}[script]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the tool writes
    p = subprocess.Popen([*PY, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                         stdin=subprocess.PIPE, stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    _, err = p.communicate(("你好\n" * 50).encode(), timeout=300)
    assert p.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]


# ---- config validation ---------------------------------------------------------------------
@pytest.mark.parametrize("config,fragment", [
    ([1, 2], "JSON object"),
    ({"n_embd": 100, "n_head": 12}, "not divisible"),
    ({"n_layer": 0}, "n_layer must be a whole number >= 1"),
    ({"n_embd": "768"}, "n_embd must be a whole number"),
    ({"attn_pdrop": 1.5}, "dropout rate"),
])
def test_bad_model_configs_are_clear_errors(tmp_path, sample_store, config, fragment):
    from chitchat.modeling import load_config

    p = tmp_path / "c.json"
    p.write_text(json.dumps(config))
    with pytest.raises(ChitchatError, match=fragment):
        load_config(p, TokenStore(sample_store).tokenizer())


@pytest.mark.parametrize("lr", ["1e39", "0", "nan", "-1"])
def test_absurd_learning_rates_are_refused(lr):
    with pytest.raises(ChitchatError, match="--lr"):
        TrainConfig(lr=float(lr))


# ---- 5. a bad chat line ends nothing ---------------------------------------------------------
@pytest.fixture(scope="module")
def bot(tiny_model_dir):
    return Chatbot.from_pretrained(tiny_model_dir, seed=0)


@pytest.mark.parametrize("bad", ["\u200b", "\udcff\udcfe"])  # zero-width; bytes ff fe read
def test_a_bad_chat_line_is_skipped_and_the_session_goes_on(bot, tmp_path, bad):
    bot.reset()
    out, err = io.StringIO(), io.StringIO()
    tr = Transcript(tmp_path, {"model_path": "tiny"})
    rc = Repl(bot, transcript=tr, stdin=io.StringIO(f"{bad}\n你好\n"), stdout=out,
              stderr=err, interactive=False).run()
    tr.close()
    assert rc == 0
    assert "not sent" in err.getvalue() and len(out.getvalue().splitlines()) == 1
    assert len(bot.history) == 2 and bot.history[0] == "你好"
    recs = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert recs[0]["event"] == "skipped" and recs[1]["user"] == "你好"
    assert (tmp_path / "samples.txt").read_text(encoding="utf-8").count("user:") == 1


def test_the_chatbot_api_raises_and_keeps_its_state(bot):
    bot.reset()
    bot.reply("你好")
    history = list(bot.history)
    for bad in ("\u200b", "a\udcffb", ""):
        with pytest.raises(ChitchatError):
            bot.reply(bad)
        assert bot.history == history


@pytest.mark.slow
def test_cli_survives_undecodable_bytes(tiny_model_dir, tmp_path):
    r = subprocess.run([*PY, "interact.py", "--model_path", str(tiny_model_dir), "--seed", "1",
                        "--save_samples_path", str(tmp_path)], input=b"\xff\xfe\n\xe2\x80\x8b\n"
                       b"\xe4\xbd\xa0\xe5\xa5\xbd\n", capture_output=True, cwd=ROOT, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stderr.decode().count("not sent") == 2 and len(r.stdout.splitlines()) == 1


# ---- 6. lone surrogates in .jsonl -------------------------------------------------------------
@pytest.mark.slow
def test_lone_surrogate_in_jsonl_names_the_line(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('["ok", "fine"]\n["\\ud800abc", "ok"]\n', encoding="utf-8")
    r = run_preprocess("--train_path", src, "--save_path", tmp_path / "o")
    assert r.returncode == 2 and f"{src}:2: utterance 1" in r.stderr and "\\ud800" in r.stderr
    assert not (tmp_path / "o").exists()


# ---- serve.py --------------------------------------------------------------------------------
@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.2", True),
                                       ("::1", True), ("[::1]", True), ("localhost", True),
                                       ("0.0.0.0", False), ("192.168.1.5", False),
                                       ("example.com", False)])
def test_loopback_hosts(host, loop):
    from chitchat.serving.run import is_loopback

    assert is_loopback(host) is loop


# ---- unsafe model files -----------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_pickle_that_runs_code_is_refused(tiny_model_dir, tmp_path, capsys):
    import torch

    from chitchat.modeling import load_model

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tiny_model_dir / "config.json", old)
    torch.save({"x": _Payload()}, old / "pytorch_model.bin")
    with pytest.raises(ChitchatError, match="Refusing to load"):
        load_model(old, tiny_model_dir / "vocab.txt")
    assert "this ran" not in capsys.readouterr().out
