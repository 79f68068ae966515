"""TRL GRPOTrainer peer: times `warmup + steps` GRPO steps, each one generation and one optimizer step.

Spec: {policy_dir, prompts (jsonl of {"prompt"}), prompts_per_step, num_generations, max_completion_length,
temperature, beta, warmup, steps, seed, lr, threads, reward_dir (a directory on sys.path for the reward),
reward ("module:function", called as f(prompt, response) -> float)}.

One step = `prompts_per_step` prompts (chat-formatted, TRL's conversational format), `num_generations`
answers each from `model.generate`, the reward function on every answer, the reference's log-probs
(beta > 0), group-normalised advantages and one optimizer step over all the answers (one micro-batch, no
accumulation; `num_iterations=1`, so TRL takes the old log-probs from the training forward itself).
A step is timed from `on_step_begin` to `on_step_end` (StepTimer): generation happens inside it, in the
first `training_step` of the step. The phases come from wrapping the trainer's methods: `_generate` is
generation (tokenising the prompts, `generate`, decoding); `_calculate_rewards` and log-prob forwards under
no_grad (the reference) are scoring; the rest is training.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
import time
from typing import Any

# peer_common first: it sets the Hub environment before transformers is imported
from peer_common import StepTimer, common_args, emit, load_spec, read_jsonl, result_stdout, setup

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState, TrainingArguments
from trl import GRPOConfig, GRPOTrainer


class PhaseTimer(StepTimer):
    """StepTimer plus each step's generation and scoring seconds, mean answer length and mean reward."""

    def __init__(self) -> None:
        super().__init__()
        self.generate_seconds: list[float] = []
        self.score_seconds: list[float] = []
        self.mean_lengths: list[float] = []
        self.rewards: list[float] = []
        self._generate = self._score = 0.0

    def wrap(self, trainer: GRPOTrainer) -> None:
        """Time the trainer's own `_generate`, `_calculate_rewards` and no-grad log-prob forwards."""
        generate, rewards, logps = (trainer._generate, trainer._calculate_rewards,
                                    trainer._get_per_token_logps_and_entropies)

        def timed_generate(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = generate(*args, **kwargs)
            self._generate += time.perf_counter() - started
            return result

        def timed_rewards(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = rewards(*args, **kwargs)
            self._score += time.perf_counter() - started
            return result

        def timed_logps(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():  # the training forward
                return logps(*args, **kwargs)
            started = time.perf_counter()  # the reference (and old log-probs, were they needed)
            result = logps(*args, **kwargs)
            self._score += time.perf_counter() - started
            return result

        trainer._generate, trainer._calculate_rewards = timed_generate, timed_rewards
        trainer._get_per_token_logps_and_entropies = timed_logps

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._generate = self._score = 0.0
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        super().on_step_end(args, state, control, **kwargs)
        self.generate_seconds.append(self._generate)
        self.score_seconds.append(self._score)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().on_log(args, state, control, logs=logs, **kwargs)
        if logs and "completions/mean_length" in logs:
            self.mean_lengths.append(float(logs["completions/mean_length"]))
            self.rewards.append(float(logs["reward"]))


def reward_function(spec: dict[str, Any]):
    """TRL's reward signature around the shared rule: the last user message and the answer's text."""
    sys.path.insert(0, spec["reward_dir"])
    module, name = spec["reward"].split(":")
    rule = getattr(importlib.import_module(module), name)

    def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return [rule(prompt[-1]["content"], completion[0]["content"])
                for prompt, completion in zip(prompts, completions, strict=True)]

    reward.__name__ = name
    return reward


def main() -> None:
    out = result_stdout()
    spec = load_spec()
    setup(spec)
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    prompts_per_step, group = int(spec["prompts_per_step"]), int(spec["num_generations"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32, trust_remote_code=False)
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]}
                                 for r in read_jsonl(spec["prompts"])])
    output_dir = tempfile.mkdtemp(prefix="trl-grpo-")
    timer = PhaseTimer()
    try:
        args = GRPOConfig(
            **common_args(spec, output_dir),
            # One step = prompts_per_step prompts x num_generations answers, generated together and trained on
            # in one micro-batch, one optimizer step per generation
            per_device_train_batch_size=prompts_per_step * group,
            num_generations=group,
            steps_per_generation=1,
            num_iterations=1,
            max_steps=warmup + steps,
            max_completion_length=int(spec["max_completion_length"]),
            temperature=float(spec["temperature"]),
            beta=float(spec["beta"]),
            disable_dropout=True,
            log_completions=False,
        )
        trainer = GRPOTrainer(model=policy, reward_funcs=reward_function(spec), args=args, train_dataset=prompts,
                              processing_class=tokenizer, callbacks=[timer])
        timer.wrap(trainer)
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    step = timer.seconds[warmup:]
    generate, score = timer.generate_seconds[warmup:], timer.score_seconds[warmup:]
    emit(out, {
        "peer": f"trl {trl.__version__} GRPOTrainer",
        "step_seconds": step,
        "generate_seconds": generate,
        "score_seconds": score,
        "train_seconds": [s - g - r for s, g, r in zip(step, generate, score, strict=True)],
        "samples_per_step": prompts_per_step * group,
        "mean_lengths": timer.mean_lengths[warmup:],
        "rewards": timer.rewards[warmup:],
        "losses": timer.losses,
    })


if __name__ == "__main__":
    main()
