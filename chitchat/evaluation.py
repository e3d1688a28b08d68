"""evaluate.py: perplexity on held-out dialogues and reply-quality metrics, with or without
MMI reranking. `evaluate(cfg)` is the whole of evaluate.py.

Perplexity is exp(sum of token NLL / target tokens) over the same windows and loss mask as
training (chitchat.batching.build_windows, --max_len, --loss_on), computed by training's own
evaluation function, batched with packed rows. A reverse model is scored on reversed
dialogues, as it was trained. It runs in float32 through the transformers forward;
--dtype / --quantize / --backend apply to the generated replies only.

Replies: for every dialogue with at least two utterances, the context is the utterances
before the last and the reference is the last. Replies are decoded in batches of
--batch_size contexts (batch k is sampled with seed + k, so a run is reproducible for a
given --batch_size), through `Chatbot.generate_batch`, so MMI is the same code as in chat.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .config import EvaluateConfig
from .utils import (ChitchatError, atomic_write_text, get_logger, out_of_memory_advice,
                    write_json)

BLEU_NOTE = ("BLEU: mean sentence BLEU, character-level (each CJK character one unit), "
             "uniform weights, smoothing: Chen & Cherry (2014) method 1 (a zero n-gram "
             "match count becomes 0.1), as NLTK's SmoothingFunction().method1")


# ---- data ---------------------------------------------------------------------------------
def is_store(path: Path) -> bool:
    return path.is_dir()


@contextlib.contextmanager
def open_store(data_path: str | os.PathLike, tokenizer, vocab_file: Path, log):
    """The token store to evaluate on: `data_path` itself, or a temporary one encoded from a
    text corpus with the model's vocab (removed afterwards)."""
    from .config import PreprocessConfig
    from .store import TokenStore
    from .preprocessing import preprocess

    path = Path(data_path)
    if is_store(path):
        store = TokenStore(path)
        if store.tokenizer().tokens != tokenizer.tokens:
            raise ChitchatError(
                f"the token store {path} was built with another vocab than the model's "
                f"({store.vocab_size} vs {tokenizer.vocab_size} tokens, or different ids). "
                f"Evaluate on the text instead (--data_path <train.txt>), or rebuild the store: "
                f"python preprocess.py --train_path <train.txt> --vocab_path {vocab_file} "
                f"--save_path {path}")
        yield store
        return
    if not path.is_file():
        raise ChitchatError(f"--data_path {path}: no such file or token store directory")
    with tempfile.TemporaryDirectory(prefix="chitchat-eval-") as tmp:
        log.info(f"encoding {path} with the model's vocab ({vocab_file})")
        out = preprocess(PreprocessConfig(train_path=str(path), save_path=str(Path(tmp) / "s"),
                                          vocab_path=str(vocab_file), val_num=0, quiet=True))
        yield TokenStore(out)


def run_state(model_path) -> dict | None:
    """The trainer state of the train.py run a model folder comes from (the run folder, its
    best/, or one of its checkpoints), or None for any other folder."""
    from .checkpoint import STATE_FILE, checkpoints_of, is_best_dir

    p = Path(model_path)
    found = [p] if (p / STATE_FILE).is_file() else \
        checkpoints_of(p.parent if is_best_dir(p) else p)
    if not found:
        return None
    path = found[-1] / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # which dialogues are held out depends on it: say so, go no further
        raise ChitchatError(f"{path} cannot be read ({e}), so the run's validation split is "
                            "unknown; evaluate with --split all, or move the damaged "
                            "checkpoint aside") from None


