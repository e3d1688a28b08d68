"""Decoding: the KV-cache loop that yields tokens as it goes.

`decode` runs a padded batch of contexts through a backend (chitchat.backends), one token per
row per step, each row stopping at its own [SEP]. Batch 1 is the chat path; N rows from one
context (`copies`) is the batched candidate generation that MMI reranking uses. The rules
applied to each step's logits are the pure functions of chitchat.sampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .config import DecodingOptions
from .sampling import Constraints, choose_tokens, process_logits
from .utils import ChitchatError

__all__ = ["Step", "decode", "decode_one", "beam_search", "Row"]


@dataclass
class Step:
    """One decoding step of a batch: per row the new token, or None once the row has ended.

    A row's [SEP] is reported once (so a caller can tell a finished reply from a cut one),
    then None. `logprobs` (with ``scores=True``) are the model's own log-probabilities of the
    chosen tokens, before any rule or warper: what MMI's forward score needs.
    """
    tokens: list[int | None]
    logprobs: list[float | None] | None = None


def _check_budget(context_len: int, max_new_tokens: int, n_positions: int) -> None:
    # The last token is never fed back, so the model sees positions up to
    # context_len + max_new_tokens - 2.
    if context_len + max_new_tokens - 1 > n_positions:
        raise ChitchatError(
            f"a context of {context_len} tokens plus --max_new_tokens {max_new_tokens} does "
            f"not fit the model's n_positions ({n_positions}); shorten the history or lower "
            "--max_new_tokens")


def decode(backend, contexts: Sequence[Sequence[int]], opts: DecodingOptions,
           cons: Constraints, generator: torch.Generator | None = None, *, copies: int = 1,
           token_types: Sequence[Sequence[int]] | None = None,
           reply_types: Sequence[int] | None = None, scores: bool = False) -> Iterator[Step]:
    """Generate replies for a batch of contexts, one `Step` per token.

    `copies` > 1 with a single context feeds that context once and decodes `copies`
    independent samples from it (the KV cache is copied, not recomputed). `token_types` and
    `reply_types` are speaker ids for models trained with them (None otherwise). Stops when
    every row has produced [SEP] or `opts.max_new_tokens` tokens; the batch sheds finished
    rows as it goes (the backend's `reorder`). Runs under inference_mode.
    """
    if copies > 1 and len(contexts) != 1:
        raise ValueError("copies > 1 needs exactly one context")
    _check_budget(max(len(c) for c in contexts), opts.max_new_tokens, backend.n_positions)
    # inference_mode is entered around each computation, never across a yield: the
    # caller's code between two tokens must run in its own autograd mode.
    with torch.inference_mode():
        state, logits = backend.start(contexts, token_types=token_types, reply_types=reply_types,
                                      capacity=max(len(c) for c in contexts)
                                      + opts.max_new_tokens)
        cons = cons.to(logits.device)
        if copies > 1:
            backend.reorder(state, torch.zeros(copies, dtype=torch.long, device=logits.device))
            logits = logits.expand(copies, -1)
        B, V = logits.shape
        seen = torch.zeros(B, V, dtype=torch.bool, device=logits.device) \
            if opts.repetition_penalty != 1.0 else None
    generated: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    live = list(range(B))  # the caller's row of each row still in the batch
    for step in range(opts.max_new_tokens):
        with torch.inference_mode():
            processed = process_logits(logits, [generated[r] for r in live], step, opts, cons,
                                       seen)  # new tensor
            toks = choose_tokens(processed, opts, generator)
            lps = None
            if scores:  # read back with the tokens: one sync per step
                lp_t = logits.log_softmax(dim=-1).gather(-1, toks.view(-1, 1)).view(-1)
                picked, lps = torch.stack((toks.double(), lp_t.double())).tolist()
                picked = [int(t) for t in picked]
            else:
                picked = toks.tolist()
        out: list[int | None] = [None] * B
        lp: list[float | None] | None = [None] * B if scores else None
        for i, t in enumerate(picked):
            r = live[i]
            if done[r]:
                continue
            out[r] = t
            if lp is not None:
                lp[r] = lps[i]
            if t == cons.sep_id:
                done[r] = True
            else:
                generated[r].append(t)
        yield Step(out, lp)
        if all(done) or step == opts.max_new_tokens - 1:
            return
        with torch.inference_mode():
            if seen is not None:
                seen[torch.arange(len(live), device=toks.device), toks] = True
            # Finished rows are fed their [SEP] (outputs ignored) until half the batch has
            # finished; then the batch shrinks to the rows still going, so a long last reply
            # does not pay for finished ones. Halving bounds the cache copies to log2(B).
            keep = [i for i, r in enumerate(live) if not done[r]]
            if len(keep) <= len(live) // 2:
                index = torch.tensor(keep, dtype=torch.long, device=toks.device)
                backend.reorder(state, index)
                toks = toks.index_select(0, index)
                if seen is not None:
                    seen = seen.index_select(0, index)
                live = [live[i] for i in keep]
            logits = backend.step(state, toks)


class Row:
    """One reply decoded a token at a time by a caller that owns the model calls (the
    server's engine batches many rows into one step). Each row has its own options,
    generator, reply so far and repetition mask, so given the same logits it picks the
    tokens `decode` picks for it alone: the same rules on a (1, V) row, the same generator.
    """

    def __init__(self, opts: DecodingOptions, cons: Constraints,
                 generator: torch.Generator | None = None, scores: bool = False):
        if opts.num_beams > 1:
            raise ChitchatError("a Row samples or decodes greedily; num_beams must be 1")
        self.opts, self.cons, self.generator = opts, cons, generator
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if scores else None
        self.stop_logprob: float | None = None
        self.finish_reason: str | None = None  # "stop" ([SEP]) or "length", once done
        self._seen: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def choose(self, logits: torch.Tensor) -> int | None:
        """The next token from this row's (1, V) or (V,) logits: a reply token, or None
        once the reply has ended ([SEP] or max_new_tokens)."""
        if self.done:
            raise RuntimeError("the row has already ended")
        opts = self.opts
        logits = logits.view(1, -1)
        with torch.inference_mode():
            if self._seen is None and opts.repetition_penalty != 1.0:
                self._seen = torch.zeros_like(logits, dtype=torch.bool)
            processed = process_logits(logits, [self.tokens], len(self.tokens), opts,
                                       self.cons, self._seen)
            t = int(choose_tokens(processed, opts, self.generator)[0])
            lp = float(logits.log_softmax(dim=-1)[0, t]) if self.logprobs is not None else None
            if t != self.cons.sep_id and self._seen is not None:
                self._seen[0, t] = True
        if t == self.cons.sep_id:
            self.stop_logprob = lp
            self.finish_reason = "stop"
            return None
        self.tokens.append(t)
        if self.logprobs is not None:
            self.logprobs.append(lp)
        if len(self.tokens) >= opts.max_new_tokens:
            self.finish_reason = "length"
        return t


def decode_one(backend, context: Sequence[int], opts: DecodingOptions, cons: Constraints,
               generator: torch.Generator | None = None, **kw) -> Iterator[int]:
    """Reply tokens for one context, as they are generated; the [SEP] is not yielded."""
    if opts.num_beams > 1:
        yield from beam_search(backend, context, opts, cons, **kw)
        return
    for step in decode(backend, [context], opts, cons, generator, **kw):
        t = step.tokens[0]
        if t is None or t == cons.sep_id:
            return
        yield t


def beam_search(backend, context: Sequence[int], opts: DecodingOptions, cons: Constraints,
                token_types=None, reply_types=None) -> list[int]:
    """Beam search over reply tokens; the best hypothesis by mean token log-probability.

    Deterministic and simple: `num_beams` live hypotheses; a hypothesis that picks [SEP]
    (allowed from min_len on) is finished; search stops once `num_beams` hypotheses have
    finished or max_new_tokens is reached (then live ones count as finished). The bans,
    min length, repetition penalty and n-gram rules apply; temperature, top-k and top-p
    do not.
    """
    nb = opts.num_beams
    _check_budget(len(context), opts.max_new_tokens, backend.n_positions)
    with torch.inference_mode():
        state, logits = backend.start([context], token_types=token_types,
                                      reply_types=reply_types,
                                      capacity=len(context) + opts.max_new_tokens)
        cons = cons.to(logits.device)
        V = logits.shape[-1]
        beams: list[list[int]] = [[]]
        beam_scores = torch.zeros(1, device=logits.device)
        finished: list[tuple[float, list[int]]] = []
        track = opts.repetition_penalty != 1.0
        for step in range(opts.max_new_tokens):
            seen = None
            if track:
                seen = torch.zeros(len(beams), V, dtype=torch.bool, device=logits.device)
                for b, toks in enumerate(beams):
                    if toks:
                        seen[b, toks] = True
            logp = process_logits(logits, beams, step, opts, cons, seen).log_softmax(dim=-1)
            total = (logp + beam_scores[:, None]).view(-1)
            k = min(2 * nb, int(torch.isfinite(total).sum()))
            if k == 0:
                break
            top = torch.topk(total, k)
            new_beams, new_scores, src = [], [], []
            for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                b, t = divmod(flat, V)
                if t == cons.sep_id:
                    finished.append((score / (len(beams[b]) + 1), beams[b]))
                    continue
                new_beams.append(beams[b] + [t])
                new_scores.append(score)
                src.append(b)
                if len(new_beams) == nb:
                    break
            if len(finished) >= nb or not new_beams or step == opts.max_new_tokens - 1:
                finished.extend((s / len(bm), bm) for s, bm in zip(new_scores, new_beams)
                                if step == opts.max_new_tokens - 1)
                break
            index = torch.tensor(src, dtype=torch.long, device=logits.device)
            backend.reorder(state, index)
            beams, beam_scores = new_beams, torch.tensor(new_scores, device=logits.device)
            logits = backend.step(state, torch.tensor([bm[-1] for bm in beams],
                                                      dtype=torch.long, device=logits.device))
    if not finished:
        return []
    return max(finished, key=lambda f: f[0])[1]
