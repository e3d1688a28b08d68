"""Decoding rules against transformers' own processors, the decoding loop, and the fast
backend's logits against transformers' GPT-2."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    LogitsProcessorList, NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper)

from chitchat.config import DecodingOptions
from chitchat.generation import beam_search, decode, decode_one
from chitchat.sampling import (
    Constraints, apply_repetition_penalty, apply_temperature, choose_tokens, ngram_bans,
    phrase_bans, process_logits, sampling_distribution, top_k_filter, top_p_filter,
    warp_logits)
from chitchat.backends import DecodeState, FastGPT2, HFDecoder, conv1d_to_linear, quantize_int8
from chitchat.utils import ChitchatError

V = 500
SEP = 3


def kept(x: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(r).nonzero().view(-1).tolist()) for r in x]


# ---- pure functions vs transformers -----------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("t,k,p", [(1.0, 8, 0.0), (0.7, 0, 0.9), (1.3, 50, 0.8),
                                   (1.0, 5, 0.95), (0.5, 100, 0.3), (2.0, 0, 0.5)])
def test_warpers_keep_exactly_transformers_sets(seed, t, k, p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, V, generator=g) * 3
    ours = warp_logits(logits, DecodingOptions(temperature=t, topk=k, topp=p))
    procs = [TemperatureLogitsWarper(t)]
    if k:
        procs.append(TopKLogitsWarper(k))
    if p:
        procs.append(TopPLogitsWarper(p))
    ref = LogitsProcessorList(procs)(None, logits.clone())
    assert kept(ours) == kept(ref)
    torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


@pytest.mark.parametrize("seed", range(10))
def test_top_k_and_top_p_alone_match(seed):
    g = torch.Generator().manual_seed(100 + seed)
    logits = torch.randn(4, V, generator=g) * 2
    for k in (1, 3, 40):
        assert kept(top_k_filter(logits, k)) == kept(TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        assert kept(top_p_filter(logits, p)) == kept(TopPLogitsWarper(p)(None, logits.clone()))


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    assert kept(top_k_filter(logits, 2)) == kept(TopKLogitsWarper(2)(None, logits.clone())) \
        == [{0, 1, 2, 3}]


@pytest.mark.parametrize("seed", range(20))
def test_sampler_draws_from_exactly_the_warped_distribution(seed):
    """The fast sampler (top-k survivors only) uses the same support and probabilities."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, V, generator=g) * 2
    for t, k, p in [(1.0, 8, 0.0), (0.8, 20, 0.9), (1.2, 3, 0.5), (1.0, 0, 0.9)]:
        opts = DecodingOptions(temperature=t, topk=k, topp=p)
        idx, probs = sampling_distribution(logits, opts)
        ref = warp_logits(logits, opts).softmax(-1)
        full = torch.zeros_like(ref)
        if idx is None:
            full = probs
        else:
            full.scatter_(-1, idx, probs)
        assert [set(r.nonzero().view(-1).tolist()) for r in full] == kept(warp_logits(logits, opts))
        torch.testing.assert_close(full / full.sum(-1, keepdim=True), ref)


