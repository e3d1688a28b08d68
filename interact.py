"""Chat with a trained model in the terminal; replies stream as they are generated.

    python interact.py --model_path model/<run>/best --max_history_len 3
    python interact.py --model_path model/<run> --mmi_model_path model/<reverse_run>
    python interact.py --help      # or, installed: chitchat-chat --help

The usage and options live in chitchat/cli.py, shared with the chitchat-chat console script.
"""
import sys

from chitchat import cli

main = cli.interact_main  # main(argv) raises instead of exiting; tests and wrappers use it

if __name__ == "__main__":
    sys.exit(cli.interact())
