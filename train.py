"""Train a GPT-2 chat model on a token store written by preprocess.py.

    python train.py --train_path data/train --epochs 40 --batch_size 8 --device cuda
    python train.py --resume auto            # continue the newest run
    torchrun --nproc_per_node 4 train.py --epochs 40 --batch_size 8
    python train.py --help      # or, installed: chitchat-train --help

The usage and options live in chitchat/cli.py, shared with the chitchat-train console script.
"""
import sys

from chitchat import cli

main = cli.train_main  # main(argv) raises instead of exiting; tests and wrappers use it

if __name__ == "__main__":
    sys.exit(cli.train())
