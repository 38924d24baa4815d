"""Combining the labels of several teachers into one (``kind: ensemble``).

An ensemble has no model of its own: ``distill label`` first labels with every member (each under its own
name, with its own cache and ledger rows), then writes one ensemble label per input from the members'
ok labels with ``combine``:

- answer: majority vote over the members' answers (compared by ``task.answer_key``). Ties go to the
  answer with the higher mean probability (classify), then to the earliest member in ``members:`` so the
  result never depends on dict order.
- probs (classify): the mean of the members' distributions. A member that gave no distribution counts
  as a one-hot vector on its answer (the only thing it told us). This is the "averaging" ensemble of
  Hinton et al. 2015 (arXiv 1503.02531, sec. 1), used as a soft target.
- confidence (classify): the mean probability of the voted answer.
- agreement: the share of members whose answer equals the voted answer (members with no ok label
  count as not agreeing, so a 2-of-3 vote with one failure is 2/3, not 1).
- samples: the members' answers in ``members:`` order (None for a member without an ok label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.task import ProjectSpec, answer_key


@dataclass
class MemberAnswer:
    teacher: str
    answer: Any                          # None when this member has no ok label for the input
    probs: dict[str, float] | None = None


@dataclass
class Combined:
    answer: Any
    probs: dict[str, float] | None
    confidence: float | None
    agreement: float
    samples: list[Any]


def member_distribution(spec: ProjectSpec, m: MemberAnswer) -> dict[str, float]:
    """A member's distribution over the label set: its own probs (renormalised over the labels) or a
    one-hot vector on its answer."""
    names = spec.label_names
    if m.probs:
        dist = {n: float(m.probs.get(n, 0.0)) for n in names}
        total = sum(dist.values())
        if total > 0:
            return {n: p / total for n, p in dist.items()}
    return {n: 1.0 if n == m.answer else 0.0 for n in names}


def mean_distribution(spec: ProjectSpec, members: list[MemberAnswer]) -> dict[str, float]:
    answered = [m for m in members if m.answer is not None]
    dists = [member_distribution(spec, m) for m in answered]
    return {n: sum(d[n] for d in dists) / len(dists) for n in spec.label_names}


def majority_vote(spec: ProjectSpec, members: list[MemberAnswer],
                  mean_probs: dict[str, float] | None = None) -> Any:
    """The most frequent answer; ties -> higher mean probability -> earliest member."""
    counts: dict[str, int] = {}
    first: dict[str, tuple[int, Any]] = {}
    for i, m in enumerate(members):
        if m.answer is None:
            continue
        k = answer_key(spec, m.answer)
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, (i, m.answer))

    def rank(k: str) -> tuple:
        p = (mean_probs or {}).get(first[k][1], 0.0) if spec.kind == "classify" else 0.0
        return (counts[k], p, -first[k][0])

    best = max(counts, key=rank)
    return first[best][1]


def combine(spec: ProjectSpec, members: list[MemberAnswer]) -> Combined | None:
    """One ensemble label from the members' answers; None when no member has an answer."""
    answered = [m for m in members if m.answer is not None]
    if not answered:
        return None
    probs = mean_distribution(spec, members) if spec.kind == "classify" else None
    answer = majority_vote(spec, members, probs)
    key = answer_key(spec, answer)
    agree = sum(1 for m in answered if answer_key(spec, m.answer) == key)
    return Combined(
        answer=answer,
        probs=probs,
        confidence=probs[answer] if probs is not None else None,
        agreement=agree / len(members),
        samples=[m.answer for m in members],
    )
