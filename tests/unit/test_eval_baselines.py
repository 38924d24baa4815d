"""The evaluation tells the truth about the teacher (issue #15): a majority-class row, per-class precision /
recall / F1, a verdict that names a teacher no better than a constant answer, no "(none)" pseudo-segment in a
project without segments, and which filters used gold. Every number is checked against a value worked out by
hand from the tables below (per-class against scikit-learn)."""

import json
import time

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from distill.evaluate import common as C
from distill.evaluate import evaluate
from distill.evaluate import lm as L
from distill.evaluate.classify import _Codes, _per_class
from distill.project import Project
from distill.report.html import render_html, write_report
from distill.task import ProjectSpec, QualityBar

LABELS = ["ok", "spam"]

# No segment_field and no segment on any row. min_segment_size 1 would gate any pseudo-segment there was.
SPEC = """
name: imbalanced
kind: classify
labels: [ok, spam]
filters: {drop_disagree_with_gold: true, min_confidence: 0.5}
quality: {metric: accuracy, against: gold, overall: 0.5, worst_segment: 0.99, min_segment_size: 1}
teachers:
  - name: tt
    kind: replay
    path: recorded.jsonl
    model: small-local-teacher
teacher: tt
"""

# Test split, 16 'ok' + 4 'spam' (gold). The teacher over-calls spam: right on the 4 spam rows and on 6 of the
# 16 ok rows -> accuracy 10/20 = 0.5, below the constant 'ok' (16/20 = 0.8). The student says 'spam' on s0
# only -> right on 16 ok + 1 spam = 17/20, "retention" 0.85 / 0.5 = 1.7 against that teacher.
GOLD = ["ok"] * 16 + ["spam"] * 4
IDS = [f"o{i}" for i in range(16)] + [f"s{i}" for i in range(4)]
TEACHER = ["ok"] * 6 + ["spam"] * 10 + ["spam"] * 4
STUDENT = ["ok"] * 16 + ["spam"] + ["ok"] * 3


class FakeStudent:
    """Duck-typed ClassifierStudent with a fixed answer per text (p = 0.9)."""

    labels = LABELS

    def __init__(self, answers: dict):
        self.answers = answers

    def predict_proba(self, texts, batch_size=32):
        out = np.full((len(texts), 2), 0.1)
        for k, t in enumerate(texts):
            out[k, LABELS.index(self.answers[t])] = 0.9
        return out

    def size_bytes(self):
        return 1000


def build(tmp_path):
    """20 test rows (above), 20 train rows the teacher labelled 14 'ok' / 6 'spam' plus 6 the filter dropped:
    3 disagreed with gold, 1 low confidence, 1 suspect_label (a reason this code does not know), 1 bad JSON."""
    p = Project.init(tmp_path / "proj", "classify", SPEC)
    now = time.time()
    with p.store.tx() as c:
        for rid, gold, tans in zip(IDS, GOLD, TEACHER):
            txt = f"message {rid} {'buy now' if gold == 'spam' else 'see you'}"
            c.execute("INSERT INTO examples(id,text,norm,gold,segment,split,created_at) VALUES(?,?,?,?,?,?,?)",
                      (rid, txt, txt, json.dumps(gold), None, "test", now))
            c.execute("INSERT INTO labels(example_id,teacher,status,answer,confidence,created_at) VALUES(?,?,?,?,?,?)",
                      (rid, "tt", "ok", json.dumps(tans), 0.9, now))
        config = {"filters": {"drop_disagree_with_gold": True, "min_confidence": 0.5, "min_margin": None,
                              "max_entropy": None, "min_agreement": None, "drop_duplicates": True}}
        c.execute("INSERT INTO filter_runs(id,teacher,config,kept,dropped,created_at) VALUES(1,'tt',?,20,6,?)",
                  (json.dumps(config), now))
        dropped = ["disagrees_with_gold"] * 3 + ["low_confidence", "suspect_label", "teacher_failed:bad_json"]
        for i in range(26):
            lab = "ok" if i < 14 or i >= 20 else "spam"
            txt = f"train {i} {'see you' if lab == 'ok' else 'buy now'}"
            c.execute("INSERT INTO examples(id,text,norm,gold,segment,split,created_at) VALUES(?,?,?,?,?,?,?)",
                      (f"t{i}", txt, txt, None, None, "train", now))
            c.execute("INSERT INTO labels(example_id,teacher,status,answer,created_at) VALUES(?,?,?,?,?)",
                      (f"t{i}", "tt", "ok", json.dumps(lab), now))
            reason = dropped[i - 20] if i >= 20 else None
            c.execute("INSERT INTO filter_decisions(run_id,example_id,kept,reason) VALUES(1,?,?,?)",
                      (f"t{i}", int(reason is None), reason))
    p.store.put_run("train-1", "train", "done", str(tmp_path / "model"),
                    {"teacher": {"identity": {"name": "tt"}}, "config": {"base": "tiny"}, "filter": {"run_id": 1}})
    texts = {f"message {rid} {'buy now' if g == 'spam' else 'see you'}": s for rid, g, s in zip(IDS, GOLD, STUDENT)}
    return p, FakeStudent(texts)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    p, student = build(tmp_path_factory.mktemp("imb"))
    return p, evaluate(p, student=student, latency_samples=0, progress=False).to_dict()


