"""Typed options for each tool (preprocess.py, train.py, interact.py, evaluate.py,
convert.py; serve.py's are in chitchat/serving/options.py), and the option groups the chat
front ends share: ModelOptions, DecodingOptions, MMIOptions. Flags, parsing and the README
tables are built from these dataclasses by chitchat.flags.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from .flags import base_type, check, group, opt
# The tools' scripts parse their options through this module.
from .flags import build_parser, flags, from_flags, markdown_flags, parse_config  # noqa: F401
from .utils import ChitchatError


@dataclass
class PreprocessConfig:
    train_path: str = opt("data/sample/train.txt",
                          "dialogue corpus: train.txt (blank line between dialogues, one "
                          "utterance per line) or .jsonl (one JSON list of utterances per line)")
    save_path: str | None = opt(None, "output token-store directory "
                                "(default: the corpus path without its extension, e.g. data/train)")
    vocab_path: str | None = opt(None, "existing BERT-style vocab.txt to use as is; without it a "
                                 "WordPiece vocab is built from the corpus")
    pretrained_model: str | None = opt(None, "model folder you will fine-tune (train.py "
                                       "--pretrained_model): encode with its vocab.txt")
    vocab_size: int = opt(13000, "size of the vocab built from the corpus (no --vocab_path)")
    min_frequency: int = opt(2, "minimum count for a WordPiece merge when building the vocab")
    encoding: str = opt("utf-8", "text encoding of the corpus, e.g. gbk or gb18030")
    max_len: int = opt(150, "dialogue length (tokens) that the report counts as too long; "
                       "train.py splits longer dialogues into windows, nothing is cut here")
    val_num: int | None = opt(None, "number of dialogues held out for validation")
    val_fraction: float = opt(0.01, "share of dialogues held out for validation when --val_num "
                              "is not given")
    seed: int = opt(42, "seed of the train/validation split")
    batch_dialogues: int = opt(2000, "dialogues encoded per encode_batch call")
    log_path: str | None = opt(None, "also write the log to this file")
    force: bool = opt(False, "rebuild even when the output is up to date")
    quiet: bool = opt(False, "no progress bar, only warnings and errors")

    def __post_init__(self):
        check(self.vocab_size >= 10, f"--vocab_size must be at least 10, got {self.vocab_size}")
        check(self.min_frequency >= 1, "--min_frequency must be at least 1")
        check(self.max_len >= 4, f"--max_len must be at least 4, got {self.max_len}")
        check(self.val_num is None or self.val_num >= 0, "--val_num must be >= 0")
        check(0.0 <= self.val_fraction < 1.0, "--val_fraction must be in [0, 1)")
        check(self.batch_dialogues >= 1, "--batch_dialogues must be at least 1")


@dataclass
class TrainConfig:
    # ---- run ----------------------------------------------------------------------------
    device: str | None = opt(None, "cpu, cuda, cuda:N (or just N, as in GPT2-chitchat); "
                             "unset: cuda when available, else cpu. Under torchrun each "
                             "rank uses cuda:LOCAL_RANK")
    no_cuda: bool = opt(False, "train on the CPU even when a GPU is available")
    model_config: str = opt("config/model_config_dialogue_small.json",
                            "GPT-2 config json for a new model (vocab size and special ids "
                            "come from the data's vocab)")
    pretrained_model: str | None = opt(None, "fine-tune this local model folder instead of "
                                       "training from scratch (its vocab must match the data)")
    train_path: str = opt("data/sample/train", "token store written by preprocess.py")
    save_model_path: str = opt("model", "parent folder of runs: each run writes "
                               "<save_model_path>/<run_name>/")
    run_name: str | None = opt(None, "run folder name (unset: the start time, "
                               "YYYYmmdd-HHMMSS; with --resume auto, the newest run)")
    log_path: str | None = opt(None, "log file (unset: <run>/train.log)")
    # ---- data ---------------------------------------------------------------------------
    max_len: int = opt(150, "longest training window in tokens; longer dialogues are split "
                       "into windows of whole utterances (nothing is dropped; a single "
                       "utterance longer than this is cut, with a warning)")
    pack_len: int | None = opt(None, "tokens per packed row (unset: --max_len); larger "
                               "rows mean larger matrix products, up to n_positions")
    batching: str = opt("pack", "pack: whole windows packed into rows of --pack_len with "
                        "block-diagonal attention; pad: one window per row padded to the "
                        "longest (GPT2-chitchat's batches, slower)", choices=["pack", "pad"])
    val_num: int | None = opt(None, "validation dialogues (unset: the split made by "
                              "preprocess.py); re-splits the store deterministically")
    val_fraction: float | None = opt(None, "share of dialogues for validation, like "
                                     "--val_num (unset: the store's split)")
    num_workers: int = opt(0, "DataLoader worker processes building batches")
    loss_on: str = opt("all", "all: learn every utterance; response: learn only the "
                       "replies (every utterance after a dialogue's first)",
                       choices=["all", "response"])
    speaker_ids: bool = opt(False, "add speaker token_type_ids ([speaker1]/[speaker2] "
                            "embeddings, as in DialoGPT and CDial-GPT)")
    reverse: bool = opt(False, "train a reverse model for MMI reranking: every dialogue is "
                        "read in reversed utterance order ([CLS] un [SEP] ... u1 [SEP]) from "
                        "the same token store; config.json records reverse: true")
    # ---- schedule -----------------------------------------------------------------------
    epochs: int = opt(40, "passes over the training windows")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides "
                                "--epochs)")
    batch_size: int = opt(4, "rows per micro-batch and rank (with --batching pack a row "
                          "holds several dialogues); on a CPU 4 reached a given validation "
                          "loss sooner than 8 (more updates per second), GPUs want more")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-4, "peak learning rate")
    eps: float = opt(1e-8, "AdamW epsilon")
    weight_decay: float = opt(0.01, "AdamW weight decay (never on biases, LayerNorm or "
                              "embeddings)")
    warmup_steps: int | None = opt(None, "linear warmup in optimizer steps (unset: 5%% of "
                                   "all steps)")
    lr_schedule: str = opt("linear", "decay after warmup, to 0 at the last step",
                           choices=["linear", "cosine"])
    max_grad_norm: float = opt(2.0, "clip the global gradient norm once per optimizer step "
                               "(0: no clipping)")
    seed: int = opt(42, "seed for initialisation, data order and dropout")
    # ---- precision and speed ------------------------------------------------------------
    dtype: str = opt("auto", "auto: bf16 on GPUs and CPUs that support it, fp16 on older "
                     "GPUs, else fp32", choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = opt(False, "torch.compile the model: slow first steps; on the CPUs "
                         "measured no faster after (docs/benchmarks.md)")
    dropout_kernel: str = opt("auto", "auto: on a CPU, dropout masks from cheap random bits "
                              "(same rate, about 3x cheaper than PyTorch's) and attention "
                              "with that dropout; on a GPU, PyTorch's fused kernels. native: "
                              "PyTorch's dropout and SDPA everywhere",
                              choices=["auto", "native", "cheap"])
    threads: int | None = opt(None, "CPU threads for torch (default: torch's choice, usually "
                              "one per core)")
    max_time: str | None = opt(None, "wall-clock budget, e.g. 30m, 2h, 1h30m: stop at the "
                               "first step past it, save and exit 0 (resume to go on); warmup "
                               "and decay are fitted to the steps that fit, estimated from the "
                               "measured speed")
    exact_fp32: bool = opt(False, "on GPUs, keep float32 matrix products in full fp32 "
                           "(default: TF32 on Ampere and newer, see docs/gpu.md)")
    fp32_matmul: str = opt("auto", "CPU runs in fp32: the library of the matrix products. "
                           "auto: oneDNN on AMD CPUs (measured faster than MKL on one, see "
                           "docs/benchmarks.md) if it computes them in full fp32, else BLAS; "
                           "a resumed run keeps the library it started with",
                           choices=["auto", "blas", "onednn"])
    allocator: str = opt("auto", "auto: on Linux, keep freed CPU memory for the next step "
                         "(glibc mallopt) and ask for huge pages for big tensors, unless the "
                         "environment sets either (1.1x-1.4x on one CPU, see "
                         "docs/benchmarks.md); system: leave malloc as it is",
                         choices=["auto", "system"])
    # ---- checkpoints, evaluation, logging -----------------------------------------------
    eval_interval: int = opt(1000, "validate every N optimizer steps, at epoch ends "
                          "and at the last step (0: not by step count)")
    save_interval: int = opt(1000, "checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = opt(3, "newest checkpoints to keep (best/ is kept besides)")
    resume: str | None = opt(None, "auto: continue the newest checkpoint of the run "
                             "(--run_name, or the newest run in --save_model_path); or a "
                             "checkpoint / run folder")
    log_step: int = opt(10, "log one line every N optimizer steps")
    patience: int = opt(0, "stop after N validations without improvement (0: never)")
    quiet: bool = opt(False, "no progress bar")

    def __post_init__(self):
        check(self.max_len >= 4, f"--max_len must be at least 4, got {self.max_len}")
        check(self.pack_len is None or self.pack_len >= self.max_len,
              f"--pack_len {self.pack_len} must be at least --max_len {self.max_len}: a "
              "row has to hold the longest window")
        check(not (self.no_cuda and self.device and self.device not in ("cpu",)),
              f"--no_cuda contradicts --device {self.device}; give one of them")
        check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        check(self.max_steps is None or self.max_steps >= 1, "--max_steps must be at least 1")
        check(self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}")
        check(self.gradient_accumulation_steps >= 1,
              "--gradient_accumulation_steps must be at least 1")
        check(0 < self.lr < 1, f"--lr must be in (0, 1), got {self.lr} (AdamW's usual "
              "range is 1e-5 to 1e-3; 2e-4 is the default)")
        check(self.eps > 0, "--eps must be positive")
        check(self.weight_decay >= 0, "--weight_decay must be >= 0")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup_steps must be >= 0")
        check(self.max_grad_norm >= 0, "--max_grad_norm must be >= 0 (0 turns clipping off)")
        check(self.val_num is None or self.val_fraction is None,
              "give --val_num or --val_fraction, not both")
        check(self.val_num is None or self.val_num >= 0, "--val_num must be >= 0")
        check(self.val_fraction is None or 0.0 <= self.val_fraction < 1.0,
              "--val_fraction must be in [0, 1)")
        check(self.num_workers >= 0, "--num_workers must be >= 0")
        check(self.eval_interval >= 0, "--eval_interval must be >= 0")
        check(self.save_interval >= 1, "--save_interval must be at least 1")
        check(self.keep_checkpoints >= 1, "--keep_checkpoints must be at least 1")
        check(self.log_step >= 1, "--log_step must be at least 1")
        check(self.patience >= 0, "--patience must be >= 0 (0 turns early stopping off)")
        check(not (self.dtype == "fp16" and (self.no_cuda or self.device == "cpu")),
              "--dtype fp16 needs a CUDA GPU (it uses a GradScaler); on a CPU use bf16 or fp32")
        check(self.threads is None or self.threads >= 1, "--threads must be at least 1")
        if self.max_time is not None:
            from .budget import parse_duration
            parse_duration(self.max_time)  # raises with the accepted forms
        check(self.run_name is None or ("/" not in self.run_name and self.run_name.strip(".")),
              f"--run_name must be a plain folder name, got {self.run_name!r}")


# ---- interact.py (and every other front end of chitchat.Chatbot) ---------------------------
@dataclass
class ModelOptions:
    """How to load a model for chatting; shared by interact.py and other front ends."""
    model_path: str | None = opt(None, "model folder: a run from train.py (model/<run> or its "
                                 "best/), any local HF GPT-2 folder, or an old GPT2-chitchat "
                                 "folder (then also --vocab_path)")
    vocab_path: str | None = opt(None, "vocab.txt, for model folders without one (GPT2-chitchat "
                                 "folders); default: the model folder's vocab.txt")
    device: str | None = opt(None, "cpu, cuda, cuda:N (or just N, as in GPT2-chitchat); "
                             "unset: cuda when available, else cpu")
    no_cuda: bool = opt(False, "run on the CPU even when a GPU is available")
    dtype: str = opt("float32", "weight and activation precision; float32 is fastest on most "
                     "CPUs at batch 1", choices=["float32", "bfloat16", "float16"])
    quantize: str | None = opt(None, "int8: dynamic int8 Linear layers (CPU only; about 2-4x "
                               "faster, slightly less accurate: see docs/benchmarks.md)",
                               choices=["int8"])
    backend: str = opt("fast", "fast: lean forward pass with a static KV cache; hf: the "
                       "transformers model with its own cache (reference, slower)",
                       choices=["fast", "hf"])
    threads: int | None = opt(None, "CPU threads for torch (default: torch's choice); 1 can "
                              "be faster on a busy machine")

    def __post_init__(self):
        check(not (self.no_cuda and self.device and self.device != "cpu"),
              f"--no_cuda contradicts --device {self.device}; give one of them")
        check(self.threads is None or self.threads >= 1, "--threads must be at least 1")
        check(not (self.quantize and self.dtype != "float32"),
              f"--quantize int8 computes in float32 between int8 layers; drop --dtype "
              f"{self.dtype}")


# Other spellings of decoding options accepted by Chatbot.set / resolve and the REPL's /set:
# OpenAI/transformers names, so an HTTP front end can pass them through, and GPT2-chitchat's
# max_len for the reply length.
OPTION_ALIASES = {"top_k": "topk", "top_p": "topp", "max_len": "max_new_tokens",
                  "max_tokens": "max_new_tokens", "min_new_tokens": "min_len"}


@dataclass
class DecodingOptions:
    """How a reply is decoded. Every field can also be changed in the REPL with /set."""
    max_new_tokens: int = opt(25, "longest reply in tokens")
    min_len: int = opt(1, "shortest reply in tokens ([SEP] is suppressed before that)")
    max_history_len: int = opt(3, "utterances of the history given to the model, the new one "
                               "included (fewer if they do not fit n_positions)")
    temperature: float = opt(1.0, "sampling temperature (0: greedy)")
    topk: int = opt(8, "sample among the k most likely tokens (0: no limit)")
    topp: float = opt(0.0, "nucleus sampling: the smallest set of tokens whose probability "
                      "reaches p (0: off)")
    repetition_penalty: float = opt(1.0, "above 1 makes tokens already in the reply less likely "
                                    "(transformers' rule: positive logits divided, negative "
                                    "ones multiplied)")
    no_repeat_ngram_size: int = opt(0, "never repeat an n-gram of this size within a reply "
                                    "(0: off)")
    greedy: bool = opt(False, "always take the most likely token (no sampling)")
    num_beams: int = opt(1, "beam search with this many beams (deterministic; ignores the "
                         "sampling options; the reply appears at once, not streamed)")
    seed: int | None = opt(None, "random seed: the same seed and input give the same replies")

    def __post_init__(self):
        check(self.max_new_tokens >= 1,
              f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        check(0 <= self.min_len <= self.max_new_tokens,
              f"--min_len must be between 0 and --max_new_tokens ({self.max_new_tokens}), got "
              f"{self.min_len}")
        check(self.max_history_len >= 1,
              f"--max_history_len must be at least 1 (the new message), got "
              f"{self.max_history_len}")
        check(0 <= self.temperature < float("inf"),
              f"--temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        check(self.topk >= 0, f"--topk must be >= 0 (0: off), got {self.topk}")
        check(0.0 <= self.topp <= 1.0, f"--topp must be in [0, 1] (0: off), got {self.topp}")
        check(self.repetition_penalty > 0,
              f"--repetition_penalty must be positive (1: off), got {self.repetition_penalty}")
        check(self.no_repeat_ngram_size >= 0, "--no_repeat_ngram_size must be >= 0 (0: off)")
        check(self.num_beams >= 1, f"--num_beams must be at least 1, got {self.num_beams}")


DEFAULT_NUM_CANDIDATES = 8
DEFAULT_MMI_WEIGHT = 0.5  # forward and reverse scores weigh the same (see chitchat.mmi)


@dataclass
class MMIOptions:
    """MMI reranking with a reverse model (see chitchat/mmi.py); shared by the front ends."""
    mmi_model_path: str | None = opt(None, "reverse model (train.py --reverse, same vocab) for "
                                     "MMI reranking: each reply is the best of "
                                     "--num_candidates samples; off when unset")
    num_candidates: int = opt(DEFAULT_NUM_CANDIDATES, "MMI: candidate replies sampled per turn "
                              "(one batched pass)")
    mmi_weight: float = opt(DEFAULT_MMI_WEIGHT, "MMI: score = (1-w)*forward + w*reverse, both "
                            "mean log-probs per token; 0: the most likely sample, 1: the "
                            "reverse score only (DialoGPT)")

    def __post_init__(self):
        self.check(self.num_candidates, self.mmi_weight)

    @staticmethod
    def check(num_candidates: int, mmi_weight: float) -> None:
        """The MMI settings' ranges (also for changes in a running chat: Chatbot.set)."""
        check(num_candidates >= 1, f"--num_candidates must be at least 1, got {num_candidates}")
        check(0.0 <= mmi_weight <= 1.0, f"--mmi_weight must be in [0, 1], got {mmi_weight}")


