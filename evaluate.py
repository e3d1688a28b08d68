"""Evaluate a chat model: perplexity on held-out dialogues, and reply metrics.

    python evaluate.py --model_path model/<run> --data_path valid.txt --generate out/plain.jsonl
    python evaluate.py --help      # or, installed: chitchat-evaluate --help

The usage and options live in chitchat/cli.py, shared with the chitchat-evaluate console script.
"""
import sys

from chitchat import cli

main = cli.evaluate_main  # main(argv) raises instead of exiting; tests and wrappers use it

if __name__ == "__main__":
    sys.exit(cli.evaluate())
