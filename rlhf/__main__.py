"""`python -m rlhf ...`: what torchrun and the deepspeed launcher start, e.g.

    torchrun --nproc_per_node 2 -m rlhf sft --config configs/sft.yaml --config configs/strategy/zero2.yaml
    deepspeed --num_gpus 2 --module rlhf sft --config configs/sft.yaml --config configs/strategy/zero2.yaml
"""

import sys

from rlhf.cli import main
from rlhf.distributed.env import strip_launcher_args

if __name__ == "__main__":
    sys.exit(main(strip_launcher_args(sys.argv[1:])))