def test_majority_row_equals_hand_values(evaluated):
    _, d = evaluated
    m = d["systems"]["majority"]
    assert m["available"] and m["answer"] == "ok" and (m["train_count"], m["n_train"]) == (14, 20)
    assert m["vs_gold"]["accuracy"]["value"] == pytest.approx(16 / 20)
    # 'ok': TP 16, FP 4, FN 0 -> F1 32/36; 'spam' is in gold but never predicted -> F1 0; macro = 4/9
    assert m["vs_gold"]["macro_f1"]["value"] == pytest.approx((32 / 36 + 0) / 2)
    assert m["vs_gold"]["macro_f1"]["value"] == pytest.approx(f1_score(GOLD, ["ok"] * 20, average="macro"))
    assert m["vs_teacher"]["agreement"]["value"] == pytest.approx(6 / 20)
    for v in (m["vs_gold"]["accuracy"], m["vs_gold"]["macro_f1"]):
        assert v["ci"][0] <= v["value"] <= v["ci"][1]
    assert "kept train labels" in m["description"] and "without gold" in m["description"]
    assert d["cost"]["majority"]["per_1m_usd"] == 0.0
    assert "majority" in d["headline"] and "retention" not in d["headline"]["majority"]


def test_teacher_worse_than_majority_is_named_and_retention_is_not_the_headline(evaluated):
    _, d = evaluated
    te, st = d["systems"]["teacher"], d["systems"]["student"]
    assert te["vs_gold"]["accuracy"]["value"] == pytest.approx(10 / 20)
    assert st["vs_gold"]["accuracy"]["value"] == pytest.approx(17 / 20)
    assert st["retention"]["accuracy"]["value"] == pytest.approx(0.85 / 0.5)  # still measured, in systems
    v = d["verdict"]
    assert v["teacher_problem"] is True and v["headline_figure"] == "student_vs_gold"
    assert v["teacher_vs_majority"]["accuracy"] == {"teacher": pytest.approx(0.5), "majority": pytest.approx(0.8),
                                                   "teacher_at_or_below": True}
    # teacher macro-F1: ok 2*6/(2*6+0+10) = 12/22, spam 2*4/(2*4+10+0) = 8/18 -> above the constant's 4/9
    assert v["teacher_vs_majority"]["macro_f1"]["teacher"] == pytest.approx((12 / 22 + 8 / 18) / 2)
    assert v["teacher_vs_majority"]["macro_f1"]["teacher_at_or_below"] is False
    problem, student_line = v["headline"]
    assert "teacher is the problem" in problem and "'ok'" in problem and "accuracy 0.500 <= 0.800" in problem
    assert "`distill teacher check`" in problem and "Fix the prompt or choose another teacher" in problem
    assert student_line.startswith("student accuracy vs gold 0.850") and "majority 0.800" in student_line
    assert "retention" not in student_line
    assert all("retention" not in row for row in d["headline"].values())


