"""The training loop: `train(cfg)` is the whole of train.py.

`train_setup.setup` builds the run (data, model, optimizer, precision, schedule) and the
`TrainState` it starts from; `fit` runs the steps, logging, validating (`validate`) and
saving (`save`; the files are checkpoint.py's) as the options ask.

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
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .budget import ESTIMATE_AFTER_STEPS, format_duration, log_estimate, lr_factor
from .checkpoint import CHECKPOINT_FORMAT, is_best_dir, save_checkpoint
from .config import TrainConfig
from .distributed import (StopSignals, barrier, dist_info, join_group, leave_group,
                          rank_fingerprints, sum_over_ranks, sync_budget, training_device,
                          vote_to_stop)
from .loss import to_device, windowed_loss
from .modeling import save_model
from .precision import fp32_matmul
from .train_setup import Run, TrainState, epoch_loader, setup
from .utils import (ChitchatError, atomic_dir, out_of_memory_advice, python_command,
                    write_json)


def train(cfg: TrainConfig, given: frozenset[str] | None = None) -> Path:
    """Train as `cfg` says; returns the run folder. `given`: the flags typed on the command
    line, which a resumed run takes over its saved options (`merge_resume_options`)."""
    info = dist_info(os.environ)
    device = training_device(cfg, info)
    join_group(info, device)
    clean = False
    try:
        run_dir = _train(cfg, info, device, given)
        clean = True
        return run_dir
    finally:
        leave_group(info, clean)


def _train(cfg: TrainConfig, info, device: torch.device, given) -> Path:
    # The run (and the DDP wrapper in it, whose reducer holds the process group) must be
    # gone when train() leaves the group: see distributed.leave_group.
    run, st = setup(cfg, info, device, given)
    with fp32_matmul(run.fp32_matmul):
        fit(run, st)
    _report_end(run, st)
    return run.run_dir


# ---- one optimizer step -----------------------------------------------------------------------
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


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed dropout from (seed, rank, step): a resumed run, or any step replayed, draws
    exactly the same masks without depending on what ran before."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def fingerprint(model: nn.Module) -> list[float]:
    """Per-parameter sums (float64): equal on every rank iff DDP kept the replicas equal."""
    return [float(p.detach().double().sum()) for p in model.parameters()]


# ---- the loop ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _LogWindow:
    """What the steps since the last logged step add up to."""
    loss: torch.Tensor
    targets: int = 0
    tokens: int = 0
    t0: float = 0.0

    def reset(self) -> None:
        self.loss.zero_()
        self.targets = self.tokens = 0
        self.t0 = time.perf_counter()


def fit(run: Run, st: TrainState) -> None:
    """Train from `st` until the planned steps, the epochs, the time budget, patience or a
    signal end the run; the last step is always saved."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    cfg, info = run.cfg, run.info
    bar = tqdm(total=run.total_steps, initial=st.step, unit="step", dynamic_ncols=True,
               disable=not info.main or cfg.quiet or not sys.stderr.isatty())
    win = _LogWindow(torch.zeros((), device=run.device))
    win.t0 = st.t_start = time.perf_counter()
    run.model.train()
    try:
        with StopSignals() as signals, logging_redirect_tqdm([run.log]):
            while (st.step < run.total_steps and st.stop_reason is None
                   and (cfg.max_steps or st.epoch < cfg.epochs)):
                plan, loader = epoch_loader(run, st.epoch, st.pos)
                for k, (micro, n_targets, n_tokens) in enumerate(loader, start=st.pos):
                    _one_step(run, st, micro, n_targets, win)
                    st.pos = k + 1
                    st.tokens_seen += n_tokens
                    win.targets += n_targets
                    win.tokens += n_tokens
                    bar.update(1)
                    if _after_step(run, st, len(plan), win, bar, signals):
                        break
                if st.stop_reason is None and st.pos >= len(plan):
                    st.epoch, st.pos = st.epoch + 1, 0
            if st.last_saved != st.step:  # the loop ended without a step (nothing left)
                save(run, st, st.epoch, st.pos, final=True)
    finally:
        bar.close()
        run.metrics.close()


