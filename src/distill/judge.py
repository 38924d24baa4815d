"""The teacher as a judge: a 1-5 grade for each answer of a ``generate`` task (``quality.judge: true``).

Exact and SQuAD-normalised match say little about free text (two good summaries rarely share their words),
so ``distill eval`` can ask the teacher to grade each system's answer against the request and, where there
is one, the reference answer (gold, else the teacher's own answer). This is the "LLM-as-a-judge" of
Zheng et al. 2023 (arXiv 2306.05685) in its single-answer grading form, with a reference when available
(their reference-guided variant), scored 1-5 and reported as a mean with a bootstrap CI.

Known biases, stated rather than hidden: a judge favours answers like its own (self-preference: here the
reference is often the teacher's own answer, so the teacher is *not* graded, only the student and the base
model), and favours longer answers (verbosity). Treat the score as a relative comparison between student
and base under the same judge, not as an absolute quality.

Every grade is a teacher call: cached under ``cache_key(teacher identity, judge prompt, 0)`` in
``teacher_calls`` (a re-run of ``distill eval`` costs nothing) and recorded in the ledger with its tokens,
cost and ``"source": "judge"``, so judging shows up in the spend like labelling does.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Sequence

from distill.task import TeacherSpec, cache_key
from distill.teachers.base import TeacherRequest
from distill.teachers.ledger import record_call, reply_from_row

JUDGE_SYSTEM = (
    "You grade answers to a task. Task: {description}\n"
    "Read the request, the reference answer (when given) and the candidate answer. Grade the candidate from 1 to 5:\n"
    "5 = correct and complete, as good as the reference; 4 = correct with a minor flaw; 3 = partly correct;\n"
    "2 = mostly wrong or missing the point; 1 = wrong, empty or off-task.\n"
    "Judge the content, not the length or the style. Reply with the digit only."
)
_DIGIT = re.compile(r"[1-5]")


def judge_messages(description: str, request: str, candidate: str, reference: str | None) -> list[dict[str, str]]:
    user = f"Request:\n{request}\n\n"
    if reference is not None:
        user += f"Reference answer:\n{reference}\n\n"
    user += f"Candidate answer:\n{candidate}\n\nGrade (1-5):"
    return [{"role": "system", "content": JUDGE_SYSTEM.format(description=description.strip())},
            {"role": "user", "content": user}]


def parse_grade(text: str | None) -> int | None:
    """The first digit 1-5 of the judge's reply, or None when there is none."""
    m = _DIGIT.search(text or "")
    return int(m.group()) if m else None


async def _grade_all(store, tspec: TeacherSpec, teacher, prompts: Sequence[list[dict[str, str]]]) -> list[dict]:
    identity = tspec.identity()
    sem = asyncio.Semaphore(tspec.concurrency)
    out: list[dict] = [{} for _ in prompts]

    async def one(i: int, msgs: list[dict[str, str]]) -> None:
        key = cache_key(identity, msgs, 0)
        row = store.get_call(key)
        if row is not None:
            reply = reply_from_row(row)
            out[i] = {"grade": parse_grade(reply.texts[0] if reply.texts else None), "cached": True, "cost": 0.0}
            return
        async with sem:
            try:
                reply = await teacher.ask(TeacherRequest(key=key, messages=msgs, kind="generate"))
            except Exception as e:  # noqa: BLE001 - one failed grade is a missing grade, not a failed eval
                out[i] = {"grade": None, "cached": False, "cost": 0.0, "error": f"{type(e).__name__}: {e}"[:200]}
                return
        grade = parse_grade(reply.texts[0] if reply.texts else None)
        with store.tx() as c:
            cost = record_call(c, tspec, key, 0, msgs, reply, "ok" if grade is not None else "parse_error",
                               None if grade is not None else "no grade 1-5 in the reply", source="judge",
                               or_ignore=True)
        out[i] = {"grade": grade, "cached": False, "cost": cost}

    await asyncio.gather(*(one(i, m) for i, m in enumerate(prompts)))
    return out


def judge(project, tspec: TeacherSpec, requests: Sequence[str], candidates: Sequence[str | None],
          references: Sequence[str | None], teacher: Any = None) -> dict[str, Any]:
    """Grades of ``candidates`` (None = the system gave no answer: grade 1, not asked). ``teacher`` defaults
    to ``make_teacher(tspec, project)``. Returns per-row grades and the counts of new and cached calls."""
    from distill.teachers import make_teacher

    own = teacher is None
    teacher = teacher or make_teacher(tspec, project)
    asked = [i for i, c in enumerate(candidates) if c is not None and c.strip()]
    prompts = [judge_messages(project.spec.description or "", requests[i], candidates[i], references[i]) for i in asked]

    async def run():
        try:
            return await _grade_all(project.store, tspec, teacher, prompts)
        finally:
            if own and hasattr(teacher, "aclose"):
                await teacher.aclose()

    graded = asyncio.run(run()) if prompts else []
    grades: list[int | None] = [1] * len(candidates)      # no answer = the lowest grade
    for i, g in zip(asked, graded):
        grades[i] = g["grade"]
    return {"grades": grades, "new_calls": sum(not g["cached"] and "error" not in g for g in graded),
            "cached": sum(g["cached"] for g in graded), "errors": sum("error" in g for g in graded),
            "ungraded": sum(g["grade"] is None for g in graded), "spend": sum(g["cost"] for g in graded)}
