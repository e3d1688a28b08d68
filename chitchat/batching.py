"""Training examples from a token store (train.py): windows of whole utterances,
packing into rows, the rows of an epoch, optimizer steps, and batches.

A *window* is what the model sees as one example: ``[CLS]`` followed by consecutive whole
utterances of one dialogue, at most ``max_len`` tokens, so that training matches the
context format interact.py builds (``[CLS] u1 [SEP] ... [SEP]``, then the reply).

Every token of a dialogue is a *target* (predicted from the tokens before it) in exactly
one window. A dialogue that fits max_len is one window. A longer one becomes several:
each later window starts with context (the most recent earlier utterances, at most half of
the window) followed by new utterances; only the new ones are targets, so nothing is
counted twice and nothing at the end is thrown away (GPT2-chitchat cut dialogues at
max_len and lost the tail). An utterance that alone exceeds max_len - 1 tokens is the
only thing ever cut: it keeps its first max_len - 2 tokens and its [SEP].

--loss_on all:       targets are every token after [CLS] (utterances and their [SEP]).
--loss_on response:  targets are the tokens of every utterance after the dialogue's first,
                     each with its closing [SEP]; the first utterance (and its [SEP]) is
                     context only. [CLS] is never a target.

Speakers (--speaker_ids): utterance k of a dialogue (0-based) is speaker 1 when k is even,
speaker 2 when odd; its tokens and its [SEP] carry that speaker's token id in
token_type_ids, and [CLS] carries the speaker of the window's first utterance.
chitchat.dialogue.speaker_token_types is the single definition, shared with chat.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dialogue import speaker_token_types
from .store import TokenStore
from .utils import ChitchatError

IGNORE_INDEX = -100


def utterance_windows(utt_lens, max_len: int) -> list[tuple[int, int, int]]:
    """Windows of one dialogue as utterance index triples (first, first_target, end).

    `utt_lens` are token counts of the utterances including their [SEP]; a window holds
    ``[CLS]`` and utterances ``first:end`` (cut only when a single utterance is too long),
    and utterances ``first_target:end`` are new. Pure; see the module docstring.
    """
    budget = max_len - 1  # room after [CLS]
    n = len(utt_lens)
    csum = np.concatenate([[0], np.cumsum(utt_lens, dtype=np.int64)])
    span = lambda a, b: int(csum[b] - csum[a])  # tokens of utterances a:b
    out: list[tuple[int, int, int]] = []
    first = new = 0
    while new < n:
        end = new + 1  # always at least one new utterance, even one that must be cut
        while end < n and span(first, end + 1) <= budget:
            end += 1
        out.append((first, new, end))
        new = end
        if new == n:
            break
        # Context for the next window: the latest utterances before `new`, at most half the
        # budget, so that a long dialogue costs at most about twice its length.
        first = new
        while (first > 0 and span(first - 1, new) <= budget // 2
               and span(first - 1, new + 1) <= budget):
            first -= 1
    return out


@dataclass
class WindowTable:
    """All windows of a set of dialogues, as parallel arrays (token offsets are relative to
    the dialogue, whose [CLS] is at 0)."""
    dialogue: np.ndarray   # int64: store index of the dialogue
    start: np.ndarray      # first content token (the first utterance's first token)
    target: np.ndarray     # first target token (window tokens before it are context)
    end: np.ndarray        # one past the last token
    first_utt: np.ndarray  # index of the window's first utterance (for speakers)
    max_len: int
    loss_on: str

    def __len__(self) -> int:
        return len(self.dialogue)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens in each window, [CLS] included."""
        return np.minimum(1 + self.end - self.start, self.max_len)

    @property
    def n_targets(self) -> np.ndarray:
        return self.lengths - 1 - (self.target - self.start)

    @property
    def cut_tokens(self) -> np.ndarray:
        """Tokens each window loses because a single utterance exceeds max_len - 1."""
        return np.maximum(0, 1 + self.end - self.start - self.max_len)


