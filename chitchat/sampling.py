"""Decoding rules: pure functions on logits, no model and no I/O.

Every rule is a function of a (B, V) logits tensor and plain arguments, so each is unit-tested
against transformers' own processors (tests/test_generation.py):

    temperature, top-k, top-p   exactly the token sets of TemperatureLogitsWarper,
                                TopKLogitsWarper, TopPLogitsWarper
    repetition penalty          RepetitionPenaltyLogitsProcessor's sign-aware rule (GPT2-chitchat
                                divided negative logits, which made repeats more likely)
    no-repeat n-grams, bans     NoRepeatNGramLogitsProcessor / NoBadWordsLogitsProcessor rules

Order per step (transformers' order): bans and min length, repetition penalty, n-gram and
phrase bans, then temperature, top-k, top-p, then sample (or argmax).

Repetition penalty and n-grams look at the reply being generated, not at the context, as
GPT2-chitchat did: penalising the context would stop the bot from answering "你好" with
"你好".
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .config import DecodingOptions

NEG_INF = float("-inf")


# ---- pure functions on logits (B, V) --------------------------------------------------------
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, with the limits where that quotient stops being a distribution.

    A temperature so small that a row's quotients overflow (inf - inf, or every one -inf)
    would make its softmax NaN, and the argmax of NaNs is token 0 ([PAD], a banned token).
    Such a row gets the limit of a shrinking temperature instead: only its largest allowed
    logits survive (greedy). An infinite temperature would give -inf / inf = NaN for banned
    tokens; its limit is uniform over the allowed ones.
    """
    if temperature == 1.0:
        return logits
    if temperature == float("inf"):
        return torch.where(torch.isfinite(logits), 0.0, NEG_INF).to(logits.dtype)
    scaled = logits / temperature
    if temperature > 1.0:  # dividing by more than 1 cannot overflow
        return scaled
    # amax propagates NaN, so a non-finite max flags +inf, NaN and all -inf alike. This runs
    # for every token: where a read is cheap the greedy limit is built only for a broken row.
    broken = ~torch.isfinite(scaled.amax(dim=-1, keepdim=True))
    if host_reads_are_cheap(logits.device) and not bool(broken.any()):
        return scaled
    top = (logits == logits.amax(dim=-1, keepdim=True)) & torch.isfinite(logits)
    return torch.where(broken, torch.where(top, 0.0, NEG_INF).to(logits.dtype), scaled)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep tokens whose logit is at least the k-th largest (ties kept); k <= 0: no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p.

    Same computation as transformers' TopPLogitsWarper (ascending sort, drop tokens whose
    cumulative probability is <= 1 - p, always keep the most likely). p <= 0 or >= 1: no-op.
    """
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Penalise the tokens marked in `seen` (B, V) bool: divide positive logits by `penalty`,
    multiply negative ones, so a penalty > 1 always lowers their probability."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def ngram_bans(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `tokens`."""
    if n <= 0 or len(tokens) < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1)
            if tuple(tokens[i:i + n - 1]) == prefix]


def phrase_bans(tokens: Sequence[int], phrases: Sequence[Sequence[int]]) -> list[int]:
    """Last tokens of multi-token banned phrases whose beginning `tokens` ends with."""
    out = []
    for ph in phrases:
        k = len(ph) - 1
        if k <= len(tokens) and (k == 0 or list(tokens[len(tokens) - k:]) == list(ph[:k])):
            out.append(ph[-1])
    return out


@dataclass(frozen=True)
class Constraints:
    """What a model may never emit, fixed for a tokenizer (and a --bad_words list).

    `banned`: (V,) bool mask of single tokens never to generate ([PAD], [UNK], [CLS], ...
    and one-token bad words). `phrases`: multi-token bad words, banned as n-gram completions.
    """
    sep_id: int
    banned: torch.Tensor
    phrases: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def build(cls, vocab_size: int, sep_id: int, banned_ids: Sequence[int] = (),
              phrases: Sequence[Sequence[int]] = ()) -> "Constraints":
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        single = [p[0] for p in phrases if len(p) == 1]
        ids = [i for i in (*banned_ids, *single) if i != sep_id]
        if ids:
            mask[torch.tensor(ids, dtype=torch.long)] = True
        multi = tuple(tuple(int(t) for t in p) for p in phrases if len(p) > 1)
        return cls(sep_id=sep_id, banned=mask, phrases=multi)

    def to(self, device) -> "Constraints":
        """These constraints with the mask on `device`: one copy per decode, not per token
        (a copy from pageable memory waits for the GPU)."""
        return replace(self, banned=self.banned.to(device))


