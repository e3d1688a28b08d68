"""MMI reranking (DialoGPT-style): sample several candidate replies, score each by how well
it predicts the context under a reverse model, keep the best.

    score = (1 - λ) · fwd + λ · rev
    fwd   = mean log P(reply tokens, [SEP] | context)        forward model, while decoding
    rev   = mean log P(context tokens | reply)               reverse model, one batched pass

Both are per-token means, so long and short candidates compete on equal terms and the two
scores are on the same scale (nats per token). λ = `mmi_weight`; the default 0.5 weighs the
two equally (Li et al. 2016's MMI-bidi form). λ = 0 is "most likely of N samples"; λ = 1 is
DialoGPT's recipe (rerank samples by the reverse model alone; the samples are already fluent).
How much the reverse term moves the choice depends on how well the reverse model is trained:
docs/quality.md measures λ = 0, 0.5 and 1 with a small reverse model, where the forward term
dominates at 0.5.

The reverse input for a candidate is ``[CLS] reply [SEP] u_n [SEP] u_n-1 [SEP] ... [SEP]``:
the reply first, then the context utterances the forward model saw, newest first (the order
train.py --reverse teaches). Only the context tokens (each utterance and its [SEP]) are
scored. Oldest utterances are dropped to fit the reverse model's n_positions, and if even
the newest does not fit, its tail is cut (the tokens next to the reply are kept).

Filters, applied by `rerank` (a pure function of the candidates and their scores):
  * empty:          the candidate's text is empty or blank;
  * nan:            its forward or reverse score is not finite;
  * near-duplicate: character-level similarity to the previous bot turn >= 0.8
                    (difflib's ratio 2·M / (|a| + |b|) on the texts without spaces, lower-
                    cased): repeating oneself is what makes a chat bot look "offline";
  * repetitive:     a run of 4 or more equal characters (哈哈哈哈). Such a candidate has a
                    very high mean log P(reply | context) (each 哈 after 哈哈 is nearly
                    certain), so the forward score picks it out of 8 samples far more often
                    than sampling alone produces it (docs/quality.md measured 42% of replies
                    at λ = 0.5 without this filter, 8% without MMI).
When every candidate is filtered, the best of a fallback ladder is taken instead of failing
or answering nothing: near-duplicates and repetitive ones (by score), then candidates with a
finite forward score (by it), then any non-empty candidate, then the longest one.
`Ranking.fallback` says which.
"""
from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .backends import DTYPES, conv1d_to_linear, make_backend
from .config import DEFAULT_MMI_WEIGHT, DEFAULT_NUM_CANDIDATES, MMIOptions
from .dialogue import Context, reverse_input, reverse_speaker_types, split_context
from .tokenization import ChatTokenizer, check_same_vocab
from .utils import ChitchatError

log = logging.getLogger("chitchat")

NEAR_DUPLICATE = 0.8
MAX_CHAR_RUN = 4


@dataclass
class Candidate:
    """One candidate reply with its scores; `dropped` says why a filter removed it."""
    text: str
    token_ids: list[int]
    forward: float
    reverse: float
    score: float
    dropped: str | None = None  # "empty" | "nan" | "near-duplicate" | "repetitive"
    chosen: bool = False


@dataclass
class Ranking:
    candidates: list[Candidate]
    choice: int                     # index into candidates
    fallback: str | None = None     # why the choice did not pass every filter


def combine(forward: float, reverse: float, weight: float) -> float:
    """(1 - weight) · forward + weight · reverse; NaN if either is not finite."""
    if not (math.isfinite(forward) and math.isfinite(reverse)):
        return math.nan
    return (1.0 - weight) * forward + weight * reverse


def mean_logprob(logprobs: Sequence[float]) -> float:
    """Length-normalised log-probability; NaN for no tokens (an empty score is no score)."""
    return sum(logprobs) / len(logprobs) if logprobs else math.nan


