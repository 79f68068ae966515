"""Every reward source of a PPO run behind one call: the reward model, reward functions (run in
a pool of worker processes, each call with a timeout) and a reward service over HTTP, mixed by
`reward.weights`.

A source that fails on a sample (a function that raises, hangs past its timeout or returns
something non-finite) gives NaN there, so the mixed reward is NaN and the iteration is skipped
by the non-finite guard, as a NaN from the reward model is; the failures are counted and logged
(`reward/function_errors`, `reward/function_timeouts`, `reward/function_nonfinite`,
`reward/function_skipped`), and each batch with failures prints one line per failing function
naming it and its first failure. A reward service that stays down after its retries stops the run
with one line naming the URL.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from rlhf.rewards.mix import mix_rewards
from rlhf.rollout.types import Rollout


FAILURE_KINDS = ("errors", "timeouts", "nonfinite", "skipped")
"""Failure totals of the reward functions (`skipped`: calls left out after a function hung or
crashed its worker too often in one batch)."""


class RewardSources:
    def __init__(self, reward_cfg, reward_model, tokenizer):
        """`reward_cfg`: the `reward` section of a PPO config; `reward_model`: anything with
        `scores(rollout) -> (batch,)` (a `RewardModel`, its Ray group) or None."""
        self.model, self.tokenizer = reward_model, tokenizer
        self.weights = dict(reward_cfg.weights)
        self.functions = list(reward_cfg.functions)
        self.pool = self.http = None
        if self.functions:
            from rlhf.rewards.functions import RewardFunctionPool

            self.pool = RewardFunctionPool(self.functions, reward_cfg.function_workers, reward_cfg.function_timeout_s)
        if reward_cfg.http:
            from rlhf.rewards.http import HTTPReward

            self.http = HTTPReward(reward_cfg.http, reward_cfg.http_timeout_s, reward_cfg.http_retries)
        self.failures: Counter = Counter()
        self._thread: ThreadPoolExecutor | None = None

    def __call__(self, rollout: Rollout, prompts: Sequence[str], fields: Sequence[dict]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(batch,) mixed raw reward of each sample, and every source's (and function
        component's) own reward; `prompts` and `fields` are the samples' prompt texts and rows."""
        return self.start(rollout, prompts, fields).result()

    def start(self, rollout: Rollout, prompts: Sequence[str], fields: Sequence[dict]) -> "PendingRewards":
        """Set the reward functions and the reward service going on a background thread (they
        wait on worker processes and sockets), so that the caller's own forwards run meanwhile;
        `result()` then scores with the reward model, here, and mixes."""
        external = None
        if self.pool is not None or self.http is not None:
            responses = self.responses(rollout)
            if self._thread is None:
                self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhf-rewards")
            external = self._thread.submit(self._external, list(prompts), responses, list(fields))
        return PendingRewards(self, rollout, external)

    def _external(self, prompts: list[str], responses: list[str], fields: list[dict]) -> dict[str, torch.Tensor]:
        sources: dict[str, torch.Tensor] = {}
        if self.pool is not None:
            result = self.pool(prompts, responses, fields)
            sources.update({name: values.float() for name, values in result.rewards.items()})
            sources.update({name: values.float() for name, values in result.components.items()})
            self.failures.update(result.failures)
            self._say_failures(result, len(responses))
        if self.http is not None:
            sources["http"] = self.http(prompts, responses, fields).float()
        return sources

    def responses(self, rollout: Rollout) -> list[str]:
        mask = rollout.response_mask
        return [self.tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True).strip()
                for row, n in zip(rollout.responses, mask.sum(-1))]

    def _say_failures(self, result, samples: int) -> None:
        """One line per function that failed in this batch, naming it and its first failure:
        the guard's own message says only "non-finite reward"."""
        for spec, message in result.messages.items():
            failed = sum(result.failures.get(f"{spec}/{kind}", 0) for kind in FAILURE_KINDS)
            print(f"[reward] {spec} failed on {failed} of {samples} samples, whose reward is NaN; first: {message}",
                  flush=True)

    def take_failures(self) -> dict[str, float]:
        """Failures counted since the last call, as metrics (the same keys every call, so that
        workers can sum them): totals per kind, and per function as
        `reward/function_<kind>/<module:function>` when there are several."""
        counts = {f"reward/function_{kind}": float(self.failures.get(kind, 0)) for kind in FAILURE_KINDS}
        if len(self.functions) > 1:  # which function failed, when there is more than one
            counts.update({f"reward/function_{kind}/{spec}": float(self.failures.get(f"{spec}/{kind}", 0))
                           for spec in self.functions for kind in FAILURE_KINDS})
        self.failures.clear()
        return counts

    def shutdown(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.close()


class PendingRewards:
    """Rewards under way (`RewardSources.start`)."""

    def __init__(self, sources: RewardSources, rollout: Rollout, external: Future | None):
        self.sources, self.rollout, self.external = sources, rollout, external

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As `RewardSources.__call__`: the mixed reward and each source's."""
        scores: dict[str, torch.Tensor] = {}
        if self.sources.model is not None:
            scores["model"] = self.sources.model.scores(self.rollout).float().cpu()
        if self.external is not None:
            scores.update(self.external.result())
        # A function's components ("module:function/name") are already summed into its reward.
        mixed = mix_rewards({name: values for name, values in scores.items() if "/" not in name},
                            self.sources.weights)
        device = self.rollout.sequences.device
        return mixed.to(device), {name: values.to(device) for name, values in scores.items()}