def process_logits(logits: torch.Tensor, generated: Sequence[Sequence[int]], step: int,
                   opts: DecodingOptions, cons: Constraints,
                   seen: torch.Tensor | None = None) -> torch.Tensor:
    """The rules that shape the distribution before sampling (everything but the warpers).

    logits: (B, V) float; generated: each row's reply tokens so far; step: len of those.
    """
    logits = logits.masked_fill(cons.banned, NEG_INF)  # decode moved it to the device
    if step < opts.min_len:
        logits[:, cons.sep_id] = NEG_INF
    if seen is not None and opts.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, opts.repetition_penalty)
    if opts.no_repeat_ngram_size > 0 or cons.phrases:
        for b, toks in enumerate(generated):
            bans = ngram_bans(toks, opts.no_repeat_ngram_size) + phrase_bans(toks, cons.phrases)
            if bans:
                logits[b, bans] = NEG_INF
    return logits


def warp_logits(logits: torch.Tensor, opts: DecodingOptions) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as transformers' warpers compose."""
    logits = apply_temperature(logits, opts.temperature)
    logits = top_k_filter(logits, opts.topk)
    return top_p_filter(logits, opts.topp)


def is_greedy(opts: DecodingOptions) -> bool:
    return opts.greedy or opts.temperature == 0


def host_reads_are_cheap(device: torch.device) -> bool:
    """Whether decoding may read a value back to the host mid-step. On a CPU it costs
    nothing; on a GPU it waits for all queued work, so the decode loop reads once per
    token (the chosen tokens) and nothing else."""
    return device.type == "cpu"


def sampling_distribution(logits: torch.Tensor, opts: DecodingOptions
                          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What a sample is drawn from: (idx (B, k), probs (B, k)) over the top-k survivors,
    or (None, probs (B, V)) over the whole vocab. probs may be unnormalised.

    On a CPU with top-k on, only the k survivors are kept: a multinomial over the whole
    vocab (or a full sort for top-p) costs ~0.5-1 ms per token on CPU, as much as a
    quantized layer. The probabilities are the same full-vocab softmax that the warpers
    produce, and top-p runs on the survivors in ascending order, as TopPLogitsWarper's
    cumulative sum sees them (the filtered tokens only add exact zeros). The tests check
    the support and the probabilities against `warp_logits`.
    """
    logits = apply_temperature(logits, opts.temperature)
    k, p = opts.topk, opts.topp
    # The shortcut must know whether the k-th value is tied, a read-back: free on a CPU;
    # on a GPU it would stall the queue, so the GPU takes the whole-vocab path.
    if 0 < k < logits.shape[-1] and host_reads_are_cheap(logits.device):
        vals, idx = torch.topk(logits, k)  # (B, k), descending
        kth = vals[..., -1:]
        # Ties at the k-th value (or fewer than k allowed tokens) keep more than k tokens:
        # those rare cases take the general path below.
        if not bool(((logits >= kth).sum(dim=-1) > k).any()):
            probs = logits.masked_fill(logits < kth, NEG_INF).softmax(dim=-1).gather(-1, idx)
            if 0.0 < p < 1.0:
                drop = probs.flip(-1).cumsum(dim=-1) <= (1 - p)  # ascending, like the warper
                drop[..., -1] = False
                probs = probs.masked_fill(drop.flip(-1), 0.0)
            return idx, probs
    return None, top_p_filter(top_k_filter(logits, k), p).softmax(dim=-1)


def choose_tokens(logits: torch.Tensor, opts: DecodingOptions,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) next tokens from processed logits: argmax if greedy, else a sample."""
    if is_greedy(opts):
        return logits.argmax(dim=-1)
    idx, probs = sampling_distribution(logits, opts)
    # torch.multinomial's one-sample path, spelled out (the same draws, bit for bit): it
    # divides by exponential noise and takes the argmax. Calling it would add its input
    # checks, which read two values back from the GPU.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    pick = (probs / noise).argmax(dim=-1, keepdim=True)
    return (pick if idx is None else idx.gather(-1, pick)).view(-1)


# ---- the decoding loop ------------------------------------------------------------------------