def test_no_segments_means_no_none_segment_and_no_worst_segment_gate(evaluated):
    _, d = evaluated
    assert d["test"]["segmented"] is False and d["test"]["segment_counts"] == {}
    for s in d["systems"].values():
        assert s.get("segments", []) == []
    g = d["gate"]
    # worst_segment 0.99 would fail any pseudo-segment; only the overall threshold (0.5) applies
    assert g["passed"] is True and g["worst_segment"] is None and g["segmented"] is False
    assert not any("segment" in w for w in g["warnings"] + g["failures"])


def test_mixed_segments_keep_the_none_segment(tmp_path):
    p, student = build(tmp_path)
    p.store.conn.execute("UPDATE examples SET segment='web' WHERE id IN ('o0', 'o1', 's0')")
    d = evaluate(p, student=student, latency_samples=0, progress=False).to_dict()
    segs = {s["segment"]: s for s in d["systems"]["student"]["segments"]}
    assert set(segs) == {"web", "(none)"} and segs["(none)"]["n"] == 17
    assert d["test"]["segmented"] is True and d["test"]["segment_counts"] == {"(none)": 17, "web": 3}
    assert d["gate"]["worst_segment"] is not None


def test_gold_filter_disclosure(evaluated):
    _, d = evaluated
    f = d["filters_used"]
    assert f["run_id"] == 1 and "trained on" in f["source"]
    rows = {r["filter"]: r for r in f["filters"]}
    assert rows["disagrees_with_gold"] == {"filter": "disagrees_with_gold", "uses_gold": True, "dropped": 3,
                                           "setting": "filters.drop_disagree_with_gold: true"}
    assert rows["low_confidence"]["uses_gold"] is False and rows["low_confidence"]["dropped"] == 1
    assert rows["duplicate"] == {"filter": "duplicate", "uses_gold": False, "dropped": 0,
                                 "setting": "filters.drop_duplicates: true"}      # active, dropped nothing
    assert rows["suspect_label"]["uses_gold"] is False and rows["suspect_label"]["dropped"] == 1   # unknown reason
    assert rows["teacher_failed:bad_json"]["uses_gold"] is False
    assert "low_margin" not in rows                                               # not switched on
    # 26 train rows, 1 without an answer (bad JSON): 3 of the 25 labels were dropped using gold
    assert (f["gold_dropped"], f["labelled"], f["gold_filters"]) == (3, 25, ["disagrees_with_gold"])
    assert "trained with 3 of 25 labels dropped because they disagreed with gold" in d["verdict"]["headline"][-1]


def test_uses_gold_rule():
    assert C.uses_gold("disagrees_with_gold") and C.uses_gold("matches_gold_v2")
    for r in ("low_confidence", "low_margin", "high_entropy", "low_agreement", "duplicate", "contaminated",
              "teacher_failed:label_not_in_set", "suspect_label", "no_label"):
        assert not C.uses_gold(r), r


def test_per_class_table_equals_sklearn_on_a_hand_built_case():
    classes = ["a", "b", "c", "d"]
    gold = ["a", "a", "a", "b", "b", "c", "c", "c", "c", None]
    pred = ["a", "b", None, "b", "d", "c", "c", "a", "c", "a"]      # None: no answer; 'd' never in gold
    c = _Codes(classes, gold, gold, None)
    rows = _per_class(c, c.encode(pred))
    g, p = gold[:9], ["<none>" if x is None else x for x in pred[:9]]           # the gold-less row is not scored
    prec, rec, f1, sup = precision_recall_fscore_support(g, p, labels=["a", "b", "c", "d"], zero_division=0)
    by = {r["class"]: r for r in rows}
    for k, lab in enumerate(["a", "b", "c", "d"]):
        assert (by[lab]["precision"], by[lab]["recall"], by[lab]["f1"], by[lab]["support"]) == pytest.approx(
            (prec[k], rec[k], f1[k], sup[k]))
    # by hand: a P 1/2 R 1/3; b P 1/2 R 1/2; c P 1 R 3/4; d P 0 (1 predicted) R 0 (support 0)
    assert by["a"]["f1"] == pytest.approx(0.4) and by["c"]["f1"] == pytest.approx(6 / 7)
    assert (by["d"]["predicted"], by["d"]["support"], by["d"]["f1"]) == (1, 0, 0.0)
    assert [r["class"] for r in rows] == ["d", "a", "b", "c"]                  # worst F1 first
    # the classes are macro-F1's: the mean of the per-class F1 is the reported macro-F1
    assert np.mean([r["f1"] for r in rows]) == pytest.approx(f1_score(g, p, labels=classes, average="macro"))


