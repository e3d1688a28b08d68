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


CHUNK_FLOATS = 1 << 20  # _HeadLoss's rows of fp32 at a time: 4 MB, which stays in cache


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
        return head_loss(hidden, self.model.lm_head, target_ids)


def head_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (N, V) against `targets` (N,).

    With gradients on, `_HeadLoss` computes it without the fp32 (N, V) tensors that
    cross-entropy keeps for backward; under torch.compile (which fuses the plain form
    itself), without gradients (validation) or with a biased head, the plain form.
    """
    if (torch.is_grad_enabled() and head.bias is None
            and not torch.compiler.is_compiling()):
        rows = max(1, CHUNK_FLOATS // head.out_features)
        return _HeadLoss.apply(hidden, head.weight, targets, rows)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _HeadLoss(torch.autograd.Function):
    """LM head and summed cross-entropy in one autograd node, gradient made in the forward.

    The plain form (`cross_entropy(logits.float())`) makes, per micro-batch, an fp32 copy of
    the logits, its log-softmax (kept for backward), a zero-filled gradient and the
    log-softmax's gradient, each N x V fp32, plus a cast back to the product dtype. Fresh
    memory that size is paid in page faults on every step (in a bf16 step of the middle
    config on a CPU, the head and loss took 59 ms this way and 30 ms here:
    docs/benchmarks.md). Here the logits stay in the product dtype and are overwritten, a
    few rows of fp32 at a time, with d(loss)/d(logits) = softmax - one_hot, which backward
    only scales and multiplies out. The numbers are the plain form's, up to rounding: the
    loss in fp32, the logits' gradient rounded once to the product dtype before its two
    products (before the loss's scale is applied, where the plain form rounds after it).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        dev = hidden.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                 else hidden.dtype)
        with torch.autocast(dev, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)  # what autocast's linear would use
            logits = torch.mm(h, w.t())  # (N, V); becomes the logits' gradient in place
            n = len(logits)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            minus_one = torch.full((min(rows, n), 1), -1.0, device=hidden.device)
            for i in range(0, n, rows):
                part = logits[i:i + rows].float()
                t = targets[i:i + rows, None]
                # softmax is one row-at-a-time kernel, where logsumexp and a second exp made
                # five passes over the chunk (the head 0.86x the time at width 128, bf16:
                # docs/benchmarks.md). The log-sum-exp is max - log(the largest probability),
                # and that probability, 1 / sum(exp(x - max)) >= 1 / V, cannot underflow as
                # the target's can.
                top = part.amax(-1, keepdim=True)
                target_logit = part.gather(1, t)
                probs = torch.softmax(part, -1)
                loss += (top - probs.amax(-1, keepdim=True).log() - target_logit).sum()
                probs.scatter_add_(1, t, minus_one[:len(t)])
                logits[i:i + rows] = probs
        ctx.save_for_backward(h, w, logits)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, w, grad_logits = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # the loss's scale (1 / targets, a GradScaler's factor) is applied after the products,
        # in the inputs' dtype (fp32 under autocast), so fp16 products cannot overflow on it
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.mm(grad_logits, w).to(h_dtype).mul_(grad)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(grad_logits.t(), h).to(w_dtype).mul_(grad)
        return grad_h, grad_w, None, None


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
