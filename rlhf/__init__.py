"""rlhf: SFT, reward modelling and PPO on Hugging Face models, over DeepSpeed, FSDP2 or one process."""
