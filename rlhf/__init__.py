"""rlhf: SFT, reward modelling and PPO on Hugging Face models, over DeepSpeed, FSDP2 or one process."""

from rlhf.distributed.host_memory import request_huge_pages

# Before anything imports torch: PyTorch reads the setting at its first allocation.
request_huge_pages()
