"""The quickstart task: list N words of a category in a requested letter case.

A prompt reads e.g. "List 3 fruits in uppercase." and the best answer is "APPLE, MANGO, PEAR".
`gold_reward(prompt, response)` scores any answer by rule, so the pipeline can show that the
reward model learns the preference and that PPO raises the *gold* reward, not just the
learned one. Demonstrations and ranked answers come from a noisy writer whose mistakes
(wrong count, words from another category, repeats, wrong case) the gold rule penalises;
SFT imitates that writer, so there is room above it for RLHF to climb.

Held-out prompts are distinct prompt strings that never appear in the training sets.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

CATEGORIES: dict[str, list[str]] = {
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
    "colors": ["red", "blue", "green", "yellow", "purple", "black", "white", "pink"],
    "animals": ["cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger"],
    "vegetables": ["carrot", "potato", "onion", "pepper", "tomato", "garlic", "cabbage", "lettuce"],
    "metals": ["iron", "gold", "silver", "copper", "tin", "zinc", "lead", "nickel"],
    "birds": ["eagle", "owl", "crow", "duck", "swan", "robin", "parrot", "hawk"],
}
CASES = ("lowercase", "uppercase", "capitalized")
CASE_PHRASES = {"lowercase": "in lowercase", "uppercase": "in uppercase", "capitalized": "capitalized"}
TEMPLATES = ("List {n} {category} {case}.", "Name {n} {category}, {case}.", "Give me {n} {category} {case}, separated by commas.")
COUNTS = (2, 3, 4, 5)
_PROMPT_RE = re.compile(r"(\d+) (" + "|".join(CATEGORIES) + r")\b.*\b(" + "|".join(CASES) + r")")


@dataclass(frozen=True)
class Task:
    n: int
    category: str
    case: str


def parse_prompt(prompt: str) -> Task:
    match = _PROMPT_RE.search(prompt)
    if not match:
        raise ValueError(f"not a quickstart prompt: {prompt!r}")
    return Task(int(match.group(1)), match.group(2), match.group(3))


def _in_case(word: str, case: str) -> bool:
    if case == "lowercase":
        return word == word.lower()
    if case == "uppercase":
        return word == word.upper()
    return word == word.capitalize()


def gold_reward(prompt: str, response: str) -> float:
    """Product of three rule scores in [0, 1]: the count (1 - |items - n| / n, floored at 0),
    the share of items that are distinct words of the category, and the share written in the
    requested case. A perfect answer scores 1; the noisy writer at quality 0.6 averages ~0.46,
    so a policy that only imitates it has room to improve."""
    task = parse_prompt(prompt)
    items = [item.strip() for item in response.strip().rstrip(".").split(",") if item.strip()]
    if not items:
        return 0.0
    count = max(0.0, 1.0 - abs(len(items) - task.n) / task.n)
    seen, valid = set(), 0
    for item in items:
        word = item.lower()
        if word in CATEGORIES[task.category] and word not in seen:
            valid += 1
        seen.add(word)
    case = sum(_in_case(item, task.case) for item in items) / len(items)
    return count * (valid / len(items)) * case


def _write_case(word: str, case: str) -> str:
    return {"lowercase": word.lower(), "uppercase": word.upper(), "capitalized": word.capitalize()}[case]


def noisy_answer(task: Task, rng: random.Random, quality: float) -> str:
    """An answer by a careless writer: each kind of mistake happens with prob. 1 - quality."""
    n = task.n
    if rng.random() > quality:
        n = max(1, n + rng.choice((-2, -1, 1, 2)))
    words = rng.sample(CATEGORIES[task.category], min(n, len(CATEGORIES[task.category])))
    if rng.random() > quality:
        other = rng.choice([c for c in CATEGORIES if c != task.category])
        words[rng.randrange(len(words))] = rng.choice(CATEGORIES[other])
    if rng.random() > quality and len(words) > 1:
        words[rng.randrange(1, len(words))] = words[0]
    case = task.case if rng.random() <= quality else rng.choice(CASES)
    return ", ".join(_write_case(w, case) for w in words)


def all_prompts() -> list[str]:
    return [
        template.format(n=n, category=category, case=CASE_PHRASES[case])
        for template in TEMPLATES
        for category in CATEGORIES
        for n in COUNTS
        for case in CASES
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written to a temp file beside `path` and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def synthesize(
    out_dir: str | Path,
    seed: int = 0,
    sft_rows: int = 2000,
    rank_rows: int = 8000,
    k: int = 4,
    prompt_rows: int = 512,
    pretrain_rows: int = 1000,
    eval_fraction: float = 0.2,
    quality: float = 0.6,
) -> dict[str, str]:
    """Write sft.jsonl, rank.jsonl, prompts.jsonl, prompts_eval.jsonl and pretrain.jsonl."""
    rng = random.Random(seed)
    prompts = all_prompts()
    rng.shuffle(prompts)
    n_eval = max(1, int(len(prompts) * eval_fraction))
    eval_prompts, train_prompts = prompts[:n_eval], prompts[n_eval:]

    def pick() -> tuple[str, Task]:
        prompt = rng.choice(train_prompts)
        return prompt, parse_prompt(prompt)

    sft = []
    for _ in range(sft_rows):
        prompt, task = pick()
        sft.append({"prompt": prompt, "response": noisy_answer(task, rng, quality)})
    rank = []
    for _ in range(rank_rows):
        prompt, task = pick()
        answers = []
        while len(answers) < k:
            answer = noisy_answer(task, rng, quality)
            if answer not in answers:
                answers.append(answer)
        scores = [round(gold_reward(prompt, a), 6) for a in answers]
        if len(set(scores)) == 1:
            continue
        rank.append({"prompt": prompt, "responses": answers, "scores": scores})
    train_prompt_rows = [{"prompt": rng.choice(train_prompts)} for _ in range(prompt_rows)]
    eval_prompt_rows = [{"prompt": p} for p in eval_prompts]
    pretrain = []
    for _ in range(pretrain_rows):
        category = rng.choice(list(CATEGORIES))
        words = rng.sample(CATEGORIES[category], 3)
        pretrain.append({"text": f"{words[0].capitalize()}, {words[1]} and {words[2]} are {category}."})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "sft": (out / "sft.jsonl", sft),
        "rank": (out / "rank.jsonl", rank),
        "prompts": (out / "prompts.jsonl", train_prompt_rows),
        "prompts_eval": (out / "prompts_eval.jsonl", eval_prompt_rows),
        "pretrain": (out / "pretrain.jsonl", pretrain),
    }
    for path, rows in files.values():
        write_jsonl(path, rows)
    return {name: str(path) for name, (path, _) in files.items()}
