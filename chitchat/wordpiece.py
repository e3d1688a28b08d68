"""A deterministic WordPiece vocab trainer.

The `tokenizers` library's WordPieceTrainer numbers words in hash-map order, so merges of
equal count are taken in a different order on every run and the vocab (its ids, and even
its set of ``##`` pieces) changes from run to run. Here every tie is broken by the tokens'
text, so the same corpus and options always give the same vocab, byte for byte.

The algorithm is the trainer's (BPE merges over word counts, pieces after the first
character of a word carry the ``##`` prefix); only the tie order differs.
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from itertools import islice
from typing import Iterable, Sequence

from tokenizers import normalizers, pre_tokenizers

PREFIX = "##"


def count_words(utterances: Iterable[str], batch: int = 2000) -> Counter:
    """Words as BERT's normalizer and pre-tokenizer cut them (CJK ideographs alone)."""
    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=None, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    it = iter(utterances)
    # One Rust call per batch: newlines only separate, as the pre-tokenizer splits on them.
    while chunk := list(islice(it, batch)):
        text = norm.normalize_str("\n".join(chunk))
        counts.update(w for w, _ in pre.pre_tokenize_str(text))
    return counts


def train_wordpiece(words: Counter, vocab_size: int, min_frequency: int,
                    special_tokens: Sequence[str]) -> list[str]:
    """Tokens in id order: the special tokens, every character seen (first-of-word and
    ``##`` forms, sorted), then merges by falling count until `vocab_size` is reached or no
    pair occurs `min_frequency` times. Ties go to the pair whose text sorts first."""
    tokens = list(dict.fromkeys(special_tokens))
    seen = set(tokens)
    initial = sorted({c for w in words for c in w})
    cont = sorted({PREFIX + c for w in words for c in w[1:]})
    for t in initial + cont:
        if t not in seen:
            seen.add(t)
            tokens.append(t)

    # Only words of two or more characters can merge.
    syms = [[w[0]] + [PREFIX + c for c in w[1:]] for w in words if len(w) > 1]
    freq = [n for w, n in words.items() if len(w) > 1]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, s in enumerate(syms):
        for p in zip(s, s[1:]):
            pairs[p] += freq[i]
            where[p].add(i)
    heap = [(-n, p) for p, n in pairs.items()]
    heapq.heapify(heap)
    while len(tokens) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg:  # stale entry: the count changed since it was pushed
            continue
        if -neg < min_frequency:
            break
        a, b = pair
        new = a + b[len(PREFIX):]
        if new not in seen:
            seen.add(new)
            tokens.append(new)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            s, n = syms[i], freq[i]
            for p in zip(s, s[1:]):
                pairs[p] -= n
                changed.add(p)
            j, merged = 0, []
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(s[j])
                    j += 1
            syms[i] = merged
            for p in zip(merged, merged[1:]):
                pairs[p] += n
                where[p].add(i)
                changed.add(p)
        for p in changed:
            if pairs[p] > 0 and p != pair:
                heapq.heappush(heap, (-pairs[p], p))
            elif pairs[p] <= 0:
                pairs.pop(p, None)
        pairs.pop(pair, None)
    return tokens
