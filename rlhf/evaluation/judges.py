"""The judges of `rlhf eval`: each scores (prompt, answer) pairs, higher is better. A reward
model reads the answer re-tokenised with its own tokenizer (it need not share the policy's),
closed by EOS only where the policy ended it (an answer cut at max_new_tokens is scored as PPO
scores a cut rollout, not as a finished one); a function scores by a known rule, and
"reference" by ROUGE-L F1 against the prompt row's reference answer."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from rlhf.config import judge_kind
from rlhf.config_sections import KernelsConfig, ModelConfig
from rlhf.data.records import PromptRecord, RankRecord
from rlhf.errors import UserError
from rlhf.evaluation.metrics import rouge_l


class Judge(Protocol):
    name: str

    def __call__(self, records: Sequence[PromptRecord], answers: Sequence[str],
                 finished: Sequence[bool] | None = None) -> list[float]:
        """`finished[i]`: answer i ended with EOS (None: all did)."""
        ...


class RewardModelJudge:
    def __init__(self, path: str, device: torch.device, max_length: int, max_prompt_length: int, batch_size: int,
                 kernels: KernelsConfig):
        from rlhf.kernels import accelerate
        from rlhf.models.loading import load_tokenizer
        from rlhf.models.reward import load_scalar_model

        resolved = Path(path).resolve()
        self.name = f"rm:{resolved.parent.name}/{resolved.name}" if resolved.name == "model" else f"rm:{resolved.name}"
        cfg = ModelConfig(path=path)
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_scalar_model(cfg, device).eval()
        accelerate(self.model, kernels)
        self.max_length, self.max_prompt_length, self.batch_size = max_length, max_prompt_length, batch_size

    def __call__(self, records: Sequence[PromptRecord], answers: Sequence[str],
                 finished: Sequence[bool] | None = None) -> list[float]:
        from rlhf.scoring import score_records

        rows = [RankRecord(prompt=r.prompt, responses=[a], scores=[0.0]) for r, a in zip(records, answers)]
        scores = score_records(self.model, self.tokenizer, rows, self.max_length, self.max_prompt_length,
                               self.batch_size, finished)
        return [row[0] for row in scores]


class FunctionJudge:
    def __init__(self, spec: str):
        module_name, _, function = spec.partition(":")
        try:
            self.function: Callable = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"judge {spec!r}: cannot import it ({exc})") from None
        self.name = function
        # A gold rule such as f(prompt, response) takes no row fields: pass only those it names.
        parameters = inspect.signature(self.function).parameters.values()
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self.takes = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def __call__(self, records: Sequence[PromptRecord], answers: Sequence[str],
                 finished: Sequence[bool] | None = None) -> list[float]:
        scores = []
        for record, answer in zip(records, answers):
            fields = {k: v for k, v in record.fields.items() if self.takes_all or k in self.takes}
            value = self.function(record.prompt[-1].content, answer, **fields)
            scores.append(float(sum(value.values())) if isinstance(value, dict) else float(value))
        return scores


class ReferenceJudge:
    name = "reference_rougeL"

    def __init__(self, field: str):
        self.field = field

    def __call__(self, records: Sequence[PromptRecord], answers: Sequence[str],
                 finished: Sequence[bool] | None = None) -> list[float]:
        return rouge_l(answers, reference_answers(records, self.field, required=True))


def reference_answers(records: Sequence[PromptRecord], field: str, required: bool = False) -> list[str] | None:
    """Each record's reference answer (the `field` column), or None when no row has one."""
    missing = [i for i, r in enumerate(records) if not isinstance(r.fields.get(field), str)]
    if not missing:
        return [r.fields[field] for r in records]
    if required or len(missing) < len(records):
        where = records[missing[0]].source or f"prompt {missing[0]}"
        raise UserError(f"{where}: field '{field}': no reference answer (the \"reference\" judge, ROUGE-L and BLEU "
                        "need one in every prompt row, or in none)")
    return None


def build_judges(specs: Sequence[str], reference_field: str, device: torch.device, max_length: int,
                 max_prompt_length: int, batch_size: int, kernels: KernelsConfig) -> list[Judge]:
    judges: list[Judge] = []
    for spec in specs:
        kind = judge_kind(spec)
        if kind == "reference":
            judges.append(ReferenceJudge(reference_field))
        elif kind == "function":
            judges.append(FunctionJudge(spec))
        else:
            judges.append(RewardModelJudge(spec, device, max_length, max_prompt_length, batch_size, kernels))
    names = [j.name for j in judges]
    for index, judge in enumerate(judges):
        if names.count(judge.name) > 1:
            judge.name = f"{judge.name}#{index}"
    return judges
