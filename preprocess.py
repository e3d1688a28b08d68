"""Tokenize a dialogue corpus into a memory-mapped token store.

    python preprocess.py --train_path data/train.txt --save_path data/train
    python preprocess.py --train_path data/train.txt --vocab_path my/vocab.txt
    python preprocess.py --help      # or, installed: chitchat-preprocess --help

The usage and options live in chitchat/cli.py, shared with the chitchat-preprocess console script.
"""
import sys

from chitchat import cli

main = cli.preprocess_main  # main(argv) raises instead of exiting; tests and wrappers use it

if __name__ == "__main__":
    sys.exit(cli.preprocess())
