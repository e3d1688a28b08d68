"""The continuous-batching engine (chitchat/serving/engine.py) on the tiny model: rows
joining and leaving a running batch, cancellation, per-row options and seeds, and every row's
reply equal to the one it gets decoded alone.

Tests that need a row to be mid-reply when something happens hold the engine with a `Gate`
on the model's step: the engine runs exactly the steps the test releases, so no test
depends on timing.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from chitchat.chat import Chatbot
from chitchat.serving.engine import Engine, EngineError, Job


@pytest.fixture(scope="module")
def bot(tiny_model_dir):
    return Chatbot.from_pretrained(tiny_model_dir, device="cpu", max_len=12)


class Gate:
    """Wraps the backend's steps (step_rows, and step_and_prefill: a step of the running
    rows that also prefills joining ones): each waits for a permit from the test, and the
    running rows of every step are recorded, with the steps at which rows joined."""

    def __init__(self, bot):
        self.backend = bot.backend
        self.inner = self.backend.step_rows
        self.inner_join = self.backend.step_and_prefill
        self.permits = threading.Semaphore(0)
        self.rows: list[int] = []
        self.joins: list[int] = []
        self.chunks: list[list[int]] = []  # the joining chunks' lengths, per join step
        self.entered = 0  # steps the engine has begun (it may be waiting for their permit)
        self.backend.step_rows = self.step_rows
        self.backend.step_and_prefill = self.step_and_prefill

    def step_rows(self, cache, tokens, types=False):
        self.entered += 1
        assert self.permits.acquire(timeout=60), "the test never released this step"
        self.rows.append(tokens.shape[0])
        return self.inner(cache, tokens, types)

    def step_and_prefill(self, cache, tokens, types, contexts, **kw):
        self.entered += 1
        assert self.permits.acquire(timeout=60), "the test never released this step"
        self.joins.append(len(self.rows))
        self.chunks.append([len(c) for c in contexts])
        self.rows.append(tokens.shape[0])
        return self.inner_join(cache, tokens, types, contexts, **kw)

    def release(self, n: int = 1000) -> None:
        for _ in range(n):
            self.permits.release()

    def remove(self) -> None:
        del self.backend.step_rows  # the instance attributes: back to the class's methods
        del self.backend.step_and_prefill


@pytest.fixture
def gate(tiny_model_dir):
    """A bot of its own whose steps the test releases."""
    b = Chatbot.from_pretrained(tiny_model_dir, device="cpu", max_len=12)
    g = Gate(b)
    g.bot = b
    yield g
    g.release()


async def collect(job: Job) -> tuple[str, object]:
    """(text of the pieces, the Reply) of a job, or raise its error."""
    text = ""
    while True:
        kind, value = await asyncio.wait_for(job.events.get(), 60)
        if kind == "piece":
            text += value
        elif kind == "done":
            return text, value
        else:
            raise value


async def wait_pieces(job: Job, n: int) -> list[str]:
    got = []
    while len(got) < n:
        kind, value = await asyncio.wait_for(job.events.get(), 60)
        assert kind == "piece", (kind, value)
        got.append(value)
    return got


async def until(predicate, what: str, step=None, timeout: float = 60.0) -> None:
    """Poll until predicate() holds (calling step() before each look); a broken engine
    fails the test instead of hanging it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if step is not None:
            step()
        if predicate():
            return
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


def make_job(bot, history, loop, **overrides) -> Job:
    return Job(bot.prepare(history, **overrides), loop, f"job-{len(history)}")


def run_jobs(bot, requests, max_batch: int, engine: Engine | None = None):
    """Queue every request before the engine starts, then collect (text, Reply) of each."""
    async def main():
        loop = asyncio.get_running_loop()
        eng = engine or Engine(bot, max_batch=max_batch, start=False)
        jobs = [make_job(bot, h, loop, **o) for h, o in requests]
        for j in jobs:
            eng.submit(j)
        eng.start()
        out = [await collect(j) for j in jobs]
        eng.close()
        return out, eng.steps
    return asyncio.run(main())


HISTORIES = [["你好"], ["今天天气不错", "是啊", "出去玩吗"], ["hello world"], ["吃了吗"],
             ["我想去北京看看", "好啊", "一起去吧", "什么时候"]]
