"""Time budgets for training (train.py --max_time) and the learning-rate schedule.

A run with a budget does not know its number of steps in advance: it measures its speed and
plans the steps that fit. Warmup and decay are then laid over that plan, re-estimated after
every step, so that a 30-minute run warms up, trains at the peak rate and decays to zero
within its 30 minutes, instead of stopping at 2% of an --epochs 40 schedule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .utils import ChitchatError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1h30m', '1.5h' or plain seconds ('600') -> seconds."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", t)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", t).strip():
            raise ChitchatError(f"--max_time {text!r} is not a duration; write e.g. 90s, 30m, "
                                "2h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0:
        raise ChitchatError(f"--max_time must be positive, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """A rough, readable duration: 45s, 12m, 3h05m, 2d04h."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{round(s / 60)}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def lr_factor(step: int, warmup: int, total: int, kind: str = "linear") -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warmup rises linearly to 1 at step warmup-1; then the factor falls from 1 (at step
    `warmup`) towards 0 at step `total`, linearly or along a half cosine.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


@dataclass
class TimeBudget:
    """The steps that fit in `seconds` of wall clock, re-estimated as the run goes.

    Every process with a budget plans a complete schedule of its own: warmup, peak and
    decay to zero within its budget (a resumed run is a warm restart). Steps here are
    counted from the process's first step. `cap` is the most steps the run may take anyway
    (--epochs / --max_steps). The first step is left out of the speed (it pays for
    allocation and warm-up) once a second one is measured.
    """
    seconds: float
    cap: int
    warmup_fraction: float = 0.05
    warmup_steps: int | None = None  # given by the user: never re-planned
    total: int = 0
    warmup: int = 1

    def __post_init__(self):
        self.total = self.cap
        self.warmup = (self.warmup_steps if self.warmup_steps is not None
                       else max(1, int(self.warmup_fraction * self.cap)))

    def update(self, done: int, elapsed: float, first_step_seconds: float) -> None:
        """After `done` steps, `elapsed` seconds into the budget; the first step took
        `first_step_seconds`."""
        if done <= 0:
            return
        per = (first_step_seconds if done == 1
               else max(1e-9, (elapsed - first_step_seconds) / (done - 1)))
        left = max(0.0, self.seconds - elapsed)
        self.total = max(done + 1, min(self.cap, done + int(left / per)))
        if self.warmup_steps is None and 2 <= done < self.warmup:
            # From the second step on (the first alone is all warm-up cost), and never
            # behind the current step: a warmup that ended in the past would make the lr
            # jump.
            self.warmup = max(1, int(self.warmup_fraction * self.total), done)

    def factor(self, done: int, kind: str) -> float:
        """The lr multiplier of the next step, the `done`-th of this process (0-based)."""
        return lr_factor(done, self.warmup, self.total, kind)

    def expired(self, elapsed: float) -> bool:
        return elapsed >= self.seconds


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