def test_repetition_penalty_sign_rule_matches_transformers():
    logits = torch.tensor([[2.0, -2.0, 0.5, -0.5, 1.0, 0.0]])
    prev = torch.tensor([[0, 1, 2, 3]])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, prev[0]] = True
    ours = apply_repetition_penalty(logits, seen, 2.0)
    ref = RepetitionPenaltyLogitsProcessor(2.0)(prev, logits.clone())
    torch.testing.assert_close(ours, ref)
    assert ours.tolist() == [[1.0, -4.0, 0.25, -1.0, 1.0, 0.0]]
    # Every penalised logit goes down, whatever its sign; GPT2-chitchat's plain division
    # raised the negative ones.
    assert (ours[0, :4] < logits[0, :4]).all()
    assert (logits[0, [1, 3]] / 2.0 > logits[0, [1, 3]]).all()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_bans_match_transformers(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(20):
        seq = torch.randint(0, 6, (12,), generator=g).tolist()
        ref = NoRepeatNGramLogitsProcessor(n)(torch.tensor([seq]), torch.zeros(1, 6))
        assert set(ngram_bans(seq, n)) == set(torch.isinf(ref[0]).nonzero().view(-1).tolist())


def test_phrase_bans_match_transformers():
    phrases = [[1, 2], [3, 4, 5], [2, 2]]
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        seq = torch.randint(0, 6, (8,), generator=g).tolist()
        ref = NoBadWordsLogitsProcessor(phrases, eos_token_id=None)(torch.tensor([seq]),
                                                                    torch.zeros(1, 6))
        assert set(phrase_bans(seq, phrases)) == set(torch.isinf(ref[0]).nonzero().view(-1).tolist())


@pytest.mark.parametrize("t", [1e-39, 1e-40, 1e-50, 0.0])
@pytest.mark.parametrize("k,p", [(0, 0.0), (8, 0.0), (8, 0.9), (1, 0.0)])
def test_a_vanishing_temperature_decodes_greedily_among_allowed_tokens(t, k, p):
    """logits / t overflows (inf - inf and -inf / tiny in the softmax are NaN): the limit
    of a shrinking temperature is the argmax of the allowed tokens, never a banned one."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 3
    logits[1] -= 50  # every logit negative: all of them would underflow to -inf
    logits[2, [1, 2, 4]] = 99.0  # the model's favourites are banned
    logits[3, 5] = 0.0  # exactly 0: 0 / (a temperature that is 0 in float32) is NaN
    opts = DecodingOptions(temperature=t, topk=k, topp=p)
    processed = process_logits(logits, [[]] * 4, 1, opts, CONS)
    best = processed.argmax(dim=-1)
    assert kept(warp_logits(processed, opts)) == [{int(b)} for b in best]
    for seed in range(3):
        picked = choose_tokens(processed, opts, torch.Generator().manual_seed(seed))
        assert picked.tolist() == best.tolist()
        assert not {0, 1, 2, 4} & set(picked.tolist())


@pytest.mark.parametrize("cheap_reads", [True, False])  # False: a GPU's sync-free form
def test_a_small_temperature_that_stays_finite_is_left_alone(monkeypatch, cheap_reads):
    monkeypatch.setattr("chitchat.sampling.host_reads_are_cheap", lambda device: cheap_reads)
    logits = torch.tensor([[5.0, 4.9, -1e38, float("-inf")], [1.0, 0.0, 0.0, 0.0]])
    out = apply_temperature(logits, 0.1)
    torch.testing.assert_close(out, logits / 0.1)
    assert kept(out)[0] == {0, 1}  # -1e38 / 0.1 is -inf: zero probability, as it should be
    broken = apply_temperature(logits, 1e-40)  # overflows: greedy, on either path
    assert kept(broken) == [{0}, {0}]


def test_an_infinite_temperature_is_uniform_over_allowed_tokens_and_rejected_as_an_option():
    logits = torch.tensor([[3.0, float("-inf"), -2.0, 0.5]])
    assert apply_temperature(logits, float("inf")).tolist() == [[0.0, float("-inf"), 0.0, 0.0]]
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ChitchatError, match="--temperature must be a finite number"):
            DecodingOptions(temperature=bad)


# ---- the loop on a scripted backend -----------------------------------------------------------
class Scripted:
    """A backend whose logits come from `fn(row, step)`, `row` being the caller's row however
    the batch is reordered; records what it was fed."""

    def __init__(self, fn, n_positions=64):
        self.fn, self.n_positions, self.vocab_size = fn, n_positions, V
        self.device = torch.device("cpu")
        self.max_length = 0
        self.batch_sizes = []  # rows fed per step

    def _logits(self, state):
        start, rows = state.cache
        return torch.stack([self.fn(b, state.length - start) for b in rows])

    def start(self, contexts, token_types=None, reply_types=None, capacity=None):
        L = max(len(c) for c in contexts)
        st = DecodeState(length=L, pad=torch.tensor([L - len(c) for c in contexts]),
                         key_mask=None, cache=(L, list(range(len(contexts)))))
        self.max_length = max(self.max_length, st.length)
        return st, self._logits(st)

    def step(self, state, tokens):
        assert len(tokens) == len(state.cache[1])
        self.batch_sizes.append(len(tokens))
        state.length += 1
        self.max_length = max(self.max_length, state.length)
        return self._logits(state)

    def reorder(self, state, index):
        state.pad = state.pad.index_select(0, index)
        start, rows = state.cache
        state.cache = (start, [rows[i] for i in index.tolist()])


def peaked(token):
    x = torch.zeros(V)
    x[token] = 20.0
    return x


CONS = Constraints.build(V, SEP, banned_ids=[0, 1, 2, 4])


def test_banned_ids_are_never_emitted():
    # The model wants token 1 ([UNK]-like) most, then 2, then 4: all banned.
    def fn(b, step):
        x = torch.randn(V) * 0.1
        x[[1, 2, 4]] = torch.tensor([30.0, 29.0, 28.0])
        x[SEP] = -50
        return x
    opts = DecodingOptions(max_new_tokens=30, topk=0, temperature=1.0, seed=0)
    for greedy in (True, False):
        toks = list(decode_one(Scripted(fn), [5, 6], DecodingOptions(**{**vars(opts),
                                                                        "greedy": greedy}),
                               CONS, torch.Generator().manual_seed(0)))
        assert len(toks) == 30 and not {0, 1, 2, 4} & set(toks)


def test_bad_word_phrases_are_banned_as_ngram_completions():
    # The model wants to say 10 11 12 10 11 12 ...; the phrase (11, 12) is banned.
    cons = Constraints.build(V, SEP, banned_ids=[0], phrases=[[11, 12], [13]])
    fn = lambda b, step: peaked([10, 11, 12][step % 3]) + peaked(13) * 0.9
    toks = list(decode_one(Scripted(fn), [5], DecodingOptions(max_new_tokens=6, greedy=True), cons))
    assert 13 not in toks
    assert all(not (a == 11 and b == 12) for a, b in zip(toks, toks[1:]))


def test_stops_at_sep_and_at_max_len():
    fn = lambda b, step: peaked(SEP if step == 3 else 7 + step)
    assert list(decode_one(Scripted(fn), [5], DecodingOptions(max_new_tokens=10, greedy=True),
                           CONS)) == [7, 8, 9]
    assert list(decode_one(Scripted(fn), [5], DecodingOptions(max_new_tokens=2, greedy=True),
                           CONS)) == [7, 8]


def test_min_len_suppresses_sep():
    fn = lambda b, step: peaked(SEP) + peaked(9) * 0.5
    toks = list(decode_one(Scripted(fn), [5], DecodingOptions(max_new_tokens=10, min_len=4,
                                                               greedy=True), CONS))
    assert toks == [9, 9, 9, 9]


def test_batch_rows_stop_independently():
    # Row b says [SEP] at step b + 1.
    fn = lambda b, step: peaked(SEP if step == b + 1 else 20 + b)
    steps = list(decode(Scripted(fn), [[5], [5, 6], [7]], DecodingOptions(max_new_tokens=10,
                                                                          greedy=True), CONS,
                        scores=True))
    rows = list(zip(*[s.tokens for s in steps]))
    assert len(steps) == 4  # the last row ends at step 3
    assert rows == [(20, SEP, None, None), (21, 21, SEP, None), (22, 22, 22, SEP)]
    assert steps[1].logprobs[2] is not None and steps[2].logprobs[0] is None


def test_the_batch_shrinks_to_the_rows_still_going():
    # Row b says [SEP] at step b + 1; 8 rows. After step 4, rows 0-3 are done (half): the
    # batch drops to 4; after step 6 to 2; after step 7 to 1. Every row's tokens stay its own.
    fn = lambda b, step: peaked(SEP if step == b + 1 else 20 + b + step)
    ctxs = [[5]] * 8
    be = Scripted(fn)
    steps = list(decode(be, ctxs, DecodingOptions(max_new_tokens=12, greedy=True,
                                                  repetition_penalty=1.3), CONS, scores=True))
    rows = [[t for t in r if t is not None] for r in zip(*[s.tokens for s in steps])]
    assert rows == [[20 + b + k for k in range(b + 1)] + [SEP] for b in range(8)]
    assert be.batch_sizes == [8, 8, 8, 8, 4, 4, 2, 1]
    for k, s in enumerate(steps):  # a score for exactly the rows that said something
        assert [lp is not None for lp in s.logprobs] == [t is not None for t in s.tokens]


def test_repetition_penalty_applies_to_the_reply_only():
    # Equal preference for 7 and 8; once 7 is said, the penalty must move to 8.
    fn = lambda b, step: peaked(7) + peaked(8) * 0.999
    opts = DecodingOptions(max_new_tokens=3, greedy=True, repetition_penalty=1.5)
    assert list(decode_one(Scripted(fn), [7, 7, 7], opts, CONS))[:2] == [7, 8]


def test_budget_is_checked_before_decoding():
    with pytest.raises(ChitchatError, match="n_positions"):
        list(decode_one(Scripted(lambda b, s: peaked(7), n_positions=10), list(range(5, 13)),
                        DecodingOptions(max_new_tokens=4), CONS))


def test_the_last_position_fed_stays_below_n_positions():
    be = Scripted(lambda b, s: peaked(7), n_positions=10)
    toks = list(decode_one(be, list(range(5, 12)), DecodingOptions(max_new_tokens=4, greedy=True),
                           CONS))
    assert len(toks) == 4 and be.max_length <= 10


class Tree(Scripted):
    """Step 0: 7 (more likely) or 8. After 7 the model is unsure (10 flat choices), after 8
    it is sure (8 9 [SEP]): greedy takes 7, beam search finds 8 9."""

    def __init__(self):
        super().__init__(None)

    def start(self, contexts, token_types=None, reply_types=None, capacity=None):
        st = DecodeState(length=len(contexts[0]), pad=torch.zeros(1, dtype=torch.long),
                         key_mask=None, cache=0)
        return st, self.dist(torch.tensor([-1]))

    def step(self, state, tokens):
        state.length += 1
        return self.dist(tokens)

    def reorder(self, state, index):
        state.pad = state.pad.index_select(0, index)

    @staticmethod
    def dist(last):
        rows = []
        for t in last.tolist():
            x = torch.full((V,), -30.0)
            if t == -1:
                x[7], x[8] = 2.0, 1.8
            elif t == 7:
                x[10:20] = 0.0
            elif t == 8:
                x[9] = 10.0
            else:
                x[SEP] = 10.0
            rows.append(x)
        return torch.stack(rows)


def test_beam_search_finds_the_better_sequence_greedy_misses():
    greedy = list(decode_one(Tree(), [5], DecodingOptions(max_new_tokens=5, greedy=True), CONS))
    assert greedy[0] == 7
    assert beam_search(Tree(), [5], DecodingOptions(max_new_tokens=5, num_beams=3), CONS) == [8, 9]
    assert list(decode_one(Tree(), [5], DecodingOptions(max_new_tokens=5, num_beams=2),
                           CONS)) == [8, 9]


# ---- the fast backend against transformers --------------------------------------------------
def tiny_gpt2(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=2, eos_token_id=SEP, pad_token_id=0, **kw)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"scale_attn_by_inverse_layer_idx": True, "n_inner": 48},
                                {"activation_function": "relu"}])
def test_fast_logits_match_transformers(kw):
    model = tiny_gpt2(**kw)
    fast = FastGPT2(model)
    ctx = [2, 17, 30, 41, 3, 55, 66, 3]
    with torch.inference_mode():
        st, logits = fast.start([ctx])
        seq = list(ctx)
        for step in range(6):
            ref = model(torch.tensor([seq])).logits[:, -1]
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            nxt = int(ref.argmax())
            seq.append(nxt)
            logits = fast.step(st, torch.tensor([nxt]))


def test_padded_batch_rows_equal_single_rows():
    model = tiny_gpt2()
    ctxs = [[2, 17, 30, 3], [2, 5, 6, 7, 8, 9, 3], [2, 11, 3]]
    for be in (FastGPT2(model), HFDecoder(model)):
        with torch.inference_mode():
            st, lb = be.start(ctxs)
            toks = lb.argmax(-1)
            lb2 = be.step(st, toks)
            for i, c in enumerate(ctxs):
                s1, l1 = be.start([c])
                torch.testing.assert_close(lb[i:i + 1], l1, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(lb2[i:i + 1], be.step(s1, toks[i:i + 1]),
                                           rtol=1e-4, atol=1e-4)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="needs oneDNN (CPU)")


@pytest.fixture
def block_every_matrix(monkeypatch):
    """The tiny test models' matrices are below the size worth blocking: block them all."""
    import chitchat.backends.kernels as inference

    monkeypatch.setattr(inference, "_BLOCKED_MIN_WEIGHT", 0)


@needs_onednn
def test_only_matrices_worth_it_are_blocked():
    import chitchat.backends.kernels as inference

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=5000, n_positions=40, n_embd=128, n_layer=1, n_head=4)
    fast = FastGPT2(GPT2LMHeadModel(cfg).eval())
    fast.prepare(8)
    layer, head = fast.blocked[0][0], fast.blocked[1]
    assert head[0].is_mkldnn  # 5000 x 128 = 640k weights
    assert not any(layer[i][0].is_mkldnn for i in (2, 3, 6, 7))  # 128 wide: 16k-64k
    assert inference._BLOCKED_MIN_WEIGHT > 4 * 128 * 128


