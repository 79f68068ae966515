"""TRL PPOTrainer peer (TRL 1.12, `trl.experimental.ppo`): times `warmup + steps` PPO updates.

Spec: {policy_dir, reward_dir, prompts (jsonl of {"prompt"}), batch_size (rollouts per update), mini_batch_size,
ppo_epochs, response_length, temperature, kl_coef, warmup, steps, seed, lr, threads}.

One update = one batch of `batch_size` prompts: generate, score (reference policy, value model, reward
model), then `ppo_epochs` passes over `batch_size // mini_batch_size` mini-batches, one optimizer step
each, on policy and value model together (TRL wraps both in one module with one AdamW).

`PPOTrainer.train` is a custom loop whose only per-update hook is `on_step_end`, so an update is timed
from one `on_step_end` (or `on_train_begin`) to the next: fetching the prompts, the rollout, the PPO
epochs, TRL's metrics, and the clean-up TRL runs after the previous update's `on_step_end` (with
warmup >= 1 every timed update carries exactly one such clean-up). The phases come from wrapping the
module-level functions the loop calls: `batch_generation` is generation; `get_reward` (value and
reward model) and `forward` under no_grad (reference policy) are scoring; the rest is training
(policy log-probs from the generation scores, rewards/KL/GAE, the PPO epochs, metrics, clean-up).
TRL calls `gc.collect()` twice per update; that time, part of training, is also reported alone
("gc_seconds") since on a small model it is a large share of the update.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from types import ModuleType, SimpleNamespace
from typing import Any

# peer_common first: it sets the Hub environment before transformers is imported
from peer_common import common_args, emit, load_spec, read_jsonl, result_stdout, setup

import torch
import trl
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments)
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as ppo_module


class PPOTimer(TrainerCallback):
    """Per-update wall time, split into generation / scoring / training, and the tokens generated."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id
        self.step_seconds: list[float] = []
        self.generate_seconds: list[float] = []
        self.score_seconds: list[float] = []
        self.gc_seconds: list[float] = []
        self.new_tokens: list[int] = []
        self.policy_losses: list[float] = []
        self.value_losses: list[float] = []
        self._started = 0.0
        self._generate = self._score = self._gc = 0.0
        self._tokens = 0

    def wrap(self, module: ModuleType) -> None:
        """Patch the names `PPOTrainer.train` looks up in its module's globals."""
        batch_generation, forward, get_reward, collect = (
            module.batch_generation, module.forward, module.get_reward, module.gc.collect)

        def timed_generation(model: torch.nn.Module, queries: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, ...]:
            started = time.perf_counter()
            query_responses, logits = batch_generation(model, queries, *rest)
            self._generate += time.perf_counter() - started
            self._tokens += self._generated_tokens(query_responses[:, queries.shape[1]:])
            return query_responses, logits

        def timed_forward(model: torch.nn.Module, *args: Any) -> Any:
            if torch.is_grad_enabled():  # the policy/value forward of a PPO mini-batch: training
                return forward(model, *args)
            started = time.perf_counter()  # the reference policy during the rollout: scoring
            result = forward(model, *args)
            self._score += time.perf_counter() - started
            return result

        def timed_reward(model: torch.nn.Module, *args: Any) -> Any:
            started = time.perf_counter()
            result = get_reward(model, *args)
            self._score += time.perf_counter() - started
            return result

        def timed_collect() -> int:
            started = time.perf_counter()
            result = collect()
            self._gc += time.perf_counter() - started
            return result

        module.batch_generation, module.forward, module.get_reward = timed_generation, timed_forward, timed_reward
        module.gc = SimpleNamespace(collect=timed_collect)  # the module uses nothing else from gc

    def _generated_tokens(self, responses: torch.Tensor) -> int:
        """Tokens per response up to and including the first EOS (all of them when there is none)."""
        width = responses.shape[1]
        first_eos = ppo_module.first_true_indices(responses == self.eos_token_id)
        return int(torch.where(first_eos < width, first_eos + 1, width).sum())

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._started = time.perf_counter()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss/policy_avg" in logs:
            self.policy_losses.append(float(logs["loss/policy_avg"]))
            self.value_losses.append(float(logs["loss/value_avg"]))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._started)
        self.generate_seconds.append(self._generate)
        self.score_seconds.append(self._score)
        self.gc_seconds.append(self._gc)
        self.new_tokens.append(self._tokens)
        self._started = now
        self._generate = self._score = self._gc = 0.0
        self._tokens = 0


def tokenized_prompts(records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """An "input_ids" column of chat-formatted prompts ending in the assistant header, as TRL's PPO examples use."""
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
           for r in records]
    return Dataset.from_dict({"input_ids": ids})


def load_lm(path: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)


def load_scorer(path: str) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                              trust_remote_code=False)


def main() -> None:
    out = result_stdout()
    spec = load_spec()
    setup(spec)
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    batch_size, mini_batch_size = int(spec["batch_size"]), int(spec["mini_batch_size"])
    if batch_size % mini_batch_size:
        raise SystemExit(f"batch_size {batch_size} is not a multiple of mini_batch_size {mini_batch_size}")

    # Left padding, as in TRL's PPO examples: generation continues right after each prompt
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_dir"], padding_side="left")
    policy, ref_policy = load_lm(spec["policy_dir"]), load_lm(spec["policy_dir"])
    reward_model, value_model = load_scorer(spec["reward_dir"]), load_scorer(spec["reward_dir"])
    prompts = tokenized_prompts(read_jsonl(spec["prompts"]), tokenizer)
    if len(prompts) < batch_size:  # TRL's loader drops the last partial batch and would then loop forever
        raise SystemExit(f"{len(prompts)} prompts, fewer than batch_size {batch_size}")

    timer = PPOTimer(tokenizer.eos_token_id)
    timer.wrap(ppo_module)
    output_dir = tempfile.mkdtemp(prefix="trl-ppo-")
    try:
        args = PPOConfig(
            **common_args(spec, output_dir),
            # One update = batch_size rollouts, generated and scored in one forward batch, trained on in
            # batch_size // mini_batch_size mini-batches of one micro-batch each
            per_device_train_batch_size=batch_size,
            local_rollout_forward_batch_size=batch_size,
            num_mini_batches=batch_size // mini_batch_size,
            num_ppo_epochs=int(spec["ppo_epochs"]),
            total_episodes=batch_size * (warmup + steps),
            response_length=int(spec["response_length"]),
            temperature=float(spec["temperature"]),
            kl_coef=float(spec["kl_coef"]),
            stop_token="eos",
            missing_eos_penalty=None,
            num_sample_generations=0,  # no sample generation between updates
        )
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                             reward_model=reward_model, value_model=value_model, train_dataset=prompts,
                             callbacks=[timer])
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)

    step = timer.step_seconds[warmup:]
    generate, score = timer.generate_seconds[warmup:], timer.score_seconds[warmup:]
    emit(out, {
        "peer": f"trl {trl.__version__} PPOTrainer",
        "step_seconds": step,
        "generate_seconds": generate,
        "score_seconds": score,
        "train_seconds": [s - g - r for s, g, r in zip(step, generate, score, strict=True)],
        "gc_seconds": timer.gc_seconds[warmup:],
        "rollouts_per_step": batch_size,
        "new_tokens_per_step": statistics.fmean(timer.new_tokens[warmup:]),
        "policy_losses": timer.policy_losses,
        "value_losses": timer.value_losses,
    })


if __name__ == "__main__":
    main()
