"""The Chatbot: a model, its tokenizer, decoding options and a conversation history.

    from chitchat import Chatbot
    bot = Chatbot.from_pretrained("model/<run>/best", topk=8, temperature=0.8, seed=1)
    bot = Chatbot.from_options(ModelOptions(model_path="model/<run>/best"),
                               DecodingOptions(topk=8, seed=1))   # as the front ends do
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

Every front end (the REPL, evaluation, the HTTP server) builds it with `from_options` and
decodes only through it. `generate` and `start` are stateless: the history is an argument,
so a server can pass a request's messages.

The context budget: the model sees ``[CLS]`` plus the last `max_history_len` utterances,
each closed by ``[SEP]``, trimmed oldest-first so that the context plus `max_new_tokens`
reply tokens fit `n_positions`. A newest utterance too long even alone is cut from the
front (its end is what the reply answers), and `Reply.notice` says so.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Iterator, Sequence

import torch

from .backends import load_for_decoding, make_backend
from .config import (DEFAULT_MMI_WEIGHT, DEFAULT_NUM_CANDIDATES, MMI_SETTINGS, OPTION_ALIASES,
                     DecodingOptions, MMIOptions, ModelOptions)
from .dialogue import Context, build_context, printable
from .generation import Row, decode, decode_one
from .mmi import MMI, load_mmi_model
from .sampling import Constraints, is_greedy
from .streams import (BatchDriver, MMIBatch, MMITokens, Prepared, Reply, ReplyStream,
                      RowTokens)
from .tokenization import ChatTokenizer
from .utils import ChitchatError, read_bad_words

log = logging.getLogger("chitchat")

_UNUSED = re.compile(r"^\[unused\d+\]$")


class Chatbot:
    """A chat session over a loaded model. Not thread-safe for the history-keeping methods;
    `generate`/`start` only read shared state, and each call has its own KV cache."""

    def __init__(self, model, tokenizer: ChatTokenizer, *, backend: str = "fast",
                 bad_words: Sequence[str] = (), mmi_model=None,
                 num_candidates: int = DEFAULT_NUM_CANDIDATES,
                 mmi_weight: float = DEFAULT_MMI_WEIGHT, **options):
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
        self._mmi_notes: set[str] = set()  # the MMI notes already logged
        self.set(**options)

    @classmethod
    def from_options(cls, model: ModelOptions, decoding: DecodingOptions | None = None,
                     mmi: MMIOptions | None = None,
                     bad_words_path: str | os.PathLike | None = None) -> "Chatbot":
        """The Chatbot a front end's options describe (interact.py, serve.py, evaluate.py):
        sets torch's CPU threads (`model.threads`), reads the `--bad_words` file and loads
        the model, with MMI if `mmi.mmi_model_path` is set."""
        if model.threads:
            torch.set_num_threads(model.threads)
        mmi = mmi or MMIOptions()
        bad = read_bad_words(bad_words_path) if bad_words_path else ()
        return cls.from_pretrained(
            model.model_path, model.vocab_path, device=model.device, no_cuda=model.no_cuda,
            dtype=model.dtype, quantize=model.quantize, backend=model.backend, bad_words=bad,
            mmi_model_path=mmi.mmi_model_path, num_candidates=mmi.num_candidates,
            mmi_weight=mmi.mmi_weight, **dataclasses.asdict(decoding or DecodingOptions()))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, vocab_path: str | os.PathLike | None = None,
                        *, device: str | None = None, no_cuda: bool = False,
                        dtype: str = "float32", quantize: str | None = None,
                        backend: str = "fast", bad_words: Sequence[str] = (),
                        mmi_model_path: str | os.PathLike | None = None,
                        num_candidates: int = DEFAULT_NUM_CANDIDATES,
                        mmi_weight: float = DEFAULT_MMI_WEIGHT,
                        **options) -> "Chatbot":
        """Load a model folder (train.py run, HF GPT-2 folder, GPT2-chitchat folder + vocab).

        dtype: float32 | bfloat16 | float16. quantize: None | "int8" (CPU, float32).
        mmi_model_path: a reverse model (train.py --reverse) on the same vocab; every reply is
        then the best of `num_candidates` samples, reranked with weight `mmi_weight` (see
        chitchat.mmi). `options` are DecodingOptions fields (temperature=, topk=, seed=, ...).
        """
        from .modeling import resolve_device

        dev = resolve_device(device, no_cuda)
        model, tok = load_for_decoding(path, vocab_path, dev, dtype, quantize, backend)
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
        new = self.resolve(**changes)
        if mmi:
            n = mmi.get("num_candidates", self.mmi.num_candidates)
            w = mmi.get("mmi_weight", self.mmi.weight)
            MMIOptions.check(n, w)
            self.mmi.num_candidates, self.mmi.weight = n, w
            self.backend.prepare(n)
            self.mmi.backend.prepare(n)
        if "seed" in changes:
            self._rng = self._generator(new.seed)
        self.options = new
        return new

    def resolve(self, **overrides) -> DecodingOptions:
        """The session's options with `overrides` applied and checked (nothing changes).
        Names may be OPTION_ALIASES spellings (top_p, max_tokens, max_len, ...)."""
        overrides = {OPTION_ALIASES.get(k, k): v for k, v in overrides.items()}
        names = {f.name for f in dataclasses.fields(DecodingOptions)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ChitchatError(f"unknown decoding option(s) {', '.join(unknown)}; "
                                f"options: {', '.join(sorted(names))}")
        opts = dataclasses.replace(self.options, **overrides)
        if self.n_positions - opts.max_new_tokens < 3:
            raise ChitchatError(f"--max_new_tokens {opts.max_new_tokens} leaves no room for a "
                                f"context: the model has n_positions {self.n_positions}; use "
                                f"--max_new_tokens {self.n_positions - 3} or less")
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
                             self.n_positions - opts.max_new_tokens, self.speaker_ids)

    def start(self, history: Sequence[str], **overrides) -> "ReplyStream":
        """Begin a reply to `history` (oldest first, alternating speakers, newest last).

        Returns a `ReplyStream`: iterate it for text pieces; `.reply` is complete once it is
        exhausted or closed. `overrides` change decoding options for this call only; a
        `seed` here seeds this call alone, otherwise the session's generator is used.
        """
        opts = self.resolve(**overrides)
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
        opts = self.resolve(**overrides)
        limit = min(self.n_positions, max_context or self.n_positions)
        if limit - opts.max_new_tokens < 3:
            raise ChitchatError(f"max_tokens {opts.max_new_tokens} leaves no room for a "
                                f"context in the {limit} positions a reply may use")
        seeded = "seed" in overrides
        if self.mmi is not None:
            opts = self._candidate_options(opts)
        ctx = build_context(self.tokenizer, history, opts.max_history_len,
                            limit - opts.max_new_tokens, self.speaker_ids)
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
        best, ranking = self.mmi.rank([prep.history], [prep.context], list(candidates))[0]
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
        opts = self.resolve(**overrides)
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
        driver = BatchDriver(steps, len(ctxs) * copies, self.tokenizer.sep_id)
        return [ReplyStream(RowTokens(driver, b), self.tokenizer, ctxs[b // copies], opts)
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
        cand_opts = self._candidate_options(opts)
        ctxs = [self.context(h, cand_opts) for h in histories]
        for c in ctxs:
            if c.notice:
                log.warning("note: %s", c.notice)
        batch = MMIBatch(lambda: self._mmi_rank(histories, ctxs, cand_opts, rng))
        return [ReplyStream(MMITokens(batch, i), self.tokenizer, ctx, opts)
                for i, ctx in enumerate(ctxs)]

    def _candidate_options(self, opts: DecodingOptions) -> DecodingOptions:
        """The options MMI's candidates decode with. They must be samples: with beam search
        or greedy decoding all would be the same reply and reranking would choose nothing.
        Beams are turned off; greedy decoding is the user's to change, so it is only
        pointed out. min_len >= 1, so a candidate is empty only if its text is blank. Each
        note is logged once per Chatbot: a server would repeat it on every request."""
        n = self.mmi.num_candidates
        notes = {}
        if opts.num_beams > 1:
            notes["beams"] = "note: MMI samples its candidates; num_beams is ignored"
        if is_greedy(opts) and n > 1:
            notes["greedy"] = (f"note: MMI with greedy decoding (--greedy or temperature 0) "
                               f"decodes {n} identical candidates and reranks nothing; sample "
                               "them (greedy off, a temperature above 0) to rerank")
        for key, note in notes.items():
            if key not in self._mmi_notes:
                self._mmi_notes.add(key)
                log.warning(note)
        return dataclasses.replace(opts, num_beams=1, min_len=max(1, opts.min_len))

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
        return self.mmi.rank(histories, ctxs, [rs.reply for rs in streams])

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


