"""The server's decoding engine: continuous batching over a preallocated KV cache.

One thread owns the model and runs it one decoding step at a time over every active row:

* A new request is prefilled (its context pass, batched with the other requests admitted at
  the same moment, in the same pass over the weights as the running rows' step) and decodes
  with the running batch from the next step on. With `step_tokens`, a step that has rows
  running computes at most that many tokens (their one each, and chunks of the joining
  contexts, first come first served, `plan_prefill`): on a CPU a step's cost grows with its
  tokens, so a long context computed in one step stalls every streaming reply for as long;
  fed in chunks, it delays its own first token instead (docs/serving.md has both). A
  context being fed sits in the row after the running ones. A row that ends ([SEP],
  max_tokens), is cancelled (client gone, stop sequence hit) or is cut at shutdown leaves at
  once; the last row moves into its cache slot, so the active rows stay packed in slots
  0..n-1 and a step is a single model call on a view of the cache.
* The cache (`FastGPT2.row_cache`) is allocated once: `max_batch` rows of `max_context`
  positions. Memory stays flat however many clients come; requests beyond the free rows wait
  in a FIFO queue (at most `max_queue`), and none overtakes another, so an MMI request that
  needs num_candidates rows is not starved by single-row ones.
* Every row keeps its own options, seed and reply so far (`generation.Row`): its own
  positions and keys mean the model computes for it what it computes for it alone, and its
  own generator makes its samples independent of its neighbours. A seeded request's reply
  is the one `Chatbot.generate` gives with that seed (tests/test_engine.py).
* MMI: a request's num_candidates candidates are rows of the batch (one context pass, copied
  into their slots); when the last one ends they are reranked and the reply is sent at once.
* Beam search (num_beams > 1) is not a row-by-row decode: such a request runs alone between
  two steps, through `Chatbot.start`.
* With `prefill_thread` (a CPU with a core to spare), a single-row request that arrives
  while replies stream is taken from the queue by a second thread, which prefills it into a
  scratch row of its own during the running step and samples its first token; the engine
  copies the row in at its next step and sends that token then. The running rows never
  wait for a newcomer's context (on a CPU a step in which one joins costs 1.5x-1.8x a plain
  one), and the newcomer's context does not wait for the running step to end. MMI
  requests, beam search and requests that come to an idle engine are the engine's, as
  above.

Jobs report to the request's event loop through `Job.events`: ("piece", str), then
("done", Reply) or ("error", Exception).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

import torch

from ..streams import Prepared, ReplyStream
from ..utils import ChitchatError

log = logging.getLogger("chitchat")

# Scratch rows of the prefill thread: one being filled while the other waits for the engine
# to copy it in.
SCRATCH_ROWS = 2


def plan_prefill(running: int, budget: int, remaining: list[int]) -> list[int]:
    """How many tokens of each joining context (in queue order, `remaining[i]` still to
    feed) the next step computes beside `running` decoding rows: all of them when no row is
    running or `budget` is 0, else at most `budget` tokens in all (the running rows'
    included, and at least one context token), first come first served. A prefix of the
    contexts, each with at least one token; only the last may be left unfinished."""
    if not running or not budget:
        return list(remaining)
    left = max(budget - running, 1)
    out = []
    for r in remaining:
        if left <= 0:
            break
        out.append(min(r, left))
        left -= out[-1]
    return out


def use_prefill_thread(choice: str, device: str, threads: int, cores: int | None) -> bool:
    """Whether the engine prefills on a second thread (serve.py --prefill_thread): `auto`
    only on a CPU with a core that torch's `threads` leave free. On a GPU both threads
    would queue on the same device, so the one-pass join stays."""
    if choice != "auto":
        return choice == "on"
    return device == "cpu" and threads < (cores or 1)


class _Pending:
    """A request admitted to the batch whose context is not all in its row yet."""

    def __init__(self, job: "Job"):
        self.job = job
        self.fed = 0  # tokens of its context already in its cache row

    @property
    def left(self) -> int:
        return len(self.job.prep.context.ids) - self.fed


class EngineError(ChitchatError):
    """A request the engine refuses now (`code`: overloaded, shutting_down)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def shutting_down() -> EngineError:
    return EngineError("the server is shutting down", "shutting_down")


