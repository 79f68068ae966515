"""Non-finite numbers in training: a step whose loss, reward or gradient norm is NaN or inf is
skipped and counted; `limit` of them in a row stop the run with a clear error.

The single and FSDP2 strategies drop a non-finite gradient inside `step` (the optimizer
never sees it). DeepSpeed applies its update inside `engine.step()` before the norm is known
here, so under DeepSpeed the first non-finite step stops the run; the newest checkpoint was
written from finite weights.
"""

from __future__ import annotations

import math

from rlhf.errors import UserError
from rlhf.rollout.types import NonFinite


class NonFiniteGuard:
    def __init__(self, stage: str, limit: int):
        self.stage, self.limit = stage, limit
        self.skipped = 0
        self.consecutive = 0

    def check(self, step: int, values: dict[str, float] | NonFinite, strategy, before_update: bool = False) -> bool:
        """True when every value is finite on every worker; otherwise counts the skip and
        raises once the limit is reached (under DeepSpeed at the first one, unless the values
        were checked `before_update`, as PPO checks its rewards). `values` are scalars, or
        the names of the non-finite tensors."""
        if isinstance(values, NonFinite):
            bad = list(values.names)
        else:
            bad = [name for name, value in values.items() if not math.isfinite(float(value))]
        if strategy.world_size > 1:
            bad_anywhere = strategy.all_reduce({"bad": float(len(bad))}, op="sum")["bad"] > 0
            bad = bad or (["a value on another worker"] if bad_anywhere else [])
        if not bad:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        what = ", ".join(bad)
        if strategy.name == "deepspeed" and not before_update:
            raise UserError(f"{self.stage}: non-finite {what} at step {step}; DeepSpeed has applied that update, so the "
                            "run stops here. The newest checkpoint holds finite weights: lower train.lr or check the data")
        if self.consecutive >= self.limit:
            raise UserError(f"{self.stage}: {self.consecutive} steps in a row with non-finite {what} (last at step {step}, "
                            f"train.max_consecutive_nonfinite={self.limit}); no checkpoint was written from them. "
                            + ("Check the reward source named (its failures are printed above and logged as "
                               "reward/function_*)" if "(from " in what else "Lower train.lr or check the data"))
        print(f"[{self.stage}] step {step}: non-finite {what}; update skipped ({self.consecutive} in a row)")
        return False
