"""Serve a chat model over OpenAI's chat completions API, with a web chat page.

    python serve.py --model_path model/<run>/best --port 8000
    python serve.py --model_path model/<run> --api_key secret        # or CHITCHAT_API_KEY=...
    python serve.py --model_path model/<run> --host 0.0.0.0 --api_key secret   # reachable by others
    python serve.py --model_path model/<run> --temperature 0.8 --topk 8 --max_len 40 --max_batch 8

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
import sys

from chitchat.config import parse_config
from chitchat.utils import run_cli


def main(argv=None):
    from chitchat.serving.options import ServeConfig
    from chitchat.serving.run import serve

    return serve(parse_config(ServeConfig, argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_cli(main))
