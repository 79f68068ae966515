"""TRL SFTTrainer peer: times `warmup + steps` optimizer steps of supervised fine-tuning.

Spec: {model_dir, data (jsonl of {"prompt", "response"}), batch_size, max_length, warmup, steps, seed, lr, threads}.

The records become TRL's conversational prompt-completion format, so TRL renders them with the
tokenizer's chat template and computes the loss on the completion tokens only (its default for
prompt-completion data). TRL truncates each rendered sequence to `max_length` keeping the start
(`truncation_mode="keep_start"`), then drops any sample with no completion token left.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from typing import Any

# peer_common first: it sets the Hub environment before transformers is imported
from peer_common import StepTimer, common_args, emit, load_spec, read_jsonl, result_stdout, setup

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def conversational(records: list[dict[str, Any]]) -> Dataset:
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]}
        for r in records
    ])


def main() -> None:
    out = result_stdout()
    spec = load_spec()
    setup(spec)
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, trust_remote_code=False)
    records = read_jsonl(spec["data"])
    output_dir = tempfile.mkdtemp(prefix="trl-sft-")
    try:
        args = SFTConfig(
            **common_args(spec, output_dir),
            per_device_train_batch_size=int(spec["batch_size"]),
            max_steps=warmup + steps,
            max_length=int(spec["max_length"]),
            packing=False,
        )
        timer = StepTimer()
        trainer = SFTTrainer(model=model, args=args, train_dataset=conversational(records),
                             processing_class=tokenizer, callbacks=[timer])
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    emit(out, {
        "peer": f"trl {trl.__version__} SFTTrainer",
        "step_seconds": timer.seconds[warmup:],
        "samples_per_step": int(spec["batch_size"]),
        "tokens_per_sample": statistics.fmean(lengths),
        "dropped_samples": len(records) - len(lengths),
        "losses": timer.losses,
    })


if __name__ == "__main__":
    main()