def similarity(a: str, b: str) -> float:
    """Character-level similarity in [0, 1] (difflib ratio, spaces and case ignored)."""
    a, b = "".join(a.lower().split()), "".join(b.lower().split())
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def rerank(texts: Sequence[str], forward: Sequence[float], reverse: Sequence[float],
           weight: float = DEFAULT_MMI_WEIGHT, previous: str | None = None,
           token_ids: Sequence[Sequence[int]] | None = None,
           threshold: float = NEAR_DUPLICATE, char_run: int | None = MAX_CHAR_RUN) -> Ranking:
    """Filter and rank candidates; pure. `previous` is the bot's previous turn (or None);
    `char_run`: drop candidates with a run of that many equal characters (None: keep)."""
    from .metrics import has_char_run

    if not texts:
        raise ValueError("rerank needs at least one candidate")
    if not (len(texts) == len(forward) == len(reverse)):
        raise ValueError(f"{len(texts)} candidates but {len(forward)} forward and "
                         f"{len(reverse)} reverse scores")
    cands = []
    for k, (t, f, r) in enumerate(zip(texts, forward, reverse)):
        f, r = float(f), float(r)
        c = Candidate(t, list(token_ids[k]) if token_ids is not None else [], f, r,
                      combine(f, r, weight))
        if not t.strip():
            c.dropped = "empty"
        elif not math.isfinite(c.score):
            c.dropped = "nan"
        elif previous is not None and similarity(t, previous) >= threshold:
            c.dropped = "near-duplicate"
        elif char_run is not None and has_char_run(t, char_run):
            c.dropped = "repetitive"
        cands.append(c)

    def best(pool, key):
        return max(pool, key=lambda k: (key(cands[k]), -k))  # ties: the earliest sample

    fallback = None
    kept = [k for k, c in enumerate(cands) if c.dropped is None]
    if kept:
        choice = best(kept, lambda c: c.score)
    else:
        dups = [k for k, c in enumerate(cands) if c.dropped in ("near-duplicate", "repetitive")]
        fwd_ok = [k for k, c in enumerate(cands)
                  if c.dropped == "nan" and math.isfinite(c.forward)]
        nonempty = [k for k, c in enumerate(cands) if c.dropped != "empty"]
        if dups:
            choice, fallback = best(dups, lambda c: c.score), "all repetitive or near-duplicates"
        elif fwd_ok:
            choice, fallback = best(fwd_ok, lambda c: c.forward), "no reverse score"
        elif nonempty:
            choice, fallback = nonempty[0], "no finite score"
        else:
            choice = best(range(len(cands)), lambda c: len(c.token_ids))
            fallback = "all empty"
    cands[choice].chosen = True
    return Ranking(cands, choice, fallback)


# ---- reverse scoring ----------------------------------------------------------------------
@torch.inference_mode()
def reverse_scores(backend, inputs: Sequence[tuple[list[int], int]], pad_id: int,
                   token_types: Sequence[Sequence[int]] | None = None,
                   max_rows: int = 64) -> list[float]:
    """Mean log P(context | reply) per input, ``(ids, first target)`` pairs.

    `backend`: the reverse model's chitchat.backends backend (its `hidden` and `project`).
    One forward pass per `max_rows` inputs (right-padded; causal attention means the padding
    after a row's last token cannot change its scores). Only the target positions go
    through the LM head.
    """
    device = backend.device
    out: list[float] = []
    for s in range(0, len(inputs), max_rows):
        chunk = inputs[s:s + max_rows]
        T = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        types = torch.zeros((len(chunk), T), dtype=torch.long) if token_types else None
        rows, cols, tgt = [], [], []
        for b, (x, first) in enumerate(chunk):
            ids[b, :len(x)] = torch.as_tensor(x)
            if types is not None:
                tt = list(token_types[s + b])
                types[b, :len(tt)] = torch.as_tensor(tt)
            for j in range(first, len(x)):  # position j-1 predicts token j
                rows.append(b)
                cols.append(j - 1)
                tgt.append(x[j])
        hidden = backend.hidden(ids.to(device),
                                None if types is None else types.to(device))  # (B, T, D)
        r = torch.as_tensor(rows, device=device)
        h = hidden[r, torch.as_tensor(cols, device=device)]  # (N, D)
        lp = backend.project(h).log_softmax(-1)
        lp = lp.gather(-1, torch.as_tensor(tgt, device=device)[:, None])[:, 0]
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(
            0, r, lp.double())
        counts = torch.bincount(r, minlength=len(chunk)).double()
        out.extend((sums / counts).tolist())  # 0/0 = NaN for a row with no target
    return out


