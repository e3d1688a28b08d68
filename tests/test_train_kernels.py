"""Cheap dropout and the fused GELU: same rates, same functions, nothing saved changes."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from chitchat.train_kernels import (ATTENTION, Q_BLOCK, CheapDropout, attention_blocks,
                                    cheap_dropout_attention, drop_rate, fuse_gelu,
                                    install_cheap_dropout, keep_mask, pick_dropout,
                                    query_block)


def tiny_gpt2(pdrop=0.1, n_layer=2):
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=64, n_layer=n_layer, n_head=4,
                     resid_pdrop=pdrop, embd_pdrop=pdrop, attn_pdrop=pdrop,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def test_pick_dropout():
    assert pick_dropout("auto", "cpu") == "cheap"
    assert pick_dropout("auto", "cuda") == "native"
    assert pick_dropout("native", "cpu") == "native"
    assert pick_dropout("cheap", "cuda") == "cheap"


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_keep_mask_drops_at_the_rate_in_every_lane(p):
    torch.manual_seed(3)
    n = 1 << 20
    m = keep_mask((n,), p, torch.float32, "cpu")
    rate = drop_rate(p)
    assert abs(rate - p) <= 1 / 65536
    assert m.unique().tolist() == pytest.approx([0.0, 1 / (1 - rate)])
    tol = 5 * (p * (1 - p) / (n / 4)) ** 0.5
    # each element takes 16 bits of a 64-bit draw: every one of the four lanes must be fair
    # (random_() without a range leaves the top bit 0, which would make one lane never drop)
    for lane in range(4):
        assert abs(float((m[lane::4] == 0).double().mean()) - p) < tol
    assert abs(float(m.double().mean()) - 1.0) < 5 * tol  # unbiased: E[mask] = 1
    # neighbours are independent: P(both dropped) = p^2
    both = float(((m[:-1] == 0) & (m[1:] == 0)).double().mean())
    assert abs(both - p * p) < tol


def test_keep_mask_replays_with_the_seed_and_differs_without():
    torch.manual_seed(7)
    a = keep_mask((3, 5, 7), 0.3, torch.bfloat16, "cpu")
    b = keep_mask((3, 5, 7), 0.3, torch.bfloat16, "cpu")
    torch.manual_seed(7)
    assert torch.equal(a, keep_mask((3, 5, 7), 0.3, torch.bfloat16, "cpu"))
    assert not torch.equal(a, b)
    assert a.dtype == torch.bfloat16 and a.shape == (3, 5, 7)


def test_cheap_dropout_forward_backward_and_eval():
    d = CheapDropout(0.2)
    x = torch.randn(4, 64, requires_grad=True)
    torch.manual_seed(1)
    y = d(x)
    torch.manual_seed(1)
    m = keep_mask(x.shape, 0.2, x.dtype, "cpu")
    assert torch.equal(y, x * m)
    y.sum().backward()
    assert torch.equal(x.grad, m)
    d.eval()
    assert d(x) is x
    assert CheapDropout(0.0)(x) is x


def _reference_attention(q, k, v, mask, p, seed, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = scores.softmax(-1)
    torch.manual_seed(seed)
    probs = probs * keep_mask(probs.shape, p, probs.dtype, "cpu")
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("kind", ["bool", "float", "none"])
def test_attention_with_dropout_is_softmax_masked_dropped(kind):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    block = causal.clone()
    block[3:, :3] = False  # two packed dialogues in one row
    mask = {"bool": block[None, None].expand(2, 1, 6, 6),
            "float": torch.zeros(6, 6).masked_fill(~block, -1e9)[None, None],
            "none": None}[kind]
    module = torch.nn.Module()
    module.is_causal = True
    torch.manual_seed(5)
    out, weights = cheap_dropout_attention(module, q, k, v, mask, dropout=0.3, scaling=0.2)
    ref_mask = causal if kind == "none" else mask
    ref = _reference_attention(q, k, v, ref_mask, 0.3, 5, 0.2)
    assert weights is None
    assert torch.allclose(out, ref, atol=1e-6)
    # the second dialogue never sees the first, dropout or not
    if kind != "none":
        v2 = v.clone()
        v2[..., :3, :] += 100.0
        torch.manual_seed(5)
        out2, _ = cheap_dropout_attention(module, q, k, v2, mask, dropout=0.3, scaling=0.2)
        assert torch.allclose(out2[:, 3:], out[:, 3:], atol=1e-5)


def test_attention_without_dropout_is_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = cheap_dropout_attention(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6)


def packed_mask(lengths_per_row, t):
    """(B, 1, t, t) bool: causal attention within consecutive windows of the given lengths
    (the rest of a row, padding, one window of its own), as collate_rows builds it."""
    seg = torch.empty(len(lengths_per_row), t, dtype=torch.long)
    for b, lengths in enumerate(lengths_per_row):
        cuts = torch.tensor(lengths + [t - sum(lengths)])
        seg[b] = torch.repeat_interleave(torch.arange(len(cuts)), cuts)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def test_attention_blocks_hold_every_visible_key_and_no_more():
    t = 300
    mask = packed_mask([[40, 90, 70, 60], [150, 100, 30], [20] * 14], t)
    spans = attention_blocks(mask, 100)
    assert [(q0, q1) for q0, q1, _, _ in spans] == [(0, 100), (100, 200), (200, 300)]
    for q0, q1, k0, k1 in spans:
        rows = mask[..., q0:q1, :]
        assert not rows[..., :k0].any() and not rows[..., k1:].any()  # nothing visible left out
        assert rows[..., k0].any() and rows[..., k1 - 1].any()  # and the span is tight
    # the second block (queries 100-199) reaches back to key 0 through row 1's first window
    # (0-149); the third to key 150, where row 1's second window starts
    assert spans[1][2:] == (0, 200) and spans[2][2:] == (150, 300)
    # a query that sees nothing (no such row comes from collate_rows) gets every key
    blind = mask.clone()
    blind[1, 0, 250] = False
    assert attention_blocks(blind, 100)[2][2:] == (0, t)
    assert len(attention_blocks(mask)) == -(-t // Q_BLOCK)
    assert query_block(300) == Q_BLOCK and query_block(2 * Q_BLOCK) == 2 * Q_BLOCK
    assert attention_blocks(torch.ones(5, 7, dtype=torch.bool).tril(2), block=2) == [
        (0, 2, 0, 4), (2, 4, 0, 6), (4, 5, 0, 7)]


def _attention_and_grads(q, k, v, mask, p, seed):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    module = torch.nn.Module()
    module.is_causal = True
    torch.manual_seed(seed)
    out, _ = cheap_dropout_attention(module, q, k, v, mask, dropout=p, scaling=0.125)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return out, q.grad, k.grad, v.grad


def test_blocked_attention_is_the_unblocked_function():
    """Rows long enough for blocks: the same outputs and gradients as one softmax over every
    key, with no key dropped (p below the masks' resolution keeps everything, so the path
    taken is the blocked one with dropout on), and packed windows isolated with dropout on."""
    torch.manual_seed(0)
    t = 300
    assert t > 2 * Q_BLOCK
    q, k, v = torch.randn(3, 2, 4, t, 16).unbind(0)
    mask = packed_mask([[40, 90, 70, 60], [150, 100, 30]], t)
    assert drop_rate(1e-6) == 0.0
    got = _attention_and_grads(q, k, v, mask, 1e-6, 1)
    q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
    ref = _reference_attention(q_, k_, v_, mask, 1e-6, 1, 0.125)
    ref.backward(torch.linspace(-1, 1, ref.numel()).view(ref.shape))
    for a, b in zip(got, (ref, q_.grad, k_.grad, v_.grad)):
        assert torch.allclose(a, b, atol=1e-5)
    # with dropout: row 0's third window (positions 130-199) sees nothing of its first two,
    # though its first queries' block computes scores against keys from 0 on (for row 1)
    out = _attention_and_grads(q, k, v, mask, 0.3, 7)[0]
    v2 = v.clone()
    v2[0, :, :130] += 100.0
    out2 = _attention_and_grads(q, k, v2, mask, 0.3, 7)[0]
    assert torch.equal(out2[0, 130:], out[0, 130:]) and torch.equal(out2[1], out[1])
    assert not torch.allclose(out2[0, :130], out[0, :130])
    # a mask broadcast over the queries (keys hidden from every query) stays whole
    keys = torch.ones(2, 1, 1, t, dtype=torch.bool)
    keys[:, :, :, 10:20] = False
    got_keys = _attention_and_grads(q, k, v, keys, 1e-6, 1)[0]
    assert torch.allclose(got_keys, _reference_attention(q, k, v, keys, 1e-6, 1, 0.125),
                          atol=1e-5)
    # a mask changed in place after a call is read again, not taken from the last call
    mask[1, 0, 200:, :200] = True
    again = _attention_and_grads(q, k, v, mask, 1e-6, 1)[0]
    ref = _reference_attention(q, k, v, mask, 1e-6, 1, 0.125)
    assert torch.allclose(again, ref, atol=1e-5) and not torch.allclose(again, got[0])


def test_install_changes_training_masks_only_and_nothing_saved(tmp_path):
    ids = torch.randint(3, 50, (2, 12))
    plain = tiny_gpt2()
    plain.eval()
    with torch.no_grad():
        before = plain(ids).logits
    model = tiny_gpt2()
    n = install_cheap_dropout(model)
    assert n == 1 + 3 * model.config.n_layer
    assert model.config._attn_implementation == ATTENTION
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
    # training draws masks: different logits, replayed exactly by the seed
    model.train()
    torch.manual_seed(11)
    a = model(ids, labels=ids).loss
    torch.manual_seed(11)
    assert float(model(ids, labels=ids).loss.detach()) == float(a.detach())
    model.eval()
    with torch.no_grad():
        assert abs(float(a.detach()) - float(model(ids, labels=ids).loss)) > 1e-6
    model.train()
    a.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
    # the saved folder is a plain GPT-2: transformers loads it on its own attention
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert ATTENTION not in json.dumps(saved)
    again = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert again.config._attn_implementation == "sdpa"
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, before, atol=1e-5)


def test_zero_dropout_trains_exactly_as_native():
    ids = torch.randint(3, 50, (2, 12))
    native, cheap = tiny_gpt2(0.0), tiny_gpt2(0.0)
    install_cheap_dropout(cheap)
    native.train(), cheap.train()
    assert torch.allclose(native(ids, labels=ids).loss, cheap(ids, labels=ids).loss,
                          atol=1e-6)


def test_fuse_gelu_is_the_same_function():
    ids = torch.randint(3, 50, (2, 12))
    model = tiny_gpt2(0.0)
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    assert fuse_gelu(model)
    assert not fuse_gelu(model)  # nothing left to swap
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
