"""Canonical records: every accepted input format is turned into one of these types.

A record keeps `source` ("path:line" or "path:row N") so that errors found later (for
example while tokenising) still point at the row the user has to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    """"system", "user" or "assistant"."""
    content: str


@dataclass
class SFTRecord:
    """A conversation that ends with an assistant turn; the loss covers assistant turns."""

    messages: list[Message]
    source: str = ""

    @property
    def prompt(self) -> list[Message]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1].content


@dataclass
class RankRecord:
    """One prompt with K >= 2 answers and their preference scores (higher is better).

    Equal scores are ties and produce no pair. Plain chosen/rejected data is K=2 with
    scores [1, 0].
    """

    prompt: list[Message]
    responses: list[str]
    scores: list[float]
    margin: float | None = None
    """Optional extra margin m in -log σ(r_w - r_l - m), as given by the data."""
    source: str = ""

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs among the answers; ties give none."""
        out = []
        for i, j in combinations(range(len(self.responses)), 2):
            if self.scores[i] > self.scores[j]:
                out.append((i, j))
            elif self.scores[j] > self.scores[i]:
                out.append((j, i))
        return out


@dataclass
class PromptRecord:
    """A prompt for RL: the conversation up to the point where the policy answers."""

    prompt: list[Message]
    source: str = ""
    fields: dict = field(default_factory=dict)
    """The row's other columns (e.g. a reference answer), which reward functions receive."""


@dataclass
class PretrainRecord:
    """Plain text for the PPO-ptx language-modelling term."""

    text: str
    source: str = ""


@dataclass
class LoadReport:
    """What a builder read: how many rows, records and skipped rows (with the first errors)."""

    rows: int = 0
    records: int = 0
    skipped: int = 0
    first_errors: list[str] = field(default_factory=list)
