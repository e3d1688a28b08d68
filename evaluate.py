"""Evaluate a chat model: perplexity on held-out dialogues, and reply metrics.

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
import sys

from chitchat.config import EvaluateConfig, parse_config
from chitchat.utils import run_cli


def main(argv=None):
    from chitchat.evaluation import evaluate

    evaluate(parse_config(EvaluateConfig, argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_cli(main))
