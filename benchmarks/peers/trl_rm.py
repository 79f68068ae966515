"""TRL RewardTrainer peer: times `warmup + steps` optimizer steps of pairwise reward-model training.

Spec: {model_dir (a causal LM), data (jsonl of {"prompt", "responses": [K strings, best first]}),
pairs_per_step, max_length, warmup, steps, seed, lr, threads}.

Each record becomes its C(K, 2) (better, worse) pairs in TRL's conversational preference format.
TRL renders prompt + answer with the chat template (no generation prompt), scores the last non-pad
token, and takes the Bradley-Terry loss -logsigmoid(r_chosen - r_rejected) averaged over the pairs.
`max_length` is a filter in TRL, not a truncation: a pair whose chosen or rejected sequence is
longer is dropped from the dataset (counted in "dropped_pairs").
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import tempfile
from typing import Any

# peer_common first: it sets the Hub environment before transformers is imported
from peer_common import StepTimer, common_args, emit, load_spec, read_jsonl, result_stdout, setup

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer


def preference_pairs(records: list[dict[str, Any]]) -> Dataset:
    """All (better, worse) pairs of each record's ranked responses."""
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": better}],
         "rejected": [{"role": "assistant", "content": worse}]}
        for r in records
        for better, worse in itertools.combinations(r["responses"], 2)
    ])


def main() -> None:
    out = result_stdout()
    spec = load_spec()
    setup(spec)  # seeds before loading: the scalar head is initialised at random
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model_dir"], num_labels=1, dtype=torch.float32, trust_remote_code=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = preference_pairs(read_jsonl(spec["data"]))
    output_dir = tempfile.mkdtemp(prefix="trl-rm-")
    try:
        args = RewardConfig(
            **common_args(spec, output_dir),
            per_device_train_batch_size=int(spec["pairs_per_step"]),
            max_steps=warmup + steps,
            max_length=int(spec["max_length"]),
            center_rewards_coefficient=None,
        )
        timer = StepTimer()
        trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                callbacks=[timer])
        kept = trainer.train_dataset
        pair_lengths = [len(c) + len(r) for c, r in zip(kept["chosen_ids"], kept["rejected_ids"], strict=True)]
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    emit(out, {
        "peer": f"trl {trl.__version__} RewardTrainer",
        "step_seconds": timer.seconds[warmup:],
        "pairs_per_step": int(spec["pairs_per_step"]),
        "tokens_per_pair": statistics.fmean(pair_lengths),
        "dropped_pairs": len(pairs) - len(pair_lengths),
        "losses": timer.losses,
    })


if __name__ == "__main__":
    main()
