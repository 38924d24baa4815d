"""`distill cost` against hand-computed numbers, on a store filled with known measurements."""

from __future__ import annotations

import json
import time

import pytest

from distill.cost import cost_figures, cost_report
from distill.errors import DistillError
from distill.project import Project

SPEC = """name: c
kind: classify
labels: [a, b]
teachers:
  - name: api
    kind: openai
    base_url: http://127.0.0.1:1/v1
    model: m
    price: {input_per_1m: 1.0, output_per_1m: 2.0}
teacher: api
"""


def call(c, key: str, cost: float, latency: float = 0.5, source: str | None = None) -> None:
    req = {"messages": [], **({"source": source} if source else {})}
    c.execute("INSERT INTO teacher_calls(key, teacher, model, request, status, cost, latency_s, created_at) "
              "VALUES(?,?,?,?,?,?,?,?)", (key, "api", "m", json.dumps(req), "ok", cost, latency, time.time()))


@pytest.fixture
def project(tmp_path) -> Project:
    """Ledger: 3 labelling calls of $0.002, $0.004, $0.006 + 1 serve call of $0.004 (mean $0.004/call,
    labelling spend $0.012). Two training runs of 1800 s and 1800 s. Eval: 0.010 s per request.
    Router: achieved coverage 0.8."""
    p = Project.init(tmp_path / "p", "classify", spec_text=SPEC)
    with p.store.tx() as c:
        for i, cost in enumerate([0.002, 0.004, 0.006]):
            call(c, f"k{i}", cost)
        call(c, "s0", 0.004, source="serve")
    model = tmp_path / "p" / "models" / "r2" / "final"
    model.mkdir(parents=True)
    (model / "router.json").write_text(json.dumps({"achieved_coverage": 0.8}))
    rec = {"teacher": {"identity": {"name": "api"}}, "train_seconds": 1800.0}
    p.store.put_run("r1", "train", "done", str(tmp_path / "elsewhere"), rec)
    p.store.put_run("r2", "train", "done", str(model), rec)
    report = tmp_path / "p" / "reports" / "eval-r2.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"latency": {"student": {"batch1": {"mean_s": 0.010}}}}))
    p.store.put_run("eval-r2", "eval", "done", str(report), {})
    yield p
    p.close()


def test_report_from_measured_figures(project):
    r = cost_report(project, monthly_requests=2e6, cpu_hour_usd=0.36)
    # teacher: 0.016 / 4 calls = $0.004 per request -> $4000 per 1M
    assert r["inputs"]["teacher_per_request"]["usd"] == pytest.approx(0.004)
    # student: 0.010 s x $0.36/h / 3600 s = $1e-6 per request -> $1 per 1M
    assert r["inputs"]["student_per_request"]["usd"] == pytest.approx(1e-6)
    assert r["inputs"]["routed_share"]["share"] == pytest.approx(0.2)
    per = r["per_1m_requests_usd"]
    assert per["teacher_only"] == pytest.approx(4000.0)
    assert per["student_only"] == pytest.approx(1.0)
    assert per["routed"] == pytest.approx(0.2 * 4000 + 1.0)          # 801
    assert r["monthly_usd"]["routed"] == pytest.approx(1602.0)       # 2M requests
    # one-off: labelling $0.012 (the serve call is a running cost) + 3600 s x $0.36/h = $0.36 -> $0.372
    assert r["inputs"]["one_off"]["labelling_usd"] == pytest.approx(0.012)
    assert r["one_off_usd"] == pytest.approx(0.372)
    # break-even: 0.372 / (0.004 - 0.000801) = 116.29 requests routed; 0.372 / (0.004 - 1e-6) = 93.02 student-only
    assert r["break_even_requests"]["routed"] == pytest.approx(0.372 / 0.003199)
    assert r["break_even_requests"]["student_only"] == pytest.approx(0.372 / 0.003999)
    assert r["model_run_id"] == "r2"


def test_given_routed_share_and_serving_marker(project):
    project.store.set_meta("serving_model", "r2")
    r = cost_report(project, routed_share=0.5, cpu_hour_usd=0.36)
    assert r["per_1m_requests_usd"]["routed"] == pytest.approx(0.5 * 4000 + 1.0)
    assert r["inputs"]["routed_share"]["basis"] == "given"


def test_no_saving_means_no_break_even():
    f = cost_figures(teacher_usd=0.001, student_usd=0.002, routed_share=0.1, one_off_usd=10.0, monthly_requests=1e6)
    assert f["break_even_requests"] == {"routed": None, "student_only": None}
    assert f["per_1m_requests_usd"]["routed"] == pytest.approx((0.1 * 0.001 + 0.002) * 1e6)   # 2100


def test_missing_measurements_are_distill_errors(tmp_path):
    p = Project.init(tmp_path / "q", "classify", spec_text=SPEC)
    with pytest.raises(DistillError, match="no trained model"):
        cost_report(p)
    p.store.put_run("r1", "train", "done", str(tmp_path), {"train_seconds": 1.0})
    with pytest.raises(DistillError, match="no calls in the ledger"):
        cost_report(p)
    with p.store.tx() as c:
        call(c, "k", 0.001)
    with pytest.raises(DistillError, match="no evaluation"):
        cost_report(p)
    with pytest.raises(DistillError, match="routed share"):
        cost_report(p, routed_share=1.5)
    p.close()
