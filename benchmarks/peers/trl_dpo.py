"""TRL DPOTrainer peer: times `warmup + steps` optimizer steps of DPO with a live reference model.

Spec: {model_dir (a causal LM), data (jsonl of {"prompt", "responses": [chosen, rejected]}), pairs_per_step,
max_length, beta, warmup, steps, seed, lr, threads}.

Each record becomes one (chosen, rejected) pair in TRL's conversational preference format; TRL renders
prompt + answer with the chat template, forwards the chosen and rejected rows of a batch together through
the policy and then through the reference (loaded by TRL from the same directory, since `ref_model` is
not given), and takes the sigmoid DPO loss on summed answer log-probs. `max_length` truncates
prompt + answer keeping its start (TRL's default `truncation_mode`); the pairs with a row longer than that
are counted in "truncated_pairs".
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

# peer_common first: it sets the Hub environment before transformers is imported
from peer_common import StepTimer, common_args, emit, load_spec, read_jsonl, result_stdout, setup

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def preference_pairs(records: list[dict[str, Any]]) -> Dataset:
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["responses"][0]}],
         "rejected": [{"role": "assistant", "content": r["responses"][1]}]}
        for r in records
    ])


def main() -> None:
    out = result_stdout()
    spec = load_spec()
    setup(spec)
    warmup, steps, max_length = int(spec["warmup"]), int(spec["steps"]), int(spec["max_length"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, trust_remote_code=False)
    pairs = preference_pairs(read_jsonl(spec["data"]))
    truncated = sum(
        max(len(tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=True, return_dict=False))
            for side in ("chosen", "rejected")) > max_length
        for p in pairs)
    output_dir = tempfile.mkdtemp(prefix="trl-dpo-")
    try:
        args = DPOConfig(
            **common_args(spec, output_dir),
            per_device_train_batch_size=int(spec["pairs_per_step"]),
            max_steps=warmup + steps,
            max_length=max_length,
            beta=float(spec["beta"]),
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
        )
        timer = StepTimer()
        trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    emit(out, {
        "peer": f"trl {trl.__version__} DPOTrainer",
        "step_seconds": timer.seconds[warmup:],
        "pairs_per_step": int(spec["pairs_per_step"]),
        "truncated_pairs": truncated,
        "losses": timer.losses,
    })


if __name__ == "__main__":
    main()
