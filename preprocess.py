"""Tokenize a dialogue corpus into a memory-mapped token store.

    python preprocess.py --train_path data/train.txt --save_path data/train
    python preprocess.py --train_path data/train.txt --vocab_path my/vocab.txt
    python preprocess.py --train_path data/train.txt --pretrained_model pretrained/gpt2-chinese
    python preprocess.py --train_path corpus.jsonl --encoding gbk --val_num 1000

train.txt holds dialogues separated by blank lines, one utterance per line.
"""
import sys

from chitchat.config import PreprocessConfig, parse_config
from chitchat.utils import run_cli


def main(argv=None):
    from chitchat.preprocessing import preprocess

    preprocess(parse_config(PreprocessConfig, argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_cli(main))
