"""The teacher as a judge (distill.judge): grades parsed, every call cached and in the ledger, nothing re-paid."""

from __future__ import annotations

import json
import subprocess
import sys

from distill.judge import judge, judge_messages, parse_grade
from distill.project import Project
from distill.teachers.base import TeacherReply

SPEC = """name: g
kind: generate
description: Summarise the customer's message in one sentence.
quality: {metric: exact_match, judge: true}
teachers:
  - name: big
    kind: openai
    base_url: http://127.0.0.1:9/v1
    model: big-1
    price: {input_per_1m: 1.0, output_per_1m: 2.0}
    terms: {outputs_may_train_models: true}
"""


class FakeJudge:
    """Grades 5 when the candidate equals the reference, 2 otherwise; 'garbage' for one candidate."""

    def __init__(self):
        self.asked = []

    async def ask(self, req):
        user = req.messages[1]["content"]
        self.asked.append(user)
        ref = user.split("Reference answer:\n")[1].split("\n\n")[0] if "Reference answer:" in user else None
        cand = user.split("Candidate answer:\n")[1].split("\n\n")[0]
        text = "no idea" if cand == "garbage" else ("Grade: 5" if cand == ref else "2")
        return TeacherReply(texts=[text], tokens_in=100, tokens_out=2, latency_s=0.01)


def test_parse_grade():
    assert parse_grade("5") == 5 and parse_grade("Grade: 3.") == 3 and parse_grade("I'd say 4/5") == 4
    assert parse_grade("0 or 9") is None and parse_grade(None) is None and parse_grade("") is None


def test_judge_grades_caches_and_ledgers(tmp_path):
    p = Project.init(tmp_path / "p", "generate", spec_text=SPEC)
    tspec = p.spec.get_teacher("big")
    reqs = ["msg a", "msg b", "msg c", "msg d"]
    cands = ["A", "wrong", None, "garbage"]
    refs = ["A", "B", "C", None]
    t = FakeJudge()
    r = judge(p, tspec, reqs, cands, refs, teacher=t)
    # None = no answer: the lowest grade, without asking; garbage reply: ungraded, not a made-up number
    assert r["grades"] == [5, 2, 1, None]
    assert (r["new_calls"], r["cached"], r["ungraded"]) == (3, 0, 1) and len(t.asked) == 3
    assert "Reference answer" not in t.asked[2]                  # no reference -> none shown
    calls = p.store.q("SELECT * FROM teacher_calls ORDER BY created_at")
    assert len(calls) == 3 and all(json.loads(c["request"])["source"] == "judge" for c in calls)
    assert [c["status"] for c in calls].count("parse_error") == 1
    assert r["spend"] == sum(c["cost"] for c in calls) == 3 * (100 * 1.0 + 2 * 2.0) / 1e6
    # a re-run pays nothing: every grade comes from the store
    t2 = FakeJudge()
    r2 = judge(p, tspec, reqs, cands, refs, teacher=t2)
    assert r2["grades"] == r["grades"] and r2["new_calls"] == 0 and r2["cached"] == 3 and not t2.asked
    p.close()


def test_judge_prompt_names_the_task_and_asks_for_a_digit():
    m = judge_messages("Summarise it.", "req", "cand", "ref")
    assert "Summarise it." in m[0]["content"] and "digit only" in m[0]["content"]
    assert m[1]["content"].index("Reference answer") < m[1]["content"].index("Candidate answer")


def test_a_failing_teacher_leaves_grades_missing_not_invented(tmp_path):
    class Down:
        async def ask(self, req):
            raise ConnectionError("refused")

    p = Project.init(tmp_path / "p", "generate", spec_text=SPEC)
    r = judge(p, p.spec.get_teacher("big"), ["x", "y"], ["a", "b"], ["a", None], teacher=Down())
    assert r["grades"] == [None, None] and r["errors"] == 2 and r["new_calls"] == 0
    assert p.store.q("SELECT COUNT(*) AS n FROM teacher_calls")[0]["n"] == 0
    p.close()


def test_the_ledger_does_not_pull_in_the_labeller():
    """The judge (and the service) record calls through distill.teachers.ledger, which must not import the
    asyncio labeller: a fresh interpreter shows what importing them really loads."""
    code = ("import sys, distill.teachers.ledger, distill.judge; "
            "print(sorted(m for m in sys.modules if m in ('distill.labeling', 'distill.ratelimit', 'rich.progress')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