class Job:
    """One request: what to decode, and the events of its reply on the request's loop."""

    def __init__(self, prep: Prepared, loop: asyncio.AbstractEventLoop, id: str = ""):
        self.prep = prep
        self.id = id
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.tokens_sent = 0
        self.ended = False  # a "done" or "error" was emitted (engine thread only)

    @property
    def rows(self) -> int:
        return max(1, len(self.prep.rows))

    def emit(self, kind: str, value) -> None:
        if kind != "piece":
            self.ended = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:
            # The loop is closed (the server stopped): nobody will read this any more.
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class _Feed:
    """The token iterator behind a row's ReplyStream: the engine appends a token, then
    pulls one piece; pulling with nothing appended ends the reply. Carries the row's
    scores for the Reply (MMI candidates)."""

    def __init__(self, row):
        self.row = row
        self.tokens: collections.deque[int] = collections.deque()

    @property
    def logprobs(self):
        return self.row.logprobs

    @property
    def stop_logprob(self):
        return self.row.stop_logprob

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.tokens:
            return self.tokens.popleft()
        raise StopIteration


class _Live:
    """A row in the cache: its job, its decoding state, its reply stream."""

    def __init__(self, job: Job, row, tokenizer):
        self.job, self.row = job, row
        self.feed = _Feed(row)
        self.stream = ReplyStream(self.feed, tokenizer, job.prep.context, job.prep.options)
        self.last: int | None = None  # the token to feed at the next step
        self.held = ""  # its first piece, from the prefill thread, sent when the row joins


