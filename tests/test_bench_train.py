"""bench/bench_train.py's bookkeeping: the clocks and curves its figures rest on."""
from __future__ import annotations

import importlib.util
import re
import sys

import numpy as np
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dtypes_auto_skips_bf16_where_the_cpu_has_no_fast_bf16(bench):
    assert bench.bench_dtypes("auto", True) == "fp32,bf16"
    assert bench.bench_dtypes("auto", False) == "fp32"
    assert bench.bench_dtypes("bf16", False) == "bf16"  # asked for: run it anyway


def test_numpy_peak_is_measured_with_numpys_blas(bench, monkeypatch):
    """The fp32 reference peak comes from numpy.matmul (its own BLAS), not torch's."""
    calls = []
    real = np.matmul
    monkeypatch.setattr(bench.np, "matmul", lambda a, b: calls.append(type(a)) or real(a, b))
    assert bench.matmul_peak(bench.torch.float32, 32, 2, "numpy") > 0
    assert calls and set(calls) == {np.ndarray}
    calls.clear()
    bench.matmul_peak(bench.torch.float32, 32, 2)
    assert calls == []
    assert bench.numpy_blas()


def test_reach_time_interpolates_between_evaluations(bench):
    curve = [(10.0, 6.0), (20.0, 5.0), (30.0, 4.0)]
    assert bench.reach_time(curve, 4.5) == pytest.approx(25.0)
    assert bench.reach_time(curve, 7.0) == 10.0  # already there at the first evaluation
    assert bench.reach_time(curve, 3.9) is None


def test_train_py_curve_takes_evaluations_out_of_the_clock(bench):
    # 100 tokens per window at 100 tok/s; the window after the evaluation took 3 s more
    recs = [{"event": "train", "tokens": 100, "tokens_per_s": 100.0},
            {"event": "eval", "val_loss": 5.0},
            {"event": "train", "tokens": 200, "tokens_per_s": 25.0},
            {"event": "train", "tokens": 300, "tokens_per_s": 100.0},
            {"event": "eval", "val_loss": 4.0}]
    curve, trained, evals = bench.train_py_curve(recs)
    assert curve == [(1.0, 5.0), (3.0, 4.0)]
    assert trained == pytest.approx(3.0)
    assert evals == pytest.approx(3.0)


def test_budget_clock_pauses_for_evaluation(bench, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench, "time", type("Clock", (), {"perf_counter": lambda: now[0]}))

    def slow_eval(model):
        now[0] += 5.0  # longer than the whole budget: it must not count
        return now[0]

    clock = bench.BudgetClock(4.0, 2, slow_eval)
    clock.begin()
    steps = 0
    while True:
        now[0] += 1.0  # one training step
        steps += 1
        if clock.after_step(None):
            break
    assert steps == 4
    assert [t for t, _ in clock.curve] == [2.0, 4.0]
    assert clock.eval_seconds == 5.0


def test_speed_windows_skip_the_same_warm_up_on_every_path(bench, monkeypatch):
    """--warmup steps, in whole windows of --steps, are run but not timed: the slow first
    steps (the heap's growth) stay out of the median, for the in-process paths and for
    train.py, whose logged windows are cut the same way."""
    from types import SimpleNamespace

    args = SimpleNamespace(steps=2, repeats=2, warmup=3)
    assert bench.warmup_windows(args) == 2
    assert bench.warmup_windows(SimpleNamespace(steps=4, warmup=0)) == 1  # at least one
    assert bench.warmup_windows(SimpleNamespace(steps=4, warmup=20)) == 5
    now, calls = [0.0], []
    monkeypatch.setattr(bench, "time", type("Clock", (), {"perf_counter": lambda: now[0]}))

    def step():
        calls.append(1)
        now[0] += 10.0 if len(calls) <= 4 else 1.0  # the two warm-up windows are slow
        return 5
    assert bench.window_rates(step, args) == [5.0, 5.0]
    assert len(calls) == 8
    calls.clear()
    now[0] = 0.0
    assert bench.window_rates(step, args, extra=1) == [5.0, 5.0]  # one more untimed window
    assert len(calls) == 10

    seen = []
    monkeypatch.setattr(bench, "train_py", lambda store, cfg, out, name, extra:
                        seen.append(extra) or out)
    monkeypatch.setattr(bench, "run_records", lambda run: [
        {"event": "train", "tokens_per_s": float(i)} for i in range(1, 9)])
    monkeypatch.setattr(bench, "run_dtype", lambda run: "fp32")
    args = SimpleNamespace(steps=4, repeats=3, warmup=20, work="unused")
    assert bench.time_train_py(None, None, args) == (7.0, "fp32")  # windows 6-8 timed
    assert seen[0][:4] == ["--max_steps", "32", "--log_step", "4"]


