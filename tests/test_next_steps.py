"""The step after the quick start: hints that work as printed, a time budget with a schedule
that fits it, the speed estimate, the reverse-run hint, encoding hints, make's chat."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chitchat.budget import TimeBudget, format_duration, parse_duration
from chitchat.config import TrainConfig
from chitchat.utils import ChitchatError, python_command, run_cli
from conftest import ROOT
from test_interact import Terminal
from test_train_cli import ENV, base_args, run_train


# ---- hints name a python that works ---------------------------------------------------------
def test_python_command_is_python_only_when_that_is_this_interpreter(monkeypatch, tmp_path):
    venv_py = tmp_path / ".venv" / "bin" / "python"
    monkeypatch.setattr(sys, "executable", str(venv_py))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/python")
    assert python_command() == ".venv/bin/python"  # not activated: the path, relative
    monkeypatch.setattr(shutil, "which", lambda name: str(venv_py))
    assert python_command() == "python"  # activated
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert python_command() == str(venv_py)


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [
    ("train.py", []), ("preprocess.py", []), ("interact.py", ["--model_path", "x"]),
    ("evaluate.py", ["--model_path", "x", "--data_path", "y"]),
    ("serve.py", ["--model_path", "x"]), ("convert.py", ["--model_path", "x",
                                                         "--output_path", "y"])])
def test_a_script_outside_its_environment_says_how_to_fix_it_in_one_line(script, args):
    # -S: no site-packages, as in a Python without the project's requirements
    r = subprocess.run([sys.executable, "-S", script, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=dict(ENV, PYTHONPATH=""))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no module" in lines[0] and "Traceback" not in r.stderr
    assert "bin/activate" in lines[0] or "make setup" in lines[0]


def test_a_missing_module_that_is_not_a_requirement_keeps_its_traceback():
    def main(argv):
        raise ModuleNotFoundError("No module named 'chitchat.nothing'", name="chitchat.nothing")

    with pytest.raises(ModuleNotFoundError):
        run_cli(main)


def test_train_hints_use_best_and_a_reverse_run_points_at_mmi(tmp_path, monkeypatch):
    from chitchat.training import next_step_hint

    monkeypatch.setattr("chitchat.training.python_command", lambda: "python")
    run = tmp_path / "run"
    run.mkdir()
    assert next_step_hint(TrainConfig(), run) == f"Chat with it: python interact.py " \
                                                 f"--model_path {run}"
    (run / "best").mkdir()
    assert next_step_hint(TrainConfig(), run).endswith(f"--model_path {run / 'best'}")
    hint = next_step_hint(TrainConfig(reverse=True), run)
    assert f"--mmi_model_path {run / 'best'}" in hint and "interact.py --model_path <a " in hint


# ---- the time budget --------------------------------------------------------------------------
@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("2h", 7200),
                                          ("1h30m", 5400), ("1.5h", 5400), ("600", 600),
                                          (" 2H ", 7200), ("1d", 86400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "30x", "1h 2", "0", "-5m", "0s"])
def test_parse_duration_refuses_nonsense(text):
    with pytest.raises(ChitchatError, match="--max_time"):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (5, 125, 1800, 3725, 90000)] == \
        ["5s", "2m05s", "30m", "1h02m", "1d01h"]


def test_budget_plans_a_complete_schedule_from_the_measured_speed():
    b = TimeBudget(seconds=100.0, cap=10_000)
    assert b.total == 10_000  # before any step: the cap
    b.update(1, elapsed=3.0, first_step_seconds=3.0)  # warm-up step: slow
    b.update(2, elapsed=4.0, first_step_seconds=3.0)  # then 1 s a step
    assert b.total == 2 + 96 and b.warmup == int(0.05 * 98)
    # steady 1 s/step: the plan stays, the lr peaks after warmup and reaches 0 at the end
    for done in range(3, 98):
        b.update(done, elapsed=3.0 + (done - 1), first_step_seconds=3.0)
    assert b.total == 98
    assert b.factor(b.warmup - 1, "linear") == 1.0
    assert b.factor(b.total, "linear") == 0.0
    assert b.expired(100.0) and not b.expired(99.9)


def test_budget_replans_when_the_speed_changes_and_never_exceeds_the_cap():
    b = TimeBudget(seconds=100.0, cap=50)
    b.update(2, elapsed=2.0, first_step_seconds=1.0)
    assert b.total == 50  # 98 would fit; the epochs allow 50
    b = TimeBudget(seconds=100.0, cap=10_000)
    b.update(2, elapsed=2.0, first_step_seconds=1.0)
    fast = b.total
    b.update(10, elapsed=50.0, first_step_seconds=1.0)  # the machine got slower
    assert b.total < fast and b.total >= 11


def test_budget_warmup_never_falls_behind_the_current_step():
    b = TimeBudget(seconds=1000.0, cap=10_000)
    b.update(1, 1.0, 1.0)
    b.update(2, 2.0, 1.0)  # 1 s/step: ~1000 steps, warmup 49
    w = b.warmup
    b.update(30, 900.0, 1.0)  # suddenly slow: few steps left
    assert b.warmup >= 30 and b.warmup <= w
    b2 = TimeBudget(seconds=100.0, cap=1000, warmup_steps=7)
    b2.update(2, 2.0, 1.0)
    assert b2.warmup == 7  # the user's warmup is kept


@pytest.mark.slow
def test_max_time_stops_saves_and_exits_0_with_a_decayed_lr(sample_store, tiny_config_path,
                                                            tmp_path):
    args = base_args(sample_store, tiny_config_path, tmp_path, "b", max_time="4s",
                     eval_interval=0, save_interval=100000, threads=1, lr=1e-3)
    i = args.index("--warmup_steps")
    del args[i:i + 2]  # the budget plans the warmup
    r = run_train(args)
    assert "stopped by the time budget (--max_time 4s)" in r.stderr
    assert "--resume auto --run_name b" in r.stderr and "--max_time 4s" in r.stderr
    assert "threads 1" in r.stderr
    if sys.platform.startswith("linux") and not any(k.startswith("MALLOC_") for k in ENV):
        assert "memory: freed memory kept (glibc mallopt)" in r.stderr  # --allocator auto
    recs = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
            if '"train"' in l]
    lrs = [r["lr"] for r in recs]
    assert len(recs) >= 3 and max(lrs) > 2 * lrs[-1]  # warmed up, then decayed
    ck = sorted((tmp_path / "b" / "checkpoints").iterdir())
    assert ck and json.loads((ck[-1] / "trainer_state.json").read_text())["step"] == \
        recs[-1]["step"]


def test_the_estimate_line_and_the_note_for_long_cpu_runs(caplog):
    from chitchat.training import log_estimate

    log = logging.getLogger("test.estimate")
    with caplog.at_level(logging.INFO, logger="test.estimate"):
        log_estimate(log, torch.device("cpu"), elapsed=21.0, first_step_s=1.0, done=3,
                     tokens_per_step=1000, steps_per_epoch=100, steps_left=4000,
                     budget=None, cfg=TrainConfig())
    text = caplog.text
    assert "10.00 s/step" in text and "100 tok/s" in text
    assert "an epoch takes about 17m" in text and "11h06m" in text
    assert "model_config_dialogue_middle.json" in text and "--max_time" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.estimate"):
        log_estimate(log, torch.device("cpu"), elapsed=3.0, first_step_s=1.0, done=3,
                     tokens_per_step=1000, steps_per_epoch=100, steps_left=50,
                     budget=None, cfg=TrainConfig())
    assert "middle" not in caplog.text  # a short run gets no note


@pytest.mark.slow
def test_train_prints_size_tokens_per_epoch_and_the_estimate(sample_store, tiny_config_path,
                                                             tmp_path):
    r = run_train(base_args(sample_store, tiny_config_path, tmp_path, "e", max_steps=4,
                            eval_interval=0))
    assert "params 0." in r.stderr and "tokens per epoch" in r.stderr
    assert "speed: " in r.stderr and "an epoch takes about" in r.stderr
    assert "| eta " in r.stderr


# ---- encodings ---------------------------------------------------------------------------------
def test_a_gb18030_file_read_as_gbk_suggests_gb18030(tmp_path):
    from chitchat.config import PreprocessConfig
    from chitchat.preprocessing import preprocess

    src = tmp_path / "c.txt"
    src.write_bytes("你好😀\n嗯\n\n再见\n好\n".encode("gb18030"))
    with pytest.raises(ChitchatError, match="--encoding gb18030"):
        preprocess(PreprocessConfig(train_path=str(src), save_path=str(tmp_path / "o"),
                                    encoding="gbk", quiet=True))
    preprocess(PreprocessConfig(train_path=str(src), save_path=str(tmp_path / "o"),
                                encoding="gb18030", quiet=True))


# ---- make's chat: Ctrl-C ends the chat, not make ------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None or sys.platform == "win32",
                    reason="needs make and a POSIX pseudo-terminal")
def test_ctrl_c_in_a_chat_started_by_make_is_not_a_make_interrupt(tiny_model_dir, tmp_path):
    mk = tmp_path / "Makefile"
    mk.write_text(f"chat:\n\t{sys.executable} interact.py --model_path {tiny_model_dir} "
                  f"--save_samples_path ''\n\t@echo after-the-chat\n")
    t = Terminal(["make", "-s", "-f", str(mk), "chat"])
    try:
        t.expect("user: ")
        t.send("你好\r")
        t.expect("chatbot: ")
        t.expect("user: ")
        t.send("\x03")  # Ctrl-C at the prompt: leave the chat
        out = t.expect("after-the-chat")
        assert t.wait() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
    assert "Interrupt" not in out and "***" not in out