# ---- the reverse model of a Chatbot ----------------------------------------------------
class MMI:
    """The reverse model and the reranking settings of a Chatbot (see chitchat.mmi)."""

    def __init__(self, model, tokenizer: ChatTokenizer,
                 num_candidates: int = DEFAULT_NUM_CANDIDATES,
                 weight: float = DEFAULT_MMI_WEIGHT, backend: str = "fast"):
        from .modeling import check_vocab, is_reverse, speaker_token_ids

        where = getattr(model.config, "_name_or_path", "") or "(in memory)"
        if not is_reverse(model.config):
            raise ChitchatError(f"the MMI model {where} is not a reverse model: its config.json "
                                "has no reverse: true. Train one on the same token store with: "
                                "python train.py --reverse --train_path <store> ...")
        check_vocab(model, tokenizer, where)
        MMIOptions.check(num_candidates, weight)
        self.model = model.eval()
        # Scoring runs num_candidates rows of reply + context through the model at once.
        self.backend = make_backend(self.model, backend, pad_id=tokenizer.pad_id)
        self.backend.prepare(num_candidates)
        self.tokenizer = tokenizer
        self.num_candidates = num_candidates
        self.weight = weight
        self.n_positions = int(model.config.n_positions)
        self.speaker_ids = speaker_token_ids(model.config)

    def score(self, contexts: Sequence[Context], replies: Sequence[Sequence[int]]) -> list[float]:
        """Mean log P(context | reply) of each (context, reply) pair, in one batched pass."""
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

    def rank(self, histories: Sequence[Sequence[str]], contexts: Sequence[Context],
             cands: Sequence) -> list[tuple]:
        """[(chosen candidate, Ranking)] per history; `cands`: num_candidates finished
        candidate Replies per history, in order, with their token_logprobs."""
        n = self.num_candidates
        forward = [mean_logprob((c.token_logprobs or []) +
                                ([c.stop_logprob] if c.stop_logprob is not None else []))
                   for c in cands]
        reverse = self.score([contexts[b // n] for b in range(len(cands))],
                             [c.token_ids for c in cands])
        out = []
        for i, h in enumerate(histories):
            rows = range(i * n, (i + 1) * n)
            previous = h[-2] if len(h) >= 2 else None  # the bot's turn before the user's
            ranking = rerank([cands[b].text for b in rows], [forward[b] for b in rows],
                             [reverse[b] for b in rows], self.weight, previous,
                             token_ids=[cands[b].token_ids for b in rows])
            if ranking.fallback:
                log.debug("MMI fallback: %s", ranking.fallback)
            out.append((cands[i * n + ranking.choice], ranking))
        return out


def load_mmi_model(path, tokenizer: ChatTokenizer, vocab_path=None, device="cpu",
                   dtype: str = "float32"):
    """The reverse model at `path`, checked against the forward model's vocab."""
    from .modeling import load_model

    model, rtok = load_model(path, vocab_path=vocab_path, device=device, dtype=DTYPES[dtype])
    check_same_vocab(tokenizer, "the forward model's vocab", rtok, f"of the MMI model {path}",
                     "Train the reverse model on the same token store (python train.py "
                     "--reverse --train_path <the forward model's store>).")
    conv1d_to_linear(model)  # F.linear on (out, in) weights: the faster CPU product
    return model
