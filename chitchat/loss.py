"""The training loss, and the same loss summed over windows (validation, perplexity).

Training's validation and evaluate.py's perplexity call `windowed_loss`, so both measure
with the same packing, masks and loss as the optimizer steps do.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .batching import WindowTable, collate_rows, epoch_rows


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
        if self.model.config._attn_implementation == "eager":
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


@torch.no_grad()
def windowed_loss(runner: nn.Module, store, table: WindowTable, batch_size: int, device,
                  amp=None, *, pad_id: int, speaker_ids=None, row_len: int | None = None,
                  rank: int = 0, world: int = 1) -> tuple[torch.Tensor, int]:
    """Summed target-token loss (a float64 tensor on `device`) and the number of target
    tokens over the windows of `table`, in rows of `row_len` packed tokens (None: one
    window per row, padded). `runner` is a LossModel (or a DDP / compiled wrapper of one);
    it runs in eval mode, and every submodule gets its own mode back (a new wrapper is in
    train mode around a model in eval mode). With `world` > 1 this rank takes every
    world-th batch from `rank` on; the caller adds the ranks' sums.

    The sum stays on the device, so nothing here waits for it.
    """
    device = torch.device(device)
    rows = epoch_rows(table, 0, 0, "pad" if row_len is None else "pack",
                      row_len or table.max_len, shuffle=False)
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    modes = [(m, m.training) for m in runner.modules()]
    runner.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    targets = 0
    try:
        for rows_b in batches[rank::world]:
            mb = collate_rows(store, table, rows_b, pad_id, row_len, speaker_ids)
            with amp if amp is not None else contextlib.nullcontext():
                total += runner(**to_device(mb, device)).double()
            targets += len(mb["target_ids"])
    finally:
        for m, training in modes:
            m.training = training
    return total, targets
