"""The CUDA paths, tested without a GPU (docs/gpu.md).

Device and dtype decisions are pure functions of the flags, torchrun's environment and what
torch reports, so every case is a unit test. The rest runs the real code on the CPU with
`torch.cuda` patched to report GPUs; the fakes behave like the real functions where it
matters (set_device rejects a device without an index; set_rng_state_all indexes every
state it is given).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.cuda._utils import _get_device_index

from chitchat import sampling, training
from chitchat.config import DecodingOptions, EvaluateConfig, TrainConfig
from chitchat.generation import decode
from chitchat.sampling import Constraints
from chitchat.backends import make_backend
from chitchat.modeling import load_model, pick_device, save_model
from chitchat.checkpoint import TENSORS_FILE, restore_optimizer
from chitchat.distributed import DistInfo, dist_info, training_device
from chitchat.precision import pick_dtype, resolve_dtype, set_fp32_precision
from chitchat.train_setup import make_optimizer
from chitchat.utils import ChitchatError, run_cli
from conftest import ROOT

cuda = torch.device


def fake_gpus(monkeypatch, n: int, bf16_native: bool = True):
    """torch.cuda reports `n` GPUs. set_device checks its argument as the real one does
    (before any CUDA call), records the index and stops the run there: it is the first
    real CUDA operation of set-up."""
    class ReachedCuda(Exception):
        pass

    calls = []

    def set_device(device):
        index = _get_device_index(device)  # the real check: "cuda" without index raises
        calls.append(index)
        raise ReachedCuda(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16_native or including_emulation)
    return ReachedCuda, calls


# ---- device decisions -----------------------------------------------------------------------
@pytest.mark.parametrize("flag, gpus, local_rank, expected", [
    (None, 1, None, cuda("cuda", 0)),        # one GPU, no --device
    ("cuda", 1, None, cuda("cuda", 0)),      # one GPU, --device cuda
    ("cuda:1", 2, None, cuda("cuda", 1)),
    ("1", 2, None, cuda("cuda", 1)),         # GPT2-chitchat's bare number
    ("0", 1, None, cuda("cuda", 0)),
    (None, 0, None, cuda("cpu")),            # no GPU: the CPU
    ("cpu", 2, None, cuda("cpu")),
    (None, 2, 1, cuda("cuda", 1)),           # torchrun rank with LOCAL_RANK 1
    ("cuda", 4, 3, cuda("cuda", 3)),
    (None, 1, 0, cuda("cuda", 0)),           # torchrun --nproc_per_node 1
    (None, 0, 1, cuda("cpu")),               # torchrun on CPUs (gloo)
])
def test_pick_device(flag, gpus, local_rank, expected):
    got = pick_device(flag, False, gpus > 0, gpus, local_rank)
    assert got == expected
    assert got.type == "cpu" or got.index is not None


@pytest.mark.parametrize("flag, gpus, local_rank, message", [
    ("cuda", 0, None, "torch sees no GPU"),
    ("cuda:1", 1, None, "torch sees 1 GPU"),
    ("2", 2, None, "cuda:0 to cuda:1"),
    (None, 2, 2, "--nproc_per_node"),        # more ranks on a node than GPUs
    ("cuda:0", 2, 1, "CUDA_VISIBLE_DEVICES"),  # an index that fights LOCAL_RANK
    ("gpu", 1, None, "not a device"),
])
def test_pick_device_errors_say_how_to_fix(flag, gpus, local_rank, message):
    with pytest.raises(ChitchatError, match=message):
        pick_device(flag, False, gpus > 0, gpus, local_rank)


def test_no_cuda_wins_over_an_available_gpu():
    assert pick_device(None, True, True, 1) == cuda("cpu")


@pytest.mark.parametrize("env, expected", [
    ({}, DistInfo()),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, DistInfo(0, 1, 0)),
    ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}, DistInfo(5, 8, 1)),  # node 2 of 4
])
def test_dist_info_from_torchrun_env(env, expected):
    assert dist_info(env) == expected


@pytest.mark.parametrize("device", [None, "cuda", "0", "cuda:0"])
def test_training_device_one_gpu_sets_an_indexed_device(monkeypatch, device):
    reached, calls = fake_gpus(monkeypatch, 1)
    cfg = TrainConfig(device=device)
    with pytest.raises(reached):
        training_device(cfg, dist_info({}))
    assert calls == [0]


def test_ddp_rank_refuses_an_explicit_other_gpu(monkeypatch):
    fake_gpus(monkeypatch, 2)
    info = dist_info({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    with pytest.raises(ChitchatError, match="CUDA_VISIBLE_DEVICES"):
        training_device(TrainConfig(device="cuda:0"), info)


def test_leave_group_retires_the_work_before_the_group_dies(monkeypatch, tmp_path):
    """gloo's destructor joins worker threads that may still need the GIL to free the last
    collective's tensors; leave_group must first meet the other ranks, drop what holds the
    group, and let go of the GIL, and only then destroy it (a real one-rank gloo group)."""
    import time
    import weakref

    import torch.distributed as dist
    from chitchat import distributed

    real_sleep, real_destroy, real_barrier = time.sleep, dist.destroy_process_group, dist.barrier

    def a_run():  # what training._train leaves behind: a DDP wrapper, a gathered tensor
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        ddp(torch.ones(2, 4)).sum().backward()
        dist.all_gather([torch.empty(3)], torch.ones(3))
        ref = weakref.ref(ddp)
        holder = [ddp]
        holder.append(holder)  # a cycle: only a collection frees it
        return ref

    calls = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ref = a_run()
        monkeypatch.setattr(dist, "barrier", lambda: (calls.append("barrier"), real_barrier()))
        monkeypatch.setattr(time, "sleep", lambda s: (calls.append(("sleep", s)),
                                                      real_sleep(s)))
        monkeypatch.setattr(dist, "destroy_process_group", lambda: (
            calls.append(("destroy", ref() is None)), real_destroy()))
        distributed.leave_group(DistInfo(0, 2, 0))
    finally:
        if dist.is_initialized():  # the group must not outlive a failing test
            real_destroy()
    assert calls[0] == "barrier" and calls[-1] == ("destroy", True)
    assert calls[1][0] == "sleep" and calls[1][1] >= 0.1
    assert not dist.is_initialized()


def test_train_leaves_the_group_without_a_barrier_after_an_error(monkeypatch):
    """After an error the other ranks may never reach a barrier: train() must not wait."""
    left = []
    monkeypatch.setattr(training, "dist_info", lambda env: DistInfo(0, 2, 0))
    monkeypatch.setattr(training, "training_device", lambda cfg, info: torch.device("cpu"))
    monkeypatch.setattr(training, "join_group", lambda info, device: None)
    monkeypatch.setattr(training, "leave_group", lambda info, clean=True: left.append(clean))

    def fails(cfg, info, device, given):
        raise ChitchatError("boom")

    monkeypatch.setattr(training, "_train", fails)
    with pytest.raises(ChitchatError, match="boom"):
        training.train(TrainConfig())
    monkeypatch.setattr(training, "_train", lambda cfg, info, device, given: "run")
    assert training.train(TrainConfig()) == "run"
    assert left == [False, True]


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("args, env, gpus, index", [
    ([], {}, 1, 0),                                                  # python train.py
    (["--device", "cuda"], {}, 1, 0),                                # --device cuda
    ([], {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, 1, 0),  # torchrun, 1 process
    ([], {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, 2, 1),  # torchrun rank 1
    (["--device", "cuda:1"], {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, 2, 1),
], ids=["default", "device-cuda", "torchrun-1", "torchrun-rank1", "torchrun-1-cuda1"])
def test_train_py_reaches_cuda_with_an_indexed_device(monkeypatch, sample_store, tmp_path,
                                                      args, env, gpus, index):
    """train.py in-process on a machine that reports GPUs: set-up gets to its first CUDA
    call with cuda:N, and before joining a process group (NCCL binds to that GPU)."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reached, calls = fake_gpus(monkeypatch, gpus)
    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: joined.append(k))
    script = load_train_script()
    with pytest.raises(reached):
        script.main(["--train_path", str(sample_store), "--save_model_path",
                     str(tmp_path), *args])
    assert calls == [index]
    assert joined == []