class Engine:
    """The only thread that runs the model (see the module docstring)."""

    def __init__(self, bot, max_batch: int = 8, max_queue: int = 64,
                 max_context: int | None = None, start: bool = True,
                 step_tokens: int = 0, prefill_thread: bool = False):
        backend = bot.backend
        if not hasattr(backend, "row_cache"):
            raise ChitchatError("the server batches rows in the fast backend's KV cache; "
                                f"{type(backend).__name__} (--backend hf) cannot serve: use "
                                "--backend fast")
        self.bot = bot
        self.max_batch = max_batch
        self.max_queue = max_queue
        # See plan_prefill; 0: a joining context is computed whole in one step.
        self.step_tokens = step_tokens
        self.max_context = min(max_context or bot.n_positions, bot.n_positions)
        mmi = getattr(bot, "mmi", None)
        # An MMI request needs all its candidates' rows at once.
        self.rows = max(max_batch, mmi.num_candidates if mmi is not None else 1)
        self.cache = backend.row_cache(self.rows, self.max_context)
        backend.prepare(self.rows)
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._live: list[_Live] = []  # row i of the cache is _live[i] (engine thread only)
        # Admitted, context not all fed, in queue order: only the first may be partly fed,
        # and it sits in row len(_live) (engine thread only).
        self._pending: list[_Pending] = []
        self._candidates: dict[Job, list] = {}  # MMI: finished candidates per job
        self._closed = False
        self._stop = False
        self._deadline: float | None = None
        self.steps = collections.Counter()  # rows in a step -> steps, for tests and logs
        self._thread = threading.Thread(target=self._run, name="chitchat-generate",
                                        daemon=True)
        # The prefill thread's state; the dict and lists are guarded by _cond.
        self._worker = None
        self._away: dict[Job, None] = {}  # given to the prefill thread, not in _live yet
        self._ready: list[tuple[_Live, int]] = []  # prefilled: (row, its scratch row)
        if prefill_thread:
            self._scratch = backend.row_cache(SCRATCH_ROWS, self.max_context)
            self._free_scratch = list(range(SCRATCH_ROWS))
            self._worker = threading.Thread(target=self._prefill_run, name="chitchat-prefill",
                                            daemon=True)
        if start:
            self.start()

    # -- any thread --
    def start(self) -> None:
        # The prefill thread first: the engine admits single-row requests itself while
        # it is not alive, so on a busy machine a late start would turn the first free
        # rows into joining steps.
        if self._worker is not None:
            self._worker.start()
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._live) + len(self._pending) + len(self._away)

    def submit(self, job: Job) -> None:
        if job.rows > self.rows:
            raise ChitchatError(f"a request of {job.rows} rows cannot fit {self.rows} rows")
        with self._cond:
            if self._closed:
                raise shutting_down()
            if len(self._queue) >= self.max_queue:
                raise EngineError(f"{len(self._queue)} requests are already waiting for the "
                                  "model; retry shortly", "overloaded")
            self._queue.append(job)
            self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        """Stop taking requests; end the queued ones now and the running ones if they have
        not finished in `timeout` seconds, each with a shutting_down error."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        for job in queued:
            self._cut(job)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; whoever still waits gets a shutting_down error."""
        with self._cond:
            self._closed = self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the generation thread did not stop within %.0f s", timeout)

    # -- the engine thread --
    def _jobs(self) -> dict[Job, None]:
        """Every job holding rows of the batch (live, or its context being fed), in order;
        not those the prefill thread holds."""
        return {**{lv.job: None for lv in self._live}, **{p.job: None for p in self._pending}}

    def _run(self) -> None:
        while True:
            with self._cond:
                # (Queued requests that cannot fit wait for rows to free: the prefill
                # thread may hold the only ones.)
                while not (self._live or self._pending or self._ready or self._stop
                           or (self._queue and self._queue[0].rows <= self._free_rows())):
                    self._cond.wait()
                if self._stop:
                    leftovers = list(self._queue)
                    self._queue.clear()
                    break
                admitted = self._admit()
                ready, self._ready = self._ready, []
                if self._worker is not None and self._queue:
                    self._cond.notify_all()  # rows may have freed for the prefill thread
            cut = self._deadline is not None and time.monotonic() >= self._deadline
            try:
                if cut:
                    self._release(ready)
                    for job in {**self._jobs(), **{lv.job: None for lv, _ in ready},
                                **dict.fromkeys(admitted)}:
                        self._cut(job)
                    self._live.clear()
                    self._pending.clear()
                    self._candidates.clear()
                    continue
                self._leave([i for i, lv in enumerate(self._live) if lv.job.cancelled.is_set()])
                self._pending = [p for p in self._pending if not p.job.cancelled.is_set()]
                self._install(ready)
                for job in admitted:
                    if not job.prep.rows:
                        self._run_alone(job)
                if self._pending:
                    self._join()  # the running rows take their step in the same pass
                elif self._live:
                    self._step()
            except Exception as e:  # reported to every client in the batch, and logged
                log.exception("generation failed")
                for job in self._jobs().keys() | set(admitted) | {lv.job for lv, _ in ready}:
                    if not job.ended:
                        job.emit("error", e)
                self._live.clear()
                self._pending.clear()
                self._candidates.clear()
        if self._worker is not None and self._worker.is_alive():
            self._worker.join()  # it stops after the context it is computing
        with self._cond:
            ready, self._ready = self._ready, []
        self._release(ready)
        for job in {**self._jobs(), **{lv.job: None for lv, _ in ready},
                    **dict.fromkeys(leftovers)}:
            self._cut(job)
        self._live.clear()
        self._pending.clear()

    def _install(self, ready: list[tuple["_Live", int]]) -> None:
        """Rows the prefill thread has filled take the next slots and decode from the next
        step on; their first pieces are sent now. (No context is half fed then: the
        engine feeds in chunks only MMI requests, which the prefill thread never gets, and
        with MMI every request is one.)"""
        backend, cache = self.bot.backend, self.cache
        try:
            for lv, r in ready:
                if lv.job.cancelled.is_set():
                    self._drop(lv)
                    continue
                backend.copy_row(cache, r, len(self._live), self._scratch)
                self._live.append(lv)
                if lv.held:
                    lv.job.tokens_sent += 1
                    lv.job.emit("piece", lv.held)
        finally:  # (on an error, _run reports it to every job of `ready`)
            self._release(ready)

    def _release(self, ready: list[tuple["_Live", int]]) -> None:
        """The scratch rows of `ready` are free again, and their jobs no longer away."""
        if not ready:
            return
        with self._cond:
            for lv, r in ready:
                self._away.pop(lv.job, None)
                self._free_scratch.append(r)
            self._cond.notify_all()

    def _prefill_run(self) -> None:
        """The prefill thread: while rows run, it takes the request at the head of the
        queue if it is a single row that fits, prefills its context into a free scratch
        row and samples its first token; then the row waits in _ready for the engine to
        copy it in. The token is sent when the row joins, right before its first step, so
        that the reply's first gap is one step and not up to two (the wait for the running
        step to end, then that step)."""
        backend, tok = self.bot.backend, self.bot.tokenizer
        while True:
            with self._cond:
                while not self._stop and (job := self._take()) is None:
                    self._cond.wait()
                if self._stop:
                    return
                r = self._free_scratch.pop()
            lv = _Live(job, job.prep.rows[0], tok)
            done = True
            try:
                if not job.cancelled.is_set():  # else the client has gone: nothing to send
                    ctx = job.prep.context
                    types = ctx.token_types is not None
                    with torch.inference_mode():
                        logits = backend.prefill(
                            self._scratch, r, [ctx.ids],
                            token_types=[ctx.token_types] if types else None,
                            reply_types=[ctx.reply_type] if types else None)
                    if not job.cancelled.is_set():
                        done = self._advance(lv, logits[0], hold=True)
            except Exception as e:  # this request's alone: the others go on
                log.exception("prefill failed")
                if not job.ended:
                    job.emit("error", e)
            if done:
                self._release([(lv, r)])
            else:
                with self._cond:
                    self._ready.append((lv, r))
                    self._cond.notify_all()

    def _admit(self) -> list[Job]:
        """Queued jobs whose rows fit now, first come first served (with the lock held);
        those that decode in the batch are pending from here on. While rows run, a
        single-row request at the head is left to the prefill thread (`_take`)."""
        free = self._free_rows()
        worker = (self._worker is not None and self._worker.is_alive()
                  and bool(self._live or self._ready))
        out = []
        while self._queue and self._queue[0].rows <= free:
            job = self._queue[0]
            if job.cancelled.is_set():
                self._queue.popleft()
                continue
            if worker and len(job.prep.rows) == 1:
                break
            self._queue.popleft()
            if job.prep.rows:  # (beam search decodes alone, in no row of the cache)
                free -= job.rows
                self._pending.append(_Pending(job))
            out.append(job)
        return out

    def _take(self) -> Job | None:
        """The prefill thread's next request (with the lock held), if rows are running, a
        scratch row is free, and the head of the queue is a single row that fits."""
        if not (self._live and self._free_scratch):
            return None
        while self._queue and self._queue[0].cancelled.is_set():
            self._queue.popleft()
        if not self._queue or len(self._queue[0].prep.rows) != 1 or self._free_rows() < 1:
            return None
        job = self._queue.popleft()
        self._away[job] = None
        return job

    def _free_rows(self) -> int:
        return (self.rows - len(self._live) - sum(p.job.rows for p in self._pending)
                - len(self._away))

    def _cut(self, job: Job) -> None:
        if job.ended:
            return
        log.warning("shutdown: request %s cut after %d tokens", job.id or "?",
                    job.tokens_sent)
        job.emit("error", shutting_down())

    def _run_alone(self, job: Job) -> None:
        p = job.prep
        rs = self.bot.start(p.history, **p.overrides)
        try:
            for piece in rs:
                if job.cancelled.is_set():
                    break
                if piece:
                    job.tokens_sent += 1
                    job.emit("piece", piece)
        finally:
            rs.close()
        job.emit("done", rs.reply)

    def _join(self) -> None:
        """Feed the pending contexts (what `plan_prefill` allows) into the rows after the
        running ones, and step the running rows, in one pass over the weights (a separate
        context pass would stall every running row for a second read of every matrix and
        a second step's fixed work). Each running row gets its next token, each context fed
        to its end its first; an unfinished one waits in its row."""
        backend, cache = self.bot.backend, self.cache
        n = len(self._live)
        takes = plan_prefill(n, self.step_tokens, [p.left for p in self._pending])
        batch = self._pending[:len(takes)]
        if takes and takes[-1] < batch[-1].left:
            # The last one stays partly fed, in the row right after the others; a request
            # before it with more rows (MMI candidates) needs that row for its copies once
            # its context is in, so this step stops after that request.
            for k, p in enumerate(batch[:-1]):
                if p.job.rows > 1:
                    batch, takes = batch[:k + 1], takes[:k + 1]
                    break
        chunks, types = [], []
        for p, t in zip(batch, takes):
            ctx = p.job.prep.context
            chunks.append(ctx.ids[p.fed:p.fed + t])
            if ctx.token_types is not None:
                types.append(ctx.token_types[p.fed:p.fed + t])
        starts = [p.fed for p in batch]
        ctxs = [p.job.prep.context for p in batch]
        kw = dict(token_types=types if types else None,
                  reply_types=[c.reply_type for c in ctxs] if types else None,
                  starts=starts if any(starts) else None)
        with torch.inference_mode():
            if n:
                self.steps[n] += 1
                step_logits, logits = backend.step_and_prefill(
                    cache, self._last_tokens(), self._live[0].job.prep.context.reply_type
                    is not None, chunks, **kw)
            else:
                step_logits, logits = None, backend.prefill(cache, 0, chunks, **kw)
        for p, t in zip(batch, takes):
            p.fed += t
        done = [p.job for p in batch if not p.left]
        running = [(i, lv, step_logits[i]) for i, lv in enumerate(self._live)]
        tok = self.bot.tokenizer
        heads = [_Live(j, j.prep.rows[0], tok) for j in done]
        extra = []
        for i, j in enumerate(done):  # MMI: the other candidates share the context pass
            for row in j.prep.rows[1:]:
                backend.copy_row(cache, n + i, n + len(done) + len(extra))
                extra.append((_Live(j, row, tok), i))
        with self._cond:  # the prefill thread counts free rows from these
            self._live.extend(heads)
            self._live.extend(lv for lv, _ in extra)
            del self._pending[:len(done)]
        chosen = [(lv, logits[i]) for i, lv in enumerate(heads)]
        chosen += [(lv, logits[i]) for lv, i in extra]
        self._choose(running + [(n + k, lv, lg) for k, (lv, lg) in enumerate(chosen)])

    def _last_tokens(self) -> torch.Tensor:
        return torch.tensor([lv.last for lv in self._live], dtype=torch.long,
                            device=self.cache.lens.device)

    def _step(self) -> None:
        n = len(self._live)
        self.steps[n] += 1
        with torch.inference_mode():
            logits = self.bot.backend.step_rows(
                self.cache, self._last_tokens(),
                types=self._live[0].job.prep.context.reply_type is not None)
        self._choose([(i, lv, logits[i]) for i, lv in enumerate(self._live)])

    def _choose(self, rows) -> None:
        """Each row's next token from its logits; rows that end leave the batch."""
        self._leave([i for i, lv, logits in rows if self._advance(lv, logits)])

    def _advance(self, lv: "_Live", logits: torch.Tensor, hold: bool = False) -> bool:
        """The row's next token from its logits, sent (with `hold`, kept in `lv.held` unless
        the reply ends with it); True if that ended its reply."""
        t = lv.row.choose(logits)
        lv.last = t
        job = lv.job
        if t is not None:
            lv.feed.tokens.append(t)
            piece = next(lv.stream)
            if piece and not job.prep.mmi:
                if hold and not lv.row.done:
                    lv.held = piece
                else:
                    job.tokens_sent += 1
                    job.emit("piece", piece)
        if not lv.row.done:
            return False
        for _ in lv.stream:  # the feed is empty: this ends the reply
            pass
        self._finished(lv)
        return True

    def _finished(self, lv: _Live) -> None:
        job = lv.job
        if not job.prep.mmi:
            job.emit("done", lv.stream.reply)
            return
        cands = self._candidates.setdefault(job, [])
        cands.append((job.prep.rows.index(lv.row), lv.stream.reply))
        if len(cands) == len(job.prep.rows):
            del self._candidates[job]
            reply = self.bot.rank_candidates(job.prep, [r for _, r in sorted(
                cands, key=lambda c: c[0])])
            if reply.text:
                job.tokens_sent = len(reply.token_ids)
                job.emit("piece", reply.text)
            job.emit("done", reply)

    def _leave(self, indices) -> None:
        """Rows `indices` leave; the last rows move into their slots, and a context being
        fed follows them (it stays in the row after the running ones)."""
        n = len(self._live)
        for i in sorted(indices, reverse=True):
            lv = self._live[i]
            if lv.job.cancelled.is_set():
                self._drop(lv)
            last = len(self._live) - 1
            if i != last:
                self.bot.backend.copy_row(self.cache, last, i)
                self._live[i] = self._live[last]
            self._live.pop()
        if len(self._live) < n and self._pending and self._pending[0].fed:
            self.bot.backend.copy_row(self.cache, n, len(self._live))

    def _drop(self, lv: "_Live") -> None:
        """A cancelled row: whoever still waits (a stop sequence was hit) gets what was
        produced."""
        if not lv.job.ended:
            self._candidates.pop(lv.job, None)
            lv.stream.close()
            lv.job.emit("done", lv.stream.reply)
