"""The dialogue format, in one place: how a dialogue becomes model input.

A dialogue of utterances u1..un is ``[CLS] u1 [SEP] u2 [SEP] ... un [SEP]``: every utterance
ends with exactly one [SEP] and none holds one (literal "[SEP]" text is plain text).
Utterances that encode to no token are left out. The same layout is

  * the token store's (`encode_dialogues`, written by preprocess.py, chitchat.store);
  * a chat context (`build_context`): the newest utterances within a token budget, after
    which the reply is generated;
  * in reverse for MMI (`reverse_input`): ``[CLS] reply [SEP] u_n [SEP] ... u_1 [SEP]``,
    the order a reverse model (train.py --reverse) is trained on.

Speakers (--speaker_ids): utterance k of a dialogue (0-based) is speaker 1 when k is even,
speaker 2 when odd; its tokens and its [SEP] carry that speaker's id in token_type_ids, and
[CLS] carries the speaker of the first utterance shown (`speaker_token_types`).

Everything here is a pure function of its arguments.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .tokenization import ChatTokenizer
from .utils import ChitchatError


@dataclass
class EncodedBatch:
    """A batch of encoded dialogues: dialogue i is ``ids[offsets[i]:offsets[i+1]]``.

    A dialogue left with no utterance at all has length 0. `dropped` maps a dialogue's
    index to the number of its utterances that had no token and were left out.
    """
    ids: np.ndarray
    offsets: np.ndarray
    dropped: dict[int, int] = field(default_factory=dict)


def encode_dialogues(tok: ChatTokenizer, dialogues: Sequence[Sequence[str]],
                     unk_counter: Counter | None = None) -> EncodedBatch:
    """Encode a batch of dialogues to ``[CLS] u1 [SEP] ... un [SEP]``.

    Utterances made only of CJK characters, punctuation and spaces (most chit-chat) are
    encoded by a vectorised code-point lookup; the rest go to one ``encode_batch`` call
    of the Rust tokenizer (which uses every core). An utterance that yields no token
    (say, only control characters) is dropped, and counted in ``dropped``.
    `unk_counter`, if given, counts the source text of every [UNK].
    """
    table = tok.char_table()
    n = len(dialogues)
    flat = [u for d in dialogues for u in d]
    n_utt = len(flat)
    per_dlg = np.fromiter(map(len, dialogues), dtype=np.int64, count=n)
    ulen = np.fromiter(map(len, flat), dtype=np.int64, count=n_utt)
    cps = np.frombuffer("".join(flat).encode("utf-32-le"), dtype=np.uint32)
    tbl = table[cps]
    utt_of = np.repeat(np.arange(n_utt), ulen)  # utterance of each code point
    slow = np.zeros(n_utt, dtype=bool)
    slow[utt_of[tbl == -1]] = True
    keep = (tbl >= 0) & ~slow[utt_of]
    cnt = np.bincount(utt_of[keep], minlength=n_utt)
    slow_idx = np.flatnonzero(slow)
    encs = tok.encode_batch([flat[i] for i in slow_idx])
    cnt[slow_idx] = [len(e.ids) for e in encs]

    # Layout: each kept utterance takes cnt+1 slots (its [SEP]); a dialogue with any
    # kept utterance takes one more for [CLS].
    dlg_of = np.repeat(np.arange(n), per_dlg)
    slots = np.where(cnt > 0, cnt + 1, 0)
    dlg_len = np.bincount(dlg_of, weights=slots, minlength=n).astype(np.int64)
    dlg_len[dlg_len > 0] += 1
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(dlg_len, out=off[1:])
    slots_before = np.concatenate(([0], np.cumsum(slots)))
    first_utt = np.concatenate(([0], np.cumsum(per_dlg)))[:-1]
    start = off[dlg_of] + 1 + slots_before[:-1] - slots_before[first_utt][dlg_of]

    out = np.empty(int(off[-1]), dtype=np.int64)
    kept_dlg = np.flatnonzero(dlg_len)
    out[off[kept_dlg]] = tok.cls_id
    kept_utt = np.flatnonzero(cnt)
    out[start[kept_utt] + cnt[kept_utt]] = tok.sep_id
    fast_before = np.concatenate(([0], np.cumsum(np.where(slow, 0, cnt))))
    rank = np.cumsum(keep)[keep] - 1 - fast_before[utt_of[keep]]
    out[start[utt_of[keep]] + rank] = tbl[keep]
    for i, enc in zip(slow_idx, encs):
        out[start[i]:start[i] + cnt[i]] = enc.ids

    if unk_counter is not None:
        u_cps, u_n = np.unique(cps[keep & (tbl == tok.unk_id)], return_counts=True)
        unk_counter.update({chr(c): int(k) for c, k in zip(u_cps, u_n)})
        for i, enc in zip(slow_idx, encs):
            if tok.unk_id in enc.ids:
                unk_counter.update(flat[i][a:b] for t, (a, b) in
                                   zip(enc.ids, enc.offsets) if t == tok.unk_id)
    empty = np.bincount(dlg_of, weights=cnt == 0, minlength=n)
    return EncodedBatch(out, off, {int(i): int(empty[i]) for i in np.flatnonzero(empty)})


def encode_context(tok: ChatTokenizer, utterances: Sequence[str]) -> list[int]:
    """``[CLS] u1 [SEP] ... [SEP]`` for a chat history (reply generation starts after).

    Utterances with no token are left out, as in preprocessing.
    """
    ids = [tok.cls_id]
    for u in utterances:
        u_ids = tok.encode(u)
        if u_ids:
            ids.extend(u_ids)
            ids.append(tok.sep_id)
    return ids


# ---- speakers ---------------------------------------------------------------------------
def speaker_token_types(utt_lens, first_utterance: int, speaker_ids: tuple[int, int],
                        total_len: int | None = None) -> np.ndarray:
    """token_type_ids for ``[CLS] u_f [SEP] u_f+1 [SEP] ...`` where u_f is utterance
    number `first_utterance` (0-based) of its dialogue; `utt_lens` include each [SEP].

    An unfinished last utterance (a reply being generated) just continues its speaker:
    pass `total_len` to pad the array to that many tokens with the next speaker's id.
    """
    ids = [speaker_ids[first_utterance % 2]]
    for k, n in enumerate(utt_lens):
        ids.extend([speaker_ids[(first_utterance + k) % 2]] * int(n))
    if total_len is not None and total_len > len(ids):
        ids.extend([speaker_ids[(first_utterance + len(utt_lens)) % 2]] * (total_len - len(ids)))
    return np.asarray(ids[:total_len] if total_len is not None else ids, dtype=np.int64)


# ---- chat contexts ----------------------------------------------------------------------
def printable(text: str) -> str:
    """`text` quoted so that it can be written anywhere and seen: undecodable bytes as
    \\xNN, invisible characters (zero-width space...) as \\uNNNN.

    Here because `build_context` names a message it cannot encode; the chat front ends
    quote user text with it too."""
    if not isinstance(text, str):
        return repr(text)
    s = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "'" + "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                         for c in s) + "'"


@dataclass
class Context:
    ids: list[int]
    token_types: list[int] | None
    reply_type: int | None
    utterances_used: int
    notice: str | None


def build_context(tokenizer: ChatTokenizer, history: Sequence[str], max_history_len: int,
                  budget: int, speaker_ids: tuple[int, int] | None = None) -> Context:
    """``[CLS] u [SEP] ...`` for the newest utterances of `history` within `budget` tokens.

    Utterances that encode to nothing are skipped. Pure: the same history and budget give
    the same ids. `speaker_ids` (models trained with --speaker_ids): utterance k of the
    history belongs to speaker k % 2, as in training (`speaker_token_types`).
    """
    if budget < 3:
        raise ChitchatError(f"a context budget of {budget} tokens cannot hold [CLS], one token "
                            "and [SEP]; lower --max_new_tokens")
    if not history:
        raise ChitchatError("the history is empty: there is nothing to reply to")
    picked: list[list[int]] = []
    used = 1  # [CLS]
    notice = None
    first = len(history)
    for k in range(len(history) - 1, max(len(history) - max_history_len, 0) - 1, -1):
        ids = tokenizer.encode(history[k])
        if not ids:
            if k == len(history) - 1:
                raise ChitchatError(f"the message {printable(history[k])} has no tokens in "
                                    "this model's vocab; say something else")
            continue
        if used + len(ids) + 1 > budget:
            if picked:
                break  # older utterances do not fit: dropped, oldest first
            keep = budget - 2
            notice = (f"the message is {len(ids)} tokens long; only its last {keep} fit "
                      f"the context budget of {budget} tokens (n_positions minus "
                      "--max_new_tokens), so its beginning was cut")
            ids = ids[-keep:]
        picked.append(ids)
        used += len(ids) + 1
        first = k
    picked.reverse()
    out = [tokenizer.cls_id]
    for ids in picked:
        out.extend(ids)
        out.append(tokenizer.sep_id)
    types = reply_type = None
    if speaker_ids is not None:
        lens = [len(ids) + 1 for ids in picked]
        types = speaker_token_types(lens, first, speaker_ids).tolist()
        reply_type = speaker_ids[len(history) % 2]
    return Context(out, types, reply_type, len(picked), notice)


# ---- the reversed form (MMI) ------------------------------------------------------------
def split_context(ids: Sequence[int], cls_id: int, sep_id: int) -> list[list[int]]:
    """``[CLS] u1 [SEP] u2 [SEP] ...`` -> [u1, u2, ...] (token ids, without specials)."""
    if not ids or ids[0] != cls_id:
        raise ValueError("a context starts with [CLS]")
    out, cur = [], []
    for t in ids[1:]:
        if t == sep_id:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(cur)
    return out


def reverse_input(reply: Sequence[int], context: Sequence[Sequence[int]], cls_id: int,
                  sep_id: int, n_positions: int) -> tuple[list[int], int, int]:
    """(ids, first target, number of utterances kept) for one candidate; pure.

    ids = ``[CLS] reply [SEP] u_n [SEP] ... [SEP]`` within n_positions; positions from
    `first target` on are the context tokens to score.
    """
    reply = list(reply)[-max(1, n_positions - 4):]  # room for [CLS], [SEP] and 1 + [SEP]
    ids = [cls_id, *reply, sep_id]
    first_target = len(ids)
    kept = 0
    for utt in reversed(context):
        room = n_positions - len(ids) - 1
        if len(utt) > room:
            if kept == 0 and room >= 1:
                ids.extend([*utt[:room], sep_id])  # keep the head: it follows the reply
                kept = 1
            break
        ids.extend([*utt, sep_id])
        kept += 1
    return ids, first_target, kept


def reverse_speaker_types(n_reply: int, context: Sequence[Sequence[int]], kept: int,
                          speaker_ids: tuple[int, int], total: int) -> list[int]:
    """token_type_ids of a reverse input: the reply is utterance 0 of the reversed dialogue,
    as in training (`speaker_token_types`)."""
    lens = [n_reply + 1] + [len(u) + 1 for u in list(reversed(context))[:kept]]
    return speaker_token_types(lens, 0, speaker_ids, total)[:total].tolist()
