"""train.py end to end, as subprocesses: resume after SIGKILL gives the same losses,
SIGTERM saves and exits 0, torchrun DDP matches a single process, and the run folder loads
offline with transformers. Tiny models on CPU (a few seconds each, most of it start-up)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test runs train.py as a process
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1")  # one thread: identical numerics in every process


def dropout_config(tmp_path_factory, p: float) -> Path:
    path = tmp_path_factory.mktemp("cfg") / f"tiny_drop{p}.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_positions": 64, "n_embd": 64,
                                "n_head": 2, "n_layer": 2, "attn_pdrop": p, "embd_pdrop": p,
                                "resid_pdrop": p}))
    return path


def base_args(store, config, save, run, **kw) -> list[str]:
    opts = dict(train_path=store, model_config=config, save_model_path=save, run_name=run,
                max_len=64, batch_size=2, dtype="fp32", device="cpu", log_step=1,
                eval_interval=25, save_interval=10, lr=1e-3, warmup_steps=5, quiet=None)
    opts.update(kw)
    args = []
    for k, v in opts.items():
        args += [f"--{k}"] + ([] if v is None else [str(v)])
    return args


def run_train(args, timeout=300, check=True):
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, text=True,
                       capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def wait_for_log(p: subprocess.Popen, pattern: str, count: int = 1) -> None:
    """Read train.py's log (stderr, without --quiet) until `count` lines match `pattern`."""
    seen = []
    for line in p.stderr:
        seen.append(line)
        if sum(bool(re.search(pattern, s)) for s in seen) >= count:
            return
    raise AssertionError(f"train.py exited ({p.wait()}) before {pattern!r}:\n"
                         + "".join(seen[-40:]))


