"""The lean backend: GPT-2 inference without transformers' generic per-token machinery.

`FastGPT2` (the default backend) is a lean forward pass over the HF weights with a
preallocated, static KV cache. At batch 1 a 768-wide GPT-2 is memory-bound on CPU: the floor
is one pass over the weights per token (~11 ms for the small config in fp32). transformers'
forward adds a few ms of fixed Python work per token on top (mask building, cache objects,
output classes, hooks) and runs Conv1D as ``addmm`` on an (in, out) weight, which is several
times slower than ``linear`` on an (out, in) weight for a single row. The lean path avoids
both. tests/test_generation.py checks its logits against HF's (hf.py).

Beside the padded batches of the backend interface (base.py) it keeps a pool of rows that
join and leave one at a time (`row_cache`, `step_and_prefill`, `copy_row`): the server's
engine (chitchat/serving/engine.py) batches requests on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import ChitchatError
from .base import DecodeState, as_types, check_fits, left_pad, reorder_rows
from .kernels import (BLOCKED_MIN_ROWS, activation, block_weight, lin_blocked, lin_float,
                      lin_int8, linear_params)


@dataclass
class _Segment:
    """One batch of FastGPT2._blocks_of: (B, S) ids and positions, the cache callback,
    the attention mask and causality, optional token types."""
    ids: torch.Tensor
    pos: torch.Tensor
    kv: Callable | None
    mask: torch.Tensor | None
    causal: bool
    types: torch.Tensor | None


@dataclass
class RowCache:
    """Keys and values (layers, rows, H, length, hd), and each row's filled length and
    reply speaker id (FastGPT2.row_cache)."""
    k: torch.Tensor
    v: torch.Tensor
    lens: torch.Tensor
    types: torch.Tensor



class FastGPT2:
    """GPT-2 inference without transformers' generic machinery in the per-token path.

    Built from a loaded GPT2LMHeadModel (fp32/bf16/fp16, or after `quantize_int8`). Holds
    references to its weights; the decode state (KV cache) lives in `DecodeState`, so one
    instance can serve several generations, one at a time or interleaved. The blocked copy
    for batches (`prepare`) is a copy: weights changed after it was made need a new instance.
    """

    @staticmethod
    def supports(model) -> str | None:
        """None if the lean path can run `model`, else why not."""
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            return "cross-attention"
        if getattr(cfg, "model_type", "gpt2") != "gpt2":
            return f"model_type {cfg.model_type!r}"
        return None

    def __init__(self, model, pad_id: int = 0):
        why = self.supports(model)
        if why:
            raise ChitchatError(f"the fast backend does not support {why}; use --backend hf")
        cfg = model.config
        tr = model.transformer
        self.pad_id = pad_id
        self.n_positions = cfg.n_positions
        self.n_head = cfg.n_head
        self.d = cfg.n_embd
        self.head_dim = self.d // self.n_head
        self.eps = cfg.layer_norm_epsilon
        self.act = activation(cfg.activation_function)
        # oneDNN applies the MLP's GELU inside the blocked product (a post-op), which also
        # saves a pass over the (rows, 4D) activations.
        self.fused_act = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
                          "gelu": "none"}.get(cfg.activation_function)
        self.wte = tr.wte.weight
        self.wpe = tr.wpe.weight
        self.dtype = self.wte.dtype
        self.device = self.wte.device
        self.vocab_size = self.wte.shape[0]
        base = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scales = [base / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else base
                       for i in range(cfg.n_layer)]
        self.layers = []
        for blk in tr.h:
            lins = [linear_params(m) for m in (blk.attn.c_attn, blk.attn.c_proj,
                                              blk.mlp.c_fc, blk.mlp.c_proj)]
            self.layers.append((blk.ln_1.weight, blk.ln_1.bias, lins[0], lins[1],
                                blk.ln_2.weight, blk.ln_2.bias, lins[2], lins[3]))
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        head = model.lm_head
        if isinstance(head, nn.Linear) and head.weight is self.wte:
            self.head = (self.wte, None)  # tied: (V, D) is already the (out, in) layout
        else:
            self.head = linear_params(head)
        packed = [isinstance(p, torch.ScriptObject)
                  for l in self.layers for p in (l[2], l[3], l[6], l[7])]
        if any(packed) != all(packed):
            raise ChitchatError("mixed int8 and float layers; quantize the whole model")
        self.int8 = all(packed)
        self.int8_head = isinstance(self.head, torch.ScriptObject)
        # oneDNN-blocked copies of the float weights, made on the first batched call
        # (`prepare`): see kernels.py.
        self.blocked: tuple[list, tuple] | None = None
        self.can_block = (not self.int8 and not self.int8_head and self.dtype == torch.float32
                          and self.device.type == "cpu" and torch.backends.mkldnn.is_available())

    # The products in each weight layout (kernels.py); attributes, so that `_up` can tell
    # the blocked one apart.
    _lin_float = staticmethod(lin_float)
    _lin_int8 = staticmethod(lin_int8)
    _lin_blocked = staticmethod(lin_blocked)

    def _up(self, h, p, lin):
        """The MLP's first product and its activation."""
        if lin is self._lin_blocked and p[0].is_mkldnn and self.fused_act is not None:
            return torch.ops.mkldnn._linear_pointwise(h, p[0], p[1], "gelu", [],
                                                      self.fused_act)
        return self.act(lin(h, p))

    def prepare(self, batch_size: int) -> None:
        """Get ready to decode `batch_size` rows at once (MMI candidates, beams, a server
        batch): on CPU in fp32, from 2 rows on, make the blocked weights now rather than on
        the first batched step."""
        if batch_size >= BLOCKED_MIN_ROWS and self.can_block and self.blocked is None:
            blk = block_weight
            self.blocked = ([(w1, b1, blk(qkv), blk(o), w2, b2, blk(fc), blk(pr))
                             for (w1, b1, qkv, o, w2, b2, fc, pr) in self.layers],
                            blk(self.head))

    def _blocked_for(self, rows: int) -> bool:
        return self.blocked is not None and rows >= BLOCKED_MIN_ROWS

    # -- the interface --
    def start(self, contexts, token_types=None, reply_types=None, capacity=None):
        ids, pad = left_pad(contexts, self.pad_id, self.device)
        types = left_pad(token_types, 0, self.device)[0] if token_types is not None else None
        B, L = ids.shape
        check_fits(L, self.n_positions)
        # (L, B, H, T, hd) per cache; sized to what this decode needs, so that copying rows
        # (beams, MMI candidates) copies no unused positions.
        T = min(self.n_positions, max(capacity or self.n_positions, L))
        shape = (len(self.layers), B, self.n_head, T, self.head_dim)
        cache = (torch.empty(shape, dtype=self.dtype, device=self.device),
                 torch.empty(shape, dtype=self.dtype, device=self.device))
        padded = bool(pad.any())
        key_mask = None
        if padded:
            cols = torch.arange(T, device=self.device)
            key_mask = (cols[None, :] >= pad[:, None]).view(B, 1, 1, T)
        state = DecodeState(length=0, pad=pad, key_mask=key_mask, cache=cache,
                            reply_types=as_types(reply_types, self.device))
        pos = (torch.arange(L, device=self.device)[None, :] - pad[:, None]).clamp_(min=0)
        mask = None
        if padded:
            causal = torch.ones(L, L, dtype=torch.bool, device=self.device).tril_()
            mask = causal[None, None] & key_mask[..., :L]
            # A pad row would attend to nothing (NaN); let it see itself. Nothing reads it.
            mask |= torch.eye(L, dtype=torch.bool, device=self.device)[None, None]
        return state, self._forward(ids, pos, self._state_kv(state, L), mask,
                                    causal=not padded, types=types, state=state)

    def step(self, state, tokens):
        t = state.length
        check_fits(t + 1, state.cache[0].shape[3])
        B = tokens.shape[0]
        pos = (t - state.pad).view(B, 1) if state.key_mask is not None else \
            torch.full((B, 1), t, dtype=torch.long, device=self.device)
        mask = state.key_mask[..., :t + 1] if state.key_mask is not None else None
        types = state.reply_types.view(B, 1) if state.reply_types is not None else None
        return self._forward(tokens.view(B, 1), pos, self._state_kv(state, 1), mask,
                             causal=False, types=types, state=state)

    @staticmethod
    def _state_kv(state, S: int):
        """Keys and values of the next S positions go to `state`'s cache after its filled
        slots; attention sees every filled slot."""
        t0, t1 = state.length, state.length + S

        def kv(i, k, v):
            kc, vc = state.cache[0][i], state.cache[1][i]  # (B, H, T, hd)
            kc[:, :, t0:t1] = k
            vc[:, :, t0:t1] = v
            return kc[:, :, :t1], vc[:, :, :t1]
        return kv

    def reorder(self, state, index):
        k, v = state.cache
        state.cache = (k.index_select(1, index), v.index_select(1, index))
        reorder_rows(state, index)

    def _forward(self, ids, pos, kv, mask, causal: bool, types=None, state=None) -> torch.Tensor:
        # ids, pos: (B, S); returns float32 logits (B, V) of the last position.
        x = self._blocks(ids, pos, kv, mask, causal, types)
        if state is not None:
            state.length += ids.shape[1]
        return self.project(F.layer_norm(x[:, -1], (self.d,), *self.ln_f, self.eps))

    def _blocks(self, ids, pos, kv, mask, causal: bool, types=None) -> torch.Tensor:
        """The transformer blocks over (B, S) ids; (B, S, D) before the final layer norm.

        `kv(layer, k, v)` stores the new keys and values (B, H, S, hd) in a cache and returns
        those to attend to; with None, the S positions attend only to each other.
        """
        return self._blocks_of([_Segment(ids, pos, kv, mask, causal, types)])[0]

    def _blocks_of(self, segments: list["_Segment"]) -> list[torch.Tensor]:
        """The blocks over several batches at once, each with its own attention (cache,
        mask, causality): every matrix product runs once over all their tokens, so the
        weights are read once (what a step costs on a CPU) however many batches there are.
        Returns each segment's (B, S, D)."""
        shapes = [s.ids.shape for s in segments]
        rows = sum(B for B, _ in shapes)
        if rows >= BLOCKED_MIN_ROWS:
            self.prepare(rows)
        layers, lin = self.layers, (self._lin_int8 if self.int8 else self._lin_float)
        if self._blocked_for(sum(B * S for B, S in shapes)):
            layers, lin = self.blocked[0], self._lin_blocked
        D, H, hd = self.d, self.n_head, self.head_dim
        xs = []
        for sg in segments:
            x = F.embedding(sg.ids, self.wte) + F.embedding(sg.pos, self.wpe)  # (B, S, D)
            if sg.types is not None:
                x = x + F.embedding(sg.types, self.wte)  # speaker embeddings share wte, as HF
            xs.append(x.reshape(-1, D))
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # (N, D): every token of every segment
        for i, (w1, b1, qkv_p, o_p, w2, b2, fc_p, pr_p) in enumerate(layers):
            h = F.layer_norm(x, (D,), w1, b1, self.eps)
            qkv = lin(h, qkv_p)  # (N, 3D)
            outs, off = [], 0
            for sg, (B, S) in zip(segments, shapes):
                q, k, v = qkv[off:off + B * S].view(B, S, 3, H, hd).permute(2, 0, 3, 1, 4)
                off += B * S
                if sg.kv is not None:
                    k, v = sg.kv(i, k, v)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=sg.mask,
                                                   is_causal=sg.causal and S > 1,
                                                   scale=self.scales[i])  # (B, H, S, hd)
                outs.append(a.transpose(1, 2).reshape(B * S, D))
            x = x + lin(outs[0] if len(outs) == 1 else torch.cat(outs), o_p)
            h = F.layer_norm(x, (D,), w2, b2, self.eps)
            x = x + lin(self._up(h, fc_p, lin), pr_p)
        out, off = [], 0
        for B, S in shapes:
            out.append(x[off:off + B * S].view(B, S, D))
            off += B * S
        return out

    # -- a pool of rows that join and leave one at a time (chitchat.serving.engine) --
    def row_cache(self, rows: int, length: int) -> "RowCache":
        """A KV cache for up to `rows` rows of up to `length` positions, allocated once.

        Unlike a DecodeState's batch, each row has its own length: its tokens sit at cache
        positions 0.. of its row, with no padding, so it computes what it would alone.
        The rows in use are 0..n-1; `move_row` keeps them packed when one leaves.
        """
        length = min(length, self.n_positions)
        shape = (len(self.layers), rows, self.n_head, length, self.head_dim)
        return RowCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                        torch.zeros(shape, dtype=self.dtype, device=self.device),
                        torch.zeros(rows, dtype=torch.long, device=self.device),
                        torch.zeros(rows, dtype=torch.long, device=self.device))

    def prefill(self, cache: "RowCache", first: int, contexts, token_types=None,
                reply_types=None, starts=None) -> torch.Tensor:
        """Feed `contexts` into rows first, first+1, ...; their logits (k, V). With `starts`,
        row first+i already holds its first starts[i] tokens and contexts[i] continues it
        (a context fed in chunks)."""
        seg, done = self._prefill_segment(cache, first, contexts, token_types, reply_types,
                                          starts)
        return done(self._blocks_of([seg])[0])

    def step_rows(self, cache: "RowCache", tokens: torch.Tensor, types: bool = False
                  ) -> torch.Tensor:
        """Feed one token to each of rows 0..n-1 ((n,) tokens), each at its own next
        position; their logits (n, V). `types`: add each row's reply speaker id."""
        seg, done = self._step_segment(cache, tokens, types)
        return done(self._blocks_of([seg])[0])

    def step_and_prefill(self, cache: "RowCache", tokens: torch.Tensor, types: bool,
                         contexts, token_types=None, reply_types=None, starts=None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """`step_rows` for rows 0..n-1 and `prefill` of `contexts` into rows n, n+1, ... in
        one pass over the weights: a request joining a running batch costs its context's
        compute, not a second read of every matrix. Logits (n, V) and (k, V)."""
        n = tokens.shape[0]
        step, step_done = self._step_segment(cache, tokens, types)
        pre, pre_done = self._prefill_segment(cache, n, contexts, token_types, reply_types,
                                              starts)
        xs, xp = self._blocks_of([step, pre])
        return step_done(xs), pre_done(xp)

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        return self.project(F.layer_norm(h, (self.d,), *self.ln_f, self.eps))

    def _prefill_segment(self, cache, first, contexts, token_types, reply_types,
                         starts=None):
        """The contexts right-padded into one batch (causal attention keeps every real token
        from seeing the padding after it, so positions and keys are a lone row's), and what
        to do with its output: set the rows' lengths, return the last tokens' logits.

        With `starts` (not all 0), row first+i continues after its first starts[i] tokens:
        its new keys go into the cache after them and its tokens attend to the whole row."""
        k = len(contexts)
        sizes = [len(c) for c in contexts]
        if not all(sizes):
            raise ValueError("every context (or chunk) needs at least one token")
        lens = torch.tensor(sizes, dtype=torch.long, device=self.device)
        S = max(sizes)
        starts = list(starts) if starts is not None else [0] * k
        st = torch.tensor(starts, dtype=torch.long, device=self.device)
        T = max(a + b for a, b in zip(starts, sizes))  # the longest row after this
        check_fits(T, cache.k.shape[3])
        if first + k > cache.k.shape[1]:
            raise ValueError(f"rows {first}..{first + k - 1} are beyond the cache's "
                             f"{cache.k.shape[1]}")
        ids = torch.full((k, S), self.pad_id, dtype=torch.long)
        types = torch.zeros((k, S), dtype=torch.long) if token_types is not None else None
        for i, c in enumerate(contexts):
            ids[i, :len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            if types is not None:
                types[i, :len(c)] = torch.as_tensor(list(token_types[i]), dtype=torch.long)
        ids = ids.to(self.device)
        if types is not None:
            types = types.to(self.device)
        rows = slice(first, first + k)
        cols = torch.arange(S, device=self.device)
        # A padding position past n_positions would index past the position table; its
        # output is never read.
        pos = (st[:, None] + cols).clamp(max=self.n_positions - 1)
        mask = None
        if any(starts):
            real = cols[None, :] < lens[:, None]  # (k, S)
            slot = torch.arange(first, first + k, device=self.device)[:, None].expand(k, S)
            at, to = slot[real], pos[real]
            # Query i of row r sees the row's positions up to its own (padding queries: up
            # to the row's last real token), all of them in the cache by then.
            last = st + lens - 1
            upto = torch.minimum(st[:, None] + cols, last[:, None])  # (k, S)
            mask = (torch.arange(T, device=self.device) <= upto[:, :, None]).unsqueeze(1)

        def kv(i, key, val):
            if mask is None:
                cache.k[i, rows, :, :S] = key
                cache.v[i, rows, :, :S] = val
                return key, val
            # (rows, length, H, hd) views: only the real tokens are written, each at its
            # position, so a padded chunk never writes past its row's end.
            cache.k[i].transpose(1, 2)[at, to] = key.transpose(1, 2)[real]
            cache.v[i].transpose(1, 2)[at, to] = val.transpose(1, 2)[real]
            return cache.k[i, rows, :, :T], cache.v[i, rows, :, :T]

        def done(x):  # (k, S, D)
            cache.lens[rows] = st + lens
            if reply_types is not None:
                cache.types[rows] = torch.as_tensor(list(reply_types), dtype=torch.long,
                                                    device=self.device)
            return self._final(x[torch.arange(k, device=self.device), lens - 1])

        return _Segment(ids, pos, kv, mask, mask is None, types), done

    def _step_segment(self, cache, tokens, types: bool):
        n = tokens.shape[0]
        lens = cache.lens[:n].clone()  # the prefill of other rows may set theirs meanwhile
        T = int(lens.max()) + 1
        check_fits(T, cache.k.shape[3])
        rows = torch.arange(n, device=self.device)
        cols = torch.arange(T, device=self.device)
        mask = (cols[None, :] <= lens[:, None]).view(n, 1, 1, T)

        def kv(i, key, val):
            kc, vc = cache.k[i], cache.v[i]  # (rows, H, length, hd)
            kc[rows, :, lens] = key[:, :, 0]
            vc[rows, :, lens] = val[:, :, 0]
            return kc[:n, :, :T], vc[:n, :, :T]

        def done(x):  # (n, 1, D)
            cache.lens[:n] += 1
            return self._final(x[:, -1])

        seg = _Segment(tokens.view(n, 1), lens.view(n, 1), kv, mask, False,
                       cache.types[:n].view(n, 1) if types else None)
        return seg, done

    def copy_row(self, cache: "RowCache", src: int, dst: int,
                 src_cache: "RowCache | None" = None) -> None:
        """Row dst becomes a copy of row src (its filled positions only) of `src_cache`
        (default: the same cache)."""
        sc = cache if src_cache is None else src_cache
        n = int(sc.lens[src])
        cache.k[:, dst, :, :n] = sc.k[:, src, :, :n]
        cache.v[:, dst, :, :n] = sc.v[:, src, :, :n]
        cache.lens[dst] = sc.lens[src]
        cache.types[dst] = sc.types[src]

    # -- scoring whole sequences (MMI's reverse model) --
    def hidden(self, ids: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D) of right-padded (B, T) ids, causal, no cache.

        Right padding cannot change the states of the real tokens before it.
        """
        B, T = ids.shape
        check_fits(T, self.n_positions)
        pos = torch.arange(T, device=ids.device).expand(B, T)
        x = self._blocks(ids, pos, None, None, causal=True, types=types)
        return F.layer_norm(x, (self.d,), *self.ln_f, self.eps)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits (N, V) of final hidden states (N, D)."""
        head, lin = self.head, (self._lin_int8 if self.int8_head else self._lin_float)
        if self._blocked_for(h.shape[0]):
            head, lin = self.blocked[1], self._lin_blocked
        return lin(h, head).float()
