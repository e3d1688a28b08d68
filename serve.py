"""Serve a chat model over OpenAI's chat completions API, with a web chat page.

    python serve.py --model_path model/<run>/best --port 8000
    python serve.py --help      # or, installed: chitchat-serve --help

The usage and options live in chitchat/cli.py, shared with the chitchat-serve console script.
"""
import sys

from chitchat import cli

main = cli.serve_main  # main(argv) raises instead of exiting; tests and wrappers use it

if __name__ == "__main__":
    sys.exit(cli.serve())