OPTIONS = [{"greedy": True, "max_len": 20},
           {"seed": 7, "topk": 5, "temperature": 0.9},
           {"seed": 3, "topp": 0.8, "max_len": 9, "repetition_penalty": 1.3},
           {"seed": 11, "topk": 0, "temperature": 1.4, "min_len": 6},
           {"greedy": True, "max_len": 5, "no_repeat_ngram_size": 2}]


def assert_alone(bot, history, options, text, reply):
    alone = bot.generate(history, **options)
    assert text == reply.text == alone.text, (history, options)
    assert reply.token_ids == alone.token_ids
    assert reply.prompt_tokens == alone.prompt_tokens
    assert reply.finish_reason == alone.finish_reason


def test_rows_with_own_options_and_seeds_equal_lone_decoding(bot):
    reqs = list(zip(HISTORIES, OPTIONS))
    out, steps = run_jobs(bot, reqs, max_batch=8)
    assert max(steps) == len(reqs)  # all five decoded in one batch
    for (h, o), (text, reply) in zip(reqs, out):
        assert_alone(bot, h, o, text, reply)


def test_a_row_computes_the_logits_it_computes_alone(bot):
    """Rows of different lengths prefilled together and stepped together: each row's
    logits are its lone decode's (the backend alone, no sampling)."""
    be = bot.backend
    ctxs = [bot.context(h).ids for h in HISTORIES[:4]]
    cache = be.row_cache(4, 64)
    with torch.inference_mode():
        got = [be.prefill(cache, 0, ctxs)]
        toks = torch.tensor([5, 6, 7, 8])
        for _ in range(3):
            got.append(be.step_rows(cache, toks))
        for r, ids in enumerate(ctxs):
            state, logits = be.start([ids], capacity=64)
            want = [logits]
            for _ in range(3):
                want.append(be.step(state, toks[r:r + 1]))
            for g, w in zip(got, want):
                torch.testing.assert_close(g[r:r + 1], w, rtol=1e-5, atol=1e-5)


def test_slots_are_reused_and_the_batch_never_exceeds_max_batch(bot):
    reqs = [(HISTORIES[k % 5], {**OPTIONS[k % 5], "max_len": 3 + 4 * k}) for k in range(7)]
    engine = Engine(bot, max_batch=2, start=False)
    k, v = engine.cache.k, engine.cache.v
    assert k.shape[1] == 2 and k.shape[3] == bot.n_positions
    out, steps = run_jobs(bot, reqs, max_batch=2, engine=engine)
    assert engine.cache.k is k and engine.cache.v is v  # the one cache, reused
    assert max(steps) == 2
    for (h, o), (text, reply) in zip(reqs, out):
        assert_alone(bot, h, o, text, reply)


def test_a_new_request_joins_the_running_batch_at_the_next_step(gate):
    bot = gate.bot
    long = {"seed": 1, "max_len": 20, "min_len": 20}
    short = {"seed": 2, "max_len": 6, "min_len": 6}

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(bot, max_batch=4)
        a = make_job(bot, ["你好"], loop, **long)
        engine.submit(a)
        gate.release(3)
        first = await wait_pieces(a, 4)  # its first token (prefill) and three steps
        b = make_job(bot, ["吃了吗", "吃了", "吃的什么"], loop, **short)
        engine.submit(b)
        gate.release()
        text_a, reply_a = await collect(a)
        text_b, reply_b = await collect(b)
        engine.close()
        return "".join(first) + text_a, reply_a, text_b, reply_b

    text_a, reply_a, text_b, reply_b = asyncio.run(main())
    assert_alone(bot, ["你好"], long, text_a, reply_a)
    assert_alone(bot, ["吃了吗", "吃了", "吃的什么"], short, text_b, reply_b)
    # a alone for 3 steps; b joined at the next step that began after it came (the 4th, or
    # the 5th if the engine had already started the 4th and was waiting for its permit):
    # prefilled in the same pass as a's step, then it decoded its 5 remaining tokens beside
    # a, and left: b waited for no reply to end. a took its 19 steps, none skipped.
    assert len(gate.rows) == 19 and gate.rows[:3] == [1, 1, 1]
    assert len(gate.joins) == 1
    joined = gate.joins[0]
    assert joined in (3, 4) and gate.rows[joined] == 1
    assert gate.rows[joined + 1:joined + 6] == [2] * 5
    assert set(gate.rows[joined + 6:]) == {1}


