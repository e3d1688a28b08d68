"""The reference backend: the transformers model with a `DynamicCache`.

It is what the tests compare the lean backend (fast.py) against and the fallback for
configs the lean path does not cover.
"""
from __future__ import annotations

import torch

from .base import DecodeState, as_types, check_fits, left_pad, reorder_rows


class HFDecoder:
    """The transformers model with a DynamicCache: slower, but any GPT-2 variant."""

    def __init__(self, model, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id
        self.n_positions = model.config.n_positions
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.device = next(model.parameters()).device

    def start(self, contexts, token_types=None, reply_types=None, capacity=None):
        from transformers import DynamicCache

        ids, pad = left_pad(contexts, self.pad_id, self.device)
        types = left_pad(token_types, 0, self.device)[0] if token_types is not None else None
        B, L = ids.shape
        check_fits(L, self.n_positions)
        # A key mask even without padding: given none, transformers looks for padding in
        # the ids, and given a 2-D one it checks whether it is all ones; both read a value
        # back from the GPU on every token. A ready 4-D mask is used as it is.
        cols = torch.arange(self.n_positions, device=self.device)
        state = DecodeState(length=0, pad=pad,
                            key_mask=(cols[None, :] >= pad[:, None]).view(B, 1, 1, -1),
                            cache=DynamicCache(config=self.model.config),
                            reply_types=as_types(reply_types, self.device))
        return state, self._forward(ids, state, types)

    def step(self, state, tokens):
        check_fits(state.length + 1, self.n_positions)
        types = state.reply_types.view(-1, 1) if state.reply_types is not None else None
        return self._forward(tokens.view(-1, 1), state, types)

    def _forward(self, ids, state, types=None):
        B, S = ids.shape
        t0, t1 = state.length, state.length + S
        pos = (torch.arange(t0, t1, device=self.device)[None, :] - state.pad[:, None]).clamp(min=0)
        keys = state.key_mask[..., :t1]  # (B, 1, 1, t1)
        if self.model.config._attn_implementation == "sdpa":
            # query i (position t0 + i) sees the keys up to itself, and always itself: a
            # padding query that saw nothing would put NaN in the cache
            seen = torch.ones(S, t1, dtype=torch.bool, device=self.device).tril_(t0)
            attn = (keys & seen) | _diagonal(S, t0, t1, self.device)
        else:  # eager attention adds its mask: let transformers build it
            attn = keys.view(B, -1).long()
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=attn,
                         token_type_ids=types, past_key_values=state.cache, use_cache=True)
        state.length = t1
        return out.logits[:, -1].float()

    def reorder(self, state, index):
        state.cache.reorder_cache(index)
        reorder_rows(state, index)

    def prepare(self, batch_size: int) -> None:
        pass

    def hidden(self, ids, types=None):
        # All ones: with right padding causal attention already keeps real tokens from
        # seeing the pads, and an explicit mask stops transformers warning about them.
        return self.model.transformer(input_ids=ids, token_type_ids=types,
                                      attention_mask=torch.ones_like(ids),
                                      use_cache=False).last_hidden_state

    def project(self, h):
        return self.model.lm_head(h).float()


def _diagonal(S: int, t0: int, t1: int, device) -> torch.Tensor:
    """(S, t1) bool, True where query i meets its own key t0 + i."""
    return torch.arange(t1, device=device)[None, :] == \
        torch.arange(t0, t0 + S, device=device)[:, None]



def _diagonal(S: int, t0: int, t1: int, device) -> torch.Tensor:
    """(S, t1) bool, True where query i meets its own key t0 + i."""
    return torch.arange(t1, device=device)[None, :] == \
        torch.arange(t0, t0 + S, device=device)[:, None]