# The MMI settings a running Chatbot may change (Chatbot.set, the REPL's /set).
MMI_SETTINGS = ("num_candidates", "mmi_weight")


def coerce_option(name: str, value: str):
    """Parse the text of a REPL /set value into the type of option `name` (a DecodingOptions
    field, an alias of one, or an MMI setting). Returns (canonical name, value)."""
    name = OPTION_ALIASES.get(name, name)
    fields = [f.name for f in dataclasses.fields(DecodingOptions)]
    if name not in fields and name not in MMI_SETTINGS:
        raise ChitchatError(f"unknown option {name!r}; options: "
                            f"{', '.join([*fields, *MMI_SETTINGS])}")
    owner = DecodingOptions if name in fields else MMIOptions
    hint = typing.get_type_hints(owner)[name]
    tp = base_type(hint)
    v = value.strip()
    if v.lower() in ("none", "null", "") and tp is not hint:
        return name, None
    try:
        if tp is bool:
            low = v.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(v)
            return name, low in ("1", "true", "yes", "on")
        return name, tp(v)
    except ValueError:
        raise ChitchatError(f"{name} needs a {tp.__name__}, got {value!r}") from None


# GPT2-chitchat's interact.py called the reply length --max_len; it still works there.
REPLY_LEN_ALIAS = {"max_new_tokens": ["--max_len"]}