# ---- dtype decisions -------------------------------------------------------------------------
@pytest.mark.parametrize("name, device, gpu_bf16, cpu_bf16, expected", [
    ("auto", "cuda", True, False, "bf16"),   # A100, H100, RTX 30xx/40xx
    ("auto", "cuda", False, False, "fp16"),  # V100, T4: bf16 only emulated
    ("auto", "cpu", False, True, "bf16"),    # AMX / AVX512-BF16
    ("auto", "cpu", False, False, "fp32"),
    ("fp32", "cuda", True, False, "fp32"),
    ("bf16", "cuda", False, False, "bf16"),  # asked for: honoured
])
def test_pick_dtype(name, device, gpu_bf16, cpu_bf16, expected):
    assert pick_dtype(name, device, gpu_bf16, cpu_bf16) == expected


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ChitchatError, match="needs a CUDA GPU"):
        pick_dtype("fp16", "cpu", False, True)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_dtype_ignores_bf16_emulation(monkeypatch, native, expected):
    """torch.cuda.is_bf16_supported() says True on V100/T4 (emulation); auto must not."""
    fake_gpus(monkeypatch, 1, bf16_native=native)
    assert resolve_dtype("auto", cuda("cuda", 0)) == expected


# ---- loading in float32 --------------------------------------------------------------------
@pytest.fixture(scope="module")
def half_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved in float16, as many hub folders are."""
    model, tok = load_model(tiny_model_dir)
    out = tmp_path_factory.mktemp("half") / "fp16"
    save_model(model.half(), tok, out)
    return out


def test_half_precision_folder_loads_in_float32(half_model_dir):
    from safetensors.torch import load_file
    assert load_file(half_model_dir / "model.safetensors")["transformer.wte.weight"].dtype \
        == torch.float16
    model, _ = load_model(half_model_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, _ = load_model(half_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_chat_float32_on_a_half_folder_is_float32(half_model_dir):
    from chitchat.chat import Chatbot
    bot = Chatbot.from_pretrained(half_model_dir, device="cpu", dtype="float32",
                                  backend="hf")
    assert {p.dtype for p in bot.model.parameters()} == {torch.float32}


@pytest.mark.slow
def test_fine_tuning_a_half_folder_keeps_float32_master_weights(half_model_dir, sample_store,
                                                               tmp_path):
    from safetensors.torch import load_file
    shutil.copy(half_model_dir / "vocab.txt", tmp_path / "vocab.txt")
    cfg = TrainConfig(train_path=str(sample_store), pretrained_model=str(half_model_dir),
                      save_model_path=str(tmp_path / "runs"), run_name="ft", max_len=64,
                      batch_size=4, dtype="fp32", device="cpu", max_steps=2, quiet=True,
                      eval_interval=0)
    run = training.train(cfg)
    weights = load_file(run / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


# ---- TF32 and the fused optimizer ---------------------------------------------------------
def test_tf32_for_fp32_work_on_gpus_unless_exact():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not set_fp32_precision(cuda("cpu"), False)
        assert not set_fp32_precision(cuda("cuda", 0), True)
        assert torch.get_float32_matmul_precision() == "highest"
        assert set_fp32_precision(cuda("cuda", 0), False)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(old)


def test_resume_keeps_the_fused_optimizer(tiny_model_dir):
    """A checkpoint whose optimizer ran unfused (fused=None: older CPU runs) resumed on a GPU
    (fused=True)."""
    model, _ = load_model(tiny_model_dir)
    cpu_run = make_optimizer(model, TrainConfig(), cuda("cpu"))
    assert [g["fused"] for g in cpu_run.param_groups] == [True, True]  # CPU: fused too
    for g in cpu_run.param_groups:
        g["fused"] = None  # as an older version's CPU run had it
    model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    cpu_run.step()
    saved = cpu_run.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    # fused AdamW also runs on CPU tensors, so the GPU run's optimizer can be built here
    gpu_run = make_optimizer(model, TrainConfig(), cuda("cuda", 0))
    restore_optimizer(gpu_run, saved)
    assert [g["fused"] for g in gpu_run.param_groups] == [True, True]
    state = gpu_run.state[next(iter(model.parameters()))]
    torch.testing.assert_close(state["exp_avg"],
                               cpu_run.state[next(iter(model.parameters()))]["exp_avg"])
    gpu_run.step()  # the fused kernel runs on the restored state


# ---- resume with fewer GPUs -----------------------------------------------------------------
def run_cfg(sample_store, config, save, **kw):
    base = dict(train_path=str(sample_store), model_config=str(config),
                save_model_path=str(save), run_name="r", max_len=64, batch_size=4,
                dtype="fp32", device="cpu", log_step=1, quiet=True, eval_interval=0,
                save_interval=3, keep_checkpoints=5, max_steps=6)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_resume_saved_with_4_gpus_on_1_gpu_is_exact(monkeypatch, sample_store, tmp_path):
    """A checkpoint that carries 4 GPUs' RNG states (as older versions wrote on a 4-GPU
    machine) resumes with one GPU visible, and gives the uninterrupted run's weights:
    dropout is reseeded every step, so CUDA generator states are not needed."""
    from safetensors.torch import load_file

    from chitchat.checkpoint import write_manifest
    config = tmp_path / "drop.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_positions": 64, "n_embd": 64,
                                  "n_head": 2, "n_layer": 2, "attn_pdrop": 0.1,
                                  "embd_pdrop": 0.1, "resid_pdrop": 0.1}))
    ref = training.train(run_cfg(sample_store, config, tmp_path / "ref"))
    copy = tmp_path / "copy" / "r"
    shutil.copytree(ref, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000006")
    ck = copy / "checkpoints" / "step-00000003"
    tensors = torch.load(ck / TENSORS_FILE, weights_only=True)
    tensors["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(4)]
    torch.save(tensors, ck / TENSORS_FILE)
    write_manifest(ck)  # as the older version would have written it: an intact checkpoint

    def set_rng_state_all(states):  # the real one: one generator per saved state
        for i, _ in enumerate(states):
            if i >= torch.cuda.device_count():
                raise IndexError("tuple index out of range")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: [torch.zeros(16, dtype=torch.uint8)])
    resumed = training.train(run_cfg(sample_store, config, tmp_path / "copy",
                                     resume=str(ck)))
    a, b = load_file(ref / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ---- out of memory ---------------------------------------------------------------------------
def oom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.slow
def test_oom_in_validation_names_the_kept_checkpoint(monkeypatch, sample_store,
                                                     tiny_config_path, tmp_path):
    real = training.validate
    calls = []

    def evaluate_once(*a, **k):
        calls.append(1)
        return real(*a, **k) if len(calls) == 1 else oom()

    monkeypatch.setattr(training, "validate", evaluate_once)
    cfg = run_cfg(sample_store, tiny_config_path, tmp_path, dtype="bf16", eval_interval=2,
                  save_interval=2, max_steps=4)
    with pytest.raises(ChitchatError) as e:
        training.train(cfg)
    msg = str(e.value)
    assert "out of memory on cpu validating after step 4" in msg
    assert "step-00000002, is kept" in msg and "--pretrained_model" in msg
    assert "--dtype bf16" not in msg, "bf16 is already on"
    assert (tmp_path / "r" / "checkpoints" / "step-00000002").is_dir()


@pytest.mark.parametrize("dtype, bf16_advice", [("fp32", True), ("bf16", False)])
def test_oom_in_a_training_step(monkeypatch, sample_store, tiny_config_path, tmp_path,
                                dtype, bf16_advice):
    monkeypatch.setattr(training, "train_step", oom)
    with pytest.raises(ChitchatError) as e:
        training.train(run_cfg(sample_store, tiny_config_path, tmp_path, dtype=dtype))
    msg = str(e.value)
    assert "at training step 1" in msg and "No checkpoint was saved yet" in msg
    assert "--batch_size (now 4" in msg and "Tried to allocate 2.00 GiB" in msg
    assert ("--dtype bf16" in msg) == bf16_advice


@pytest.mark.parametrize("where, patch", [("computing the perplexity", "windowed_loss"),
                                          ("generating replies", "generate_replies")])
def test_oom_in_evaluate_py(monkeypatch, capsys, tiny_model_dir, tmp_path, where, patch):
    import importlib
    evaluation = importlib.import_module("chitchat.evaluation")
    loss = importlib.import_module("chitchat.loss")
    monkeypatch.setattr(loss if patch == "windowed_loss" else evaluation, patch, oom)
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--model_path", str(tiny_model_dir), "--data_path",
            str(ROOT / "data" / "sample" / "train.txt"), "--max_dialogues", "4",
            "--device", "cpu", "--max_len", "64", "--quiet"]
    if patch == "generate_replies":
        args += ["--no_perplexity", "--generate", str(tmp_path / "r.jsonl")]
    assert run_cli(script.main, args) == 2
    err = capsys.readouterr().err
    assert f"error: out of memory on cpu {where}" in err and "--batch_size" in err


# ---- host-device syncs ---------------------------------------------------------------------
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class ReadCounter:
    """Counts Python-level reads of tensor values (each one waits for a GPU)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in READS:
            real = getattr(torch.Tensor, name)

            def wrapper(t, *a, _real=real, **k):
                self.n += 1
                return _real(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("backend", ["fast", "hf"])
@pytest.mark.parametrize("scores,temperature", [(False, 1.0), (True, 1.0), (False, 0.7)])
def test_decoding_reads_back_once_per_token(monkeypatch, tiny_model_dir, backend, scores,
                                            temperature):
    """As on a GPU (no cheap reads): one read per decoded token (the chosen tokens), plus
    at most one when the batch starts (FastGPT2 checks it for padding). A temperature below
    1 (its overflow guard) adds none."""
    model, tok = load_model(tiny_model_dir)
    be = make_backend(model, backend, tok.pad_id)
    cons = Constraints.build(tok.vocab_size, tok.sep_id, tok.banned_ids)
    opts = DecodingOptions(max_new_tokens=6, min_len=6, topk=8, topp=0.9,
                           temperature=temperature)
    monkeypatch.setattr(sampling, "host_reads_are_cheap", lambda device: False,
                        raising=False)
    contexts = [[tok.cls_id, 10, 11, 12, tok.sep_id], [tok.cls_id, 13, tok.sep_id]]
    g = torch.Generator().manual_seed(0)
    counter = ReadCounter(monkeypatch)
    steps = list(decode(be, contexts, opts, cons, g, scores=scores))
    monkeypatch.undo()
    assert len(steps) == 6
    assert counter.n <= len(steps) + 1, f"{counter.n} reads for {len(steps)} tokens"


def test_banned_mask_moves_once_per_decode(monkeypatch, tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    be = make_backend(model, "fast", tok.pad_id)
    cons = Constraints.build(tok.vocab_size, tok.sep_id, tok.banned_ids)
    moves = []
    real_to = torch.Tensor.to

    def to(t, *a, **k):
        if t is cons.banned:
            moves.append(a)
        return real_to(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    steps = list(decode(be, [[tok.cls_id, 10, tok.sep_id]],
                        DecodingOptions(max_new_tokens=8, min_len=8), cons,
                        torch.Generator().manual_seed(0)))
    monkeypatch.undo()
    assert len(steps) == 8 and len(moves) <= 1


def test_sync_free_sampling_draws_what_multinomial_draws():
    probs = torch.rand(4, 50).softmax(-1)
    probs[:, :7] = 0
    for seed in range(20):
        a = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
        b = sampling.choose_tokens(probs.log(), DecodingOptions(topk=0),
                                     torch.Generator().manual_seed(seed))
        assert a.view(-1).tolist() == b.tolist()


WRAPPER = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
calls = []
real = dist.all_reduce
def counting(*a, **k):
    calls.append(1)
    return real(*a, **k)
dist.all_reduce = counting
with open(os.path.join({out!r}, "pid-" + os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
import runpy
sys.argv = [{train!r}] + sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(os.path.join({out!r}, "calls-" + os.environ["RANK"]), "w") as f:
        f.write(str(len(calls)))
"""


def torchrun_two_ranks(tmp_path, sample_store, config, **opts):
    """train.py on two CPU ranks (gloo) under torchrun, started in the background; each
    rank writes its pid and, at exit, its count of dist.all_reduce calls to tmp_path."""
    wrapper = tmp_path / "count_all_reduce.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), out=str(tmp_path),
                                      train=str(ROOT / "train.py")))
    base = dict(train_path=sample_store, model_config=config, save_model_path=tmp_path,
                run_name="ddp", max_len=64, batch_size=2, dtype="fp32", device="cpu",
                eval_interval=0)
    base.update(opts)
    args = [a for k, v in base.items() for a in (f"--{k}", str(v))] + ["--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--master_port", str(30500 + os.getpid() % 1000),
                             str(wrapper), *args],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def finish(p, timeout: float) -> str:
    """The torchrun job's stderr once it exits; past `timeout`, kill its whole session
    (torchrun and both ranks: a stuck rank must not outlive the test and hold on to the
    machine) and fail with what it printed."""
    import signal
    try:
        return p.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{p.communicate()[1][-3000:]}")


@pytest.mark.slow
def test_ddp_reads_the_stop_flag_only_at_logged_steps(sample_store, tiny_config_path,
                                                      tmp_path):
    """Every dist.all_reduce is a host-device sync on GPUs: they may happen at logged
    steps, validations and checkpoints, not at every step."""
    p = torchrun_two_ranks(tmp_path, sample_store, tiny_config_path, log_step=4,
                           max_steps=12, save_interval=12)
    err = finish(p, 300)
    assert p.returncode == 0, err[-3000:]
    events = [json.loads(l)["event"] for l in
              (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    saves = len(list((tmp_path / "ddp" / "checkpoints").iterdir()))
    allowed = events.count("train") + events.count("eval") + saves
    assert events.count("train") == 3  # steps 4, 8, 12
    for rank in ("0", "1"):
        n = int((tmp_path / f"calls-{rank}").read_text())
        assert n <= allowed, f"rank {rank}: {n} all_reduce calls in 12 steps"


@pytest.mark.slow
def test_ddp_sigterm_on_one_rank_stops_both_at_a_logged_step(sample_store, tiny_config_path,
                                                             tmp_path):
    """SIGTERM to rank 1 only: the vote in the logging all_reduce stops both ranks at the
    same logged step; the run saves once, with equal replicas, and exits 0."""
    import signal
    import time
    p = torchrun_two_ranks(tmp_path, sample_store, tiny_config_path, log_step=5,
                           max_steps=100000, save_interval=100000)
    metrics = tmp_path / "ddp" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:]
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGTERM)
    err = finish(p, 180)
    assert p.returncode == 0, err[-3000:]
    assert "stopped by a signal to another rank" in err  # rank 0 logs; it learnt by the vote
    ckpts = list((tmp_path / "ddp" / "checkpoints").iterdir())
    assert len(ckpts) == 1
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] % 5 == 0
    a, b = state["rank_fingerprints"]
    assert a == b
