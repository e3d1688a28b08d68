"""What every inference backend shares: the interface the decoding loop (generation.py)
drives, one batch's decode state, and the helpers for left-padded batches.

Batches are left-padded: every row writes its next token at the same cache index, so one
``step`` serves N rows (MMI candidates, or several requests at once). Each row has its own
position ids (counting from its first real token) and a key mask that hides its padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ..utils import ChitchatError


class Backend(Protocol):
    n_positions: int
    vocab_size: int

    def start(self, contexts: Sequence[Sequence[int]], token_types=None, reply_types=None,
              capacity: int | None = None) -> tuple["DecodeState", torch.Tensor]:
        """Feed the contexts (left-padded into one batch); return (state, logits (B, V)).

        capacity: the most positions this decode will use (context + new tokens); caches
        are sized for it (default n_positions).

        token_types: per-context speaker ids (models trained with --speaker_ids), and
        reply_types: the speaker id of each row's generated tokens; None for other models.
        """

    def step(self, state: "DecodeState", tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); return the next logits (B, V) as float32."""

    def reorder(self, state: "DecodeState", index: torch.Tensor) -> None:
        """Make row i continue from old row index[i] (beam search)."""

    def prepare(self, batch_size: int) -> None:
        """Batches of `batch_size` rows are coming: do any one-time set-up for them now."""

    def hidden(self, ids: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D) of right-padded (B, T) ids: no cache, causal."""

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head: float32 logits (N, V) of hidden states (N, D)."""


@dataclass
class DecodeState:
    """One batch's progress: filled cache length, padding, and the backend's cache."""
    length: int                   # cache slots filled (same for every row)
    pad: torch.Tensor             # (B,) left padding of each row
    key_mask: torch.Tensor | None  # (B, 1, 1, T) bool, True = attend; None: no padding (fast)
    cache: object = None
    reply_types: torch.Tensor | None = None  # (B,) speaker id of generated tokens



def left_pad(contexts: Sequence[Sequence[int]], pad_id: int, device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids left-padded with `pad_id`, and (B,) pad counts."""
    if not contexts or any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token")
    L = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), L), pad_id, dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, L - len(c):] = torch.as_tensor(list(c), dtype=torch.long)
    pad = torch.tensor([L - len(c) for c in contexts], dtype=torch.long)
    return ids.to(device), pad.to(device)


def as_types(reply_types, device) -> torch.Tensor | None:
    return None if reply_types is None else torch.as_tensor(list(reply_types), dtype=torch.long,
                                                            device=device)


def reorder_rows(state: DecodeState, index: torch.Tensor) -> None:
    state.pad = state.pad.index_select(0, index)
    if state.key_mask is not None:
        state.key_mask = state.key_mask.index_select(0, index)
    if state.reply_types is not None:
        state.reply_types = state.reply_types.index_select(0, index)


def check_fits(n: int, limit: int) -> None:
    if n > limit:
        # The context budget in chat.py and generation.py keeps this from happening; reaching
        # it is a bug, and a silent wrap-around would feed the model unseen positions.
        raise ChitchatError(f"position {n - 1} is beyond the last usable position "
                            f"({limit - 1}); shorten the context or --max_new_tokens")

