"""In-memory swaps that make a GPT-2 train faster and change nothing that is saved.

`fuse_gelu`: GPT-2's "gelu_new" is the tanh form of GELU written out in five elementwise
operations (each kept for backward); PyTorch's `gelu(approximate="tanh")` is the same
function in one kernel.

Cheap dropout, for CPU training: PyTorch's CPU dropout draws one Bernoulli sample per
element (`bernoulli_`): 8-10 ms per residual dropout of an 8 x 150 x 768 micro-batch, 15% of a
bf16 training step of the small config on a CPU whose matrix products are fast
(docs/benchmarks.md). Here each element gets 16 bits of one 64-bit draw of the same
generator, kept when those bits are at or above p * 65536: the same independent masks at a
rate within 1/65536 of p, for about a third of the cost. Attention dropout gets the same
masks in an attention function of our own (the math path SDPA takes anyway when dropout is
on, on a CPU); with dropout off (eval, attn_pdrop 0) that function hands over to SDPA.

`install_cheap_dropout` swaps the modules of a model in memory only: the saved config and
weights are the same as without it, so a saved model loads in plain transformers. GPUs keep
PyTorch's fused dropout and SDPA's dropout kernels (`pick_dropout`).
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "chitchat_cheap_dropout"  # the name the attention function is registered under
_LEVELS = 1 << 16  # a mask element's bits: its rate is p rounded to a multiple of 1/65536


def pick_dropout(name: str, device_type: str) -> str:
    """--dropout_kernel auto -> "cheap" on a CPU, "native" on a GPU (pure)."""
    if name != "auto":
        return name
    return "cheap" if device_type == "cpu" else "native"


def drop_rate(p: float) -> float:
    """The rate a cheap mask drops at: p rounded to a multiple of 1/65536."""
    return round(p * _LEVELS) / _LEVELS


def keep_mask(shape, p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A `shape` tensor of 0 (dropped, with probability drop_rate(p)) and 1 / (1 - that rate)
    (kept), independent per element; drawn from torch's default generator for `device`, so
    seeding it replays the masks."""
    n = math.prod(shape)
    cut = round(p * _LEVELS)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # all 64 bits (random_() alone leaves the top bit 0)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    keep = bits >= cut - _LEVELS // 2
    return keep.to(dtype).mul_(_LEVELS / (_LEVELS - cut))


