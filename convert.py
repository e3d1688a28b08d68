"""Write a complete, modern model folder from an old GPT2-chitchat one.

    python convert.py --model_path old_gpt2_chitchat_model/ --vocab_path vocab.txt \\
        --output_path model/converted

The new folder holds config.json (with the vocab's [CLS]/[SEP]/[PAD] ids), model.safetensors,
the tokenizer with its chat template, and generation_config.json ([SEP] stops a reply; the
sampling defaults of interact.py), so transformers, vLLM and TGI use it as chitchat does
(docs/serving.md, "Beyond one machine"). pytorch_model.bin is read with weights_only=True.
The folder is written whole or not at all; an existing non-empty folder is replaced only if
convert.py wrote it.
"""
import sys

from chitchat.config import ConvertConfig, parse_config
from chitchat.utils import run_cli


def main(argv=None):
    from chitchat.modeling import convert_folder

    cfg = parse_config(ConvertConfig, argv, description=__doc__)
    for line in convert_folder(cfg.model_path, cfg.output_path, vocab_path=cfg.vocab_path):
        print(line)


if __name__ == "__main__":
    sys.exit(run_cli(main))
