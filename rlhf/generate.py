"""`rlhf generate`: answer prompts with a model, through its chat template."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from rlhf.config_sections import DataSourceConfig, KernelsConfig, ModelConfig
from rlhf.data.records import Message
from rlhf.data.template import prompt_text
from rlhf.distributed.strategy import pick_device
from rlhf.kernels import accelerate
from rlhf.errors import UserError
from rlhf.models.loading import load_causal_lm, load_tokenizer


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
) -> list[str]:
    """Decode answers (text up to the first EOS) for each prompt, in batches, left-padded."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def generate_cli(args: argparse.Namespace) -> None:
    prompts: list[list[Message]] = [[Message("user", p)] for p in args.prompt]
    if args.prompts:
        from rlhf.data.builders import load_records

        records, _ = load_records("prompt", DataSourceConfig(path=args.prompts))
        prompts.extend(r.prompt for r in records)
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompts FILE")
    torch.manual_seed(args.seed)
    cfg = ModelConfig(path=args.model)
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, pick_device()).eval()
    accelerate(model, KernelsConfig())
    answers = generate_answers(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p, args.batch_size)
    rows = [{"prompt": p[-1].content, "response": a} for p, a in zip(prompts, answers)]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {len(rows)} answers to {out}")
    else:
        for row in rows:
            json.dump(row, sys.stdout)
            sys.stdout.write("\n")
