"""The training loop: data plan, optimizer and schedule, precision, DDP, evaluation,
checkpoints and resume. `train(cfg)` is the whole of train.py.

A run lives in ``<save_model_path>/<run_name>/``::

    config.json model.safetensors ... vocab.txt   the latest model, a complete HF folder
                                                  (interact.py --model_path <run> loads it)
    checkpoints/step-00001000/                    HF folder + training_state.pt
                                                  + trainer_state.json (the newest
                                                  --keep_checkpoints are kept)
    best/                                         HF folder, lowest validation loss
    train.log  metrics.jsonl  tensorboard/

Correctness rules (each has a test):
  * the loss of an optimizer step is (sum of token losses) / (target tokens of the whole
    step, all micro-batches and ranks); padding and context tokens are never targets;
  * gradients are clipped once per optimizer step, after accumulation;
  * AdamW without weight decay on biases, LayerNorm weights and embeddings;
  * linear warmup then linear or cosine decay, counted in optimizer steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .batching import WindowTable, build_windows, collate_rows, epoch_rows, plan_steps
from .budget import TimeBudget, format_duration, lr_factor, parse_duration
from .checkpoint import (CHECKPOINT_FORMAT, STATE_FILE, TENSORS_FILE, check_run_dir,
                         checkpoints_of, find_resume_checkpoint, is_best_dir, is_checkpoint,
                         publish_model, write_manifest)
from .config import TrainConfig
from .modeling import (build_model, check_same_vocab, is_reverse, load_config, load_model,
                       read_config, resolve_device, save_model, set_reverse,
                       set_speaker_token_ids, speaker_token_ids)
from .store import ReversedStore, TokenStore, resplit
from .tokenization import ChatTokenizer
from .utils import (ChitchatError, atomic_dir, atomic_write_text, get_logger,
                    out_of_memory_advice, python_command, write_json)

# Options a resumed run may change; the others define the run (data, model, batch, ...)
# and changing them would silently make it a different run.
RESUMABLE = {"device", "no_cuda", "num_workers", "epochs", "max_steps", "eval_interval",
             "save_interval", "keep_checkpoints", "log_step", "patience", "quiet",
             "log_path", "resume", "compile", "dtype", "exact_fp32", "save_model_path",
             "run_name", "threads", "max_time"}


# ---- distributed ------------------------------------------------------------------------
@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int | None = None  # torchrun's LOCAL_RANK; None outside torchrun

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def dist_info(env) -> DistInfo:
    """This process's place in the torchrun job that `env` (os.environ) describes."""
    local = int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(local_rank=local)
    return DistInfo(int(env["RANK"]), world, 0 if local is None else local)


