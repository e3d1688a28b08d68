"""The command-line tools: the top-level scripts (python train.py ...) and the console
scripts of an installed package (chitchat-train ...) both run these.

Each tool is a pair: <tool>_main(argv) parses argv and runs the tool, letting its errors
propagate (tests call it for that), and <tool>(argv=None) wraps it in run_cli, which turns a
ChitchatError into a one-line message and returns the exit status. The tool modules are
imported inside the *_main functions: every script imports this module, and each should
load only its own tool's dependencies (a missing one then becomes run_cli's one-line hint).
"""
from __future__ import annotations

from chitchat.config import (ConvertConfig, EvaluateConfig, InteractConfig, PreprocessConfig,
                             TrainConfig, parse_config)
from chitchat.flags import given_flags
from chitchat.utils import run_cli

PREPROCESS_HELP = """Tokenize a dialogue corpus into a memory-mapped token store.

    python preprocess.py --train_path data/train.txt --save_path data/train
    python preprocess.py --train_path data/train.txt --vocab_path my/vocab.txt
    python preprocess.py --train_path data/train.txt --pretrained_model pretrained/gpt2-chinese
    python preprocess.py --train_path corpus.jsonl --encoding gbk --val_num 1000

train.txt holds dialogues separated by blank lines, one utterance per line.
"""

TRAIN_HELP = """Train a GPT-2 chat model on a token store written by preprocess.py.

    python preprocess.py                     # data/sample/train.txt -> data/sample/train
    python train.py --model_config config/model_config_dialogue_tiny.json --max_steps 300
    python train.py --epochs 40 --batch_size 8 --device cuda      # or cpu, cuda:1, --no_cuda
    python train.py --train_path data/train --run_name small --epochs 40
    python train.py --resume auto            # continue the newest run where it stopped

One node, several processes (DDP; gloo on CPU, nccl on GPUs; --batch_size is per process):

    torchrun --nproc_per_node 4 train.py --epochs 40 --batch_size 8

Several nodes (run on every node; same --run_name, and --save_model_path on storage that
rank 0 writes and every node reads when resuming):

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint host0:29500 --rdzv_id chat1 train.py --run_name chat1 ...

Each run writes model/<run_name>/ (default name: the start time): the latest model as a
complete Hugging Face folder (python interact.py --model_path model/<run_name>),
checkpoints/step-N/, best/, train.log and metrics.jsonl. Ctrl-C or SIGTERM saves and exits;
`--resume auto` continues the newest run (or the one named by --run_name).
"""

INTERACT_HELP = """Chat with a trained model in the terminal; replies stream as they are generated.

    python interact.py --model_path model/<run>/best
    python interact.py --model_path model/<run> --max_history_len 3 --topk 8 --topp 0.9 --temperature 0.8
    python interact.py --model_path old_gpt2_chitchat_model/ --vocab_path vocab.txt --device cpu
    python interact.py --model_path model/<run> --quantize int8        # faster on CPU
    echo -e "你好\\n你在干嘛" | python interact.py --model_path model/<run>   # one reply line per input line

In the chat: /reset, /history, /set temperature=0.7, /help, /exit. Ctrl-C stops a reply;
Ctrl-D (or Ctrl-C at the prompt) exits. Transcripts go to sample/ (--save_samples_path).
"""

SERVE_HELP = """Serve a chat model over OpenAI's chat completions API, with a web chat page.

    python serve.py --model_path model/<run>/best --port 8000
    python serve.py --model_path model/<run> --api_key secret        # or CHITCHAT_API_KEY=...
    python serve.py --model_path model/<run> --host 0.0.0.0 --api_key secret   # reachable by others
    python serve.py --model_path model/<run> --temperature 0.8 --topk 8 --max_new_tokens 40 --max_batch 8

Then:

    curl http://127.0.0.1:8000/v1/chat/completions \\
        -d '{"model": "chitchat", "messages": [{"role": "user", "content": "你好"}]}'
    # any OpenAI client: base_url="http://127.0.0.1:8000/v1" (api_key: the --api_key value)
    # a browser at http://127.0.0.1:8000/ gets a chat page that streams replies

The decoding options below are the defaults of every request; a request's temperature,
top_p, max_tokens, seed, stop, top_k and repetition_penalty override them. The server is
stateless: each request carries the whole conversation in `messages` (system messages are
ignored). It binds 127.0.0.1 unless --host says otherwise, answers 503 while the model loads,
and stops cleanly on SIGTERM or Ctrl-C.
"""

