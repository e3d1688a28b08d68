"""Reply-quality metrics. Pure functions on strings; no model needed.

Text is compared in *units*: every CJK character is a unit (character-level, as is usual for
Chinese), a run of Latin letters or digits is one unit, and any other non-space character
(punctuation, emoji) is a unit of its own.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_UNIT_RE = re.compile(r"[A-Za-z0-9\u00C0-\u024F]+|\S")
# Chen & Cherry (2014) smoothing method 1: a zero n-gram match count (n >= 2) becomes EPSILON,
# so one missing 4-gram does not zero a sentence's BLEU (NLTK's SmoothingFunction().method1);
# a reply with no unigram in common scores 0, as in NLTK.
EPSILON = 0.1


def units(text: str) -> list[str]:
    return _UNIT_RE.findall(text.lower())


def _ngrams(seq: Sequence[str], n: int) -> Counter:
    return Counter(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))


def sentence_bleu(hypothesis: str, reference: str, max_n: int = 4) -> float:
    """BLEU-`max_n` of one reply against one reference, uniform weights, smoothing method 1."""
    hyp, ref = units(hypothesis), units(reference)
    if not hyp or not ref:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        total = sum(h.values())
        match = sum(min(c, r[g]) for g, c in h.items())
        if n == 1 and not match:
            return 0.0  # no unit in common: NLTK returns 0 before any smoothing
        log_p += math.log((match if match else EPSILON) / max(1, total)) / max_n
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(log_p)


def bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Mean sentence BLEU over reply/reference pairs."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} replies but {len(references)} references")
    if not hypotheses:
        return 0.0
    return sum(sentence_bleu(h, r, max_n) for h, r in zip(hypotheses, references)) / len(
        hypotheses)


def distinct(replies: Sequence[str], n: int) -> float:
    """Distinct-n: distinct n-grams over all n-grams, pooled across all replies."""
    grams = Counter()
    for r in replies:
        grams.update(_ngrams(units(r), n))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def repeats_context(reply: str, context: Sequence[str]) -> bool:
    """True when the reply is, up to case and spaces, one of the context's utterances."""
    norm = lambda s: "".join(s.lower().split())
    return bool(norm(reply)) and norm(reply) in {norm(c) for c in context}


def has_char_run(reply: str, run: int = 4) -> bool:
    """True for a run of `run` or more equal characters, e.g. 哈哈哈哈."""
    return re.search(rf"(\S)\1{{{run - 1},}}", reply) is not None


def reply_metrics(replies: Sequence[str], references: Sequence[str],
                  contexts: Sequence[Sequence[str]]) -> dict:
    """All reply metrics of evaluate.py, as one flat dict."""
    n = len(replies)
    share = lambda xs: sum(xs) / n if n else 0.0
    return {
        "replies": n,
        "bleu_1": bleu(replies, references, 1),
        "bleu_2": bleu(replies, references, 2),
        "bleu_4": bleu(replies, references, 4),
        "distinct_1": distinct(replies, 1),
        "distinct_2": distinct(replies, 2),
        "mean_reply_length": share([len(units(r)) for r in replies]),
        "repeats_context": share([repeats_context(r, c) for r, c in zip(replies, contexts)]),
        "char_run_4": share([has_char_run(r) for r in replies]),
        "empty": share([not r.strip() for r in replies]),
    }