def test_clm_blocks_concatenate_and_drop_the_tail(bench):
    class Store:
        path = "fake"

        def dialogue(self, i):
            return np.arange(5, dtype=np.uint16) + 10 * i

    blocks = bench.clm_blocks(Store(), np.arange(3), block=4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 10, 11, 12], [13, 14, 20, 21]]


def test_trainer_rows_are_skipped_without_accelerate(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    assert "accelerate is not installed" in bench.trainer_missing()


@pytest.mark.slow  # runs train.py or the bench as a process
def test_time_to_loss_gives_every_path_the_asked_lr(bench, sample_store, tmp_path, monkeypatch,
                                                   capsys):
    """--mode time_to_loss end to end on a tiny model with a 2-second budget: the classic
    loop and train.py both run at the --lr given (an lr sweep), and Trainer is left out."""
    import json

    from conftest import TINY_CONFIG

    config = tmp_path / "tiny.json"  # positions for train.py's default windows of 150
    config.write_text(json.dumps({**TINY_CONFIG, "n_positions": 160}))
    monkeypatch.setattr(sys, "argv", [
        "bench_train.py", "--mode", "time_to_loss", "--config", str(config),
        "--train_path", str(sample_store), "--work", str(tmp_path), "--budget", "2s",
        "--evals", "1", "--lr", "0.0007", "--no_trainer"])
    classic_lrs = []
    real_classic = bench.classic_to_budget

    def classic_to_budget(store, cfg, args, clock, lr):
        classic_lrs.append(lr)
        return real_classic(store, cfg, args, clock, lr)

    monkeypatch.setattr(bench, "classic_to_budget", classic_to_budget)
    bench.main()
    out = capsys.readouterr().out
    assert classic_lrs == [0.0007]
    assert "peak lr 0.0007 for all" in out
    assert "Trainer path skipped (--no_trainer)" in out
    assert "classic fp32" in out and "train.py / classic time" in out
    states = sorted((tmp_path / "ttl-runs" / "train_py").glob("checkpoints/*/trainer_state.json"))
    assert json.loads(states[-1].read_text())["scheduler"]["base_lr"] == 0.0007


@pytest.mark.slow  # runs train.py or the bench as a process
def test_trainer_peer_runs_in_a_child_with_the_given_environment(bench, sample_store, tmp_path):
    """The speed mode's Trainer row with train.py's allocator settings: a child process
    (the settings are read at a process's start) that reports one row per dtype."""
    import json
    from types import SimpleNamespace

    from conftest import TINY_CONFIG

    if bench.trainer_missing():
        pytest.skip("accelerate is not installed")
    env = bench.train_py_allocator_env({})
    if not env:
        pytest.skip("train.py's allocator settings are empty on this system")
    config = tmp_path / "tiny.json"  # positions for Trainer's blocks of 128
    config.write_text(json.dumps({**TINY_CONFIG, "n_positions": 160}))
    args = SimpleNamespace(train_path=str(sample_store), work=str(tmp_path), config=str(config),
                           dtypes="fp32,bf16", steps=1, repeats=1, warmup=1, pack_len=64,
                           fast_batch=2, accum=1)
    rows = bench.trainer_with_env(args, env)
    assert [r["dtype"] for r in rows] == ["fp32", "bf16"]
    assert all(r["tps"] > 0 and r["faults"] >= 0 for r in rows)
    assert all(r["env"] == env for r in rows)  # the child ran with the settings


@pytest.mark.slow  # runs train.py or the bench as a process
def test_speed_mode_prints_every_row(bench, sample_store, tmp_path, monkeypatch, capsys):
    """The speed mode end to end on a tiny model, one step per window: every row the docs
    quote is printed (the classic loop, the fast path, train.py and its variants, Trainer
    and the Trainer given train.py's allocator settings)."""
    import json

    from conftest import TINY_CONFIG

    config = tmp_path / "tiny.json"  # positions for windows of 150 and Trainer's 128
    config.write_text(json.dumps({**TINY_CONFIG, "n_positions": 160}))
    monkeypatch.setattr(sys, "argv", [
        "bench_train.py", "--config", str(config), "--train_path", str(sample_store),
        "--work", str(tmp_path), "--steps", "1", "--repeats", "1", "--warmup", "2",
        "--gemm", "64", "--pack_len", "150", "--dtypes", "fp32"])
    bench.main()
    out = capsys.readouterr().out
    for row in ("classic  fp32", "fast     fp32", "train.py, default flags",
                "train.py --dropout_kernel native", "train.py --allocator system"):
        assert row in out, row
    assert "MFU" in out.split("train.py, default flags")[1].splitlines()[0]
    if bench.trainer_missing():
        return
    assert "trainer  fp32, run_clm blocks of 128" in out
    assert "vs Trainer fp32 (target" in out
    if bench.train_py_allocator_env({}):
        assert "trainer  fp32 with train.py's allocator settings" in out


@pytest.mark.slow  # runs train.py or the bench as a process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_profile_runs_with_train_pys_allocator_settings(bench, sample_store, tmp_path):
    """The profile mode restarts itself with what --allocator auto gives train.py, once (a
    second restart would loop), and says so above its table."""
    import json
    import os
    import subprocess

    from conftest import TINY_CONFIG

    env = bench.train_py_allocator_env({})
    if not env:
        pytest.skip("no glibc here: train.py's allocator settings are empty")
    assert bench.train_py_allocator_env(env) == {}  # what the restarted process sees
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY_CONFIG, "n_positions": 160}))
    clean = {k: v for k, v in os.environ.items() if k not in env}
    out = subprocess.run(
        [sys.executable, str(bench.ROOT / "bench" / "bench_train.py"), "--mode", "profile",
         "--config", str(config), "--train_path", str(sample_store), "--work", str(tmp_path),
         "--dtypes", "fp32", "--steps", "1", "--fast_batch", "2", "--pack_len", "150",
         "--shapes"],
        env=clean, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("memory (as train.py"))
    assert all(f"{k}={v}" in line for k, v in env.items()), line
    assert re.search(r"one step of 2 packed rows of 150, [\d.]+ s of operator time, "
                     r"[\d,]+ minor page faults", out), out
    # --shapes: the products' rows name their operands' shapes
    mm = [l for l in out.splitlines() if l.startswith(("aten::mm ", "aten::addmm "))]
    assert mm and all(re.search(r"\[\d+, \d+\]", l) for l in mm), mm


