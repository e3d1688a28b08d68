"""What --quantize int8 costs in accuracy: validation perplexity, float32 vs int8, same model.

    python bench/bench_int8_ppl.py --model_path model/<run>/best \\
        --data_path ../shared/corpora/lccc_toy/valid.txt
    python bench/bench_int8_ppl.py --model_path model/<run>/best --data_path data/sample/train

--data_path is a dialogue file (train.txt format; encoded with the model's vocab) or a token
store from preprocess.py (its validation split). Each dialogue is ``[CLS] u1 [SEP] ...``,
cut to n_positions; every token after [CLS] is predicted (train.py's --loss_on all), and the
perplexity is token-weighted: exp(total NLL / total predicted tokens). Both models run
transformers' forward (the int8 one after chitchat.backends.quantize_int8), one dialogue
at a time, so nothing but the weights differs. Also reports how often the two agree on the
most likely next token.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def dialogues(data_path: Path, tok, limit: int | None) -> list[list[int]]:
    if data_path.is_dir():
        from chitchat.store import TokenStore

        store = TokenStore(data_path)
        if store.vocab_size != tok.vocab_size:
            raise SystemExit(f"{data_path} was built with another vocab "
                             f"({store.vocab_size} tokens, the model has {tok.vocab_size})")
        idx = store.valid_indices()
        out = [store.dialogue(int(i)).astype("int64").tolist() for i in idx]
    else:
        from chitchat.corpus import read_dialogues
        from chitchat.dialogue import encode_context

        out = [encode_context(tok, d.utterances) for d in read_dialogues(data_path)]
    out = [d for d in out if len(d) > 1]
    return out[:limit] if limit else out


@torch.inference_mode()
def evaluate(model, data, n_positions: int) -> tuple[float, int, list[torch.Tensor]]:
    nll, n, top1 = 0.0, 0, []
    for ids in data:
        x = torch.tensor([ids[:n_positions]])
        logits = model(x).logits[0, :-1].float()
        y = x[0, 1:]
        nll += F.cross_entropy(logits, y, reduction="sum").item()
        n += y.numel()
        top1.append(logits.argmax(-1))
    return math.exp(nll / n), n, top1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", required=True)
    ap.add_argument("--vocab_path", default=None)
    ap.add_argument("--data_path", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N dialogues only")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from chitchat.backends import quantize_int8
    from chitchat.modeling import load_model

    model, tok = load_model(args.model_path, args.vocab_path)
    data = dialogues(Path(args.data_path), tok, args.limit)
    n_pos = model.config.n_positions
    ppl32, n, top32 = evaluate(model, data, n_pos)
    ppl8, _, top8 = evaluate(quantize_int8(copy.deepcopy(model)), data, n_pos)
    agree = sum(int((a == b).sum()) for a, b in zip(top32, top8)) / n
    print(f"{args.model_path} on {args.data_path}: {len(data)} dialogues, {n} predicted tokens")
    print("| weights | validation perplexity |")
    print("|---|---:|")
    print(f"| float32 | {ppl32:.3f} |")
    print(f"| int8 (dynamic, per-channel) | {ppl8:.3f} |")
    print(f"int8 cost: {100 * (ppl8 / ppl32 - 1):+.2f}% perplexity; "
          f"same top-1 next token {100 * agree:.1f}% of the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