@needs_onednn
@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu"])  # fused, fused, not fused
def test_batches_of_two_rows_or_more_use_blocked_weights_with_the_same_logits(
        act, block_every_matrix):
    model = tiny_gpt2(activation_function=act)
    fast = FastGPT2(model)
    ctxs = [[2, 17, 30, 3], [2, 5, 6, 7, 8, 9, 3], [2, 11, 3], [2, 40, 41, 42, 3],
            [2, 60, 3]]
    with torch.inference_mode():
        s1, l1 = fast.start(ctxs[:1])
        assert fast.blocked is None  # one row: the plain weights, no second copy
        fast.start(ctxs[:2])
        assert fast.blocked[0][0][2][0].is_mkldnn and fast.blocked[1][0].is_mkldnn
        st, lb = fast.start(ctxs)
        toks = lb.argmax(-1)
        lb2 = fast.step(st, toks)
        for i, c in enumerate(ctxs):
            pos = torch.arange(len(c) + 1)[None]
            ref = model(torch.tensor([c + [int(toks[i])]]), position_ids=pos).logits[0]
            torch.testing.assert_close(lb[i], ref[-2], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lb2[i], ref[-1], rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("act", ["gelu_new", "gelu", "gelu_pytorch_tanh", "relu"])
def test_the_fused_mlp_activation_is_the_models_own(act, block_every_matrix):
    model = tiny_gpt2(activation_function=act)
    fast = FastGPT2(model)
    fast.prepare(8)
    # Inputs of order 1 and more, where GELU's erf and tanh forms differ by up to 5e-4.
    h = torch.linspace(-4, 4, 5 * 32).view(5, 32)
    w, b = fast.layers[0][6]
    with torch.no_grad():
        w.mul_(20)
    fast.blocked = None
    fast.prepare(8)
    with torch.inference_mode():
        got = fast._up(h, fast.blocked[0][0][6], fast._lin_blocked)
        ref = model.transformer.h[0].mlp.act(F.linear(h, w, b))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rows", [2, 5])
def test_hidden_and_project_match_transformers_under_right_padding(rows, block_every_matrix):
    model = tiny_gpt2()
    seqs = [[2, 17, 30, 41, 3, 55, 66, 3], [2, 5, 6, 3], [2, 9, 3, 8, 8, 3], [2, 7, 3],
            [2, 19, 20, 21, 22, 3]][:rows]
    ids = torch.zeros(rows, 8, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    for be in (FastGPT2(model), HFDecoder(model)):
        with torch.inference_mode():
            h = be.hidden(ids)
            logits = be.project(h.reshape(-1, h.shape[-1])).view(rows, 8, -1)
            for b, s in enumerate(seqs):
                ref = model(torch.tensor([s]), output_hidden_states=True)
                torch.testing.assert_close(h[b, :len(s)], ref.hidden_states[-1][0],
                                           rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(logits[b, :len(s)], ref.logits[0],
                                           rtol=1e-4, atol=1e-4)


def test_copies_decode_from_one_prefill():
    model = tiny_gpt2()
    opts = DecodingOptions(max_new_tokens=6, topk=0)
    cons = Constraints.build(V, SEP, [0, 1, 2])
    be = FastGPT2(model)
    steps = list(decode(be, [[2, 10, 11, 3]], opts, cons, torch.Generator().manual_seed(0),
                        copies=4))
    rows = [[t for t in r if t is not None] for r in zip(*[s.tokens for s in steps])]
    assert len(rows) == 4 and len({tuple(r) for r in rows}) > 1  # independent samples


def test_greedy_equals_transformers_generate():
    model = tiny_gpt2()
    ctx = [2, 17, 30, 41, 3]
    banned = [0, 1, 2, 5, 6]
    ours = list(decode_one(FastGPT2(model), ctx, DecodingOptions(max_new_tokens=12, min_len=0,
                                                                 greedy=True),
                           Constraints.build(V, SEP, banned)))
    out = model.generate(torch.tensor([ctx]), max_new_tokens=12, do_sample=False,
                         eos_token_id=SEP, pad_token_id=0, bad_words_ids=[[i] for i in banned])
    ref = out[0, len(ctx):].tolist()
    if SEP in ref:
        ref = ref[:ref.index(SEP)]
    assert ours == ref


def test_int8_is_converted_and_close():
    model = tiny_gpt2()
    q = quantize_int8(copy.deepcopy(model))
    assert not any(type(m).__name__ == "Conv1D" for m in q.modules())
    fast, hf, ref = FastGPT2(q), HFDecoder(q), FastGPT2(model)
    assert fast.int8 and fast.int8_head
    ctx = [[2, 17, 30, 41, 3, 8, 9]]
    with torch.inference_mode():
        lf, lh, lr = fast.start(ctx)[1], hf.start(ctx)[1], ref.start(ctx)[1]
    # Activations are quantized per call, so float rounding differences of 1e-7 between the
    # two paths can move a value across a quantization step: compare at that scale.
    torch.testing.assert_close(lf, lh, rtol=0, atol=2e-2)
    assert (lf - lr).abs().max() < 0.1 * lr.abs().max()


def test_conv1d_to_linear_keeps_the_function():
    model = tiny_gpt2()
    lin = conv1d_to_linear(copy.deepcopy(model))
    x = torch.tensor([[2, 17, 30, 41]])
    with torch.inference_mode():
        torch.testing.assert_close(lin(x).logits, model(x).logits)
