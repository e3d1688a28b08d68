"""Chat decoding speed: the same weights through every decoding path, measured in one run.

    python bench/bench_chat.py                        # small config, 5 repeats, ~2-4 minutes
    python bench/bench_chat.py --repeats 3 --threads 1
    python bench/bench_chat.py --quick                # 1 repeat, skips the slow baselines
    python bench/bench_chat.py --mmi                  # plain reply vs MMI with 8 candidates

Setup (issue 4): config/model_config_dialogue_small.json (10 layers, 768 wide, 81M
parameters), random init with a fixed seed, the GPT2-chitchat vocab (13,317 tokens) when
../shared has it, a context of about 45 tokens (3 utterances) and replies of exactly 25
tokens ([SEP] is suppressed until then), top-k 8 sampling.

Paths, interleaved round-robin so that a busy neighbour slows all of them alike:
  chitchat-loop   GPT2-chitchat's interact.py loop: full recompute per token, autograd on
  no-cache        the same loop under torch.inference_mode
  generate        transformers' generate() with its KV cache, fp32
  ours-fp32       Chatbot, the default (fast backend, static KV cache)
  ours-int8       Chatbot --quantize int8
  ours-hf         Chatbot --backend hf (transformers forward with our loop), for reference
  ours-bf16       Chatbot --dtype bfloat16 (--all only)
Also the floor: one fp32 matrix-vector product over every weight matrix.

--mmi (issue 5) times, in the same run, a plain reply (ours-fp32), the 8 candidates alone
(one batched decode, copies=8, with forward scores) and a whole MMI reply (candidates +
one batched reverse-model pass + reranking). Forward and reverse models are the same random
small-config weights; every reply and candidate is exactly 25 tokens. Target: MMI <= 2.5x.
With --model_path/--mmi_model_path/--data it times trained models instead, on real contexts,
each reply ending at its own [SEP] (an MMI reply then waits for its longest candidate):

    python bench/bench_chat.py --mmi --model_path model/fwd --mmi_model_path model/rev \
        --data valid.txt --dialogues 100

Reported per path: median time per reply, time to first token, ms per token after the first
(the decode rate), and the ratios the issue sets as targets.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HISTORY = ["你好，最近工作忙不忙？", "还行吧，每天加班到很晚，有点累。",
           "那要注意休息，周末一起去爬山吧！"]
REPLY_TOKENS = 25
TOPK = 8


def make_tokenizer():
    from chitchat.tokenization import ChatTokenizer

    shared = ROOT.parent / "shared" / "vocab" / "gpt2-chitchat-vocab.txt"
    if shared.is_file():
        return ChatTokenizer.from_vocab_file(shared), "gpt2-chitchat vocab"
    # Same size without ../shared: specials, then CJK characters.
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [chr(c) for c in range(0x4E00, 0x4E00 + 13317 - len(tokens))]
    return ChatTokenizer(tokens), "synthetic 13,317-token vocab"


def make_model(tok, config_path: Path, seed: int):
    from chitchat.modeling import build_model, load_config

    torch.manual_seed(seed)
    return build_model(load_config(config_path, tok)).eval()


# ---- the baselines --------------------------------------------------------------------------
def top_k_top_p_filtering(logits, top_k=0, top_p=0.0, filter_value=-float("Inf")):
    """GPT2-chitchat's filter, verbatim in behaviour (1-D logits, in place)."""
    top_k = min(top_k, logits.size(-1))
    if top_k > 0:
        indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
        logits[indices_to_remove] = filter_value
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        logits[sorted_indices[sorted_indices_to_remove]] = filter_value
    return logits


def chitchat_loop(model, tok, context, n):
    """GPT2-chitchat interact.py's inner loop (no KV cache); [SEP] held off for n tokens."""
    input_ids = torch.tensor([context])
    response, first = [], None
    t0 = time.perf_counter()
    for _ in range(n):
        outputs = model(input_ids=input_ids)
        next_token_logits = outputs.logits[0, -1, :]
        for i in set(response):
            next_token_logits[i] /= 1.0
        next_token_logits = next_token_logits / 1.0
        next_token_logits[tok.unk_id] = -float("Inf")
        next_token_logits[tok.sep_id] = -float("Inf")  # exactly n tokens
        filtered = top_k_top_p_filtering(next_token_logits, top_k=TOPK, top_p=0)
        next_token = torch.multinomial(F.softmax(filtered, dim=-1), num_samples=1)
        response.append(next_token.item())
        first = first or time.perf_counter() - t0
        input_ids = torch.cat((input_ids, next_token.unsqueeze(0)), dim=1)
    return first, time.perf_counter() - t0, len(response)


def no_cache_loop(model, tok, context, n):
    with torch.inference_mode():
        return chitchat_loop(model, tok, context, n)