def join_group(info: DistInfo, device: torch.device) -> None:
    """Join torchrun's process group; called after torch.cuda.set_device, so that NCCL
    binds each rank to its own GPU."""
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def broadcast_text(text: str, info: DistInfo, device: torch.device) -> str:
    """Rank 0's string on every rank (as bytes in a tensor: no pickling)."""
    if not info.enabled:
        return text
    data = torch.zeros(4096, dtype=torch.uint8, device=device)
    if info.main:
        raw = text.encode("utf-8")
        if len(raw) > 4095:
            raise ChitchatError(f"path too long to share between ranks: {text[:80]}...")
        data[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(data, 0)
    raw = bytes(data.cpu().tolist())
    return raw[:raw.index(0)].decode("utf-8")


def training_device(cfg: TrainConfig, info: DistInfo) -> torch.device:
    """The shared device rules, plus what only training needs: torchrun's local rank."""
    if cfg.device and "," in cfg.device:
        raise ChitchatError(f"--device {cfg.device}: for several GPUs use torchrun, e.g. "
                            f"CUDA_VISIBLE_DEVICES={cfg.device} torchrun --nproc_per_node "
                            f"{len(cfg.device.split(','))} train.py ...")
    # One process (plain or torchrun --nproc_per_node 1) may name any GPU; several take
    # cuda:LOCAL_RANK each.
    device = resolve_device(None if cfg.no_cuda else cfg.device, cfg.no_cuda,
                            info.local_rank if info.enabled else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ChitchatError(f"--device {device}: training supports cpu and cuda")
    return device


# ---- precision ----------------------------------------------------------------------------
def cpu_has_fast_bf16() -> bool:
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def pick_dtype(name: str, device_type: str, gpu_bf16: bool, cpu_bf16: bool) -> str:
    """--dtype auto -> the fastest safe choice (pure). gpu_bf16: the GPU has bf16 tensor
    cores (Ampere and newer); V100 and T4 only emulate bf16, which is slow there and
    sends SDPA to its slowest kernel, so they get fp16 with a GradScaler."""
    if name != "auto":
        if name == "fp16" and device_type != "cuda":
            raise ChitchatError("--dtype fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
        return name
    if device_type == "cuda":
        return "bf16" if gpu_bf16 else "fp16"
    return "bf16" if cpu_bf16 else "fp32"


def resolve_dtype(name: str, device: torch.device) -> str:
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return pick_dtype(name, device.type, gpu_bf16,
                      device.type == "cpu" and cpu_has_fast_bf16())


def set_fp32_precision(device: torch.device, exact_fp32: bool) -> bool:
    """Let float32 matrix products on a GPU use TF32 (Ampere and newer; older cards ignore
    it): fp32 runs, and the float32 parts of mixed precision, run several times faster at
    a precision training does not notice. --exact_fp32 keeps full fp32. Returns whether
    TF32 was turned on."""
    if device.type != "cuda" or exact_fp32:
        return False
    # The legacy switch, not torch.backends.*.fp32_precision: mixing the two APIs makes
    # torch.get_float32_matmul_precision() raise, and torch.compile calls it.
    torch.set_float32_matmul_precision("high")
    return True


def autocast_ctx(dtype: str, device: torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16"
                          else torch.float16)


# ---- optimizer and schedule -----------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay only on the weight matrices of attention and MLP.

    Biases and LayerNorm weights are 1-D; the token and position embeddings (wte, wpe,
    and lm_head, tied to wte) are 2-D but are lookup tables, which decay would shrink
    towards zero for rarely seen tokens.
    """
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for _, p in model.named_parameters():  # tied parameters are listed once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    # The fused kernel updates every parameter in one call (CPU and CUDA); the default on a
    # CPU is one Python-level update per parameter tensor (124 of them in the small config).
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.eps,
                             fused=device.type in ("cuda", "cpu") or None)


def restore_optimizer(optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state but keep this run's kernel choice: the saved
    param groups carry the device's flags of the run that wrote them (a CPU run's
    fused=None, as runs before the fused CPU kernel wrote, would turn the fused kernel off
    for the rest of the run)."""
    kernel = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for g, flags in zip(optimizer.param_groups, kernel):
        g.update(flags)


# ---- the loss ---------------------------------------------------------------------------------
class LossModel(nn.Module):
    """GPT-2 plus the summed next-token loss over the target positions of a batch.

    Only target positions go through the LM head, so padding and context tokens cost no
    vocabulary projection and the (B, T, V) logits tensor never exists. Wrapping the whole
    computation in one module lets DDP and torch.compile see a single forward.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, target_pos, target_ids,
                token_type_ids=None):
        if self.model.config._attn_implementation != "sdpa":
            # eager attention adds the mask to the scores: turn "may attend" into a bias
            attention_mask = torch.zeros(attention_mask.shape, device=attention_mask.device
                                         ).masked_fill_(~attention_mask,
                                                        torch.finfo(torch.float32).min)
        hidden = self.model.transformer(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            token_type_ids=token_type_ids, use_cache=False).last_hidden_state  # (B, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_pos)  # (N, H)
        logits = self.model.lm_head(hidden)  # (N, V)
        return F.cross_entropy(logits.float(), target_ids, reduction="sum")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if isinstance(v, torch.Tensor)}


def train_step(runner, ddp, model, optimizer, micro_batches: list[dict], n_targets: int,
               world: int, amp, scaler, max_grad_norm: float, device: torch.device):
    """One optimizer step over the micro-batches of this rank.

    Each micro-batch's loss sum is scaled by world / n_targets (n_targets: the whole step's
    targets on all ranks), so after DDP averages over ranks the gradient is exactly
    d(sum of all token losses)/d(weights) / n_targets. Returns (local loss sum, grad norm)
    as device tensors: nothing here waits for the device.
    """
    scale = world / max(1, n_targets)
    total = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        sync = ddp is None or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else ddp.no_sync()):
            with amp:
                loss_sum = runner(**to_device(mb, device))
            scaled = loss_sum * scale
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss_sum.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


@torch.no_grad()
def evaluate(runner, model, store, table: WindowTable, cfg: TrainConfig, row_len,
             pad_id: int, speaker_ids, info: DistInfo, amp, device) -> dict | None:
    """Validation loss (per target token, over all ranks) and perplexity, or None when
    there is no validation data."""
    if len(table) == 0:
        return None
    rows = epoch_rows(table, 0, cfg.seed, cfg.batching, row_len or table.max_len,
                      shuffle=False)
    batches = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, targets
    for rows_b in batches[info.rank::info.world]:
        mb = collate_rows(store, table, rows_b, pad_id,
                          row_len if cfg.batching == "pack" else None, speaker_ids)
        with amp:
            sums[0] += runner(**to_device(mb, device)).double()
        sums[1] += len(mb["target_ids"])
    if info.enabled:
        dist.all_reduce(sums)
    model.train(was_training)
    loss = float(sums[0] / sums[1])
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "targets": int(sums[1])}


# ---- run folder and checkpoints ---------------------------------------------------------------
def merge_resume_options(cfg: TrainConfig, saved: dict, where: Path) -> TrainConfig:
    """The run's saved options, with the CLI's values for the few that may change.

    A flag counts as given when it differs from its default (argparse cannot tell more).
    """
    defaults = TrainConfig.__dataclass_fields__
    merged = {k: v for k, v in saved.items() if k in defaults}  # options of newer versions
    for f in dataclasses.fields(TrainConfig):
        if f.name not in saved:
            merged[f.name] = getattr(cfg, f.name)
            continue
        value = getattr(cfg, f.name)
        given = value != defaults[f.name].default
        if f.name in RESUMABLE:
            if given or f.name in ("resume", "quiet"):
                merged[f.name] = value
        elif given and value != saved[f.name]:
            raise ChitchatError(
                f"--{f.name} {value} differs from the run being resumed ({where}), which "
                f"used {saved[f.name]}. A resumed run keeps it; drop --{f.name}, or start a "
                "new run without --resume.")
    merged["run_name"] = saved["run_name"]
    merged["save_model_path"] = saved["save_model_path"]
    return TrainConfig(**merged)


def rng_state() -> dict:
    # CUDA generators are not saved: seed_step reseeds every generator (torch.manual_seed
    # seeds all GPUs) before each step's first random draw, so their state at a checkpoint
    # never matters, and a run may resume with other GPUs visible. Checkpoints of older
    # versions carry a "cuda" entry; it is ignored.
    return {"cpu": torch.get_rng_state()}


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed dropout from (seed, rank, step): a resumed run, or any step replayed, draws
    exactly the same masks without depending on what ran before."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def fingerprint(model: nn.Module) -> list[float]:
    """Per-parameter sums (float64): equal on every rank iff DDP kept the replicas equal."""
    return [float(p.detach().double().sum()) for p in model.parameters()]


ESTIMATE_AFTER_STEPS = 3  # the first step pays for warm-up; two more give a speed


def log_estimate(log, device, elapsed, first_step_s, done, tokens_per_step, steps_per_epoch,
                 steps_left, budget, cfg) -> None:
    """How long an epoch and the run will take, from the steps measured so far."""
    per = (elapsed - first_step_s) / max(1, done - 1)
    epoch_s = per * steps_per_epoch
    msg = (f"speed: {per:.2f} s/step, {tokens_per_step / max(per, 1e-9):,.0f} tok/s -> an "
           f"epoch takes about {format_duration(epoch_s)}")
    if budget:
        msg += (f"; --max_time {cfg.max_time} fits about {budget.total} steps "
                f"({budget.total / steps_per_epoch:.2f} epochs), warmup {budget.warmup}")
        log.info(msg)
        return
    run_s = per * steps_left
    log.info(msg + f", the run ({steps_left} more steps) about {format_duration(run_s)}")
    if device.type == "cpu" and run_s > 3600:
        log.warning(
            f"note: this run needs about {format_duration(run_s)} on this CPU. For a first "
            "model, use a smaller config (config/model_config_dialogue_middle.json, 6 layers "
            "x 384; or _tiny.json), fewer --epochs, or a time budget: --max_time 2h (warmup "
            "and decay then fit the budget). Ctrl-C saves and --resume auto continues.")


def sync_budget(budget: TimeBudget, elapsed: float, info: DistInfo,
                device: torch.device) -> bool:
    """Rank 0's plan and verdict on every rank: the lr and the last step must agree, and
    each rank's clock differs."""
    expired = budget.expired(elapsed)
    if not info.enabled:
        return expired
    t = torch.tensor([budget.total, budget.warmup, float(expired)], dtype=torch.float64,
                     device=device)
    dist.broadcast(t, 0)
    budget.total, budget.warmup = int(t[0]), int(t[1])
    return bool(t[2])


def next_step_hint(cfg: TrainConfig, run_dir: Path) -> str:
    """The command that uses what was trained, as the user's shell can run it."""
    py = python_command()
    model = run_dir / "best" if (run_dir / "best").is_dir() else run_dir
    if cfg.reverse:
        return (f"It is a reverse model, for MMI reranking: {py} interact.py --model_path "
                f"<a forward model> --mmi_model_path {model}")
    return f"Chat with it: {py} interact.py --model_path {model}"


def attention_kernel(model, device: torch.device, amp) -> str:
    """The SDPA kernel that training's attention runs, found by running one small call
    shaped like it (a boolean block mask, the model's attention dropout, its head size,
    forward and backward) under the profiler: kernel choices differ by device, dtype, mask
    and dropout, and a silent fall to the math path costs a large share of a step."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    hd = cfg.n_embd // cfg.n_head
    q = torch.randn(1, cfg.n_head, 16, hd, device=device, requires_grad=True)
    k, v = torch.randn(2, 1, cfg.n_head, 16, hd, device=device)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=device).tril()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        with amp:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=cfg.attn_pdrop)
        out.float().sum().backward()
    names = sorted({e.key for e in prof.key_averages()
                    if e.key.startswith("aten::_scaled_dot_product_")
                    and not e.key.endswith("_backward")})
    return ", ".join(n.removeprefix("aten::") for n in names) or "unknown"


def check_same_data(state: dict, now: dict, ckpt: Path, store) -> None:
    """A resumed run must see the vocab and token ids its checkpoint was trained on."""
    saved = state.get("data")
    if saved is None:  # a checkpoint from before fingerprints: compare the vocab files
        same_vocab = (ckpt / "vocab.txt").read_bytes() == store.vocab_path.read_bytes()
        same_tokens = True
    else:
        same_vocab = saved["vocab_sha256"] == now["vocab_sha256"]
        same_tokens = saved["tokens_sha256"] == now["tokens_sha256"]
    if not same_vocab:
        raise ChitchatError(
            f"the vocab of {store.path} is not the one {ckpt} was trained with (the store was "
            "rebuilt since); the checkpoint's embeddings belong to its own vocab, so resuming "
            "would train on shuffled token ids. Rebuild the store with the run's vocab: "
            f"python preprocess.py --train_path <train.txt> --save_path {store.path} "
            f"--vocab_path {ckpt / 'vocab.txt'} --force; or start a new run.")
    if not same_tokens:
        raise ChitchatError(
            f"the token ids in {store.path} changed since {ckpt} was saved (the corpus was "
            "rebuilt), so the run's data position means nothing now. To go on training on "
            f"the new data, start a new run from it: --pretrained_model {ckpt}")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after `step`: a resumed run logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if _record_step(line) <= step]
    atomic_write_text(path, "".join(kept))


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line torn by a kill: drop it


def save_error(path: Path, last_ckpt: Path | None, e: Exception) -> ChitchatError:
    try:
        free = f"{shutil.disk_usage(path.parent.parent).free / 2**20:,.0f} MB free"
    except OSError:
        free = "free space unknown"
    kept = (f"The previous checkpoint {last_ckpt} is intact." if last_ckpt else
            "No earlier checkpoint exists.")
    return ChitchatError(f"could not write checkpoint {path} ({free}): {e}. Nothing partial "
                         f"was kept. {kept} Free disk space (or lower --keep_checkpoints) and "
                         "continue with --resume auto.")


# ---- model --------------------------------------------------------------------------------
def make_model(cfg: TrainConfig, tok: ChatTokenizer, store: TokenStore, log):
    if cfg.pretrained_model:
        path = Path(cfg.pretrained_model)
        has_vocab = (path / "vocab.txt").is_file()
        model, model_tok = load_model(path, None if has_vocab else store.vocab_path)
        n_emb = model.get_input_embeddings().weight.shape[0]
        # A folder without vocab.txt was loaded with the store's vocab: load_model checked
        # the sizes, so the fix below is for folders with their own vocab.
        fix = (f"Preprocess the corpus with the model's vocab: python preprocess.py "
               f"--train_path <train.txt> --pretrained_model {path} --save_path "
               f"{store.path}")
        if n_emb != tok.vocab_size:
            raise ChitchatError(f"vocab size mismatch: the model at {path} has {n_emb} token "
                                f"embeddings but the data at {store.path} has a vocab of "
                                f"{tok.vocab_size} tokens. {fix}")
        if has_vocab:
            check_same_vocab(model_tok, path / "vocab.txt", tok, store.vocab_path, fix)
        model.train()
        log.info(f"fine-tuning {path} ({model.num_parameters():,} parameters, n_positions "
                 f"{model.config.n_positions})")
        # load_model took the special ids from the vocab; say so when the folder had others.
        for note in read_config(path, model_tok)[1]:
            log.info(f"  {note}")
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(load_config(cfg.model_config, tok))
    if cfg.speaker_ids and speaker_token_ids(model.config) is None:
        set_speaker_token_ids(model.config, tok.speaker_ids())
    if cfg.pretrained_model and is_reverse(model.config) and not cfg.reverse:
        raise ChitchatError(f"{cfg.pretrained_model} is a reverse model (trained with "
                            "--reverse); continue it with --reverse, or fine-tune a forward "
                            "model instead")
    # A forward model may seed a reverse one (--reverse --pretrained_model fwd/): the
    # flag follows the data order it is trained on from now on.
    set_reverse(model.config, cfg.reverse)
    return model


def check_lengths(cfg: TrainConfig, model) -> None:
    n_pos = model.config.n_positions
    if cfg.max_len > n_pos:
        raise ChitchatError(f"--max_len {cfg.max_len} exceeds the model's n_positions "
                            f"{n_pos}: positions beyond it have no embedding. Use --max_len "
                            f"{n_pos} or less, or a config with larger n_positions.")


# ---- the run ------------------------------------------------------------------------------
class _StepData(torch.utils.data.Dataset):
    """Item i: this rank's collated micro-batches of step i, the step's target count and
    its real tokens on all ranks (both known on the host, so no device sync is needed)."""

    def __init__(self, store, table, plans, rank, pad_id, row_len, speaker_ids):
        self.store, self.table, self.plans, self.rank = store, table, plans, rank
        self.pad_id, self.row_len, self.speaker_ids = pad_id, row_len, speaker_ids

    def __len__(self):
        return len(self.plans)

    def __getitem__(self, i):
        p = self.plans[i]
        micro = [collate_rows(self.store, self.table, rows, self.pad_id, self.row_len,
                              self.speaker_ids) for rows in p.micro[self.rank]]
        lengths = self.table.lengths
        tokens = int(sum(lengths[w] for r in p.micro for m in r for row in m for w in row))
        return micro, p.n_targets, tokens


class _Signals:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT
    interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _Metrics:
    """metrics.jsonl plus TensorBoard (when installed), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, log):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("TensorBoard logging off (pip install tensorboard to turn it on)")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("event", "step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self):
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _oom_advice(cfg: TrainConfig, dtype: str, row_len, last_ckpt: Path | None) -> str:
    rows = f"rows of {row_len or 'up to ' + str(cfg.max_len)} tokens"
    lower = [f"a smaller --batch_size (now {cfg.batch_size}, {rows}) with more "
             "--gradient_accumulation_steps (same effective batch)",
             "a smaller --pack_len/--max_len"]
    if dtype == "fp32":
        lower.append("--dtype bf16 (fp16 on cards without bf16)")
    text = "Use " + ", ".join(lower[:-1]) + " or " + lower[-1] + "."
    if last_ckpt is None:
        return text + " No checkpoint was saved yet."
    return (text + f" The last checkpoint, {last_ckpt}, is kept. A resumed run keeps its "
            "batch shape (only --dtype may change): change the batch in a new run that "
            f"starts from it with --pretrained_model {last_ckpt}.")


def _loss_error(step_from: int, step_to: int, last_ckpt: Path | None, cfg, where="train"):
    keep = (f"The last good checkpoint is {last_ckpt}; nothing after it was saved."
            if last_ckpt else "No checkpoint was saved (none was due yet).")
    return ChitchatError(
        f"the {where} loss became NaN or inf between optimizer steps {step_from} and "
        f"{step_to}. {keep} Try a lower --lr (now {cfg.lr:g}), more --warmup_steps, "
        f"--max_grad_norm 1.0, or --dtype fp32 / bf16 instead of fp16; check the "
        "--pretrained_model weights for NaN.")


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; returns the run folder."""
    info = dist_info(os.environ)
    device = training_device(cfg, info)
    join_group(info, device)
    try:
        return _train(cfg, info, device)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, info: DistInfo, device: torch.device) -> Path:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per save is noise
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # -- which run: new, or resumed (rank 0 decides, the others follow) ----------------------
    ckpt = None
    if cfg.resume:
        ckpt_text = ""
        if info.main:
            found = find_resume_checkpoint(cfg.resume, cfg.save_model_path, cfg.run_name,
                                           get_logger("chitchat.train", quiet=cfg.quiet))
            ckpt_text = str(found) if found else ""
        ckpt_text = broadcast_text(ckpt_text, info, device)
        ckpt = Path(ckpt_text) if ckpt_text else None
    state: dict = {}
    if ckpt is not None:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ChitchatError(f"{ckpt}: checkpoint format {state.get('format')}, this "
                                f"version reads {CHECKPOINT_FORMAT}")
        cfg = merge_resume_options(cfg, state["options"], ckpt)
        if state["world_size"] != info.world:
            raise ChitchatError(f"{ckpt} was written by a run on {state['world_size']} "
                                f"process(es), this one has {info.world}. Resume with the same "
                                "torchrun --nnodes/--nproc_per_node: the data order depends "
                                "on it.")
        run_dir = ckpt.parent.parent
    else:
        name = cfg.run_name or broadcast_text(datetime.now().strftime("%Y%m%d-%H%M%S"), info,
                                                device)
        cfg = dataclasses.replace(cfg, run_name=name)
        run_dir = Path(cfg.save_model_path) / name
        if info.main and checkpoints_of(run_dir):
            raise ChitchatError(f"{run_dir} already holds checkpoints. Continue it with "
                                f"--resume auto --run_name {name}, or pick another "
                                "--run_name.")
        if info.main:
            check_run_dir(run_dir)
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            trim_metrics(run_dir / "metrics.jsonl", state["step"])
    log = get_logger("chitchat.train", (cfg.log_path or run_dir / "train.log")
                     if info.main else None, quiet=not info.main)
    if not info.main:  # only rank 0 logs (the tqdm redirect below ignores handler levels)
        log.setLevel("WARNING")
    if ckpt is None and cfg.resume == "auto" and info.main:
        log.info("--resume auto: no checkpoint found, starting a new run")

    # -- data --------------------------------------------------------------------------------
    store = TokenStore(cfg.train_path)
    if cfg.reverse:
        store = ReversedStore(store)
    tok = store.tokenizer()
    data_print = store.fingerprint()
    if ckpt is not None:
        check_same_data(state, data_print, ckpt, store)
    train_idx, valid_idx = resplit(store, cfg.val_num, cfg.val_fraction, cfg.seed)
    train_table = build_windows(store, train_idx, cfg.max_len, cfg.loss_on)
    valid_table = build_windows(store, valid_idx, cfg.max_len, cfg.loss_on)
    if len(train_table) == 0:
        raise ChitchatError(f"{store.path}: no training window has a target token "
                            f"({len(train_idx)} training dialogues, --loss_on {cfg.loss_on})."
                            " With --loss_on response every dialogue needs two utterances.")
    row_len = (cfg.pack_len or cfg.max_len) if cfg.batching == "pack" else None

    # -- model, optimizer, precision -----------------------------------------------------------
    if ckpt is not None:
        model, _ = load_model(ckpt, store.vocab_path)
        model.train()
    else:
        model = make_model(cfg, tok, store, log)
    check_lengths(cfg, model)
    speaker_ids = speaker_token_ids(model.config)
    model.to(device)
    dtype = resolve_dtype(cfg.dtype, device)
    amp = autocast_ctx(dtype, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    optimizer = make_optimizer(model, cfg, device)
    tf32 = set_fp32_precision(device, cfg.exact_fp32)
    runner = loss_model = LossModel(model)
    ddp = None
    if info.enabled:
        ddp = runner = nn.parallel.DistributedDataParallel(
            loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)

    # -- schedule ------------------------------------------------------------------------------
    first_plan = plan_steps(epoch_rows(train_table, 0, cfg.seed, cfg.batching,
                                       row_len or cfg.max_len),
                            train_table, cfg.batch_size, cfg.gradient_accumulation_steps,
                            info.world)
    total_steps = cfg.max_steps or cfg.epochs * len(first_plan)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * total_steps)

    step = epoch = pos = 0
    best = math.inf
    bad_evals = 0
    tokens_seen = 0
    if ckpt is not None:
        tensors = torch.load(ckpt / TENSORS_FILE, map_location="cpu", weights_only=True)
        restore_optimizer(optimizer, tensors["optimizer"])
        if scaler is not None and tensors.get("scaler"):
            scaler.load_state_dict(tensors["scaler"])
        torch.set_rng_state(tensors["rng"]["cpu"])  # CUDA states: see rng_state
        step, epoch, pos = state["step"], state["epoch"], state["step_in_epoch"]
        best = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        bad_evals, tokens_seen = state["bad_evals"], state["tokens_seen"]
        log.info(f"resuming {run_dir} from {ckpt.name}: step {step}, epoch {epoch + 1}, "
                 f"step {pos} of the epoch")

    budget = (TimeBudget(parse_duration(cfg.max_time), cap=total_steps - step,
                         warmup_steps=cfg.warmup_steps) if cfg.max_time else None)
    epoch_tokens = int(train_table.lengths.sum())
    if info.main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info(f"run {run_dir}  device {device}  dtype {dtype}"
                 + ("  (TF32 matmuls)" if tf32 else "") + f"  processes {info.world}  "
                 f"threads {torch.get_num_threads()}  params {n_params / 1e6:.1f}M  "
                 f"vocab {tok.vocab_size}")
        log.info(f"data {store.path}: {len(train_idx)} train / {len(valid_idx)} validation "
                 f"dialogues -> {len(train_table)} / {len(valid_table)} windows, "
                 f"{epoch_tokens:,} tokens per epoch; "
                 f"{cfg.batching} rows of {row_len or 'longest'} tokens; "
                 f"{len(first_plan)} steps per epoch; "
                 + (f"up to {total_steps} steps in --max_time {cfg.max_time} (warmup and "
                    "decay fitted to the measured speed)" if budget else
                    f"{total_steps} steps; warmup {warmup}")
                 + ("; REVERSED utterance order (MMI reverse model)" if cfg.reverse else ""))
    if info.main and model.config._attn_implementation == "sdpa":
        kernel = attention_kernel(model, device, amp)
        if "math" in kernel:
            log.warning(f"attention: {kernel}, SDPA's unfused path"
                        + (f" (attn_pdrop {model.config.attn_pdrop} has no fused kernel "
                           "here; with attn_pdrop 0 the fused one runs, see "
                           "docs/benchmarks.md)" if model.config.attn_pdrop > 0 else ""))
        else:
            log.info(f"attention: {kernel}")
    metrics = _Metrics(run_dir, info.main, log)

    last_ckpt = ckpt if info.main else None  # the newest intact checkpoint
    last_saved = step if ckpt is not None else -1
    checked_step = step
    bad_loss = torch.zeros((), device=device)  # loss sums since the last finiteness check

    def state_json(epoch_, pos_, val=None):
        return {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch_,
                "step_in_epoch": pos_, "tokens_seen": tokens_seen,
                "best_val_loss": None if math.isinf(best) else best, "bad_evals": bad_evals,
                "world_size": info.world, "dtype": dtype, "last_val": val,
                "scheduler": {"kind": cfg.lr_schedule, "base_lr": cfg.lr,
                              "lr": optimizer.param_groups[0]["lr"],
                              **({"budget_seconds": budget.seconds, "budget_from_step": step0,
                                  "warmup_steps": budget.warmup,
                                  "total_steps": step0 + budget.total} if budget else
                                 {"warmup_steps": warmup, "total_steps": total_steps})},
                "options": dataclasses.asdict(cfg), "data": data_print}

    def check_finite(where="train"):
        nonlocal checked_step
        flag = bad_loss.clone()
        if info.enabled:
            dist.all_reduce(flag)
        if not torch.isfinite(flag):
            raise _loss_error(checked_step, step, last_ckpt, cfg, where)
        bad_loss.zero_()
        checked_step = step

    def save(epoch_, pos_, final=False):
        nonlocal last_ckpt, last_saved
        check_finite()
        prints = fingerprint(model)
        if info.enabled:  # record every rank's replica fingerprint (they must agree)
            t = torch.tensor(prints, dtype=torch.float64, device=device)
            gathered = [torch.empty_like(t) for _ in range(info.world)]
            dist.all_gather(gathered, t)
            rank_prints = [g.sum().item() for g in gathered]
        else:
            rank_prints = [sum(prints)]
        if info.main:
            path = run_dir / "checkpoints" / f"step-{step:08d}"
            try:
                with atomic_dir(path, is_checkpoint, "a train.py checkpoint") as tmp:
                    save_model(model, tok, tmp)
                    torch.save({"optimizer": optimizer.state_dict(),
                                "scaler": scaler.state_dict() if scaler is not None else None,
                                "rng": rng_state()}, tmp / TENSORS_FILE)
                    st = state_json(epoch_, pos_)
                    st["rank_fingerprints"] = rank_prints
                    write_json(tmp / STATE_FILE, st)
                    write_manifest(tmp)
                publish_model(path, run_dir)
            except (OSError, RuntimeError) as e:
                raise save_error(path, last_ckpt, e) from e
            for old in checkpoints_of(run_dir)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old)
            last_ckpt = path
            log.info(f"saved {path}" + (" (final)" if final else ""))
        last_saved = step
        if info.enabled:
            dist.barrier()

    def oom_advice():
        return _oom_advice(cfg, dtype, row_len, last_ckpt)

    def run_eval(epoch_, reason):
        nonlocal best, bad_evals
        with out_of_memory_advice(device, f"validating after step {step}", oom_advice):
            res = evaluate(runner, model, store, valid_table, cfg, row_len, tok.pad_id,
                           speaker_ids, info, amp, device)
        if res is None:
            return
        if not math.isfinite(res["loss"]):
            raise _loss_error(checked_step, step, last_ckpt, cfg, "validation")
        improved = res["loss"] < best
        if improved:
            best, bad_evals = res["loss"], 0
            if info.main:
                with atomic_dir(run_dir / "best", is_best_dir,
                                "a best/ model folder of train.py") as tmp:
                    save_model(model, tok, tmp)
                    write_json(tmp / "best.json", {"step": step, "epoch": epoch_ + 1,
                                                   "val_loss": res["loss"],
                                                   "val_ppl": res["ppl"]})
        else:
            bad_evals += 1
        log.info(f"eval  step {step} | epoch {epoch_ + 1} | val_loss {res['loss']:.4f} | "
                 f"val_ppl {res['ppl']:.2f} | {reason}"
                 + (" | best" if improved else f" | no improvement ({bad_evals})"))
        metrics.write({"event": "eval", "step": step, "epoch": epoch_ + 1,
                       "val_loss": res["loss"], "val_ppl": res["ppl"], "reason": reason,
                       "tokens": tokens_seen})

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not info.main or cfg.quiet or not sys.stderr.isatty())
    acc_loss = torch.zeros((), device=device)
    acc_targets = acc_tokens = 0
    last_norm = torch.zeros((), device=device)
    t_log = t_start = time.perf_counter()
    step0, tokens0, first_step_s = step, tokens_seen, 0.0
    stop_reason = None
    model.train()
    try:
        with _Signals() as signals, logging_redirect_tqdm([log]):
            while (step < total_steps and stop_reason is None
                   and (cfg.max_steps or epoch < cfg.epochs)):
                plan = first_plan if epoch == 0 else plan_steps(
                    epoch_rows(train_table, epoch, cfg.seed, cfg.batching,
                               row_len or cfg.max_len),
                    train_table, cfg.batch_size, cfg.gradient_accumulation_steps, info.world)
                loader = torch.utils.data.DataLoader(
                    _StepData(store, train_table, plan[pos:], info.rank, tok.pad_id, row_len,
                              speaker_ids),
                    batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                    pin_memory=device.type == "cuda")
                for k, (micro, n_targets, n_tokens) in enumerate(loader, start=pos):
                    seed_step(cfg.seed, info.rank, step)
                    factor = (budget.factor(step - step0, cfg.lr_schedule) if budget else
                              lr_factor(step, warmup, total_steps, cfg.lr_schedule))
                    for g in optimizer.param_groups:
                        g["lr"] = cfg.lr * factor
                    with out_of_memory_advice(device, f"at training step {step + 1}",
                                              oom_advice):
                        loss_sum, last_norm = train_step(
                            runner, ddp, model, optimizer, micro, n_targets, info.world, amp,
                            scaler, cfg.max_grad_norm, device)
                    step += 1
                    pos = k + 1
                    tokens_seen += n_tokens
                    acc_loss += loss_sum
                    bad_loss += loss_sum
                    acc_targets += n_targets
                    acc_tokens += n_tokens
                    bar.update(1)
                    epoch_done = pos == len(plan)
                    last = step >= total_steps or (not cfg.max_steps and epoch_done
                                                   and epoch + 1 >= cfg.epochs)
                    elapsed = time.perf_counter() - t_start
                    if step - step0 == 1:
                        first_step_s = elapsed
                    out_of_time = False
                    if budget and (not info.enabled or step % cfg.log_step == 0 or last):
                        budget.update(step - step0, elapsed, first_step_s)
                        out_of_time = sync_budget(budget, elapsed, info, device)
                        bar.total = step0 + budget.total
                    if info.main and step - step0 == ESTIMATE_AFTER_STEPS:
                        log_estimate(log, device, elapsed, first_step_s, step - step0,
                                     (tokens_seen - tokens0) / (step - step0), len(first_plan),
                                     total_steps - step, budget, cfg)

                    # Every rank must stop at the same step. Under DDP the signal vote
                    # rides on the logging all_reduce (one collective and one host sync
                    # per --log_step, not per step), so a signal takes effect at the next
                    # logged step; a lone process stops after the current step.
                    got_signal = signals.received is not None
                    if step % cfg.log_step == 0 or last or epoch_done:
                        sums = torch.stack((acc_loss, torch.full((), float(got_signal),
                                                                 device=device)))
                        if info.enabled:
                            dist.all_reduce(sums)
                        loss_total, votes = sums.tolist()
                        got_signal = votes > 0
                        loss = loss_total / max(1, acc_targets)
                        if not math.isfinite(loss):
                            raise _loss_error(checked_step, step, last_ckpt, cfg)
                        bad_loss.zero_()
                        checked_step = step
                        now = time.perf_counter()
                        tps = acc_tokens / max(1e-9, now - t_log)
                        lr = optimizer.param_groups[0]["lr"]
                        norm = float(last_norm)
                        plan_end = step0 + budget.total if budget else total_steps
                        eta = ""
                        if step - step0 > 1:
                            per = (elapsed - first_step_s) / (step - step0 - 1)
                            eta = f" | eta {format_duration(per * (plan_end - step))}"
                        log.info(f"step {step}/{plan_end} | epoch {epoch + 1} | loss "
                                 f"{loss:.4f} | ppl {math.exp(min(loss, 700)):.2f} | lr "
                                 f"{lr:.3e} | grad_norm {norm:.3f} | {tps:,.0f} tok/s{eta}")
                        metrics.write({"event": "train", "step": step, "epoch": epoch + 1,
                                       "loss": loss, "ppl": math.exp(min(loss, 700)),
                                       "lr": lr, "grad_norm": norm, "tokens_per_s": tps,
                                       "tokens": tokens_seen})
                        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                        acc_loss.zero_()
                        acc_targets = acc_tokens = 0
                        t_log = time.perf_counter()
                    elif info.enabled:
                        got_signal = False  # voted on at the next logged step

                    if (epoch_done or last or out_of_time
                            or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                        run_eval(epoch, "epoch end" if epoch_done else
                                 "end" if last or out_of_time else "interval")
                        if cfg.patience and bad_evals >= cfg.patience:
                            stop_reason = (f"early stop: no validation improvement in "
                                           f"{bad_evals} evaluations (--patience)")
                    if got_signal:
                        stop_reason = ("stopped by "
                                       + (signals.received or "a signal to another rank"))
                    elif out_of_time and not last:
                        stop_reason = f"stopped by the time budget (--max_time {cfg.max_time})"
                    save_pos = (epoch + 1, 0) if epoch_done else (epoch, pos)
                    if step % cfg.save_interval == 0 or stop_reason or last:
                        save(*save_pos, final=last or stop_reason is not None)
                    if stop_reason or last:
                        break
                if stop_reason is None and pos >= len(plan):
                    epoch, pos = epoch + 1, 0
            if last_saved != step:  # the loop ended without a step (nothing left to do)
                save(epoch, pos, final=True)
    finally:
        bar.close()
        metrics.close()

    if stop_reason and stop_reason.startswith("stopped by"):
        log.info(f"{stop_reason} at step {step}; saved. Continue with: {python_command()} "
                 f"train.py --resume auto --run_name {cfg.run_name} --save_model_path "
                 f"{cfg.save_model_path}" + (f" --max_time {cfg.max_time}" if budget else ""))
    elif stop_reason:
        log.info(stop_reason)
    best_dir = run_dir / "best"
    log.info(f"done: {step} steps. Model: {run_dir} (best validation: "
             f"{best_dir if best_dir.is_dir() else 'none'}). " + next_step_hint(cfg, run_dir))
    return run_dir
