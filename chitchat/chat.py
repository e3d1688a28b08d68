"""The Chatbot: a model, its tokenizer, decoding options and a conversation history.

    from chitchat import Chatbot
    bot = Chatbot.from_pretrained("model/<run>/best", topk=8, temperature=0.8, seed=1)
    print(bot.reply("你好"))                  # keeps the history
    for piece in bot.stream("你在干嘛"):      # the same, streamed piece by piece
        print(piece, end="", flush=True)
    bot.reset()
    r = bot.generate(["你好", "你好呀", "吃了吗"], temperature=0.7)   # stateless
    r.text, r.token_ids, r.prompt_tokens, r.finish_reason

MMI reranking (chitchat/mmi.py) with a reverse model from ``train.py --reverse``::

    bot = Chatbot.from_pretrained("model/fwd", mmi_model_path="model/rev", num_candidates=8,
                                  mmi_weight=0.5, seed=1)
    r = bot.generate(["你好", "你好呀", "吃了吗"])
    r.text, r.candidates      # every candidate with its forward/reverse/combined score

Every front end (the REPL, tests, an HTTP server) goes through this class. `generate` and
`start` are stateless: the history is an argument, so a server can pass a request's messages.

The context budget: the model sees ``[CLS]`` plus the last `max_history_len` utterances,
each closed by ``[SEP]``, trimmed oldest-first so that the context plus `max_len` reply tokens
fit `n_positions`. A newest utterance too long even alone is cut from the front (its end is
what the reply answers), and `Reply.notice` says so.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .config import DecodingOptions, _base_type
from .dialogue import (Context, build_context, printable, reverse_input, reverse_speaker_types,
                       split_context)
from .generation import Constraints, Row, decode, decode_one
from .backends import DTYPES, conv1d_to_linear, make_backend, quantize_int8
from .tokenization import ChatTokenizer, Detokenizer
from .utils import ChitchatError

log = logging.getLogger("chitchat")

# Other spellings accepted by `set` and the decoding keyword arguments (OpenAI/transformers
# names, so an HTTP front end can pass them through).
OPTION_ALIASES = {"top_k": "topk", "top_p": "topp", "max_new_tokens": "max_len",
                  "max_tokens": "max_len", "min_new_tokens": "min_len"}
_UNUSED = re.compile(r"^\[unused\d+\]$")


@dataclass
class Reply:
    """One generated reply and what it took."""
    text: str
    token_ids: list[int]
    prompt_tokens: int              # tokens of context the model saw
    finish_reason: str              # "stop" ([SEP]), "length" (max_len), "interrupted"
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
    """A reply to decode row by row outside `Chatbot` (chitchat.engine batches the rows of
    many requests into one model step): see `Chatbot.prepare`."""
    history: list[str]
    context: Context
    options: DecodingOptions       # the reply's options (MMI: the candidates')
    rows: list[Row]                # one; MMI: num_candidates candidates; beam search: none
    overrides: dict

    @property
    def mmi(self) -> bool:
        return len(self.rows) > 1


def read_bad_words(path: str | os.PathLike) -> list[str]:
    """Words or phrases, one per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ChitchatError(f"--bad_words file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ChitchatError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return [ln.strip() for ln in lines if ln.strip()]


# Session settings of a Chatbot with MMI, changeable like decoding options (Chatbot.set).
MMI_SETTINGS = {"num_candidates": int, "mmi_weight": float}


def coerce_option(name: str, value: str):
    """Parse the text of a /set value into the type of option `name` (a DecodingOptions
    field or an MMI setting)."""
    name = OPTION_ALIASES.get(name, name)
    fields = {f.name: f for f in dataclasses.fields(DecodingOptions)}
    if name not in fields and name not in MMI_SETTINGS:
        raise ChitchatError(f"unknown option {name!r}; options: "
                            f"{', '.join([*fields, *MMI_SETTINGS])}")
    hint = MMI_SETTINGS.get(name) or typing.get_type_hints(DecodingOptions)[name]
    tp = _base_type(hint)
    v = value.strip()
    if v.lower() in ("none", "null", "") and tp is not hint:
        return name, None
    try:
        if tp is bool:
            low = v.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(v)
            return name, low in ("1", "true", "yes", "on")
        return name, tp(v)
    except ValueError:
        raise ChitchatError(f"{name} needs a {tp.__name__}, got {value!r}") from None


class Chatbot:
    """A chat session over a loaded model. Not thread-safe for the history-keeping methods;
    `generate`/`start` only read shared state, and each call has its own KV cache."""

    def __init__(self, model, tokenizer: ChatTokenizer, *, backend: str = "fast",
                 bad_words: Sequence[str] = (), mmi_model=None, num_candidates: int = 8,
                 mmi_weight: float = 0.5, **options):
        from .modeling import check_vocab, is_reverse, speaker_token_ids

        where = getattr(model.config, "_name_or_path", "") or "(in memory)"
        check_vocab(model, tokenizer, where)
        if is_reverse(model.config):
            raise ChitchatError(f"the model {where} is a reverse model (trained with --reverse: "
                                "it predicts earlier utterances from later ones) and cannot "
                                "chat; pass it as --mmi_model_path and a forward model as "
                                "--model_path")
        self.mmi = None
        if mmi_model is not None:
            self.mmi = MMI(mmi_model, tokenizer, num_candidates, mmi_weight, backend)
        self.model = model
        self.tokenizer = tokenizer
        self.n_positions = int(model.config.n_positions)
        self.speaker_ids = speaker_token_ids(model.config)
        self.backend = make_backend(model, backend, pad_id=tokenizer.pad_id)
        if self.mmi is not None:  # every reply decodes num_candidates rows
            self.backend.prepare(num_candidates)
        self.options = DecodingOptions()
        self.history: list[str] = []
        self.last_reply: Reply | None = None
        self._rng: torch.Generator | None = None
        self.bad_words = list(bad_words)
        self.constraints = self._constraints(self.bad_words)
        self.set(**options)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vocab_path: str | os.PathLike | None = None,
                        *, device: str | None = None, no_cuda: bool = False,
                        dtype: str = "float32", quantize: str | None = None,
                        backend: str = "fast", bad_words: Sequence[str] = (),
                        mmi_model_path: str | os.PathLike | None = None,
                        num_candidates: int = 8, mmi_weight: float = 0.5,
                        **options) -> "Chatbot":
        """Load a model folder (train.py run, HF GPT-2 folder, GPT2-chitchat folder + vocab).

        dtype: float32 | bfloat16 | float16. quantize: None | "int8" (CPU, float32).
        mmi_model_path: a reverse model (train.py --reverse) on the same vocab; every reply is
        then the best of `num_candidates` samples, reranked with weight `mmi_weight` (see
        chitchat.mmi). `options` are DecodingOptions fields (temperature=, topk=, seed=, ...).
        """
        from .modeling import load_model, resolve_device

        dev = resolve_device(device, no_cuda)
        if dtype not in DTYPES:
            raise ChitchatError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if quantize not in (None, "int8"):
            raise ChitchatError(f"quantize must be None or 'int8', got {quantize!r}")
        if quantize and (dev.type != "cpu" or dtype != "float32"):
            raise ChitchatError("--quantize int8 needs --device cpu and --dtype float32")
        model, tok = load_model(path, vocab_path=vocab_path, device=dev, dtype=DTYPES[dtype])
        if quantize == "int8":
            model = quantize_int8(model)
        elif backend == "fast":
            # The lean path wants (out, in) weights; converting the model we own (instead of
            # FastGPT2 keeping transposed copies) saves a second copy of every matrix. The
            # model computes the same; only its state_dict layout differs, so save from the
            # folder, not from bot.model.
            conv1d_to_linear(model)
        mmi_model = None
        if mmi_model_path is not None:
            mmi_model = load_mmi_model(mmi_model_path, tok, vocab_path, dev, dtype)
        return cls(model, tok, backend=backend, bad_words=bad_words, mmi_model=mmi_model,
                   num_candidates=num_candidates, mmi_weight=mmi_weight, **options)

    # ---- options ----------------------------------------------------------------------------
    def set(self, **changes) -> DecodingOptions:
        """Change decoding options, and with MMI `num_candidates` / `mmi_weight` (validated;
        on error nothing changes). Returns the decoding options."""
        mmi = {k: changes.pop(k) for k in list(changes) if k in MMI_SETTINGS}
        if mmi and self.mmi is None:
            raise ChitchatError(f"{', '.join(mmi)} needs MMI: load a reverse model with "
                                "--mmi_model_path")
        new = self._options(changes)
        if mmi:
            n = mmi.get("num_candidates", self.mmi.num_candidates)
            w = mmi.get("mmi_weight", self.mmi.weight)
            MMI.check(n, w)
            self.mmi.num_candidates, self.mmi.weight = n, w
            self.backend.prepare(n)
            self.mmi.backend.prepare(n)
        if "seed" in changes:
            self._rng = self._generator(new.seed)
        self.options = new
        return new

    def resolve(self, **overrides) -> DecodingOptions:
        """The session's options with `overrides` applied and checked (nothing changes)."""
        return self._options(overrides)

    def _options(self, overrides: dict) -> DecodingOptions:
        overrides = {OPTION_ALIASES.get(k, k): v for k, v in overrides.items()}
        names = {f.name for f in dataclasses.fields(DecodingOptions)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ChitchatError(f"unknown decoding option(s) {', '.join(unknown)}; "
                                f"options: {', '.join(sorted(names))}")
        opts = dataclasses.replace(self.options, **overrides)
        if self.n_positions - opts.max_len < 3:
            raise ChitchatError(f"--max_len {opts.max_len} leaves no room for a context: the "
                                f"model has n_positions {self.n_positions}; use --max_len "
                                f"{self.n_positions - 3} or less")
        return opts

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self.backend.device)
        g.manual_seed(seed)
        return g

    def _constraints(self, bad_words: Sequence[str]) -> Constraints:
        tok = self.tokenizer
        banned = list(tok.banned_ids) + [i for i, t in enumerate(tok.tokens) if _UNUSED.match(t)]
        phrases = []
        for w in bad_words:
            ids = tok.encode(w)
            if not ids or tok.unk_id in ids:
                log.warning("--bad_words: %r has no usable tokens in this vocab (unknown "
                            "characters); it cannot be generated anyway", w)
                continue
            phrases.append(ids)
        return Constraints.build(tok.vocab_size, tok.sep_id, banned, phrases)

    # ---- stateless core ---------------------------------------------------------------------
    def context(self, history: Sequence[str], opts: DecodingOptions | None = None) -> Context:
        opts = opts or self.options
        return build_context(self.tokenizer, history, opts.max_history_len,
                             self.n_positions - opts.max_len, self.speaker_ids)

    def start(self, history: Sequence[str], **overrides) -> "ReplyStream":
        """Begin a reply to `history` (oldest first, alternating speakers, newest last).

        Returns a `ReplyStream`: iterate it for text pieces; `.reply` is complete once it is
        exhausted or closed. `overrides` change decoding options for this call only; a
        `seed` here seeds this call alone, otherwise the session's generator is used.
        """
        opts = self._options(overrides)
        rng = self._generator(opts.seed) if "seed" in overrides else self._rng
        if self.mmi is not None:
            return self._mmi_streams([history], opts, rng)[0]
        ctx = self.context(history, opts)
        if ctx.notice:
            log.warning("note: %s", ctx.notice)
        tokens = decode_one(self.backend, ctx.ids, opts, self.constraints, rng,
                            token_types=[ctx.token_types] if ctx.token_types else None,
                            reply_types=[ctx.reply_type] if ctx.reply_type is not None else None)
        return ReplyStream(tokens, self.tokenizer, ctx, opts)

    def generate(self, history: Sequence[str], **overrides) -> Reply:
        """A complete reply to `history`, without touching the session's history."""
        rs = self.start(history, **overrides)
        for _ in rs:
            pass
        return rs.reply

    def prepare(self, history: Sequence[str], *, max_context: int | None = None,
                **overrides) -> Prepared:
        """Validate a reply to `history` and set up its decoding rows, for a decoder that
        drives the model itself (the server's engine): it feeds `context.ids`, then hands
        each row's logits to `Row.choose` until the row is done, and builds the reply with
        `ReplyStream` (one row) or `rank_candidates` (MMI).

        Each row has its own generator: seeded from `seed` if given (a lone row then picks
        the tokens `generate` picks with that seed), else the session's. `max_context`:
        the positions a row may use (default n_positions); the history is trimmed to fit
        it with the reply. num_beams > 1 gives no rows: decode it with `start`.
        """
        opts = self._options(overrides)
        limit = min(self.n_positions, max_context or self.n_positions)
        if limit - opts.max_len < 3:
            raise ChitchatError(f"max_tokens {opts.max_len} leaves no room for a context in "
                                f"the {limit} positions a reply may use")
        seeded = "seed" in overrides
        if self.mmi is not None:
            opts = dataclasses.replace(opts, num_beams=1, min_len=max(1, opts.min_len))
        ctx = build_context(self.tokenizer, history, opts.max_history_len, limit - opts.max_len,
                            self.speaker_ids)
        if ctx.notice:
            log.warning("note: %s", ctx.notice)
        if self.mmi is not None:
            n = self.mmi.num_candidates
            if seeded:  # independent candidates, reproducible from the one seed
                seeds = torch.randint(2 ** 62, (n,), generator=self._generator(opts.seed))
                gens = [self._generator(int(s)) for s in seeds]
            else:
                gens = [self._rng] * n
            rows = [Row(opts, self.constraints, g, scores=True) for g in gens]
        elif opts.num_beams > 1:
            rows = []
        else:
            rows = [Row(opts, self.constraints,
                        self._generator(opts.seed) if seeded else self._rng)]
        return Prepared(list(history), ctx, opts, rows, dict(overrides))

    def rank_candidates(self, prep: Prepared, candidates: Sequence[Reply]) -> Reply:
        """MMI: the best of a prepared request's finished candidates (one Reply per row,
        with token_logprobs), with every candidate and the fallback recorded on it."""
        best, ranking = self._rank([prep.history], [prep.context], list(candidates))[0]
        return dataclasses.replace(best, candidates=ranking.candidates,
                                   mmi_fallback=ranking.fallback)

    def start_batch(self, histories: Sequence[Sequence[str]], *, copies: int = 1,
                    scores: bool = False, _raw: bool = False,
                    **overrides) -> list["ReplyStream"]:
        """Replies to several histories decoded together: one padded batch, one model call
        per token for all rows, each row stopping at its own [SEP].

        Returns one `ReplyStream` per row (``copies`` rows for a single history: independent
        samples sharing one context pass, as MMI reranking wants). The streams may be read
        in any order; reading one advances the batch and buffers the others' tokens. With
        `scores`, each `Reply.token_logprobs` holds the model's log-probabilities of its
        tokens. Beam search is not batched: num_beams must be 1. A seed makes the whole
        batch reproducible, not each row on its own. With MMI, every row's reply is the
        reranked best of `num_candidates` samples (all histories' candidates decode as one
        batch) and its stream yields it at once.
        """
        opts = self._options(overrides)
        if opts.num_beams > 1:
            raise ChitchatError("start_batch samples or decodes greedily; num_beams must be 1")
        if copies > 1 and len(histories) != 1:
            raise ChitchatError("copies > 1 takes exactly one history")
        rng = self._generator(opts.seed) if "seed" in overrides else self._rng
        if self.mmi is not None and not _raw:
            if copies > 1:
                raise ChitchatError("copies > 1 returns raw samples; with MMI each reply is "
                                    "already the best of num_candidates samples")
            return self._mmi_streams(histories, opts, rng)
        ctxs = [self.context(h, opts) for h in histories]
        for c in ctxs:
            if c.notice:
                log.warning("note: %s", c.notice)
        return self._start_rows(ctxs, opts, rng, copies, scores)

    def _start_rows(self, ctxs: list[Context], opts: DecodingOptions, rng, copies: int,
                    scores: bool) -> list["ReplyStream"]:
        speakers = ctxs[0].token_types is not None
        steps = decode(self.backend, [c.ids for c in ctxs], opts, self.constraints, rng,
                       copies=copies, scores=scores,
                       token_types=[c.token_types for c in ctxs] if speakers else None,
                       reply_types=[c.reply_type for c in ctxs] if speakers else None)
        driver = _BatchDriver(steps, len(ctxs) * copies, self.tokenizer.sep_id)
        return [ReplyStream(_RowTokens(driver, b), self.tokenizer, ctxs[b // copies], opts)
                for b in range(len(ctxs) * copies)]

    def generate_batch(self, histories: Sequence[Sequence[str]], **kw) -> list[Reply]:
        """Complete replies for `start_batch` (same arguments)."""
        streams = self.start_batch(histories, **kw)
        for rs in streams:
            for _ in rs:
                pass
        return [rs.reply for rs in streams]

    # ---- MMI ------------------------------------------------------------------------------
    def _mmi_streams(self, histories: Sequence[Sequence[str]], opts: DecodingOptions,
                     rng) -> list["ReplyStream"]:
        """Reranked replies, one per history, as streams that yield each reply at once.

        Candidates: one decoding pass over len(histories) * N rows (a single history uses
        copies=N, sharing its context pass and KV cache), with forward scores. Reverse
        scores: one batched pass of the reverse model over all candidates. The reply is
        known only after reranking, so the work runs when a stream is first read (Ctrl-C
        there interrupts it like any reply) and the time to first token is the whole
        reply's time.
        """
        # Candidates are sampled: with num_beams > 1 or greedy decoding they would all be
        # the same reply. min_len >= 1, so a candidate is empty only if its text is blank.
        cand_opts = dataclasses.replace(opts, num_beams=1, min_len=max(1, opts.min_len))
        if opts.num_beams > 1:
            log.warning("note: MMI samples its candidates; num_beams is ignored")
        ctxs = [self.context(h, cand_opts) for h in histories]
        for c in ctxs:
            if c.notice:
                log.warning("note: %s", c.notice)
        batch = _MMIBatch(lambda: self._mmi_rank(histories, ctxs, cand_opts, rng))
        return [ReplyStream(_MMITokens(batch, i), self.tokenizer, ctx, opts)
                for i, ctx in enumerate(ctxs)]

    def _mmi_rank(self, histories, ctxs: list[Context], cand_opts: DecodingOptions, rng):
        """[(chosen candidate Reply, Ranking)] per history."""
        n = self.mmi.num_candidates
        if len(ctxs) == 1:
            streams = self._start_rows(ctxs, cand_opts, rng, n, scores=True)
        else:
            streams = self._start_rows([c for c in ctxs for _ in range(n)], cand_opts, rng, 1,
                                       scores=True)
        for rs in streams:
            for _ in rs:
                pass
        return self._rank(histories, ctxs, [rs.reply for rs in streams])

    def _rank(self, histories, ctxs: list[Context], cands: list[Reply]):
        """[(chosen candidate Reply, Ranking)] per history; `cands`: num_candidates
        finished candidates per history, in order, with their token_logprobs."""
        from .mmi import mean_logprob, rerank

        mmi, n = self.mmi, self.mmi.num_candidates
        forward = [mean_logprob((c.token_logprobs or []) +
                                ([c.stop_logprob] if c.stop_logprob is not None else []))
                   for c in cands]
        reverse = mmi.score([ctxs[b // n] for b in range(len(cands))],
                            [c.token_ids for c in cands])
        out = []
        for i, h in enumerate(histories):
            rows = range(i * n, (i + 1) * n)
            previous = h[-2] if len(h) >= 2 else None  # the bot's turn before the user's
            ranking = rerank([cands[b].text for b in rows], [forward[b] for b in rows],
                             [reverse[b] for b in rows], mmi.weight, previous,
                             token_ids=[cands[b].token_ids for b in rows])
            if ranking.fallback:
                log.debug("MMI fallback: %s", ranking.fallback)
            out.append((cands[i * n + ranking.choice], ranking))
        return out

    # ---- the session ------------------------------------------------------------------------
    def stream(self, text: str) -> Iterator[str]:
        """Reply to `text` piece by piece, keeping the history.

        Stopping early (closing the generator, or Ctrl-C while it runs) still records the
        exchange with the part of the reply that was produced; an exchange with no reply
        token at all is not recorded. With MMI the reply is chosen after every candidate is
        complete, so it arrives at once (the pieces follow each other without waiting).
        """
        text = self._user_text(text)
        rs = self.start([*self.history, text])
        try:
            yield from rs
        finally:
            rs.close()
            self._commit(text, rs.reply)

    def reply(self, text: str) -> str:
        """The whole reply to `text`, keeping the history."""
        for _ in self.stream(text):
            pass
        return self.last_reply.text

    def reset(self) -> None:
        self.history.clear()
        self.last_reply = None

    def check_message(self, text: str) -> str:
        """`text` as it would be sent, or a ChitchatError saying why it cannot be (empty,
        not valid text, no token in this vocab). Nothing changes either way."""
        text = self._user_text(text)
        self.context([*self.history, text])
        return text

    def _user_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ChitchatError("the message is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: undecodable input bytes
            raise ChitchatError(f"the message {printable(text)} holds bytes that are not "
                                "valid UTF-8 text; check the terminal's encoding") from None
        return " ".join(text.split())

    def _commit(self, text: str, reply: Reply) -> None:
        self.last_reply = reply
        if reply.token_ids:
            self.history.extend([text, reply.text])



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
            r.finish_reason = "length" if len(r.token_ids) >= self.options.max_len else "stop"
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


class _BatchDriver:
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


class _RowTokens:
    """The token iterator of one row of a batch."""

    def __init__(self, driver: _BatchDriver, row: int):
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


class _MMIBatch:
    """The reranking of a batch of histories, computed once, when first needed."""

    def __init__(self, compute):
        self._compute = compute
        self.result = None

    def get(self):
        if self.result is None:
            self.result = self._compute()
        return self.result


class _MMITokens:
    """The token iterator of one MMI reply: reranks on the first read, then replays the
    chosen candidate's tokens (with its scores and the whole ranking for Reply)."""

    def __init__(self, batch: _MMIBatch, row: int):
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


class MMI:
    """The reverse model and the reranking settings of a Chatbot (see chitchat.mmi)."""

    def __init__(self, model, tokenizer: ChatTokenizer, num_candidates: int = 8,
                 weight: float = 0.5, backend: str = "fast"):
        from .modeling import check_vocab, is_reverse, speaker_token_ids

        where = getattr(model.config, "_name_or_path", "") or "(in memory)"
        if not is_reverse(model.config):
            raise ChitchatError(f"the MMI model {where} is not a reverse model: its config.json "
                                "has no reverse: true. Train one on the same token store with: "
                                "python train.py --reverse --train_path <store> ...")
        check_vocab(model, tokenizer, where)
        self.check(num_candidates, weight)
        self.model = model.eval()
        # Scoring runs num_candidates rows of reply + context through the model at once.
        self.backend = make_backend(self.model, backend, pad_id=tokenizer.pad_id)
        self.backend.prepare(num_candidates)
        self.tokenizer = tokenizer
        self.num_candidates = num_candidates
        self.weight = weight
        self.n_positions = int(model.config.n_positions)
        self.speaker_ids = speaker_token_ids(model.config)

    @staticmethod
    def check(num_candidates: int, weight: float) -> None:
        if num_candidates < 1:
            raise ChitchatError(f"--num_candidates must be at least 1, got {num_candidates}")
        if not 0.0 <= weight <= 1.0:
            raise ChitchatError(f"--mmi_weight must be in [0, 1], got {weight}")

    def score(self, contexts: Sequence[Context], replies: Sequence[Sequence[int]]) -> list[float]:
        """Mean log P(context | reply) of each (context, reply) pair, in one batched pass."""
        from .mmi import reverse_scores

        tok = self.tokenizer
        inputs, types, row_of, seen = [], [], [], {}
        for ctx, reply in zip(contexts, replies):
            key = (tuple(ctx.ids), tuple(reply))
            if key in seen:  # short replies repeat often ("哈哈"): score each once
                row_of.append(seen[key])
                continue
            seen[key] = len(inputs)
            row_of.append(len(inputs))
            utts = split_context(ctx.ids, tok.cls_id, tok.sep_id)
            ids, first, kept = reverse_input(reply, utts, tok.cls_id, tok.sep_id,
                                             self.n_positions)
            inputs.append((ids, first))
            if self.speaker_ids is not None:
                types.append(reverse_speaker_types(first - 2, utts, kept, self.speaker_ids,
                                                   len(ids)))
        scores = reverse_scores(self.backend, inputs, tok.pad_id, types or None)
        return [scores[r] for r in row_of]


def load_mmi_model(path, tokenizer: ChatTokenizer, vocab_path=None, device="cpu",
                   dtype: str = "float32"):
    """The reverse model at `path`, checked against the forward model's vocab."""
    from .modeling import load_model

    model, rtok = load_model(path, vocab_path=vocab_path, device=device, dtype=DTYPES[dtype])
    if rtok.tokens != tokenizer.tokens:
        diff = next((i for i, (a, b) in enumerate(zip(rtok.tokens, tokenizer.tokens))
                     if a != b), min(len(rtok.tokens), len(tokenizer.tokens)))
        raise ChitchatError(
            f"vocab mismatch between the forward model and the MMI model {path}: "
            f"{tokenizer.vocab_size} vs {rtok.vocab_size} tokens, first difference at id "
            f"{diff}. Train the reverse model on the same token store (python train.py "
            "--reverse --train_path <the forward model's store>).")
    conv1d_to_linear(model)  # F.linear on (out, in) weights: the faster CPU product
    return model