def test_a_cancelled_row_leaves_at_once_and_the_others_are_unaffected(gate):
    bot = gate.bot
    opts = {"seed": 4, "max_len": 20, "min_len": 20}

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(bot, max_batch=4, start=False)
        a = make_job(bot, ["你好"], loop, **opts)
        b = make_job(bot, ["出去玩吗"], loop, **opts)
        engine.submit(a)
        engine.submit(b)
        engine.start()  # both are admitted together
        gate.release(2)
        await wait_pieces(a, 3)
        a.cancel()
        gate.release()
        _, reply_a = await collect(a)
        text_b, reply_b = await collect(b)
        engine.close()
        return reply_a, text_b, reply_b

    reply_a, text_b, reply_b = asyncio.run(main())
    assert reply_a.finish_reason == "interrupted"
    assert 3 <= len(reply_a.token_ids) <= 4  # the step under way when it was cancelled
    assert_alone(bot, ["出去玩吗"], opts, text_b, reply_b)
    assert len(gate.rows) == 19 and gate.rows.count(2) <= 3  # b went on alone


def test_the_hf_backend_cannot_serve(tiny_model_dir):
    from chitchat.utils import ChitchatError

    hf = Chatbot.from_pretrained(tiny_model_dir, device="cpu", backend="hf")
    with pytest.raises(ChitchatError, match="--backend fast"):
        Engine(hf, start=False)


def test_queue_limit_and_drain(bot):
    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(bot, max_queue=2, start=False)
        jobs = [make_job(bot, ["hi"], loop) for _ in range(2)]
        for j in jobs:
            engine.submit(j)
        with pytest.raises(EngineError) as full:
            engine.submit(make_job(bot, ["hi"], loop))
        engine.drain(5)  # before the engine starts: both are still queued
        with pytest.raises(EngineError) as closed:
            engine.submit(make_job(bot, ["hi"], loop))
        engine.start()
        errors = [await jobs[0].events.get(), await jobs[1].events.get()]
        engine.close()
        return full.value, closed.value, errors

    full, closed, errors = asyncio.run(main())
    assert full.code == "overloaded" and closed.code == "shutting_down"
    assert [(k, e.code) for k, e in errors] == [("error", "shutting_down")] * 2


def test_drain_lets_running_rows_finish_then_cuts_them(gate, caplog):
    bot = gate.bot
    opts = {"seed": 4, "max_len": 20, "min_len": 20}

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(bot, max_batch=4)
        a = make_job(bot, ["你好"], loop, **opts)
        engine.submit(a)
        gate.release(2)
        await wait_pieces(a, 3)
        engine.drain(0)  # the deadline has passed at the next step
        gate.release()
        while True:
            kind, value = await asyncio.wait_for(a.events.get(), 60)
            if kind != "piece":
                break
        engine.close()
        return kind, value

    with caplog.at_level("WARNING", logger="chitchat"):
        kind, value = asyncio.run(main())
    assert kind == "error" and value.code == "shutting_down"
    cut = [r for r in caplog.records if "cut after" in r.getMessage()]
    assert len(cut) == 1 and "job-1" in cut[0].getMessage()


@pytest.fixture(scope="module")
def mmi_bot(tiny_model_dir, reverse_dir):
    return Chatbot.from_pretrained(tiny_model_dir, mmi_model_path=reverse_dir, num_candidates=4,
                                   mmi_weight=0.5, max_len=10)


def test_mmi_request_decodes_its_candidates_beside_other_rows(mmi_bot):
    reqs = [(["你好"], {"seed": 5}), (["吃了吗"], {"seed": 6}), (["你好"], {"seed": 5})]
    out, steps = run_jobs(mmi_bot, reqs, max_batch=8)
    assert max(steps) == 8  # two requests' 4 candidates in one step; the third waited
    (t0, r0), (t1, r1), (t2, r2) = out
    assert len(r0.candidates) == 4 and sum(c.chosen for c in r0.candidates) == 1
    chosen = next(c for c in r0.candidates if c.chosen)
    assert t0 == r0.text == chosen.text
    assert (t2, r2.token_ids) == (t0, r0.token_ids)  # the seed reproduces the reply


