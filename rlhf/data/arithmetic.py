"""The verifiable-reward quickstart: small sums and differences with exact answers.

A prompt reads e.g. "What is 7 + 5?" and its row carries the exact answer ("answer": "12"), so
a reward *function* scores any response (`rlhf.rewards.builtin:exact_match` reads the final
answer after "Answer:") and no reward model is needed: GRPO, RLOO or REINFORCE++ learn from
that rule alone. Demonstrations come from a careless calculator that is right with
probability `quality` and otherwise off by one to three; SFT imitates it, so sampling from the
SFT model is often wrong and there is room above it for RL to climb.

Held-out prompts are distinct prompt strings that never appear in the training sets (the same
sum may appear there under another wording, as a fact the model has seen).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.data.quickstart import write_jsonl
from rlhf.rewards.builtin import exact_match

OPERANDS = range(7)
TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?")
ANSWER_FORMAT = "Answer: {value}"
_PROMPT_RE = re.compile(r"(\d+) ([+-]) (\d+)")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b


def parse_prompt(prompt: str) -> Problem:
    match = _PROMPT_RE.search(prompt)
    if not match:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return Problem(int(match.group(1)), match.group(2), int(match.group(3)))


def gold_reward(prompt: str, response: str) -> float:
    """1.0 when the response states the exact result of the prompt's sum (read as the
    built-in `exact_match` reads a final answer), else 0.0: the held-out accuracy
    (`eval.gold_reward`). The result is computed from the prompt, not taken from the row's
    answer field, so it checks the data as well as the policy."""
    return exact_match(prompt, response, answer=str(parse_prompt(prompt).value))


def noisy_answer(problem: Problem, rng: random.Random, quality: float) -> str:
    """Right with probability `quality`, else off by 1 to 3 (never below zero)."""
    value = problem.value
    if rng.random() > quality:
        value = max(0, value + rng.choice((-3, -2, -1, 1, 2, 3))) if value > 0 else value + rng.randint(1, 3)
    return ANSWER_FORMAT.format(value=value)


def all_prompts() -> list[str]:
    """Every wording of every sum a + b and every difference a - b with a >= b."""
    prompts = []
    for template in TEMPLATES:
        for a in OPERANDS:
            for b in OPERANDS:
                prompts.append(template.format(a=a, op="+", b=b))
                if a >= b:
                    prompts.append(template.format(a=a, op="-", b=b))
    return prompts


def synthesize(
    out_dir: str | Path,
    seed: int = 0,
    sft_rows: int = 3000,
    prompt_rows: int = 1024,
    eval_fraction: float = 0.2,
    quality: float = 0.6,
) -> dict[str, str]:
    """Write sft.jsonl (prompt, response), prompts.jsonl and prompts_eval.jsonl (prompt,
    answer)."""
    rng = random.Random(seed)
    prompts = all_prompts()
    rng.shuffle(prompts)
    n_eval = max(1, int(len(prompts) * eval_fraction))
    eval_prompts, train_prompts = prompts[:n_eval], prompts[n_eval:]

    def row(prompt: str) -> dict:
        return {"prompt": prompt, "answer": str(parse_prompt(prompt).value)}

    sft = []
    for _ in range(sft_rows):
        prompt = rng.choice(train_prompts)
        sft.append({"prompt": prompt, "response": noisy_answer(parse_prompt(prompt), rng, quality)})
    files = {
        "sft": sft,
        "prompts": [row(rng.choice(train_prompts)) for _ in range(prompt_rows)],
        "prompts_eval": [row(p) for p in eval_prompts],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return {name: str(out / f"{name}.jsonl") for name in files}
