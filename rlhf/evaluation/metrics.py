"""Numbers of an evaluation computed from scores and texts alone: win rate with its Wilson
interval, repetition, and the reference-answer overlaps (ROUGE-L through `rouge-score`, BLEU
through `sacrebleu`)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Sequence

Z_95 = 1.959963984540054
"""The standard normal's 97.5% quantile: a two-sided 95% interval."""


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (Wilson 1927). Unlike the normal
    approximation p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at p = 0
    or 1. `successes` may be fractional (ties counted half)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class WinRate:
    rate: float
    """(wins + ties / 2) / n."""
    low: float
    high: float
    """The 95% Wilson interval of `rate`."""
    wins: int
    ties: int
    losses: int

    def as_dict(self) -> dict:
        return asdict(self)


def win_rate(policy: Sequence[float], baseline: Sequence[float], tie_tolerance: float = 1e-6) -> WinRate:
    """Paired comparison: answer i of the policy against answer i of the baseline (same prompt).
    Scores within `tie_tolerance` tie (a judge scoring two equal answers in different batches
    may round them apart) and count half a win."""
    if len(policy) != len(baseline):
        raise ValueError(f"{len(policy)} policy scores against {len(baseline)} baseline scores")
    wins = ties = 0
    for ours, theirs in zip(policy, baseline):
        if abs(ours - theirs) <= tie_tolerance:
            ties += 1
        elif ours > theirs:
            wins += 1
    n = len(policy)
    successes = wins + ties / 2
    low, high = wilson_interval(successes, n)
    return WinRate(successes / n if n else float("nan"), low, high, wins, ties, n - wins - ties)


_WORD = re.compile(r"\w+")


def repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """Share of the answers' word n-grams (lower-cased) that repeat an earlier n-gram of the same
    answer, over all answers: sum(n-grams - distinct n-grams) / sum(n-grams). 0 when no answer
    has n words."""
    total = repeated = 0
    for text in texts:
        words = _WORD.findall(text.lower())
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def rouge_l(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each answer against its reference (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(reference, answer)["rougeL"].fmeasure for answer, reference in zip(answers, references)]


def bleu(answers: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of the answers against one reference each (sacrebleu's defaults)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(answers), [list(references)]).score)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