EVALUATE_HELP = """Evaluate a chat model: perplexity on held-out dialogues, and reply metrics.

    python evaluate.py --model_path model/<run> --data_path ../shared/corpora/lccc_toy/valid.txt
    python evaluate.py --model_path model/<run> --data_path data/train --split valid
    python evaluate.py --model_path model/<run> --data_path valid.txt --generate out/plain.jsonl
    python evaluate.py --model_path model/<run> --data_path valid.txt --generate out/mmi.jsonl \\
        --mmi_model_path model/<reverse run> --num_candidates 8 --mmi_weight 0.5
    python evaluate.py ... --max_dialogues 100 --device cuda --batch_size 32 --seed 1

--data_path is a train.txt / .jsonl corpus (encoded with the model's vocab into a temporary
token store) or a token store directory. Perplexity uses train.py's windows and loss mask
(--max_len, --loss_on). --generate writes {context, reference, reply} per line (context: the
utterances before a dialogue's last, reference: the last) and adds BLEU-1/2/4 (character
level, smoothing method 1), Distinct-1/2, mean reply length and repetition shares. A table is
printed; the metrics go to --output_json (default: beside the replies, or in the model folder).
"""

CONVERT_HELP = """Write a complete, modern model folder from an old GPT2-chitchat one.

    python convert.py --model_path old_gpt2_chitchat_model/ --vocab_path vocab.txt \\
        --output_path model/converted

The new folder holds config.json (with the vocab's [CLS]/[SEP]/[PAD] ids), model.safetensors,
the tokenizer with its chat template, and generation_config.json ([SEP] stops a reply; the
sampling defaults of interact.py), so transformers, vLLM and TGI use it as chitchat does
(docs/serving.md, "Beyond one machine"). pytorch_model.bin is read with weights_only=True.
The folder is written whole or not at all; an existing non-empty folder is replaced only if
convert.py wrote it.
"""


def preprocess_main(argv=None):
    from chitchat.preprocessing import preprocess

    preprocess(parse_config(PreprocessConfig, argv, description=PREPROCESS_HELP))


def train_main(argv=None):
    cfg = parse_config(TrainConfig, argv, description=TRAIN_HELP)
    from chitchat.allocator import tune_allocator

    tune_allocator(cfg.allocator)  # before torch is imported: see chitchat/allocator.py
    from chitchat.training import train

    train(cfg, given=given_flags(TrainConfig, argv))


def interact_main(argv=None):
    from chitchat.repl import interact

    return interact(parse_config(InteractConfig, argv, description=INTERACT_HELP))


def serve_main(argv=None):
    # ServeConfig lives beside the server, so this import comes before --help too
    from chitchat.serving.options import ServeConfig
    from chitchat.serving.run import serve

    return serve(parse_config(ServeConfig, argv, description=SERVE_HELP))


def evaluate_main(argv=None):
    from chitchat.evaluation import evaluate

    evaluate(parse_config(EvaluateConfig, argv, description=EVALUATE_HELP))


def convert_main(argv=None):
    from chitchat.modeling import convert_folder

    cfg = parse_config(ConvertConfig, argv, description=CONVERT_HELP)
    for line in convert_folder(cfg.model_path, cfg.output_path, vocab_path=cfg.vocab_path):
        print(line)


def _entry(main):
    """The console script of `main`: argv from the command line, the exit status returned."""
    def entry(argv=None) -> int:
        return run_cli(main, argv)

    entry.__name__ = entry.__qualname__ = main.__name__.removesuffix("_main")
    return entry


preprocess = _entry(preprocess_main)
train = _entry(train_main)
interact = _entry(interact_main)
serve = _entry(serve_main)
evaluate = _entry(evaluate_main)
convert = _entry(convert_main)