def hf_generate(model, tok, context, n):
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.first = time.perf_counter() - t0

        def end(self):
            pass

    s = FirstToken()
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([context]), do_sample=True, top_k=TOPK, top_p=1.0,
                         temperature=1.0, max_new_tokens=n, min_new_tokens=n,
                         eos_token_id=tok.sep_id, pad_token_id=tok.pad_id,
                         bad_words_ids=[[i] for i in tok.banned_ids], streamer=s)
    return s.first, time.perf_counter() - t0, out.shape[1] - len(context)


def ours(bot):
    def run(model, tok, context, n):
        r = bot.generate(HISTORY, max_len=n, min_len=n)
        return r.first_token_s, r.total_s, len(r.token_ids)
    return run


def matvec_floor(model, repeats: int) -> float:
    """ms for one fp32 matrix-vector product over every weight matrix (incl. the LM head)."""
    mats = [m.weight.t().contiguous() for m in model.modules() if type(m).__name__ == "Conv1D"]
    mats.append(model.lm_head.weight)  # (out, in) layouts, as F.linear wants
    xs = [torch.randn(1, w.shape[1]) for w in mats]
    with torch.inference_mode():
        ts = []
        for _ in range(max(repeats, 5) + 2):
            t = time.perf_counter()
            for x, w in zip(xs, mats):
                F.linear(x, w)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def natural_lengths(args) -> int:
    """--mmi with trained models: replies end at their own [SEP], over real contexts."""
    from chitchat import Chatbot
    from chitchat.corpus import read_dialogues

    plain = Chatbot.from_pretrained(args.model_path, device="cpu", seed=args.seed)
    mmi = Chatbot.from_pretrained(args.model_path, device="cpu", seed=args.seed,
                                  mmi_model_path=args.mmi_model_path,
                                  num_candidates=args.num_candidates)
    histories = [d.utterances[:-1] for d in read_dialogues(args.data)
                 if len(d.utterances) >= 2][:args.dialogues]
    if not histories:
        raise SystemExit(f"{args.data}: no dialogue with 2 or more utterances")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model_path} "
          f"({plain.model.num_parameters() / 1e6:.1f}M parameters) + {args.mmi_model_path}; "
          f"{len(histories)} contexts from {args.data}", flush=True)
    times = {"plain": [], "mmi": []}
    lens = {"plain": [], "candidates (longest of N)": [], "mmi": []}
    plain.generate(histories[0])  # warm-up
    mmi.generate(histories[0])
    for h in histories:  # interleaved, so that load changes hit both alike
        r = plain.generate(h)
        times["plain"].append(r.total_s)
        lens["plain"].append(len(r.token_ids))
        r = mmi.generate(h)
        times["mmi"].append(r.total_s)
        lens["mmi"].append(len(r.token_ids))
        lens["candidates (longest of N)"].append(max(len(c.token_ids) for c in r.candidates))
    print("\n| path | median reply (ms) | total (s) | mean tokens |\n|---|---:|---:|---:|")
    for k in times:
        print(f"| {k} | {statistics.median(times[k]) * 1e3:.0f} | {sum(times[k]):.2f} | "
              f"{statistics.mean(lens[k]):.1f} |")
    print(f"| candidates (longest of {args.num_candidates}) | | | "
          f"{statistics.mean(lens['candidates (longest of N)']):.1f} |")
    print(f"\nmmi-{args.num_candidates} / plain, total time: "
          f"{sum(times['mmi']) / sum(times['plain']):.2f}x; median per context: "
          f"{statistics.median(m / p for m, p in zip(times['mmi'], times['plain'])):.2f}x")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "config" / "model_config_dialogue_small.json"))
    ap.add_argument("--repeats", type=int, default=5, help="timed replies per path")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="1 repeat, skip the two full-recompute loops")
    ap.add_argument("--all", action="store_true", help="also time bf16")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--mmi", action="store_true",
                    help="only time a plain reply against an MMI reply (and its candidates)")
    ap.add_argument("--num_candidates", type=int, default=8, help="MMI candidates (--mmi)")
    ap.add_argument("--model_path", help="--mmi with trained models and natural reply lengths: "
                    "the forward model (needs --mmi_model_path and --data)")
    ap.add_argument("--mmi_model_path", help="the reverse model (with --model_path)")
    ap.add_argument("--data", help="train.txt-style dialogues; each one's utterances before "
                    "the last are a context (with --model_path)")
    ap.add_argument("--dialogues", type=int, default=100, help="contexts (with --model_path)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_path:
        if not (args.mmi and args.mmi_model_path and args.data):
            ap.error("--model_path needs --mmi, --mmi_model_path and --data")
        return natural_lengths(args)
    if args.quick:
        args.repeats = 1

    from transformers.utils import logging as hf_logging

    from chitchat import Chatbot
    from chitchat.backends import quantize_int8

    hf_logging.set_verbosity_error()
    tok, vocab_note = make_tokenizer()
    model = make_model(tok, Path(args.config), args.seed)
    grad_model = copy.deepcopy(model)  # GPT2-chitchat's params require grad; ours never do
    for p in model.parameters():
        p.requires_grad_(False)
    bot32 = Chatbot(model, tok, topk=TOPK, seed=args.seed)
    context = bot32.context(HISTORY).ids
    paths = {}
    if args.mmi:
        from chitchat.backends import conv1d_to_linear
        from chitchat.modeling import set_reverse

        n_c = args.num_candidates
        rev = conv1d_to_linear(copy.deepcopy(model))
        set_reverse(rev.config, True)
        bot_mmi = Chatbot(model, tok, topk=TOPK, seed=args.seed, mmi_model=rev,
                          num_candidates=n_c)

        def candidates(m, tok_, context_, n):
            t0 = time.perf_counter()
            rs = bot32.generate_batch([HISTORY], copies=n_c, scores=True, max_len=n, min_len=n)
            return rs[0].first_token_s, time.perf_counter() - t0, len(rs[0].token_ids)

        paths["ours-fp32"] = (model, ours(bot32))
        paths[f"candidates-{n_c}"] = (model, candidates)
        paths[f"mmi-{n_c}"] = (model, ours(bot_mmi))
    elif not args.quick:
        paths["chitchat-loop"] = (grad_model, chitchat_loop)
        paths["no-cache"] = (model, no_cache_loop)
    if not args.mmi:
        paths["generate"] = (model, hf_generate)
        paths["ours-fp32"] = (model, ours(bot32))
        paths["ours-int8"] = (None, ours(Chatbot(quantize_int8(copy.deepcopy(model)), tok,
                                                 topk=TOPK, seed=args.seed)))
        paths["ours-hf"] = (model, ours(Chatbot(model, tok, backend="hf", topk=TOPK,
                                                seed=args.seed)))
    if args.all and not args.mmi:
        paths["ours-bf16"] = (None, ours(Chatbot(copy.deepcopy(model).to(torch.bfloat16), tok,
                                                 topk=TOPK, seed=args.seed)))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {n_params / 1e6:.0f}M parameters; "
          f"{vocab_note}; context {len(context)} tokens, replies {REPLY_TOKENS} tokens, "
          f"{args.repeats} repeats", flush=True)

    results = {k: {"first": [], "total": []} for k in paths}
    for name, (m, fn) in paths.items():  # warm-up: allocator, kernels, lazy init
        fn(m, tok, context, REPLY_TOKENS)
    for r in range(args.repeats):
        for name, (m, fn) in paths.items():
            first, total, n = fn(m, tok, context, REPLY_TOKENS)
            assert n == REPLY_TOKENS, (name, n)
            results[name]["first"].append(first)
            results[name]["total"].append(total)
        print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    floor = matvec_floor(model, args.repeats)
    rows = {}
    for name, v in results.items():
        total, first = statistics.median(v["total"]), statistics.median(v["first"])
        per_tok = (total - first) / (REPLY_TOKENS - 1)
        rows[name] = {"reply_ms": total * 1e3, "first_token_ms": first * 1e3,
                      "ms_per_token": per_tok * 1e3, "all_reply_ms": [t * 1e3 for t in v["total"]]}
    print("\n| path | reply (ms) | first token (ms) | ms/token after the first |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['reply_ms']:.0f} | {r['first_token_ms']:.1f} | "
              f"{r['ms_per_token']:.2f} |")
    print(f"| fp32 matvec over all weights (floor per token) | | | {floor:.2f} |")

    def ratio(a, b):
        return rows[a]["reply_ms"] / rows[b]["reply_ms"] if a in rows and b in rows else None

    ratios = {"ours-fp32 vs generate (target >= 1.2x)": ratio("generate", "ours-fp32"),
              f"mmi-{args.num_candidates} / ours-fp32 (MMI reply cost, target <= 2.5x)":
                  ratio(f"mmi-{args.num_candidates}", "ours-fp32"),
              f"candidates-{args.num_candidates} / ours-fp32 (decoding the candidates)":
                  ratio(f"candidates-{args.num_candidates}", "ours-fp32"),
              "ours-int8 vs chitchat-loop (target >= 5x, moonshot 8x)":
                  ratio("chitchat-loop", "ours-int8"),
              "ours-fp32 vs chitchat-loop": ratio("chitchat-loop", "ours-fp32"),
              "ours-int8 vs generate": ratio("generate", "ours-int8"),
              "no-cache vs chitchat-loop": ratio("chitchat-loop", "no-cache")}
    print()
    for k, v in ratios.items():
        if v is not None:
            print(f"{k}: {v:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios,
                                               "matvec_floor_ms": floor,
                                               "threads": torch.get_num_threads(),
                                               "context_tokens": len(context),
                                               "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
