"""Train a GPT-2 chat model on a token store written by preprocess.py.

    python preprocess.py                     # data/sample/train.txt -> data/sample/train
    python train.py --model_config config/model_config_dialogue_tiny.json --max_steps 300
    python train.py --epochs 40 --batch_size 8 --device cuda      # or cpu, cuda:1, --no_cuda
    python train.py --train_path data/train --run_name small --epochs 40
    python train.py --resume auto            # continue the newest run where it stopped

One node, several processes (DDP; gloo on CPU, nccl on GPUs; --batch_size is per process):

    torchrun --nproc_per_node 4 train.py --epochs 40 --batch_size 8

Several nodes (run on every node; same --run_name, and --save_model_path on storage that
rank 0 writes and every node reads when resuming):

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint host0:29500 --rdzv_id chat1 train.py --run_name chat1 ...

Each run writes model/<run_name>/ (default name: the start time): the latest model as a
complete Hugging Face folder (python interact.py --model_path model/<run_name>),
checkpoints/step-N/, best/, train.log and metrics.jsonl. Ctrl-C or SIGTERM saves and exits;
`--resume auto` continues the newest run (or the one named by --run_name).
"""
import sys

from chitchat.config import TrainConfig, parse_config
from chitchat.utils import run_cli


def main(argv=None):
    from chitchat.training import train

    train(parse_config(TrainConfig, argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_cli(main))