def build_windows(store: TokenStore, indices, max_len: int,
                  loss_on: str = "all") -> WindowTable:
    """Windows of the dialogues `indices`, dropping windows with no target token (a
    one-utterance dialogue under --loss_on response teaches nothing)."""
    if max_len < 4:
        raise ChitchatError(f"--max_len must be at least 4, got {max_len}")
    idx = np.asarray(indices, dtype=np.int64)
    off = np.asarray(store.dialogue_offsets)
    du = np.asarray(store.dialogue_utterances)
    ends = np.asarray(store.utterance_ends)
    lens = off[idx + 1] - off[idx]
    fits = lens <= max_len
    cols = {k: [] for k in ("dialogue", "start", "target", "end", "first_utt")}

    # Most dialogues fit: one window each, vectorised.
    short = idx[fits]
    first_sep = ends[du[short]] - off[short]  # one past the first utterance's [SEP]
    cols["dialogue"].append(short)
    cols["start"].append(np.ones_like(short))
    cols["target"].append(first_sep if loss_on == "response" else np.ones_like(short))
    cols["end"].append(lens[fits])
    cols["first_utt"].append(np.zeros_like(short))

    rows = []
    for i in idx[~fits]:
        u_ends = ends[du[i]:du[i + 1]] - off[i]
        u_starts = np.concatenate([[1], u_ends[:-1]])
        for first, new, end in utterance_windows(u_ends - u_starts, max_len):
            tgt = max(new, 1) if loss_on == "response" else new
            rows.append((i, u_starts[first], u_starts[tgt] if tgt < end else u_ends[end - 1],
                         u_ends[end - 1], first))
    if rows:
        r = np.asarray(rows, dtype=np.int64)
        for k, name in enumerate(cols):
            cols[name].append(r[:, k])
    table = WindowTable(**{k: np.concatenate(v).astype(np.int64) for k, v in cols.items()},
                        max_len=max_len, loss_on=loss_on)
    keep = table.n_targets > 0
    # Dialogue order, so the table does not depend on which dialogues were long.
    order = np.lexsort((table.start[keep], table.dialogue[keep]))
    return WindowTable(**{k: getattr(table, k)[keep][order] for k in cols},
                       max_len=max_len, loss_on=loss_on)


def window_example(store: TokenStore, table: WindowTable, w: int,
                   speaker_ids: tuple[int, int] | None = None):
    """Materialise window `w`: (ids, is_target, token_types or None) as int64/bool arrays."""
    d, s, t, e = (int(table.dialogue[w]), int(table.start[w]), int(table.target[w]),
                  int(table.end[w]))
    dia = store.dialogue(d)
    ids = np.concatenate([dia[:1], dia[s:e]]).astype(np.int64)
    is_target = np.zeros(len(ids), dtype=bool)
    is_target[1 + t - s:] = True
    types = None
    if speaker_ids is not None:
        spans = store.utterance_spans(d)
        first = int(table.first_utt[w])
        in_window = [b - a for a, b in spans[first:] if b <= e]
        types = speaker_token_types(in_window, first, speaker_ids)
    L = table.max_len
    if len(ids) > L:  # a single over-long utterance: keep its head and its [SEP]
        ids = np.concatenate([ids[:L - 1], ids[-1:]])
        is_target = np.concatenate([is_target[:L - 1], is_target[-1:]])
        if types is not None:
            types = types[:L]
    return ids, is_target, types


def pack_rows(order, lengths, row_len: int, open_rows: int = 32) -> list[list[int]]:
    """Pack windows (taken in `order`) into rows of at most `row_len` tokens.

    First fit over a bounded set of open rows: close to optimal fill for chat-length
    windows, linear time, and it keeps the shuffled order mostly intact (a row is emitted
    when it is the oldest open one and a new row is needed). Pure and deterministic.
    """
    rows: list[list[int]] = []
    open_: list[list] = []  # [room, [window, ...]]
    for w in order:
        n = int(lengths[w])
        if n > row_len:
            raise ValueError(f"window of {n} tokens does not fit a row of {row_len}")
        for r in open_:
            if r[0] >= n:
                r[0] -= n
                r[1].append(int(w))
                break
        else:
            if len(open_) == open_rows:
                rows.append(open_.pop(0)[1])
            open_.append([row_len - n, [int(w)]])
    rows.extend(r[1] for r in open_)
    return rows


@dataclass
class StepPlan:
    """The data of one optimizer step: micro-batches (lists of rows, each a list of
    windows) for every rank, and the target count over all of them (the loss divisor)."""
    micro: list[list[list[list[int]]]]  # [rank][micro][row] -> windows
    n_targets: int