def split_of(store, state: dict | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, valid, where from): the split of the run that trained the model when it
    re-split this very store (train.py --val_num / --val_fraction), else the store's own,
    so that --split valid never holds dialogues the model was trained on."""
    from .store import resplit

    opts = (state or {}).get("options", {})
    resplit_run = opts.get("val_num") is not None or opts.get("val_fraction") is not None
    if resplit_run and (state.get("data") or {}).get("tokens_sha256") == \
            store.fingerprint()["tokens_sha256"]:
        train, valid = resplit(store, opts.get("val_num"), opts.get("val_fraction"),
                               opts["seed"])
        flags = [f"--{k} {opts[k]}" for k in ("val_num", "val_fraction", "seed")
                 if opts.get(k) is not None]
        return train, valid, f"the run's split (train.py {' '.join(flags)})"
    return store.train_indices(), store.valid_indices(), "the store's split"


def select_dialogues(store, split: str, limit: int | None,
                     state: dict | None = None) -> tuple[np.ndarray, str]:
    """(dialogue indices of --split, which split they follow); `state`: the model's run
    (`run_state`), whose split `valid` and `train` follow."""
    if split == "all":
        idx, source = np.arange(len(store)), "every dialogue"
    else:
        train, valid, source = split_of(store, state)
        idx = valid if split == "valid" else train
    if len(idx) == 0:
        raise ChitchatError(f"{store.path} has no {split} dialogues; use --split all")
    return (idx[:limit] if limit else idx), source


def dialogue_texts(data_path: Path, store, indices, tokenizer, limit: int | None
                   ) -> list[list[str]]:
    """Utterances of the evaluated dialogues: the original text for a corpus file (references
    keep their spelling), the decoded ids for a token store."""
    if is_store(data_path):
        out = []
        for i in indices:
            dia = store.dialogue(int(i))
            out.append([tokenizer.decode(dia[a:b - 1].tolist())
                        for a, b in store.utterance_spans(int(i))])
        return out
    from .corpus import read_dialogues

    out = []
    for d in read_dialogues(data_path):
        if limit and len(out) >= limit:
            break
        out.append(d.utterances)
    return out


# ---- perplexity -----------------------------------------------------------------------------
def perplexity(model, store, indices, max_len: int, loss_on: str, batch_size: int, device,
               pad_id: int, progress: bool = False) -> dict:
    """Token-weighted perplexity of `model` on the windows of dialogues `indices`.

    Uses training's validation loss (`windowed_loss`: the same packing, masks and loss)
    on slices of the window table, so that a progress bar can follow; the slices' loss
    sums add up exactly.
    """
    import torch
    from tqdm.auto import tqdm

    from .batching import WindowTable, build_windows
    from .loss import LossModel, windowed_loss
    from .modeling import speaker_token_ids

    n_pos = int(model.config.n_positions)
    if max_len > n_pos:
        raise ChitchatError(f"--max_len {max_len} exceeds the model's n_positions {n_pos}; "
                            f"use --max_len {n_pos} or less")
    table = build_windows(store, indices, max_len, loss_on)
    if len(table) == 0:
        raise ChitchatError(f"no window with a target token in {len(indices)} dialogue(s) "
                            f"(--loss_on {loss_on} needs dialogues of two utterances or more)")
    runner = LossModel(model)
    speakers = speaker_token_ids(model.config)
    chunk = 32 * batch_size  # windows per windowed_loss() call
    loss_sum, targets = 0.0, 0
    fields = ("dialogue", "start", "target", "end", "first_utt")
    bar = tqdm(total=len(table), unit=" windows", desc="perplexity", disable=not progress)
    for s in range(0, len(table), chunk):
        part = WindowTable(**{f: getattr(table, f)[s:s + chunk] for f in fields},
                           max_len=max_len, loss_on=loss_on)
        part_sum, part_targets = windowed_loss(runner, store, part, batch_size,
                                               torch.device(device), pad_id=pad_id,
                                               speaker_ids=speakers, row_len=max_len)
        loss_sum += float(part_sum)
        targets += part_targets
        bar.update(len(part))
    bar.close()
    loss = loss_sum / targets
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "targets": targets,
            "windows": len(table), "dialogues": int(len(indices)), "max_len": max_len,
            "loss_on": loss_on, "cut_tokens": int(table.cut_tokens.sum())}


# ---- replies ----------------------------------------------------------------------------------
def generate_replies(bot, dialogues: list[list[str]], batch_size: int, seed: int,
                     progress: bool = False) -> list[dict]:
    """{context, reference, reply} for every dialogue of two utterances or more."""
    from tqdm.auto import tqdm

    items = []
    for utts in dialogues:
        if len(utts) < 2:
            continue
        if not bot.tokenizer.encode(utts[-2]):
            continue  # nothing to reply to (the newest context utterance has no token)
        items.append({"context": list(utts[:-1]), "reference": utts[-1]})
    bar = tqdm(total=len(items), unit=" replies", desc="replies", disable=not progress)
    for k, s in enumerate(range(0, len(items), batch_size)):
        batch = items[s:s + batch_size]
        replies = bot.generate_batch([it["context"] for it in batch], seed=seed + k)
        for it, r in zip(batch, replies):
            it["reply"] = r.text
        bar.update(len(batch))
    bar.close()
    return items


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---- the report -----------------------------------------------------------------------------
def format_table(result: dict) -> str:
    rows = []
    p = result.get("perplexity")
    if p:
        rows.append(("perplexity", f"{p['ppl']:.2f}  (loss {p['loss']:.4f} over {p['targets']:,}"
                                   f" target tokens, {p['windows']:,} windows of <= "
                                   f"{p['max_len']}, loss on {p['loss_on']})"))
    m = result.get("replies")
    if m:
        pct = lambda x: f"{100 * x:.1f}%"
        rows += [("replies", f"{m['replies']:,}" + (
                     f"  (MMI: {result['mmi']['num_candidates']} candidates, weight "
                     f"{result['mmi']['mmi_weight']})" if result.get("mmi") else "  (no MMI)")),
                 ("BLEU-1", f"{m['bleu_1']:.4f}"), ("BLEU-2", f"{m['bleu_2']:.4f}"),
                 ("BLEU-4", f"{m['bleu_4']:.4f}"),
                 ("Distinct-1", f"{m['distinct_1']:.4f}"), ("Distinct-2", f"{m['distinct_2']:.4f}"),
                 ("mean reply length (chars)", f"{m['mean_reply_length']:.2f}"),
                 ("repeats a context utterance", pct(m["repeats_context"])),
                 ("has a 4+ character run", pct(m["char_run_4"])),
                 ("empty replies", pct(m["empty"]))]
    w = max(len(r[0]) for r in rows) if rows else 0
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {k.ljust(w)} | {v} |" for k, v in rows]
    if m:
        lines.append(BLEU_NOTE)
    return "\n".join(lines)


def default_output(cfg: EvaluateConfig) -> Path:
    if cfg.output_json:
        return Path(cfg.output_json)
    if cfg.generate:
        g = Path(cfg.generate)
        return g.with_name(g.stem + ".metrics.json")
    # One name per split, so evaluating a store's valid then its train dialogues keeps both.
    split = "" if cfg.split == "all" else f"-{cfg.split}"
    return Path(cfg.model.model_path) / f"eval-{Path(cfg.data_path).stem}{split}.json"


# Files of a model folder that an evaluation output must never replace, even before they exist
# (a model saved later would find an evaluation in their place).
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "vocab.txt",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "chitchat_convert.json", "pytorch_model.bin", "best.json",
               "trainer_state.json", "training_state.pt", "manifest.json", "metrics.jsonl",
               "train.log"}
RESULT_KEYS = {"model_path", "data_path", "split", "seed"}  # in every evaluate() result
REPLY_KEYS = {"context", "reference", "reply"}  # a --generate record


def is_evaluation_output(path: Path) -> bool:
    """Whether the file at `path` is one evaluate.py wrote (a result JSON, or replies whose
    first line is a reply record): the only files in a model folder it may replace."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.readline() if path.suffix == ".jsonl" else f.read()
        obj = json.loads(head)
    except (OSError, ValueError):
        return False
    keys = REPLY_KEYS if path.suffix == ".jsonl" else RESULT_KEYS
    return isinstance(obj, dict) and keys <= obj.keys()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(cfg: EvaluateConfig) -> None:
    """Outputs are written whole (write, then rename), so one that is also an input would
    be lost: refuse that before any work. A token store and a model folder are inputs as a
    whole: nothing is written inside a store, and in a model folder only new files or
    evaluate.py's own earlier outputs are (the default output goes there)."""
    # --generate first: a store path there would also put the default metrics file there.
    outs = [(Path(cfg.generate), "--generate")] if cfg.generate else []
    outs.append((default_output(cfg), "--output_json"))
    inputs = {Path(p).resolve(): flag for p, flag in ((cfg.data_path, "--data_path"),
                                                      (cfg.model.vocab_path, "--vocab_path"))
              if p}
    data = Path(cfg.data_path).resolve() if cfg.data_path else None
    store = data if data is not None and is_store(data) else None
    models = [(Path(p).resolve(), flag) for p, flag in ((cfg.model.model_path, "--model_path"),
                                                        (cfg.mmi.mmi_model_path,
                                                         "--mmi_model_path")) if p]
    for out, flag in outs:
        r = out.resolve()
        name = flag if flag != "--output_json" or cfg.output_json else \
            "the metrics file (--output_json's default)"
        if r.is_dir():
            raise ChitchatError(f"{name} {out} is a folder; give a file path")
        clash = inputs.get(r)
        if clash:
            raise ChitchatError(f"{name} {out} would overwrite {clash}; choose another "
                                f"{flag} path")
        if store is not None and _inside(r, store):
            raise ChitchatError(f"{name} {out} is inside the token store {cfg.data_path} "
                                "(--data_path), which evaluate.py reads and must not change; "
                                f"choose a {flag} path outside it")
        for folder, model_flag in models:
            if not _inside(r, folder):
                continue
            if r.name in MODEL_FILES:
                why = f"the model's own {r.name}"
            elif r.exists() and not is_evaluation_output(r):
                why = "a file that evaluate.py did not write"
            else:
                continue
            raise ChitchatError(f"{name} {out} would overwrite {why} in the model folder "
                                f"{folder} ({model_flag}); choose a {flag} path outside it, "
                                "or a new file name")
    if len(outs) == 2 and outs[0][0].resolve() == outs[1][0].resolve():
        raise ChitchatError(f"--output_json and --generate are the same file ({outs[0][0]})")


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run evaluate.py as `cfg` says; prints the table, writes the JSON, returns it."""
    import torch
    from transformers.utils import logging as hf_logging

    from .chat import Chatbot
    from .modeling import resolve_device
    from .store import ReversedStore
    from .metrics import reply_metrics
    from .modeling import is_reverse, load_model
    from .precision import set_fp32_precision

    log = get_logger(quiet=cfg.quiet)
    check_outputs(cfg)
    hf_logging.disable_progress_bar()
    if cfg.model.threads:  # the perplexity runs before any Chatbot exists
        torch.set_num_threads(cfg.model.threads)
    progress = not cfg.quiet and sys.stderr.isatty()
    m = cfg.model
    device = resolve_device(m.device, m.no_cuda)
    model, tok = load_model(m.model_path, m.vocab_path, device)
    set_fp32_precision(device, cfg.exact_fp32)  # the perplexity runs in float32
    vocab_file = Path(m.vocab_path) if m.vocab_path else Path(m.model_path) / "vocab.txt"
    data_path = Path(cfg.data_path)
    if not is_store(data_path) and cfg.split != "all":
        raise ChitchatError(f"--split {cfg.split} selects from a token store's split; a text "
                            f"corpus ({data_path}) is evaluated whole")
    result: dict = {"model_path": str(m.model_path), "data_path": str(data_path),
                    "split": cfg.split, "max_dialogues": cfg.max_dialogues, "seed": cfg.seed,
                    "device": str(device)}
    t0 = time.perf_counter()
    with open_store(data_path, tok, vocab_file, log) as store:
        state = run_state(m.model_path) if cfg.split != "all" else None
        indices, source = select_dialogues(store, cfg.split, cfg.max_dialogues, state)
        if cfg.split != "all":
            log.info(f"--split {cfg.split}: {len(indices)} dialogues of {source}")
        if not cfg.no_perplexity:
            ppl_store = ReversedStore(store) if is_reverse(model.config) else store
            with out_of_memory_advice(
                    device, f"computing the perplexity (--batch_size {cfg.batch_size} rows of "
                    f"--max_len {cfg.max_len} tokens)",
                    "Use a smaller --batch_size or --max_len, or skip it with --no_perplexity."):
                result["perplexity"] = perplexity(model, ppl_store, indices, cfg.max_len,
                                                  cfg.loss_on, cfg.batch_size, device,
                                                  tok.pad_id, progress)
            result["perplexity"]["reverse_model"] = is_reverse(model.config)
            if result["perplexity"]["cut_tokens"]:  # as train.py says of the same windows
                log.warning(f"warning: {result['perplexity']['cut_tokens']:,} tokens of "
                            f"utterances longer than --max_len {cfg.max_len} are cut and not "
                            "in the perplexity; a larger --max_len keeps them")
            result["perplexity_seconds"] = round(time.perf_counter() - t0, 2)
        dialogues = dialogue_texts(data_path, store, indices, tok, cfg.max_dialogues) \
            if cfg.generate else []
    del model
    if cfg.generate:
        t1 = time.perf_counter()
        bot = Chatbot.from_options(m, cfg.decoding, cfg.mmi)
        mmi = f" x --num_candidates {cfg.mmi.num_candidates}" if cfg.mmi.mmi_model_path else ""
        with out_of_memory_advice(
                device, f"generating replies (--batch_size {cfg.batch_size} contexts{mmi})",
                "Use a smaller --batch_size" + (" or fewer --num_candidates" if mmi else "")
                + (", or --dtype bfloat16 / float16" if m.dtype == "float32" else "") + "."):
            records = generate_replies(bot, dialogues, cfg.batch_size, cfg.seed, progress)
        if not records:
            raise ChitchatError(f"{data_path}: no dialogue has two utterances; nothing to "
                                "reply to")
        write_jsonl(cfg.generate, records)
        result["replies_path"] = str(cfg.generate)
        result["replies"] = reply_metrics([r["reply"] for r in records],
                                          [r["reference"] for r in records],
                                          [r["context"] for r in records])
        result["bleu"] = BLEU_NOTE
        result["decoding"] = dataclasses.asdict(cfg.decoding)
        result["mmi"] = dataclasses.asdict(cfg.mmi) if cfg.mmi.mmi_model_path else None
        result["generation_seconds"] = round(time.perf_counter() - t1, 2)
    out = default_output(cfg)
    write_json(out, result)
    print(f"{m.model_path} on {data_path}"
          + (f" (first {cfg.max_dialogues} dialogues)" if cfg.max_dialogues else ""))
    print(format_table(result))
    log.info(f"wrote {out}" + (f" and {cfg.generate}" if cfg.generate else ""))
    return result
