"""Build, load and save GPT-2 LM models.

A model folder is a plain transformers folder (config.json, model.safetensors,
generation_config.json, tokenizer files with the chat template), so
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it offline,
and vLLM or TGI can serve it. Old GPT2-chitchat folders (config.json + pytorch_model.bin, no
tokenizer) load too, with the vocab from --vocab_path; `convert_folder` (convert.py) turns
one into a complete modern folder.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from .config import DecodingOptions
from .tokenization import ChatTokenizer, check_same_vocab
from .utils import ChitchatError, atomic_dir, check_replaceable, write_json

# GPT2Config fields a model config json may set; anything else is a typo and fails loudly.
_CONFIG_KEYS = set(GPT2Config().to_dict()) | {"architectures", "model_type", "output_past",
                                              "transformers_version", "torch_dtype", "dtype"}


def load_config(path: str | os.PathLike, tokenizer: ChatTokenizer) -> GPT2Config:
    """A GPT2Config from a json file, with vocab size and special ids from the tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise ChitchatError(f"model config not found: {path}. The project ships "
                            "config/model_config_dialogue_small.json and "
                            "config/model_config_dialogue_tiny.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChitchatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise ChitchatError(f"{path}: a model config is a JSON object ({{\"n_layer\": 10, "
                            f"...}}), not a {type(raw).__name__}")
    unknown = sorted(set(raw) - _CONFIG_KEYS)
    if unknown:
        raise ChitchatError(f"{path}: unknown GPT-2 config key(s) {', '.join(unknown)}")
    _check_sizes(raw, path)
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "output_past")}
    raw.update(vocab_size=tokenizer.vocab_size, **special_ids(tokenizer))
    config = GPT2Config(**raw)
    config.architectures = ["GPT2LMHeadModel"]
    return config


_SIZE_KEYS = ("n_layer", "n_head", "n_embd", "n_positions")
_RATE_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def _check_sizes(raw: dict, path: Path) -> None:
    """Types and ranges that GPT2Config itself accepts silently and the model then fails on
    (or, for a dropout of 1.5, trains on as nonsense)."""
    for k in _SIZE_KEYS:
        v = raw.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ChitchatError(f"{path}: {k} must be a whole number >= 1, got {v!r}")
    for k in _RATE_KEYS + ("layer_norm_epsilon", "initializer_range"):
        v = raw.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ChitchatError(f"{path}: {k} must be a number, got {v!r}")
    for k in _RATE_KEYS:
        if raw.get(k) is not None and not 0 <= raw[k] < 1:
            raise ChitchatError(f"{path}: {k} is a dropout rate in [0, 1), got {raw[k]!r}")
    n_embd, n_head = raw.get("n_embd", 768), raw.get("n_head", 12)
    if n_embd % n_head:
        raise ChitchatError(f"{path}: n_embd {n_embd} is not divisible by n_head {n_head}; "
                            f"each head gets n_embd / n_head dimensions (e.g. n_embd "
                            f"{n_head * max(1, round(n_embd / n_head))})")


def build_model(config: GPT2Config) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(config)


def _has_weights(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()


def load_model(path: str | os.PathLike, vocab_path: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> tuple[GPT2LMHeadModel, ChatTokenizer]:
    """Load a model folder and its tokenizer.

    Accepts a folder written by train.py, any local HF GPT-2 folder (safetensors, or
    pytorch_model.bin read with ``weights_only=True``), and GPT2-chitchat's folders, which
    have no tokenizer files: pass their vocab with `vocab_path`. Weights load as `dtype`
    (default float32, whatever the folder stores).
    """
    path = Path(path)
    if not (path / "config.json").is_file() or not _has_weights(path):
        raise ChitchatError(f"{path} is not a model folder: it needs config.json and "
                            "model.safetensors (or pytorch_model.bin). Train one with "
                            "train.py, or point --model_path at model/<run> or its best/.")
    if vocab_path is not None:
        tokenizer = ChatTokenizer.from_vocab_file(vocab_path)
        if (path / "vocab.txt").is_file():
            # The folder knows its own vocab: a different one would shuffle every token.
            check_same_vocab(ChatTokenizer.from_dir(path), path / "vocab.txt", tokenizer,
                             Path(vocab_path), "Drop --vocab_path: the folder has its own.")
    elif (path / "vocab.txt").is_file():
        tokenizer = ChatTokenizer.from_dir(path)
    else:
        raise ChitchatError(f"{path} has no vocab.txt (an old GPT2-chitchat folder?); pass "
                            "the vocab it was trained with: --vocab_path vocab.txt")
    config, _ = read_config(path, tokenizer)
    if (path / "model.safetensors").is_file():
        model = GPT2LMHeadModel.from_pretrained(path, config=config, dtype=load_dtype(dtype))
    else:
        model = GPT2LMHeadModel(config)
        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu",
                               weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            # Only plain tensors are read: unpickling arbitrary objects could run code.
            raise ChitchatError(
                f"{path}/pytorch_model.bin cannot be read as plain tensors (weights_only=True"
                f"): {str(e).splitlines()[0]}. Refusing to load it. Re-save its state_dict "
                "with torch.save, or convert it to model.safetensors where it was made.") \
                from None
        # Old transformers saved attention-mask buffers (attn.bias, attn.masked_bias);
        # they are not weights.
        state = {k: v for k, v in state.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = model.config.tie_word_embeddings  # then lm_head is wte, saved or not
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise ChitchatError(f"{path}/pytorch_model.bin does not match its config.json: "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.tie_weights()
        model.to(load_dtype(dtype))
    check_vocab(model, tokenizer, path)
    return model.to(device).eval(), tokenizer


def special_ids(tokenizer: ChatTokenizer) -> dict[str, int]:
    """The config's special ids: chitchat's dialogues start with [CLS] and end with [SEP]."""
    return {"bos_token_id": tokenizer.cls_id, "eos_token_id": tokenizer.sep_id,
            "pad_token_id": tokenizer.pad_id}


# Keys of downloaded and GPT2-chitchat configs that transformers 5 no longer reads, and the
# source's tokenizer class (uer's folders name BertTokenizer; the folders chitchat writes
# carry their own tokenizer files, which name theirs).
_LEGACY_CONFIG_KEYS = ("n_ctx", "output_past", "gradient_checkpointing", "task_specific_params",
                       "tokenizer_class")


def read_config(path: Path, tokenizer: ChatTokenizer) -> tuple[GPT2Config, list[str]]:
    """A model folder's config.json as chitchat runs it, and notes of what was changed.

    The special ids come from the vocab: Chinese GPT-2s with a BERT vocab (uer's) and
    GPT2-chitchat's folders name GPT-2's 50256, an id their vocab lacks, which transformers
    warns about on every load and which a fine-tuned or converted folder must not inherit.
    They are set before the config is built, so loading such a folder warns about nothing.
    """
    try:
        raw, _ = GPT2Config.get_config_dict(path)
    except (OSError, ValueError) as e:
        raise ChitchatError(f"{path}/config.json: cannot read it as a GPT-2 config: {e}")
    notes = []
    for key, want in special_ids(tokenizer).items():
        have = raw.get(key)
        if have is not None and have != want:
            notes.append(f"config.json: {key} {have} -> {want} (from the vocab)")
        raw[key] = want
    for key in _LEGACY_CONFIG_KEYS:
        raw.pop(key, None)
    raw["architectures"] = ["GPT2LMHeadModel"]
    try:
        config = GPT2Config.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ChitchatError(f"{path}/config.json: cannot read it as a GPT-2 config: {e}")
    config.name_or_path = str(path)
    return config, notes


def check_vocab(model: GPT2LMHeadModel, tokenizer: ChatTokenizer, where) -> None:
    n_emb = model.get_input_embeddings().weight.shape[0]
    if n_emb != tokenizer.vocab_size:
        raise ChitchatError(
            f"vocab size mismatch: the model at {where} has {n_emb} token embeddings but the "
            f"vocab has {tokenizer.vocab_size} tokens. Use the vocab the model was trained "
            "with (--vocab_path), or preprocess the data with that vocab "
            "(python preprocess.py --vocab_path <model>/vocab.txt).")


def generation_config(tokenizer: ChatTokenizer,
                      options: DecodingOptions | None = None) -> GenerationConfig:
    """transformers' GenerationConfig for chitchat's decoding options (default: those of
    interact.py and serve.py), so generate(), pipelines, vLLM and TGI stop at [SEP] and
    sample as chitchat does. The tokens chitchat never generates are bad_words_ids."""
    o = options or DecodingOptions()
    sample = not o.greedy and o.temperature > 0 and o.num_beams == 1
    kw = dict(**special_ids(tokenizer), max_new_tokens=o.max_new_tokens,
              min_new_tokens=o.min_len, repetition_penalty=o.repetition_penalty,
              no_repeat_ngram_size=o.no_repeat_ngram_size, num_beams=o.num_beams,
              do_sample=sample, bad_words_ids=[[i] for i in tokenizer.banned_ids])
    if sample:
        # chitchat's "0: off" is transformers' top_k 0 and top_p 1.0.
        kw.update(temperature=o.temperature, top_k=o.topk, top_p=o.topp or 1.0)
    return GenerationConfig(**kw)


def save_model(model, tokenizer: ChatTokenizer, directory: str | os.PathLike) -> None:
    """Write a complete HF folder: weights, config, generation config, tokenizer files
    with the chat template."""
    directory = Path(directory)
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


# ---- speaker token types (train.py --speaker_ids; read by interact) ----------------------
# config.json records the two token ids whose embeddings mark the speakers, so that any
# consumer knows to pass token_type_ids (see chitchat.dialogue.speaker_token_types).
SPEAKER_KEY = "speaker_token_ids"
_CONFIG_KEYS.add(SPEAKER_KEY)


def set_speaker_token_ids(config: GPT2Config, ids: tuple[int, int] | None) -> None:
    setattr(config, SPEAKER_KEY, list(ids) if ids else None)


def speaker_token_ids(config: GPT2Config) -> tuple[int, int] | None:
    """The model's speaker token ids, or None when it was trained without them."""
    ids = getattr(config, SPEAKER_KEY, None)
    return (int(ids[0]), int(ids[1])) if ids else None
# GPT2-chitchat's configs (and config/model_config_dialogue_small.json) carry the legacy
# n_ctx (= n_positions), which transformers 5 no longer defines; accept it as inert.
_CONFIG_KEYS.add("n_ctx")


# ---- reverse models (train.py --reverse; MMI reranking) ---------------------------------
# A reverse model learns P(earlier utterances | later ones) on dialogues in reversed
# utterance order. config.json records it, so that a reverse model cannot be mistaken for a
# chat model (its "replies" would be guesses at what came before) nor the other way round.
REVERSE_KEY = "reverse"
_CONFIG_KEYS.add(REVERSE_KEY)


def set_reverse(config: GPT2Config, reverse: bool) -> None:
    setattr(config, REVERSE_KEY, bool(reverse))


def is_reverse(config: GPT2Config) -> bool:
    return bool(getattr(config, REVERSE_KEY, False))


def pick_device(device: str | None, no_cuda: bool, cuda_available: bool, gpu_count: int,
                local_rank: int | None = None) -> torch.device:
    """The device one process runs on, from the flags and what torch reports (pure).

    device: cpu, cuda, cuda:N or GPT2-chitchat's bare GPU number; None means cuda when
    available. local_rank: torchrun's LOCAL_RANK (None outside torchrun); it picks the GPU
    when the flag names none. A CUDA device always carries an index: torch.cuda.set_device,
    NCCL and DDP's device_ids reject a bare "cuda".
    """
    if device is None:
        if no_cuda or not cuda_available:
            return torch.device("cpu")
        device = "cuda"
    if device.isdigit():
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ChitchatError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") \
            from None
    if dev.type != "cuda":
        return dev
    if not cuda_available:
        raise ChitchatError(f"--device {device} asks for CUDA, but torch sees no GPU; use "
                            "--device cpu")
    index = dev.index
    if local_rank is not None:
        if index is not None and index != local_rank:
            raise ChitchatError(f"--device {device} under torchrun: each process uses "
                                f"cuda:LOCAL_RANK (this one cuda:{local_rank}); drop the index "
                                "and choose GPUs with CUDA_VISIBLE_DEVICES")
        index = local_rank
    index = 0 if index is None else index
    if index >= gpu_count:
        raise ChitchatError(f"cuda:{index} does not exist: torch sees {gpu_count} GPU(s), "
                            f"cuda:0 to cuda:{gpu_count - 1}. Check --device, "
                            "CUDA_VISIBLE_DEVICES and torchrun --nproc_per_node.")
    return torch.device("cuda", index)


def resolve_device(device: str | None, no_cuda: bool = False,
                   local_rank: int | None = None) -> torch.device:
    """`pick_device` with this machine's GPUs."""
    available = torch.cuda.is_available()
    return pick_device(device, no_cuda, available,
                       torch.cuda.device_count() if available else 0, local_rank)


def load_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """What from_pretrained loads weights as: float32 unless a dtype is asked for.

    transformers 5 defaults to the folder's own dtype ("auto"), so a half-precision folder
    would train with half-precision master weights and a float32 chat would silently run
    in half precision.
    """
    return torch.float32 if dtype is None else dtype


# ---- convert.py: old folders -> complete modern folders ----------------------------------
# The converter writes this file into every folder it creates; its presence is what lets a
# later run replace that folder (any other non-empty folder is the user's and is refused).
CONVERT_MARKER = "chitchat_convert.json"


def _is_converted(path: Path) -> bool:
    return (path / CONVERT_MARKER).is_file()


def _check_convert_output(out: Path, src: Path) -> None:
    # The output folder is replaced whole: were it the model folder or a folder that holds
    # it (a converted folder may hold the next model to convert), the model would be deleted.
    o, s = out.resolve(), src.resolve()
    if o == s or o in s.parents:
        where = "the model folder itself" if o == s else f"a folder that holds {src}"
        raise ChitchatError(f"--output_path {out} is {where}; the output folder is replaced "
                            "whole, so the model would be deleted (nothing was changed). Choose "
                            f"an output folder that neither is nor holds {src}.")
    check_replaceable(out, _is_converted, "a folder written by convert.py")


def convert_folder(src: str | os.PathLike, out: str | os.PathLike,
                   vocab_path: str | os.PathLike | None = None) -> list[str]:
    """Write a complete, modern model folder from an old one (GPT2-chitchat's config.json +
    pytorch_model.bin + separate vocab, or any folder `load_model` reads): config.json with
    the vocab's special ids, model.safetensors, the tokenizer with the chat template, and
    generation_config.json. The folder appears whole or not at all. Returns report lines."""
    src, out = Path(src), Path(out)
    _check_convert_output(out, src)
    model, tok = load_model(src, vocab_path=vocab_path)
    config = model.config
    notes = read_config(src, tok)[1]  # what load_model changed, for the report
    with atomic_dir(out, _is_converted, "a folder written by convert.py") as tmp:
        save_model(model, tok, tmp)
        write_json(tmp / CONVERT_MARKER, {
            "written_by": "chitchat convert.py", "source": src.name,
            "vocab": Path(vocab_path).name if vocab_path else "vocab.txt"})
    notes.append(f"wrote {out}: {config.n_layer} layers, {config.n_embd} wide, vocab "
                 f"{tok.vocab_size}, n_positions {config.n_positions}")
    if speaker_token_ids(config):
        notes.append("note: this model was trained with speaker token types, which the chat "
                     "template cannot carry; other engines will run it without them "
                     "(docs/serving.md, Beyond one machine)")
    return notes
