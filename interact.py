"""Chat with a trained model in the terminal; replies stream as they are generated.

    python interact.py --model_path model/<run>/best
    python interact.py --model_path model/<run> --max_history_len 3 --topk 8 --topp 0.9 --temperature 0.8
    python interact.py --model_path old_gpt2_chitchat_model/ --vocab_path vocab.txt --device cpu
    python interact.py --model_path model/<run> --quantize int8        # faster on CPU
    echo -e "你好\\n你在干嘛" | python interact.py --model_path model/<run>   # one reply line per input line

In the chat: /reset, /history, /set temperature=0.7, /help, /exit. Ctrl-C stops a reply;
Ctrl-D (or Ctrl-C at the prompt) exits. Transcripts go to sample/ (--save_samples_path).
"""
import sys

from chitchat.config import InteractConfig, parse_config
from chitchat.utils import run_cli


def main(argv=None):
    from chitchat.repl import interact

    return interact(parse_config(InteractConfig, argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_cli(main))