@dataclass
class InteractConfig:
    model: ModelOptions = group(ModelOptions)
    mmi: MMIOptions = group(MMIOptions)
    decoding: DecodingOptions = group(DecodingOptions, aliases=REPLY_LEN_ALIAS)
    bad_words: str | None = opt(None, "file of words or phrases never to generate, one per line")
    stream: bool = opt(True, "print replies token by token as they are generated",
                       bool="optional")
    save_samples_path: str = opt("sample", "folder for transcripts: samples.txt (GPT2-chitchat's "
                                 "user:/chatbot: lines) and samples.jsonl, appended and flushed "
                                 "every turn; '' turns them off")
    debug: bool = opt(False, "print every MMI candidate with its forward, reverse and combined "
                      "scores, and the choice (to stderr)")

    def __post_init__(self):
        check(self.model.model_path is not None,
              "--model_path is required: a model folder from train.py (e.g. model/<run>/best), "
              "or an old GPT2-chitchat folder together with --vocab_path")


# ---- evaluate.py ----------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    model: ModelOptions = group(ModelOptions)
    mmi: MMIOptions = group(MMIOptions)
    data_path: str | None = opt(None, "held-out dialogues: a train.txt / .jsonl corpus (encoded "
                                "with the model's vocab into a temporary token store) or a token "
                                "store directory from preprocess.py")
    split: str = opt("all", "dialogues of a token store to use (a text corpus is used whole); "
                     "valid and train follow the model's run where it re-split the store "
                     "(train.py --val_num / --val_fraction)", choices=["all", "valid", "train"])
    max_dialogues: int | None = opt(None, "use only the first N dialogues (bounds the runtime)")
    # ---- perplexity (the same windows and loss mask as train.py) -------------------------
    max_len: int = opt(150, "perplexity windows in tokens, as train.py --max_len")
    loss_on: str = opt("all", "tokens counted in the perplexity, as train.py --loss_on",
                       choices=["all", "response"])
    no_perplexity: bool = opt(False, "skip the perplexity (only --generate)")
    exact_fp32: bool = opt(False, "on GPUs, compute the perplexity with full fp32 matrix "
                           "products (default: TF32 on Ampere and newer)")
    # ---- replies ------------------------------------------------------------------------------
    generate: str | None = opt(None, "write one reply per dialogue to this JSONL file "
                               "({context, reference, reply}; context: the utterances before "
                               "the last, reference: the last) and compute the reply metrics")
    # Replies are decoded in batches (Chatbot.generate_batch): no beam search; the seed is
    # per batch, below. --reply_len was evaluate.py's name for the reply length.
    decoding: DecodingOptions = group(
        DecodingOptions, aliases={"max_new_tokens": ["--reply_len"]},
        flags=["max_new_tokens", "max_history_len", "temperature", "topk", "topp",
               "repetition_penalty"])
    seed: int = opt(42, "random seed: batch k of replies is sampled with seed + k")
    batch_size: int = opt(16, "perplexity rows, or contexts decoded together, per batch")
    output_json: str | None = opt(None, "metrics file (default: beside --generate as "
                                  "<name>.metrics.json, else <model_path>/eval-<data>.json, "
                                  "eval-<data>-<split>.json with --split valid or train)")
    quiet: bool = opt(False, "no progress bar")

    def __post_init__(self):
        check(self.model.model_path is not None, "--model_path is required: the model to "
              "evaluate")
        check(self.data_path is not None, "--data_path is required: held-out dialogues "
              "(train.txt format) or a token store")
        check(self.max_dialogues is None or self.max_dialogues >= 1,
              "--max_dialogues must be at least 1")
        check(self.max_len >= 4, f"--max_len must be at least 4, got {self.max_len}")
        check(self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}")
        check(not (self.no_perplexity and not self.generate),
              "--no_perplexity leaves nothing to do without --generate out.jsonl")
        check(self.mmi.mmi_model_path is None or self.generate is not None,
              "--mmi_model_path reranks generated replies: add --generate out.jsonl")
        check(self.decoding.num_beams == 1, "replies are decoded in batches: num_beams must "
              "be 1")


# ---- convert.py -----------------------------------------------------------------------------
@dataclass
class ConvertConfig:
    model_path: str | None = opt(None, "folder to convert: an old GPT2-chitchat folder "
                                 "(config.json + pytorch_model.bin, then also --vocab_path) or "
                                 "any model folder interact.py loads")
    vocab_path: str | None = opt(None, "the vocab.txt the model was trained with (GPT2-chitchat "
                                 "folders have none); default: the folder's vocab.txt")
    output_path: str | None = opt(None, "new folder to write: config.json, model.safetensors, "
                                  "tokenizer files with the chat template, "
                                  "generation_config.json. An existing folder must be empty or "
                                  "one convert.py wrote")

    def __post_init__(self):
        check(self.model_path is not None, "--model_path is required: the folder to convert")
        check(self.output_path is not None, "--output_path is required: the new folder to write")
