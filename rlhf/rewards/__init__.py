"""Rewards computed outside the reward model, and their mixture.

- `functions`: user reward functions ("module:function") run in a pool of worker processes,
  each call with a timeout (`RewardFunctionPool`, `load_function`).
- `builtin`: ready-made functions: `exact_match`, `numeric_match` (math-verify), `format_match`.
- `http`: a client for a reward service (`HTTPReward`).
- `mix`: the weighted sum of the sources (`mix_rewards`).

This package's `__init__` imports nothing: the worker processes import `rlhf.rewards._worker`
only, which must stay free of torch (about 3 s of start-up per worker otherwise).
"""