class CheapDropout(nn.Dropout):
    """nn.Dropout with a mask from keep_mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(x.shape, self.p, x.dtype, x.device)


def cheap_dropout_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal=None,
                            q_block: int | None = None, **kwargs):
    """transformers' attention-function interface. With dropout on: softmax(q k^T * scale
    + mask) with a keep_mask, times v, in the inputs' dtype as SDPA's math path does; with
    dropout off: SDPA itself (its fused kernel where it has one).

    With a boolean mask (train.py's packed rows, or the causal mask built here) and rows
    longer than 2 x Q_BLOCK, the queries go in blocks of Q_BLOCK, each against only the keys
    its mask lets some query of the block see (attention_blocks): packed windows are short
    (median 38 tokens in chitchat50w_slice), so most of a long row's T x T scores are
    masked, and the math path pays for every one of them in its softmax, mask and dropout
    passes. The result is the same function; only the keep masks are drawn per block.
    Shorter rows (train.py's default 150) stay whole: there the blocks' extra calls cost
    more than they save (docs/benchmarks.md). `q_block` sets the block instead (at or above
    T: whole rows), for the bench."""
    if dropout == 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    t, s = query.shape[-2], key.shape[-2]
    if attention_mask is None:  # causal; a query at i sees keys up to i + (s - t)
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
    if q_block is None:
        q_block = query_block(t)
    with torch.autocast(query.device.type, enabled=False):  # autocast would softmax in fp32
        value = value.to(query.dtype)
        if (attention_mask.dtype != torch.bool or q_block >= t or attention_mask.shape[-2] != t
                or torch.compiler.is_compiling()):  # float masks, or ones broadcast over queries
            hidden = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask
            out = _attend(query, key, value, hidden, dropout, scaling)
        else:
            # contiguous once, so that the blocks' slices are plain strided batches
            query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
            out = torch.cat([_attend(query[..., q0:q1, :], key[..., k0:k1, :],
                                     value[..., k0:k1, :], hidden, dropout, scaling)
                             for q0, q1, k0, k1, hidden in _blocks(attention_mask, q_block)],
                            dim=-2)
    return out.transpose(1, 2).contiguous(), None


def _attend(query, key, value, hidden, p: float, scaling: float) -> torch.Tensor:
    """Attention with cheap dropout; `hidden`: a boolean mask, True where a key is hidden
    from a query, or an additive float mask."""
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)
    if hidden.dtype == torch.bool:
        scores.masked_fill_(hidden, torch.finfo(scores.dtype).min)
    else:
        scores = scores + hidden.to(scores.dtype)
    probs = scores.softmax(-1)
    probs = probs * keep_mask(probs.shape, p, probs.dtype, probs.device)
    return torch.matmul(probs, value)


# queries per block, for rows longer than 2 x Q_BLOCK (bench_train.py --mode attention: at
# rows of 300, 75 ran about as fast as 100 in bf16, faster in fp32, faster than 50 and 150;
# at rows of 150, whole rows won)
Q_BLOCK = 75


def query_block(t: int) -> int:
    """The query block train.py's attention takes for rows of `t` tokens (t: whole rows)."""
    return Q_BLOCK if t > 2 * Q_BLOCK else t


def attention_blocks(mask: torch.Tensor, block: int = Q_BLOCK) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) for each block of `block` queries of a (..., T, S) boolean mask
    (True: the query may see the key): every key any query of the block may see, in any
    row or head, lies in [k0, k1), so the block's attention needs only those keys. A block
    with a query that may see no key at all gets every key, so that such a query's output
    (a uniform average, as softmax gives over all-masked scores) is the same as unblocked."""
    m = mask.reshape(-1, *mask.shape[-2:])  # (rows x heads, T, S)
    t, s = m.shape[-2:]
    keys = torch.arange(s, device=m.device)
    first = torch.where(m, keys, s).amin(-1).amin(0).tolist()
    last = torch.where(m, keys, -1).amax(-1).amax(0).tolist()
    blind = (~m.any(-1)).any(0).tolist()  # per query: in some row or head it sees nothing
    spans = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        if any(blind[q0:q1]):
            spans.append((q0, q1, 0, s))
        else:
            spans.append((q0, q1, min(first[q0:q1]), max(last[q0:q1]) + 1))
    return spans


_plan: tuple = (lambda: None, None, [])  # the last mask (weak reference), (version, block), blocks


def _blocks(mask: torch.Tensor, block: int) -> list:
    """attention_blocks of `mask`, each with its slice of ~mask; kept for the last mask seen,
    since every layer of a forward gets the same mask object."""
    global _plan
    ref, key, blocks = _plan
    if ref() is not mask or key != (mask._version, block):
        hidden = ~mask
        blocks = [(q0, q1, k0, k1, hidden[..., q0:q1, k0:k1])
                  for q0, q1, k0, k1 in attention_blocks(mask, block)]
        _plan = (weakref.ref(mask), (mask._version, block), blocks)
    return blocks


def _swap(model: nn.Module, kind: type, make) -> int:
    """Replace every submodule of exactly type `kind` by make(it); returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


def install_cheap_dropout(model: nn.Module) -> int:
    """Give a GPT-2 model (in memory) cheap dropout: every nn.Dropout becomes a CheapDropout
    of the same rate, and SDPA attention becomes cheap_dropout_attention. Returns the number
    of dropout modules swapped. Models on eager attention keep it (its dropout module is
    swapped like the others)."""
    swapped = _swap(model, nn.Dropout, lambda d: CheapDropout(d.p, d.inplace))
    if model.config._attn_implementation == "sdpa":
        AttentionInterface.register(ATTENTION, cheap_dropout_attention)
        # masks built by transformers (calls without our 4-D mask) take SDPA's boolean form
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
        model.config._attn_implementation = ATTENTION
    return swapped


def use_training_kernels(model: nn.Module, dropout_kernel: str, device_type: str) -> str:
    """What train.py does to its model before training: fuse the GELU, and on "cheap"
    dropout (--dropout_kernel, resolved by pick_dropout) install it. Returns that choice."""
    fuse_gelu(model)
    kind = pick_dropout(dropout_kernel, device_type)
    if kind == "cheap":
        install_cheap_dropout(model)
    return kind


def fuse_gelu(model: nn.Module) -> bool:
    """Swap each MLP's "gelu_new" module for the one-kernel tanh GELU (the same function).
    Returns whether anything was swapped."""
    return _swap(model, NewGELUActivation, lambda _: GELUTanh()) > 0
