"""Replies as streams of text pieces: `Reply` (a finished reply and what it took),
`ReplyStream` (the pieces of one reply as its tokens arrive), and the token iterators that
feed a stream from one row of a batched decode (`BatchDriver`, `RowTokens`) or from MMI
reranking (`MMIBatch`, `MMITokens`). `Chatbot` builds these; the server's engine builds
`ReplyStream`s from the rows it decodes itself.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Iterator

from .config import DecodingOptions
from .dialogue import Context
from .generation import Row
from .tokenization import ChatTokenizer, Detokenizer


@dataclass
class Reply:
    """One generated reply and what it took."""
    text: str
    token_ids: list[int]
    prompt_tokens: int              # tokens of context the model saw
    finish_reason: str  # "stop" ([SEP]), "length" (max_new_tokens), "interrupted"
    notice: str | None = None       # e.g. the newest utterance was cut to fit
    first_token_s: float | None = None
    total_s: float = 0.0
    utterances_used: int = 0        # history utterances in the context
    token_logprobs: list[float] | None = None  # log P(token | before), with scores=True
    stop_logprob: float | None = None  # log P([SEP] | reply), with scores=True, if it ended
    candidates: list | None = None  # MMI: every chitchat.mmi.Candidate, the chosen one marked
    mmi_fallback: str | None = None  # MMI: why the choice did not pass every filter


@dataclass
class Prepared:
    """A reply to decode row by row outside `Chatbot` (chitchat.serving.engine batches the rows of
    many requests into one model step): see `Chatbot.prepare`."""
    history: list[str]
    context: Context
    options: DecodingOptions       # the reply's options (MMI: the candidates')
    rows: list[Row]                # one; MMI: num_candidates candidates; beam search: none
    overrides: dict

    @property
    def mmi(self) -> bool:
        return len(self.rows) > 1



class ReplyStream:
    """Text pieces of one reply as its tokens are generated; `.reply` holds the result.

    The reply is final once the stream is exhausted or closed; closing it early (or an
    exception such as KeyboardInterrupt while a token is computed) marks it "interrupted".
    """

    def __init__(self, tokens: Iterator[int], tokenizer: ChatTokenizer, ctx: Context,
                 opts: DecodingOptions):
        self.context = ctx
        self.options = opts
        self._tokens = tokens
        self._tok = tokenizer
        self._detok = Detokenizer()
        self._t0 = time.perf_counter()
        self.reply = Reply(text="", token_ids=[], prompt_tokens=len(ctx.ids),
                           finish_reason="interrupted", notice=ctx.notice,
                           utterances_used=ctx.utterances_used)
        self._open = True
        self._pieces: list[str] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if not self._open:
            raise StopIteration
        try:
            t = next(self._tokens)
        except StopIteration:
            r = self.reply
            r.finish_reason = ("length" if len(r.token_ids) >= self.options.max_new_tokens
                               else "stop")
            self._finish()
            raise
        except BaseException:
            self._finish()  # KeyboardInterrupt or an error: keep what was produced, re-raise
            raise
        r = self.reply
        if r.first_token_s is None:
            r.first_token_s = time.perf_counter() - self._t0
        r.token_ids.append(t)
        piece = self._detok.push(self._tok.tokens[t])
        self._pieces.append(piece)
        return piece

    def close(self) -> None:
        if self._open:
            if hasattr(self._tokens, "close"):
                self._tokens.close()
            self._finish()

    def _finish(self) -> None:
        self._open = False
        self.reply.text = "".join(self._pieces)
        self.reply.total_s = time.perf_counter() - self._t0
        lps = getattr(self._tokens, "logprobs", None)
        if lps is not None:
            self.reply.token_logprobs = lps[:len(self.reply.token_ids)]
        stop = getattr(self._tokens, "stop_logprob", None)
        if stop is not None and self.reply.finish_reason == "stop":
            self.reply.stop_logprob = stop
        self.reply.candidates = getattr(self._tokens, "candidates", None)
        self.reply.mmi_fallback = getattr(self._tokens, "mmi_fallback", None)


class BatchDriver:
    """Shares one batched `decode` among per-row token iterators (see Chatbot.start_batch).

    A row that needs a token it does not have advances the whole batch by one step and
    buffers the tokens of the other rows.
    """

    def __init__(self, steps: Iterator, n: int, sep_id: int):
        self._steps = steps
        self._sep = sep_id
        self.queues = [collections.deque() for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.stop_logprobs: list[float | None] = [None] * n
        self.ended = [False] * n
        self.open = [True] * n
        self._exhausted = False

    def pull(self, b: int) -> int | None:
        """Row b's next token, or None when its reply has ended."""
        while not self.queues[b]:
            if self.ended[b] or self._exhausted:
                return None
            try:
                step = next(self._steps)
            except StopIteration:
                self._exhausted = True
                return None
            for i, t in enumerate(step.tokens):
                if t is None:
                    continue
                if t == self._sep:
                    self.ended[i] = True
                    if step.logprobs is not None:
                        self.stop_logprobs[i] = step.logprobs[i]
                else:
                    self.queues[i].append(t)
                    if step.logprobs is not None:
                        self.logprobs[i].append(step.logprobs[i])
        return self.queues[b].popleft()

    def close_row(self, b: int) -> None:
        self.open[b] = False
        if not any(self.open):
            self._steps.close()
            self._exhausted = True


class RowTokens:
    """The token iterator of one row of a batch."""

    def __init__(self, driver: BatchDriver, row: int):
        self._d, self._row = driver, row

    @property
    def logprobs(self) -> list[float] | None:
        lps = self._d.logprobs[self._row]
        return lps if lps else None

    @property
    def stop_logprob(self) -> float | None:
        return self._d.stop_logprobs[self._row]

    def __iter__(self):
        return self

    def __next__(self) -> int:
        t = self._d.pull(self._row)
        if t is None:
            raise StopIteration
        return t

    def close(self) -> None:
        self._d.close_row(self._row)


class MMIBatch:
    """The reranking of a batch of histories, computed once, when first needed."""

    def __init__(self, compute):
        self._compute = compute
        self.result = None

    def get(self):
        if self.result is None:
            self.result = self._compute()
        return self.result


class MMITokens:
    """The token iterator of one MMI reply: reranks on the first read, then replays the
    chosen candidate's tokens (with its scores and the whole ranking for Reply)."""

    def __init__(self, batch: MMIBatch, row: int):
        self._batch, self._row = batch, row
        self._it = None
        self.logprobs = self.stop_logprob = self.candidates = self.mmi_fallback = None

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self._it is None:
            best, ranking = self._batch.get()[self._row]
            self.logprobs, self.stop_logprob = best.token_logprobs, best.stop_logprob
            self.candidates, self.mmi_fallback = ranking.candidates, ranking.fallback
            self._it = iter(list(best.token_ids))
        return next(self._it)