def train_losses(run_dir: Path) -> dict[int, float]:
    """Loss by step; a resumed run re-logs steps after its checkpoint, the last one wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl")
                                                    .read_text().splitlines())
            if r["event"] == "eval"}


@pytest.fixture(scope="module")
def reference_run(sample_store, tmp_path_factory):
    """An uninterrupted 100-step run with dropout (2.5 epochs of 40 steps)."""
    cfg = dropout_config(tmp_path_factory, 0.1)
    save = tmp_path_factory.mktemp("runs")
    args = base_args(sample_store, cfg, save, "ref", max_steps=100,
                     gradient_accumulation_steps=4)
    run_train(args)
    return save / "ref", cfg


def test_run_folder_layout(reference_run):
    run, _ = reference_run
    for f in ("config.json", "model.safetensors", "generation_config.json", "vocab.txt",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "train.log", "metrics.jsonl"):
        assert (run / f).is_file(), f
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000080", "step-00000090", "step-00000100"]  # --keep 3
    last = run / "checkpoints" / "step-00000100"
    assert (last / "training_state.pt").is_file() and (last / "model.safetensors").is_file()
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 100 and state["options"]["max_steps"] == 100
    tensors = torch.load(last / "training_state.pt", weights_only=True)
    assert {"optimizer", "scaler", "rng"} <= set(tensors)
    assert (run / "best" / "model.safetensors").is_file()
    assert json.loads((run / "best" / "best.json").read_text())["val_loss"] == \
        min(eval_losses(run).values())
    # the run root holds the newest model
    assert (run / "model.safetensors").read_bytes() == (last / "model.safetensors").read_bytes()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rec = next(r for r in recs if r["event"] == "train")
    assert {"step", "epoch", "loss", "ppl", "lr", "grad_norm", "tokens_per_s"} <= set(train_rec)
    assert {r["step"] for r in recs if r["event"] == "eval"} == {25, 40, 50, 75, 80, 100}  # 40 steps an epoch
    log = (run / "train.log").read_text()
    assert "step 1/100 | epoch 1 | loss" in log and "tok/s" in log and "grad_norm" in log


def test_resume_after_sigkill_gives_identical_losses(sample_store, reference_run,
                                                     tmp_path):
    ref, cfg = reference_run
    args = base_args(sample_store, cfg, tmp_path, "k", max_steps=100,
                     gradient_accumulation_steps=4)
    args.remove("--quiet")  # the log says when a checkpoint is saved
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck = tmp_path / "k" / "checkpoints"
    wait_for_log(p, r"^saved .*step-")
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    done = sorted(c.name for c in ck.iterdir() if c.name.startswith("step-"))
    assert done[-1] != "step-00000100", "the kill should land mid-run"
    resumed_from = int(done[-1].split("-")[1])
    state = json.loads((ck / done[-1] / "trainer_state.json").read_text())
    assert state["step_in_epoch"] > 0, "mid-epoch"
    out = run_train(["--resume", "auto", "--save_model_path", str(tmp_path), "--quiet"])
    assert f"step {resumed_from}" in out.stderr
    want, got = train_losses(ref), train_losses(tmp_path / "k")
    assert sorted(got) == list(range(1, 101))
    for s in range(1, 101):
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])
    for s, v in eval_losses(ref).items():
        assert abs(eval_losses(tmp_path / "k")[s] - v) <= 1e-5


def test_sigterm_saves_and_exits_0(sample_store, tiny_config_path, tmp_path):
    args = base_args(sample_store, tiny_config_path, tmp_path, "t", max_steps=100000,
                     save_interval=100000, eval_interval=0)
    args.remove("--quiet")  # the log says when a step is done
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_log(p, r"^step \d+/", count=3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "stopped by SIGTERM" in err and "--resume auto --run_name t" in err
    ckpts = list((tmp_path / "t" / "checkpoints").iterdir())
    assert len(ckpts) == 1
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert max(train_losses(tmp_path / "t")) == step
    # continue it for 2 more steps: --max_steps is one of the options a resume may change
    run_train(["--resume", "auto", "--run_name", "t", "--save_model_path", str(tmp_path),
               "--max_steps", str(step + 2), "--quiet"])
    assert max(train_losses(tmp_path / "t")) == step + 2


def test_resume_refuses_a_changed_run_option(reference_run, tmp_path):
    ref, _ = reference_run
    p = run_train(["--resume", str(ref), "--batch_size", "7"], check=False)
    assert p.returncode == 2 and "--batch_size 7 differs" in p.stderr


def test_torchrun_two_ranks_match_single_process(sample_store, tiny_config_path, tmp_path):
    """DDP over 2 CPU processes (gloo) with batch 2 per rank == one process with batch 2 and
    2 accumulation steps: the same rows per optimizer step, the same normalisation."""
    from safetensors.torch import load_file
    common = dict(max_steps=8, eval_interval=4, save_interval=8)
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29500 + os.getpid() % 1000), "train.py",
         *base_args(sample_store, tiny_config_path, tmp_path, "ddp", **common)],
        cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_train(base_args(sample_store, tiny_config_path, tmp_path, "single",
                        gradient_accumulation_steps=2, **common))
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-00000008" /
                        "trainer_state.json").read_text())
    assert state["world_size"] == 2
    a, b = state["rank_fingerprints"]
    assert a == b, "both ranks hold identical weights"
    w_ddp = load_file(tmp_path / "ddp" / "model.safetensors")
    w_one = load_file(tmp_path / "single" / "model.safetensors")
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], atol=1e-4, rtol=1e-3)
    l_ddp, l_one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert sorted(l_ddp) == list(range(1, 9))
    for s in l_one:
        assert abs(l_ddp[s] - l_one[s]) < 1e-4
    for s, v in eval_losses(tmp_path / "single").items():
        assert abs(eval_losses(tmp_path / "ddp")[s] - v) < 1e-4
    assert ddp.stderr.count("step 8/8") == 1, "only rank 0 logs"


def test_run_folder_loads_offline_with_transformers(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from chitchat.modeling import load_model
    run, _ = reference_run
    for folder in (run, run / "best", run / "checkpoints" / "step-00000100"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size == tok.vocab_size
    gen = pipeline("text-generation", model=str(run), tokenizer=str(run), device="cpu")
    out = gen("你好", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)
    model, ctok = load_model(run)  # interact.py's loader
    assert ctok.vocab_size == model.config.vocab_size


def test_speaker_ids_are_recorded_for_interact(sample_store, tiny_config_path, tmp_path):
    from chitchat.modeling import load_model, speaker_token_ids
    run_train(base_args(sample_store, tiny_config_path, tmp_path, "spk", max_steps=2,
                        speaker_ids=None, loss_on="response"))
    model, tok = load_model(tmp_path / "spk")
    assert speaker_token_ids(model.config) == tok.speaker_ids()


def test_plot_without_matplotlib_says_how_to_install(reference_run):
    run, _ = reference_run
    p = subprocess.run([sys.executable, "-m", "chitchat.plot", str(run)], cwd=ROOT, env=ENV,
                       text=True, capture_output=True)
    try:
        import matplotlib  # noqa: F401
        assert p.returncode == 0 and (run / "loss.png").is_file()
    except ImportError:
        assert p.returncode == 2 and "pip install matplotlib" in p.stderr