@pytest.mark.slow  # runs train.py or the bench as a process
def test_attention_mode_times_whole_rows_against_blocks(bench, sample_store, tmp_path):
    """--mode attention: a line per variant with its time and its ratio to whole rows, the
    share of the scores each block size computes, and which one train.py takes."""
    import json
    import subprocess

    from conftest import TINY_CONFIG

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY_CONFIG, "n_positions": 160}))
    out = subprocess.run(
        [sys.executable, str(bench.ROOT / "bench" / "bench_train.py"), "--mode", "attention",
         "--config", str(config), "--train_path", str(sample_store), "--work", str(tmp_path),
         "--dtypes", "fp32", "--repeats", "1", "--fast_batch", "2", "--pack_len", "150",
         "--max_len", "40", "--blocks", "50,25,150"], capture_output=True, text=True,
        check=True).stdout
    shares = [int(x) for x in re.findall(r"blocks of (?:50|25) compute (\d+)% of the", out)]
    assert len(shares) == 2 and all(0 < x < 100 for x in shares), out
    assert shares[1] <= shares[0]  # halved blocks skip at least as many masked scores
    rows = dict(re.findall(r"^  (whole rows|blocks of \d+) +[\d.]+ +([\d.]+)x", out, re.M))
    assert set(rows) == {"whole rows", "blocks of 50", "blocks of 25"}, out  # 150: whole
    assert float(rows["whole rows"]) == 1.0
    assert re.search(r"whole rows .*<- train.py", out) and "train.py's: whole rows" in out


