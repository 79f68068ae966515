"""`rlhf eval` and `rlhf rm eval`: judging a policy's sampled answers, and a reward model's ranking."""
