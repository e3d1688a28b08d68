"""Preprocessing speed and memory, measured side by side in one run.

    python bench/bench_preprocess.py                       # chitchat50w_slice, 3 repeats
    python bench/bench_preprocess.py --corpus other/train.txt --repeats 5

Compares, on the same corpus and vocab:
  classic  GPT2-chitchat's loop without its quadratic rescan: one BertTokenizerFast.encode
           call per utterance;
  ours     the whole preprocess pipeline (streaming read, batched Rust encoding, token store,
           report), with --vocab_path so both use the same vocab.
and ours again on the corpus repeated 10 times (built in a temporary directory), for the
scaling (dialogues/s) and the peak-memory (RSS) ratios. Each measurement runs in a fresh
process; figures are medians over the repeats.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def worker(kind: str, corpus: str, vocab: str, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    if kind == "classic":
        from transformers import BertTokenizerFast

        from chitchat.corpus import read_dialogues
        hf = BertTokenizerFast(vocab=vocab)
        t0 = time.perf_counter()
        n = 0
        for d in read_dialogues(corpus):
            ids = [hf.cls_token_id]
            for u in d.utterances:
                ids.extend(hf.encode(u, add_special_tokens=False))
                ids.append(hf.sep_token_id)
            n += 1
        dt = time.perf_counter() - t0
    else:
        from chitchat.config import PreprocessConfig
        from chitchat.preprocessing import preprocess
        from chitchat.store import TokenStore
        t0 = time.perf_counter()
        preprocess(PreprocessConfig(train_path=corpus, vocab_path=vocab, save_path=out,
                                    force=True, quiet=True))
        dt = time.perf_counter() - t0
        n = len(TokenStore(out))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": dt, "dialogues": n, "rss_mb": rss_mb}))


def measure(kind: str, corpus: Path, vocab: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", kind, "--corpus", str(corpus),
                        "--vocab", str(vocab), "--out", str(out)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(SHARED / "corpora/chitchat50w_slice/train.txt"))
    ap.add_argument("--vocab", default=str(SHARED / "vocab/gpt2-chitchat-vocab.txt"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["classic", "ours"])
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.corpus, a.vocab, a.out)
    corpus, vocab = Path(a.corpus), Path(a.vocab)
    for p in (corpus, vocab):
        if not p.is_file():
            sys.exit(f"missing {p}: pass --corpus and --vocab (the defaults live in ../shared)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "x10.txt"
        text = corpus.read_text(encoding="utf-8").rstrip("\n")
        big.write_text("\n\n".join([text] * 10) + "\n", encoding="utf-8")
        runs = {"classic": [], "ours": [], "ours_x10": []}
        for r in range(a.repeats):  # interleaved, so drift hits every variant alike
            runs["classic"].append(measure("classic", corpus, vocab, tmp / "c"))
            runs["ours"].append(measure("ours", corpus, vocab, tmp / "o"))
            runs["ours_x10"].append(measure("ours", big, vocab, tmp / "o10"))
            print(f"repeat {r + 1}/{a.repeats} done", file=sys.stderr)
    med = {k: {"dialogues_per_s": statistics.median(x["dialogues"] / x["seconds"] for x in v),
               "rss_mb": statistics.median(x["rss_mb"] for x in v),
               "dialogues": v[0]["dialogues"]} for k, v in runs.items()}
    print(f"corpus {corpus.parent.name}: {med['ours']['dialogues']:,} dialogues; "
          f"medians of {a.repeats} runs")
    print(f"{'variant':<10}{'dialogues':>11}{'dialogues/s':>13}{'peak RSS MB':>13}")
    for k, v in med.items():
        print(f"{k:<10}{v['dialogues']:>11,}{v['dialogues_per_s']:>13,.0f}{v['rss_mb']:>13.0f}")
    speed = med["ours"]["dialogues_per_s"] / med["classic"]["dialogues_per_s"]
    scale = med["ours_x10"]["dialogues_per_s"] / med["ours"]["dialogues_per_s"]
    mem = med["ours_x10"]["rss_mb"] / med["ours"]["rss_mb"]
    print(f"speed    ours / classic loop          {speed:5.2f}x   (target >= 2.5x)")
    print(f"scaling  x10 / x1 dialogues per s     {scale:5.2f}x   (target >= 0.9x)")
    print(f"memory   x10 / x1 peak RSS            {mem:5.2f}x   (target < 1.5x)")


if __name__ == "__main__":
    main()