def test_row_batches_run_epoch_after_epoch_in_new_orders(bench, sample_store):
    """The profile and memory modes' micro-batches: every window once per epoch, then the
    next epoch in another order (a long memory run must not replay one epoch's sizes)."""
    import itertools

    store = bench.TokenStore(sample_store)
    table = bench.build_windows(store, store.train_indices(), 150)
    args = type("A", (), {"fast_batch": 2, "pack_len": 150})()
    per_epoch = len(bench.pack_rows(np.arange(len(table)), table.lengths, 150)) // 2
    first, second = [], []
    batches = list(itertools.islice(bench.row_batches(args, table), 2 * per_epoch - 2))
    for b in batches[:per_epoch - 1]:
        first += [w for row in b for w in row]
    for b in batches[per_epoch + 1:]:
        second += [w for row in b for w in row]
    assert all(len(b) == 2 for b in batches)
    assert len(set(first)) == len(first) > 0.8 * len(table)  # no window twice in an epoch
    assert first[:20] != second[:20]


@pytest.mark.slow  # runs train.py or the bench as a process
def test_memory_mode_prints_a_line_per_window_and_the_last_step(bench, sample_store, tmp_path):
    """The memory mode prints a line every --every steps plus one for the last, each with
    the resident anonymous memory, under train.py's malloc settings."""
    import json
    import subprocess

    from conftest import TINY_CONFIG

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY_CONFIG, "n_positions": 160}))
    steps = 5
    out = subprocess.run(
        [sys.executable, str(bench.ROOT / "bench" / "bench_train.py"), "--mode", "memory",
         "--config", str(config), "--train_path", str(sample_store), "--work", str(tmp_path),
         "--dtypes", "fp32", "--steps", str(steps), "--every", "2", "--fast_batch", "2",
         "--pack_len", "150"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    start = lines.index(next(l for l in lines if l.strip().startswith("step")))
    table = [l.split() for l in lines[start + 1:] if l.strip()]
    assert [int(r[0]) for r in table] == [2, 4, 5]
    for step, ms, faults, tok_s, anon in table:
        assert float(ms) > 0 and float(faults) >= 0 and float(tok_s) > 0 and float(anon) > 10
    if bench.train_py_allocator_env({}):  # glibc: the mode restarted with train.py's settings
        line = next(l for l in lines if l.startswith("memory (as train.py --allocator auto)"))
        assert all(f"{k}={v}" in line for k, v in bench.train_py_allocator_env({}).items())


@pytest.mark.parametrize("same", [True, False])
def test_memory_mode_same_batch_repeats_one_micro_batch(bench, sample_store, tmp_path,
                                                        monkeypatch, capsys, same):
    """--same_batch, on which the docs' flat-heap figure rests, steps on one micro-batch every
    time; without it, the steps walk through the corpus's batches."""
    import argparse

    seen = []

    def fake_steps(args, store, table, dtype):  # the training step is not under test here
        def step(rows):
            seen.append(tuple(tuple(r) for r in rows))
            return 100
        return step

    monkeypatch.setattr(bench, "_fast_steps", fake_steps)
    args = argparse.Namespace(train_path=str(sample_store), work=str(tmp_path),
                              config="model_config_dialogue_tiny.json", max_len=150,
                              pack_len=150, fast_batch=2, dtypes="fp32", steps=4, every=2,
                              same_batch=same, allocator="system", fp32_matmul="auto")
    bench.memory(args)
    assert len(seen) == 4
    assert (len(set(seen)) == 1) == same
    assert ("the same micro-batch every step" in capsys.readouterr().out) == same


@pytest.mark.slow  # runs a second Python
def test_the_avx2_imitation_makes_train_py_choose_fp32_on_blas():
    """bench/imitate_avx2 on PYTHONPATH: whatever this CPU has, train.py's choices are an
    AVX2-only CPU's (fp32, BLAS products), in the process and in its children."""
    import os
    import subprocess

    code = ("import torch; from chitchat.precision import *; "
            "print(resolve_dtype('auto', torch.device('cpu')), pick_fp32_matmul("
            "'auto', 'cpu', 'fp32', False, 'AuthenticAMD', probe_onednn_fp32))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "imitate_avx2"),
                                                        str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fp32", "blas"]
