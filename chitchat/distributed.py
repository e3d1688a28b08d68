"""Several training processes (torchrun): who is who, the device each one trains on, and
what they must agree on (paths, the time budget, when to stop, equal weights)."""
from __future__ import annotations

import dataclasses
import gc
import signal
import time

import torch
import torch.distributed as dist

from .budget import TimeBudget
from .config import TrainConfig
from .modeling import resolve_device
from .utils import ChitchatError


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


_RETIRE_SECONDS = 0.2  # how long leave_group lets the gloo workers take the GIL


def leave_group(info: DistInfo, clean: bool = True) -> None:
    """Leave torchrun's process group, without the hang at exit that gloo can give.

    A gloo worker thread retires each collective after the caller's wait has returned, and
    freeing a collective's tensors takes the GIL. The group's destructor joins those threads
    while the caller holds the GIL, so a destructor that runs right after a collective (for
    instance when the finished run's DDP reducer, which holds the group, is freed) can wait
    forever on a thread that waits for the GIL. Hence: after a clean run every rank meets at
    a barrier (which also waits for this rank's queued work), what still holds the group is
    collected, and the GIL is let go for a moment before the group is destroyed. After an
    error the other ranks may never reach a barrier, so none is waited for."""
    if not (info.enabled and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    gc.collect()
    time.sleep(_RETIRE_SECONDS)  # releases the GIL: the workers retire the last collectives
    dist.destroy_process_group()


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


def sum_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """`t` summed over all ranks, in place."""
    if info.enabled:
        dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def vote_to_stop(loss_sum: torch.Tensor, stop: bool, info: DistInfo) -> tuple[float, bool]:
    """The loss sum over all ranks, and whether any rank wants to stop. The vote rides on
    the loss's all_reduce: one collective and one host sync, not two."""
    sums = sum_over_ranks(torch.stack((loss_sum, torch.full((), float(stop),
                                                            device=loss_sum.device))), info)
    total, votes = sums.tolist()
    return total, votes > 0


def rank_fingerprints(prints: list[float], info: DistInfo, device) -> list[float]:
    """Every rank's replica fingerprint (the sum of its per-parameter sums); DDP keeps the
    replicas equal, so they must agree."""
    if not info.enabled:
        return [sum(prints)]
    t = torch.tensor(prints, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(gathered, t)
    return [g.sum().item() for g in gathered]


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


class StopSignals:
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