def test_per_class_in_the_eval_and_the_report(evaluated, tmp_path):
    p, d = evaluated
    te = {r["class"]: r for r in d["systems"]["teacher"]["per_class"]}
    assert te["spam"]["precision"] == pytest.approx(4 / 14) and te["spam"]["recall"] == 1.0
    assert te["ok"]["recall"] == pytest.approx(6 / 16) and te["ok"]["support"] == 16
    assert {"student", "teacher", "base"} <= {n for n, s in d["systems"].items() if s.get("per_class")}
    html_path, json_path = write_report(p, d)
    html = html_path.read_text()
    assert json.loads(json_path.read_text())["systems"]["student"]["per_class"] == d["systems"]["student"]["per_class"]
    assert "teacher is the problem" in html and "distill teacher check" in html
    assert "retention (acc.)" not in html and "<div class='k'>retention</div>" not in html
    assert "student accuracy vs gold" in html and "majority" in html
    assert "No segments" in html and "<th>segment</th>" not in html
    assert "Filters: which used gold" in html and "<th>disagrees_with_gold</th>" in html
    assert "3 of 25 training labels were dropped by filters that read gold" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    # 40 classes: the HTML shows the 15 worst and says where the rest are
    many = [{"class": f"c{k:02d}", "precision": k / 40, "recall": k / 40, "f1": k / 40, "support": 2, "predicted": 2}
            for k in range(40)]
    doc = {**d, "systems": {**d["systems"], "student": {**d["systems"]["student"], "per_class": many}}}
    page = render_html(doc)
    # (42 = the student's 40 + 'ok' and 'spam', which only teacher and base still list)
    assert "the 15 worst of 42 classes are shown, the other 27 are in report.json" in page
    assert "<th>c00</th>" in page and "<th>c14</th>" in page and "<th>c15</th>" not in page


def test_lm_scoring_has_no_none_segment_without_segments_and_a_majority_answer():
    spec = ProjectSpec(name="t", kind="extract", schema={"type": "object", "properties": {"intent": {"type": "string"}}})
    gold = [{"intent": "A"}, {"intent": "A"}, {"intent": "B"}]
    test = {"n": 3, "gold": gold, "teacher_pred": [{"intent": "B"}] * 3, "segments": [None] * 3, "segmented": False}
    s = L._score_system(spec, "majority", [{"intent": "A"}] * 3, None, test, 1, "field_f1")
    assert s["segments"] == [] and s["vs_gold"]["accuracy"]["value"] == pytest.approx(2 / 3)
    assert s["vs_gold"]["field_f1"]["value"] == pytest.approx(2 / 3)     # TP 2 of 3 predicted and 3 reference pairs
    mixed = {**test, "segments": ["x", None, None], "segmented": True}
    assert {b["segment"] for b in L._score_system(spec, "majority", [{"intent": "A"}] * 3, None, mixed, 1,
                                                  "field_f1")["segments"]} == {"x", "(none)"}
    q = QualityBar(metric="field_f1", against="gold", overall=0.5, worst_segment=0.9, min_segment_size=1)
    g = L._gate(q, "extract", s, segmented=False)
    assert g["passed"] and g["worst_segment"] is None and not any("segment" in w for w in g["warnings"])