def test_step_and_prefill_equals_a_step_then_a_prefill(bot):
    """The one-pass join computes what the two passes compute: the running rows' logits,
    the new rows' logits, and the same cache (keys, values, lengths)."""
    import copy

    backend = bot.backend
    running = [[2, 40, 41, 3], [2, 50, 51, 52, 53, 3]]
    joining = [[2, 60, 61, 3], [2, 70, 3, 71, 72, 73, 3]]
    tokens = torch.tensor([80, 81])
    with torch.inference_mode():
        cache = backend.row_cache(6, 32)
        backend.prefill(cache, 0, running)
        twin = copy.deepcopy(cache)
        step = backend.step_rows(cache, tokens)
        pre = backend.prefill(cache, 2, joining)
        step2, pre2 = backend.step_and_prefill(twin, tokens, False, joining)
    torch.testing.assert_close(step2, step, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pre2, pre, atol=1e-4, rtol=1e-4)
    assert twin.lens[:4].tolist() == cache.lens[:4].tolist() == [5, 7, 4, 7]
    for r, n in enumerate(cache.lens[:4].tolist()):
        torch.testing.assert_close(twin.k[:, r, :, :n], cache.k[:, r, :, :n], atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(twin.v[:, r, :, :n], cache.v[:, r, :, :n], atol=1e-4,
                                   rtol=1e-4)


def test_a_context_fed_in_chunks_equals_the_whole_context(bot):
    """Prefill in chunks (`starts`: each chunk continues its row, rows at different points,
    padded to the longest chunk, beside running rows) leaves the cache a whole-context
    prefill leaves, and the last chunk's logits are the whole context's."""
    import copy

    backend = bot.backend
    running = [[2, 40, 41, 3]]
    a = [2, 60, 61, 62, 63, 64, 65, 3]
    b = [2, 70, 3, 71, 72, 3]
    with torch.inference_mode():
        whole = backend.row_cache(4, 16)
        backend.prefill(whole, 0, running)
        twin = copy.deepcopy(whole)
        want = backend.prefill(whole, 1, [a, b])
        # a: 3 + 2 + 3 tokens, b: 1 + 2 + 3; the running row steps beside the middle chunk.
        backend.prefill(twin, 1, [a[:3], b[:1]])
        tokens = torch.tensor([80])
        backend.step_and_prefill(twin, tokens, False, [a[3:5], b[1:3]], starts=[3, 1])
        got = backend.prefill(twin, 1, [a[5:], b[3:]], starts=[5, 3])
        backend.step_rows(whole, tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert twin.lens[:3].tolist() == whole.lens[:3].tolist() == [5, 8, 6]
    for r, n in enumerate(whole.lens[:3].tolist()):
        torch.testing.assert_close(twin.k[:, r, :, :n], whole.k[:, r, :, :n], atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(twin.v[:, r, :, :n], whole.v[:, r, :, :n], atol=1e-4,
                                   rtol=1e-4)
    with pytest.raises(ValueError, match="at least one token"):
        backend.prefill(twin, 1, [[]], starts=[3])


def test_plan_prefill_keeps_a_step_within_its_token_budget():
    from chitchat.serving.engine import plan_prefill

    assert plan_prefill(0, 10, [30, 5]) == [30, 5]  # nobody is waiting on this step
    assert plan_prefill(3, 0, [30, 5]) == [30, 5]  # no budget: contexts go in whole
    assert plan_prefill(3, 10, [4, 5, 2]) == [4, 3]  # first come first served
    assert plan_prefill(3, 10, [30, 5]) == [7]
    assert plan_prefill(2, 10, [8, 5]) == [8]
    assert plan_prefill(12, 10, [30]) == [1]  # a full batch still feeds a token a step
    assert plan_prefill(3, 10, []) == []


class Recorder:
    """Records what each joining step computes (running rows, chunk lengths, starts) and
    every row copy, with whether a context was being fed then."""

    def __init__(self, bot):
        self.backend = bot.backend
        self.inner_join = self.backend.step_and_prefill
        self.inner_copy = self.backend.copy_row
        self.engine = None
        self.joins: list[tuple[int, list[int], list[int] | None]] = []
        self.copies: list[tuple[int, int, bool]] = []
        self.backend.step_and_prefill = self.step_and_prefill
        self.backend.copy_row = self.copy_row

    def step_and_prefill(self, cache, tokens, types, contexts, **kw):
        self.joins.append((tokens.shape[0], [len(c) for c in contexts], kw.get("starts")))
        return self.inner_join(cache, tokens, types, contexts, **kw)

    def copy_row(self, cache, src, dst, src_cache=None):
        pending = self.engine._pending
        self.copies.append((src, dst, bool(pending and pending[0].fed)))
        return self.inner_copy(cache, src, dst, src_cache)

    def remove(self) -> None:
        del self.backend.step_and_prefill
        del self.backend.copy_row


@pytest.mark.parametrize("speakers", [False, True], ids=["plain", "speaker-ids"])
def test_contexts_joining_running_rows_are_fed_in_chunks_and_decode_as_alone(tiny_model_dir,
                                                                              speakers):
    """With a budget of 4 tokens a step, contexts that join 2 or 3 running rows go in one or
    two tokens a step, rows finish (and move) while one is half in, and every reply is
    still the one its request gets alone; with a speaker-id model, each chunk with its
    tokens' speaker ids."""
    from chitchat.modeling import load_model, set_speaker_token_ids

    model, tok = load_model(tiny_model_dir)
    if speakers:
        set_speaker_token_ids(model.config, tok.speaker_ids())
    bot = Chatbot(model, tok, max_len=12)
    assert (bot.context(HISTORIES[1]).token_types is not None) == speakers
    rec = Recorder(bot)
    try:
        reqs = [(HISTORIES[k % 5], {**OPTIONS[k % 5], "max_len": 3 + 3 * k}) for k in range(9)]
        engine = Engine(bot, max_batch=3, step_tokens=4, start=False)
        rec.engine = engine
        out, _ = run_jobs(bot, reqs, max_batch=3, engine=engine)
    finally:
        rec.remove()
    for (h, o), (text, reply) in zip(reqs, out):
        assert_alone(bot, h, o, text, reply)
    assert all(rows + sum(chunks) <= 4 for rows, chunks, _ in rec.joins), rec.joins
    assert any(starts and any(starts) for _, _, starts in rec.joins)  # a context continued
    assert any(partial for _, _, partial in rec.copies)  # a half-fed row followed a move


def test_a_request_cancelled_while_its_context_is_fed_frees_its_row(gate):
    bot = gate.bot
    run = {"seed": 4, "max_len": 20, "min_len": 20}
    long = ["我想去北京看看", "好啊", "一起去吧", "什么时候"]

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(bot, max_batch=2, step_tokens=2)
        a = make_job(bot, ["你好"], loop, **run)
        engine.submit(a)
        gate.release(2)
        await wait_pieces(a, 3)
        b = make_job(bot, long, loop, **run)
        engine.submit(b)
        await until(lambda: engine._pending and engine._pending[0].fed, "b is half in",
                    step=lambda: gate.release(1))
        b.cancel()
        joins = len(gate.joins)
        c = make_job(bot, ["出去玩吗"], loop, **run)
        engine.submit(c)  # it needs b's row: the batch has 2
        gate.release()
        text_a, reply_a = await collect(a)
        text_c, reply_c = await collect(c)
        engine.close()
        return b, joins, text_a, reply_a, text_c, reply_c

    b, joins, text_a, reply_a, text_c, reply_c = asyncio.run(main())
    assert b.events.empty() and b.tokens_sent == 0
    assert_alone(bot, ["出去玩吗"], run, text_c, reply_c)
    assert len(reply_a.token_ids) == 20
    # c was fed beside a, then decoded beside it: b's row was free again at once.
    assert len(gate.joins) > joins and 2 in gate.rows


def test_mmi_candidates_of_a_context_fed_in_chunks_are_those_of_a_whole_one(mmi_bot):
    """An MMI request whose context goes in over several steps beside running rows gets
    the candidates (and the reply) it gets with the context in whole."""
    # a and b start together; c joins a's 4 running rows when b's short replies end.
    reqs = [(["你好"], {"seed": 5, "min_len": 10}), (["吃了吗"], {"seed": 6, "max_len": 4}),
            (["今天天气不错", "是啊", "出去玩吗"], {"seed": 7})]
    rec = Recorder(mmi_bot)
    try:
        engine = Engine(mmi_bot, max_batch=8, step_tokens=6, start=False)
        rec.engine = engine
        chunked, _ = run_jobs(mmi_bot, reqs, max_batch=8, engine=engine)
    finally:
        rec.remove()
    whole, _ = run_jobs(mmi_bot, reqs, max_batch=8)
    assert any(starts and any(starts) for _, _, starts in rec.joins), rec.joins
    assert all(rows + sum(chunks) <= 6 for rows, chunks, _ in rec.joins), rec.joins
    for (t1, r1), (t2, r2) in zip(chunked, whole):
        assert (t1, r1.token_ids) == (t2, r2.token_ids)
        assert [c.token_ids for c in r1.candidates] == [c.token_ids for c in r2.candidates]


def test_an_mmi_request_fed_to_its_end_leaves_the_next_context_for_the_next_step(
        tiny_model_dir, reverse_dir):
    """Two MMI requests join 4 running rows at once with a budget that would finish the
    first context and start the second: the step stops after the first (its 3 other
    candidates are copied into the rows after it, where the second would have waited), the
    second goes in at the next step, and every reply is the one it gets with whole
    contexts."""
    bot = Chatbot.from_pretrained(tiny_model_dir, mmi_model_path=reverse_dir,
                                  num_candidates=4, mmi_weight=0.5, max_len=10)
    reqs = [(["你好"], {"seed": 5, "min_len": 10}),
            (["今天天气不错", "是啊"], {"seed": 6}), (["吃了吗"], {"seed": 7})]
    b_len = len(bot.prepare(reqs[1][0], **reqs[1][1]).context.ids)
    gate = Gate(bot)

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(bot, max_batch=12, step_tokens=4 + b_len + 1)
        jobs = [make_job(bot, h, loop, **o) for h, o in reqs]
        engine.submit(jobs[0])
        gate.release(1)
        await until(lambda: gate.rows and engine.active == 4, "a's 4 candidates running")
        engine.submit(jobs[1])
        engine.submit(jobs[2])
        gate.release()
        out = [await collect(j) for j in jobs]
        engine.close()
        return out

    try:
        out = asyncio.run(main())
    finally:
        gate.release()
        gate.remove()
    whole, _ = run_jobs(bot, reqs, max_batch=12)
    k = gate.chunks.index([b_len])  # the first join after b and c came: b alone
    assert gate.rows[gate.joins[k]] == 4 and gate.chunks[k + 1][0] >= 1
    for (t1, r1), (t2, r2) in zip(out, whole):
        assert (t1, r1.token_ids) == (t2, r2.token_ids)
        assert [c.token_ids for c in r1.candidates] == [c.token_ids for c in r2.candidates]


# -- the prefill thread (Engine(prefill_thread=True), serve.py --prefill_thread) --

class ThreadPrefill:
    """Wraps the backend's prefill: counts the calls made on the prefill thread, and can
    hold them (until `go` is set) or make them fail."""

    def __init__(self, bot, hold: bool = False, fail: bool = False):
        self.backend = bot.backend
        self.inner = self.backend.prefill
        self.calls = 0
        self.entered = threading.Event()
        self.go = threading.Event()
        if not hold:
            self.go.set()
        self.fail = fail
        self.backend.prefill = self.prefill

    def prefill(self, cache, first, contexts, **kw):
        if threading.current_thread().name == "chitchat-prefill":
            self.calls += 1
            self.entered.set()
            assert self.go.wait(60), "the test never let the prefill go"
            if self.fail:
                raise RuntimeError("prefill broke")
        return self.inner(cache, first, contexts, **kw)

    def remove(self) -> None:
        del self.backend.prefill


def test_use_prefill_thread_needs_a_cpu_core_beside_torchs_threads():
    from chitchat.serving.engine import use_prefill_thread

    assert use_prefill_thread("auto", "cpu", 1, 2)
    assert not use_prefill_thread("auto", "cpu", 2, 2)  # torch already takes every core
    assert not use_prefill_thread("auto", "cpu", 1, None)  # unknown: one core
    assert not use_prefill_thread("auto", "cuda", 1, 8)  # one device: the one-pass join
    assert use_prefill_thread("on", "cuda", 4, 1)
    assert not use_prefill_thread("off", "cpu", 1, 8)


@pytest.mark.parametrize("speakers,late", [(False, False), (True, False), (False, True)],
                         ids=["plain", "speaker-ids", "late-prefill-thread"])
def test_rows_prefilled_on_the_prefill_thread_decode_as_alone(tiny_model_dir, speakers, late):
    """Requests that come while rows run are prefilled on the second thread (with their
    speaker ids on a speaker-id model), copied into the batch, and decode what they decode
    alone; none goes through a joining step. `late`: the prefill thread is slow to start
    (a busy machine); the engine must not run its first steps without it, or rows that
    free then would be refilled by joining steps."""
    from chitchat.modeling import load_model, set_speaker_token_ids

    model, tok = load_model(tiny_model_dir)
    if speakers:
        set_speaker_token_ids(model.config, tok.speaker_ids())
    bot = Chatbot(model, tok, max_len=12)
    spy = ThreadPrefill(bot)
    rec = Recorder(bot)
    try:
        reqs = [(HISTORIES[k % 5], {**OPTIONS[k % 5], "max_len": 3 + 3 * k}) for k in range(9)]
        engine = Engine(bot, max_batch=3, prefill_thread=True, start=False)
        rec.engine = engine
        if late:
            worker_start = engine._worker.start

            def slow_start():
                time.sleep(0.5)  # time for the first rows to end, were the engine running
                worker_start()

            engine._worker.start = slow_start
        out, steps = run_jobs(bot, reqs, max_batch=3, engine=engine)
    finally:
        rec.remove()
        spy.remove()
    for (h, o), (text, reply) in zip(reqs, out):
        assert_alone(bot, h, o, text, reply)
    assert spy.calls >= 4  # the first 3 came to an idle engine; most later ones joined
    assert rec.joins == []
    assert max(steps) == 3 and engine.active == 0


def test_a_newcomer_is_prefilled_during_the_running_step_and_joins_without_a_join_step(
        gate):
    """While the engine is held inside a step of the running row, a new request is taken
    from the queue by the prefill thread and its context goes in there; its first token is
    sent when its row joins, right before its first step (so its first gap is one step),
    and no step computes its context."""
    bot = gate.bot
    long = {"seed": 1, "max_len": 20, "min_len": 20}
    short = {"seed": 2, "max_len": 6, "min_len": 6}
    b_hist = ["吃了吗", "吃了", "吃的什么"]

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(bot, max_batch=4, prefill_thread=True)
        a = make_job(bot, ["你好"], loop, **long)
        engine.submit(a)
        gate.release(2)
        first = await wait_pieces(a, 3)
        await until(lambda: gate.entered == 3, "the engine waits in a's third step")
        b = make_job(bot, b_hist, loop, **short)
        engine.submit(b)
        await until(lambda: engine._ready, "b is prefilled")
        seen = (len(gate.rows), b.events.qsize())  # during a's third step: nothing sent
        gate.release(1)
        b_first = await wait_pieces(b, 1)
        seen += (len(gate.rows),)  # sent before the fourth step (b's first) was let go
        gate.release()
        text_a, reply_a = await collect(a)
        text_b, reply_b = await collect(b)
        engine.close()
        return ("".join(first) + text_a, reply_a, "".join(b_first) + text_b, reply_b, seen)

    text_a, reply_a, text_b, reply_b, seen = asyncio.run(main())
    assert seen == (2, 0, 3)
    assert_alone(bot, ["你好"], long, text_a, reply_a)
    assert_alone(bot, b_hist, short, text_b, reply_b)
    assert gate.joins == [] and len(gate.rows) == 19
    assert gate.rows[:3] == [1] * 3 and gate.rows[3:8] == [2] * 5  # b's 5 steps, then a's


def _with_running_row(gate, tweak, max_batch=2, **engine_kw):
    """a runs (its steps released one by one as the test's `tweak` needs), b comes and is
    held in the prefill thread; tweak(engine, a, b, spy, loop) acts and returns jobs to
    collect."""
    bot = gate.bot
    spy = ThreadPrefill(bot, hold=True)

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(bot, max_batch=max_batch, prefill_thread=True, **engine_kw)
        a = make_job(bot, ["你好"], loop, seed=4, max_len=20, min_len=20)
        engine.submit(a)
        gate.release(2)
        await wait_pieces(a, 3)
        b = make_job(bot, ["出去玩吗"], loop, seed=5, max_len=20, min_len=20)
        engine.submit(b)
        await until(spy.entered.is_set, "b is in the prefill thread",
                    step=lambda: gate.release(1))
        out = await tweak(engine, a, b, spy, loop)
        engine.close()
        return out

    try:
        return asyncio.run(main())
    finally:
        spy.remove()


def test_a_request_cancelled_in_the_prefill_thread_frees_its_row(gate):
    run = {"seed": 6, "max_len": 20, "min_len": 20}

    async def tweak(engine, a, b, spy, loop):
        b.cancel()
        spy.go.set()
        c = make_job(gate.bot, ["吃了吗"], loop, **run)
        engine.submit(c)  # it needs b's row: the batch has 2
        gate.release()
        return b, await collect(a), await collect(c)

    b, (text_a, reply_a), (text_c, reply_c) = _with_running_row(gate, tweak)
    assert b.events.empty() and b.tokens_sent == 0
    assert len(reply_a.token_ids) == 20
    assert_alone(gate.bot, ["吃了吗"], run, text_c, reply_c)


def test_a_failed_prefill_ends_its_request_alone(gate, caplog):
    run = {"seed": 6, "max_len": 8}

    async def tweak(engine, a, b, spy, loop):
        spy.fail = True
        spy.go.set()
        with pytest.raises(RuntimeError, match="prefill broke"):
            await collect(b)
        spy.fail = False
        c = make_job(gate.bot, ["吃了吗"], loop, **run)
        engine.submit(c)
        gate.release()
        return await collect(a), await collect(c)

    with caplog.at_level("ERROR", logger="chitchat"):
        (text_a, reply_a), (text_c, reply_c) = _with_running_row(gate, tweak)
    assert len(reply_a.token_ids) == 20  # a went on
    assert_alone(gate.bot, ["吃了吗"], run, text_c, reply_c)
    assert any("prefill failed" in r.getMessage() for r in caplog.records)


def test_drain_cuts_a_request_still_in_the_prefill_thread(gate, caplog):
    async def tweak(engine, a, b, spy, loop):
        engine.drain(0)
        spy.go.set()
        gate.release()
        out = []
        for job in (a, b):
            while True:
                kind, value = await asyncio.wait_for(job.events.get(), 60)
                if kind != "piece":
                    out.append((kind, getattr(value, "code", None), job.tokens_sent))
                    break
        return out

    with caplog.at_level("WARNING", logger="chitchat"):
        out = _with_running_row(gate, tweak)
    assert out[0][:2] == out[1][:2] == ("error", "shutting_down")
    assert out[1][2] == 0  # b was cut before its first token
    assert sum("cut after" in r.getMessage() for r in caplog.records) == 2


def test_mmi_requests_are_prefilled_by_the_engine(mmi_bot):
    """MMI candidates share one context pass in the batch: with the prefill thread on,
    such requests still join as before, with the same replies."""
    reqs = [(["你好"], {"seed": 5, "min_len": 10}), (["吃了吗"], {"seed": 6, "max_len": 4}),
            (["今天天气不错", "是啊", "出去玩吗"], {"seed": 7})]
    spy = ThreadPrefill(mmi_bot)
    try:
        threaded, _ = run_jobs(mmi_bot, reqs, max_batch=8,
                               engine=Engine(mmi_bot, max_batch=8, prefill_thread=True,
                                             start=False))
    finally:
        spy.remove()
    whole, _ = run_jobs(mmi_bot, reqs, max_batch=8)
    assert spy.calls == 0
    for (t1, r1), (t2, r2) in zip(threaded, whole):
        assert (t1, r1.token_ids) == (t2, r2.token_ids)


def test_a_failure_while_rows_join_from_the_prefill_thread_is_reported_and_survived(gate):
    """Copying a prefilled row in fails: every job of the batch and the joining one get
    the error (none is left waiting), the rows are free again, and the next request is
    served."""
    bot = gate.bot
    inner = bot.backend.copy_row

    def copy_row(cache, src, dst, src_cache=None):
        if src_cache is not None:
            raise RuntimeError("copy broke")
        return inner(cache, src, dst, src_cache)

    async def tweak(engine, a, b, spy, loop):
        bot.backend.copy_row = copy_row
        spy.go.set()
        gate.release()
        errors = []
        for job in (a, b):
            with pytest.raises(RuntimeError, match="copy broke"):
                await collect(job)
            errors.append(job.ended)
        del bot.backend.copy_row
        c = make_job(bot, ["吃了吗"], loop, seed=6, max_len=8)
        engine.submit(c)
        out = await collect(c)
        await until(lambda: engine.active == 0, "c's row left")
        return errors, out, engine._free_rows()

    errors, (text_c, reply_c), free = _with_running_row(gate, tweak)
    assert errors == [True, True]
    assert free == 2  # every row (and none counted twice)
    assert_alone(bot, ["吃了吗"], {"seed": 6, "max_len": 8}, text_c, reply_c)
