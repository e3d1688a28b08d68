"""Write a complete, modern model folder from an old GPT2-chitchat one.

    python convert.py --model_path old_model/ --vocab_path vocab.txt --output_path model/new
    python convert.py --help      # or, installed: chitchat-convert --help

The usage and options live in chitchat/cli.py, shared with the chitchat-convert console script.
"""
import sys

from chitchat import cli

main = cli.convert_main  # main(argv) raises instead of exiting; tests and wrappers use it

if __name__ == "__main__":
    sys.exit(cli.convert())