def _one_step(run: Run, st: TrainState, micro: list[dict], n_targets: int,
              win: _LogWindow) -> None:
    cfg = run.cfg
    seed_step(cfg.seed, run.info.rank, st.step)
    factor = (st.budget.factor(st.step - st.step0, cfg.lr_schedule) if st.budget else
              lr_factor(st.step, run.warmup, run.total_steps, cfg.lr_schedule))
    for g in run.optimizer.param_groups:
        g["lr"] = cfg.lr * factor
    with out_of_memory_advice(run.device, f"at training step {st.step + 1}",
                              lambda: _oom_advice(run, st)):
        loss_sum, st.last_norm = train_step(
            run.runner, run.ddp, run.model, run.optimizer, micro, n_targets, run.info.world,
            run.amp, run.scaler, cfg.max_grad_norm, run.device)
    st.step += 1
    win.loss += loss_sum
    st.bad_loss += loss_sum


def _after_step(run: Run, st: TrainState, plan_len: int, win: _LogWindow, bar,
                signals: StopSignals) -> bool:
    """Log, validate, decide whether to stop and save, as the step just done asks;
    True: the loop stops here."""
    cfg, info = run.cfg, run.info
    epoch_done = st.pos == plan_len
    last = st.step >= run.total_steps or (not cfg.max_steps and epoch_done
                                          and st.epoch + 1 >= cfg.epochs)
    elapsed, out_of_time = _watch_clock(run, st, last, bar)
    # Every rank must stop at the same step. Under DDP the signal vote rides on the logging
    # all_reduce (one collective and one host sync per --log_step, not per step), so a
    # signal takes effect at the next logged step; a lone process stops after the current
    # step.
    got_signal = signals.received is not None
    if st.step % cfg.log_step == 0 or last or epoch_done:
        got_signal = _log_step(run, st, win, got_signal, elapsed, bar)
    elif info.enabled:
        got_signal = False  # voted on at the next logged step
    if (epoch_done or last or out_of_time
            or (cfg.eval_interval and st.step % cfg.eval_interval == 0)):
        _validate_and_keep_best(run, st, "epoch end" if epoch_done else
                                "end" if last or out_of_time else "interval")
        if cfg.patience and st.bad_evals >= cfg.patience:
            st.stop_reason = (f"early stop: no validation improvement in {st.bad_evals} "
                              "evaluations (--patience)")
    if got_signal:
        st.stop_reason = "stopped by " + (signals.received or "a signal to another rank")
    elif out_of_time and not last:
        st.stop_reason = f"stopped by the time budget (--max_time {cfg.max_time})"
    save_pos = (st.epoch + 1, 0) if epoch_done else (st.epoch, st.pos)
    if st.step % cfg.save_interval == 0 or st.stop_reason or last:
        save(run, st, *save_pos, final=last or st.stop_reason is not None)
    return bool(st.stop_reason or last)


def _watch_clock(run: Run, st: TrainState, last: bool, bar) -> tuple[float, bool]:
    """(seconds since the loop began, whether the time budget ran out); re-plans the
    budget and logs the first speed estimate."""
    cfg, info, budget = run.cfg, run.info, st.budget
    elapsed = time.perf_counter() - st.t_start
    done = st.step - st.step0
    if done == 1:
        st.first_step_s = elapsed
    out_of_time = False
    if budget and (not info.enabled or st.step % cfg.log_step == 0 or last):
        budget.update(done, elapsed, st.first_step_s)
        out_of_time = sync_budget(budget, elapsed, info, run.device)
        bar.total = st.step0 + budget.total
    if info.main and done == ESTIMATE_AFTER_STEPS:
        log_estimate(run.log, run.device, elapsed, st.first_step_s, done,
                     (st.tokens_seen - st.tokens0) / done, len(run.first_plan),
                     run.total_steps - st.step, budget, cfg)
    return elapsed, out_of_time