def epoch_rows(table: WindowTable, epoch: int, seed: int, batching: str, row_len: int,
               shuffle: bool = True) -> list[list[int]]:
    """Rows of one epoch: a seeded shuffle (the same on every rank and on resume), then
    packing (``pack``) or one window per row (``pad``, GPT2-chitchat's batches)."""
    n = len(table)
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
             else np.arange(n))
    if batching == "pad":
        return [[int(w)] for w in order]
    return pack_rows(order, table.lengths, row_len)


def plan_steps(rows: list[list[int]], table: WindowTable, batch_size: int, accum: int,
               world: int) -> list[StepPlan]:
    """Group rows into optimizer steps of ``batch_size * accum * world`` rows; micro-batch
    m of a step goes to rank ``m % world``. The last, short step is spread evenly; a rank
    left with an empty micro-batch gets an empty list (the collator pads it to one row with
    no target) so that every rank runs the same number of forward/backward passes."""
    n_tg = table.n_targets
    per_step = batch_size * accum * world
    n_micro = accum * world
    steps = []
    for s in range(0, len(rows), per_step):
        chunk = rows[s:s + per_step]
        if len(chunk) == per_step:
            micro = [chunk[m * batch_size:(m + 1) * batch_size] for m in range(n_micro)]
        else:
            micro = [chunk[m::n_micro] for m in range(n_micro)]
        by_rank = [[micro[a * world + r] for a in range(accum)] for r in range(world)]
        n = int(sum(n_tg[w] for row in chunk for w in row))
        steps.append(StepPlan(by_rank, n))
    return steps


def collate_rows(store: TokenStore, table: WindowTable, rows: list[list[int]],
                 pad_id: int, row_len: int | None = None,
                 speaker_ids: tuple[int, int] | None = None) -> dict:
    """Tensors for one micro-batch (rows of packed windows).

    input_ids, position_ids, token_type_ids: (B, T); position ids restart at 0 on every
    window. attention_mask: (B, 1, T, T) bool, True where a query may attend a key: causal
    and within the same window (block-diagonal), so packed windows never see each other.
    Padding forms its own block. target_pos: flat indices into B*T of the positions whose
    next token is a target, target_ids: those next tokens; only these are fed to the LM
    head. n_tokens: real (non-pad) tokens, an int.
    """
    import torch

    if not rows:
        rows = [[]]
    lens = [sum(int(table.lengths[w]) for w in row) for row in rows]
    T = row_len or max(max(lens), 2)
    B = len(rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    seg = np.full((B, T), -1, dtype=np.int64)
    nxt = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    types = np.zeros((B, T), dtype=np.int64) if speaker_ids is not None else None
    for b, row in enumerate(rows):
        p = 0
        for k, w in enumerate(row):
            x, is_t, tt = window_example(store, table, w, speaker_ids)
            n = len(x)
            ids[b, p:p + n] = x
            pos[b, p:p + n] = np.arange(n)
            seg[b, p:p + n] = k
            # position j predicts token j+1 of the same window
            nxt[b, p:p + n - 1] = np.where(is_t[1:], x[1:], IGNORE_INDEX)
            if tt is not None:
                types[b, p:p + n] = tt
            p += n
        seg[b, p:] = len(row)  # padding: one block of its own (no all-masked query rows)
        if types is not None:
            types[b, p:] = speaker_ids[0]
    ids_t = torch.from_numpy(ids)
    seg_t = torch.from_numpy(seg)
    causal = torch.ones(T, T, dtype=torch.bool).tril_()
    mask = (seg_t[:, :, None] == seg_t[:, None, :]) & causal  # (B, T, T)
    flat = nxt.reshape(-1)
    tpos = np.flatnonzero(flat != IGNORE_INDEX)
    out = {
        "input_ids": ids_t,
        "position_ids": torch.from_numpy(pos),
        "attention_mask": mask[:, None],
        "target_pos": torch.from_numpy(tpos),
        "target_ids": torch.from_numpy(flat[tpos]),
    }
    if types is not None:
        out["token_type_ids"] = torch.from_numpy(types)
    out["n_tokens"] = int(sum(lens))
    return out