def _log_step(run: Run, st: TrainState, win: _LogWindow, got_signal: bool, elapsed: float,
              bar) -> bool:
    """The train.log line and metrics record of this step; returns the ranks' stop vote."""
    loss_total, got_signal = vote_to_stop(win.loss, got_signal, run.info)
    loss = loss_total / max(1, win.targets)
    if not math.isfinite(loss):
        raise _loss_error(st.checked_step, st.step, st.last_ckpt, run.cfg)
    st.bad_loss.zero_()
    st.checked_step = st.step
    tps = win.tokens / max(1e-9, time.perf_counter() - win.t0)
    lr = run.optimizer.param_groups[0]["lr"]
    norm = float(st.last_norm)
    done = st.step - st.step0
    plan_end = st.step0 + st.budget.total if st.budget else run.total_steps
    eta = ""
    if done > 1:
        per = (elapsed - st.first_step_s) / (done - 1)
        eta = f" | eta {format_duration(per * (plan_end - st.step))}"
    run.log.info(f"step {st.step}/{plan_end} | epoch {st.epoch + 1} | loss {loss:.4f} | ppl "
                 f"{math.exp(min(loss, 700)):.2f} | lr {lr:.3e} | grad_norm {norm:.3f} | "
                 f"{tps:,.0f} tok/s{eta}")
    run.metrics.write({"event": "train", "step": st.step, "epoch": st.epoch + 1,
                       "loss": loss, "ppl": math.exp(min(loss, 700)), "lr": lr,
                       "grad_norm": norm, "tokens_per_s": tps, "tokens": st.tokens_seen})
    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    win.reset()
    return got_signal


# ---- validation -------------------------------------------------------------------------------
def validate(run: Run) -> dict | None:
    """Validation loss (per target token, over all ranks) and perplexity, or None when
    there is no validation data."""
    if len(run.valid_table) == 0:
        return None
    info = run.info
    loss_sum, targets = windowed_loss(
        run.runner, run.store, run.valid_table, run.cfg.batch_size, run.device, run.amp,
        pad_id=run.tok.pad_id, speaker_ids=run.speaker_ids, row_len=run.row_len,
        rank=info.rank, world=info.world)
    sums = torch.stack((loss_sum, torch.tensor(float(targets), dtype=torch.float64,
                                               device=run.device)))
    sum_over_ranks(sums, info)
    loss = float(sums[0] / sums[1])
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "targets": int(sums[1])}


def _validate_and_keep_best(run: Run, st: TrainState, reason: str) -> None:
    """Validate; a new lowest loss replaces best/, and --patience counts the others."""
    with out_of_memory_advice(run.device, f"validating after step {st.step}",
                              lambda: _oom_advice(run, st)):
        res = validate(run)
    if res is None:
        return
    if not math.isfinite(res["loss"]):
        raise _loss_error(st.checked_step, st.step, st.last_ckpt, run.cfg, "validation")
    improved = res["loss"] < st.best
    if improved:
        st.best, st.bad_evals = res["loss"], 0
        if run.info.main:
            with atomic_dir(run.run_dir / "best", is_best_dir,
                            "a best/ model folder of train.py") as tmp:
                save_model(run.model, run.tok, tmp)
                write_json(tmp / "best.json", {"step": st.step, "epoch": st.epoch + 1,
                                               "val_loss": res["loss"],
                                               "val_ppl": res["ppl"]})
    else:
        st.bad_evals += 1
    run.log.info(f"eval  step {st.step} | epoch {st.epoch + 1} | val_loss {res['loss']:.4f} | "
                 f"val_ppl {res['ppl']:.2f} | {reason}"
                 + (" | best" if improved else f" | no improvement ({st.bad_evals})"))
    run.metrics.write({"event": "eval", "step": st.step, "epoch": st.epoch + 1,
                       "val_loss": res["loss"], "val_ppl": res["ppl"], "reason": reason,
                       "tokens": st.tokens_seen})


# ---- saving -----------------------------------------------------------------------------------
def save(run: Run, st: TrainState, epoch: int, pos: int, final: bool = False) -> None:
    """A checkpoint of step `st.step`, to resume at step `pos` of `epoch` (all ranks take
    part: they check the loss and compare their weights first)."""
    _check_finite(run, st)
    prints = rank_fingerprints(fingerprint(run.model), run.info, run.device)
    if run.info.main:
        state = trainer_state(run, st, epoch, pos)
        state["rank_fingerprints"] = prints
        path = save_checkpoint(run.run_dir, st.step, run.model, run.tok, run.optimizer,
                               run.scaler, state, run.cfg.keep_checkpoints, st.last_ckpt)
        st.last_ckpt = path
        run.log.info(f"saved {path}" + (" (final)" if final else ""))
    st.last_saved = st.step
    barrier(run.info)


def trainer_state(run: Run, st: TrainState, epoch: int, pos: int, val=None) -> dict:
    """A checkpoint's trainer_state.json."""
    cfg, budget = run.cfg, st.budget
    return {"format": CHECKPOINT_FORMAT, "step": st.step, "epoch": epoch,
            "step_in_epoch": pos, "tokens_seen": st.tokens_seen,
            "best_val_loss": None if math.isinf(st.best) else st.best,
            "bad_evals": st.bad_evals, "world_size": run.info.world, "dtype": run.dtype,
            "fp32_matmul": run.fp32_matmul if run.cpu_fp32 else None,
            "last_val": val,
            "scheduler": {"kind": cfg.lr_schedule, "base_lr": cfg.lr,
                          "lr": run.optimizer.param_groups[0]["lr"],
                          **({"budget_seconds": budget.seconds, "budget_from_step": st.step0,
                              "warmup_steps": budget.warmup,
                              "total_steps": st.step0 + budget.total} if budget else
                             {"warmup_steps": run.warmup, "total_steps": run.total_steps})},
            "options": dataclasses.asdict(cfg), "data": run.data_print}


def _check_finite(run: Run, st: TrainState, where: str = "train") -> None:
    flag = sum_over_ranks(st.bad_loss.clone(), run.info)
    if not torch.isfinite(flag):
        raise _loss_error(st.checked_step, st.step, st.last_ckpt, run.cfg, where)
    st.bad_loss.zero_()
    st.checked_step = st.step


# ---- messages ---------------------------------------------------------------------------------
def _report_end(run: Run, st: TrainState) -> None:
    cfg, log, run_dir, reason = run.cfg, run.log, run.run_dir, st.stop_reason
    if reason and reason.startswith("stopped by"):
        log.info(f"{reason} at step {st.step}; saved. Continue with: {python_command()} "
                 f"train.py --resume auto --run_name {cfg.run_name} --save_model_path "
                 f"{cfg.save_model_path}" + (f" --max_time {cfg.max_time}" if st.budget else ""))
    elif reason:
        log.info(reason)
    best_dir = run_dir / "best"
    log.info(f"done: {st.step} steps. Model: {run_dir} (best validation: "
             f"{best_dir if best_dir.is_dir() else 'none'}). " + next_step_hint(cfg, run_dir))


def next_step_hint(cfg: TrainConfig, run_dir: Path) -> str:
    """The command that uses what was trained, as the user's shell can run it."""
    py = python_command()
    model = run_dir / "best" if (run_dir / "best").is_dir() else run_dir
    if cfg.reverse:
        return (f"It is a reverse model, for MMI reranking: {py} interact.py --model_path "
                f"<a forward model> --mmi_model_path {model}")
    return f"Chat with it: {py} interact.py --model_path {model}"


def _oom_advice(run: Run, st: TrainState) -> str:
    cfg, dtype, row_len, last_ckpt = run.cfg, run.dtype, run.row_len, st.last_ckpt
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
