"""``distill eval`` and ``distill report`` on a hand-built project: every number is checked against a value
worked out by hand from the table below (macro-F1 against scikit-learn)."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from distill.errors import DistillError
from distill.evaluate import evaluate
from distill.project import Project
from distill.report.html import write_report

LABELS = ["neg", "neu", "pos"]
WORDS = {"pos": "great happy love", "neg": "awful hate bad", "neu": "okay table chair"}

SPEC = """
name: evaltest
kind: classify
labels: [neg, neu, pos]
segment_field: channel
quality: {{metric: accuracy, against: gold, overall: {overall}, worst_segment: {worst}, min_segment_size: 5}}
teachers:
  - name: tt
    kind: replay
    path: recorded.jsonl
    model: big-teacher-v1
teacher: tt
"""

# (id, segment, gold, student prediction, teacher answer; None = the teacher failed on this row)
W = [("w0", "web", "pos", "neu", "pos")] + [
    (f"w{i}", "web", LABELS[i % 3], LABELS[i % 3], LABELS[i % 3]) for i in range(1, 10)]
E = [("e0", "email", "neg", "pos", "neg"), ("e1", "email", "neg", "pos", "neg"), ("e2", "email", "neu", "pos", "neu"),
     ("e3", "email", "pos", "pos", "pos"), ("e4", "email", "pos", "pos", "pos"), ("e5", "email", "neg", "neg", "neg"),
     ("e6", "email", "neu", "neu", "pos"), ("e7", "email", "pos", "pos", None)]
S = [("s0", "sms", "pos", "neg", "pos"), ("s1", "sms", "pos", "neg", "pos")]
TEST = W + E + S
HOSTILE = '<script>alert("x")</script> & <b>bold</b>'


def text_of(rid, gold):
    # The class's keywords make the TF-IDF baseline right on every test row; the id keeps texts unique.
    extra = f" {HOSTILE}" if rid == "e0" else ""
    return f"{WORDS[gold]} {rid}{extra}"


class FakeStudent:
    """Duck-typed ClassifierStudent: a fixed answer per text, p=0.8 when right and 0.6 when wrong."""

    labels = LABELS

    def __init__(self, answers):
        self.answers = answers
        self.calls = 0

    def predict_proba(self, texts, batch_size=32):
        self.calls += 1
        out = np.zeros((len(texts), 3))
        for k, t in enumerate(texts):
            pred, right = self.answers[t]
            p = 0.8 if right else 0.6
            out[k] = (1 - p) / 2
            out[k, LABELS.index(pred)] = p
        return out

    def size_bytes(self):
        return 12345


def build(tmp_path, overall=0.7, worst=0.6):
    p = Project.init(tmp_path / "proj", "classify", SPEC.format(overall=overall, worst=worst))
    now = time.time()
    answers = {}
    with p.store.tx() as c:
        for rid, seg, gold, spred, tans in TEST:
            txt = text_of(rid, gold)
            answers[txt] = (spred, spred == gold)
            c.execute("INSERT INTO examples(id,text,norm,gold,segment,split,created_at) VALUES(?,?,?,?,?,?,?)",
                      (rid, txt, txt.lower(), json.dumps(gold), seg, "test", now))
            if tans is None:
                c.execute("INSERT INTO labels(example_id,teacher,status,reason,created_at) VALUES(?,?,?,?,?)",
                          (rid, "tt", "failed", "label_not_in_set", now))
            else:
                probs = {lab: (0.9 if lab == tans else 0.05) for lab in LABELS}
                c.execute("INSERT INTO labels(example_id,teacher,status,answer,probs,confidence,created_at) "
                          "VALUES(?,?,?,?,?,?,?)", (rid, "tt", "ok", json.dumps(tans), json.dumps(probs), 0.9, now))
        # 30 train rows (10 per label) + 3 the filter dropped; the baseline must see only the kept 30.
        c.execute("INSERT INTO filter_runs(id,teacher,config,kept,dropped,created_at) VALUES(1,'tt','{}',30,3,?)", (now,))
        for i in range(33):
            lab = LABELS[i % 3]
            txt = f"{WORDS[lab]} train{i}"
            c.execute("INSERT INTO examples(id,text,norm,gold,segment,split,created_at) VALUES(?,?,?,?,?,?,?)",
                      (f"t{i}", txt, txt, None, "web", "train", now))
            c.execute("INSERT INTO labels(example_id,teacher,status,answer,created_at) VALUES(?,?,?,?,?)",
                      (f"t{i}", "tt", "ok", json.dumps(lab), now))
            kept = i < 30
            c.execute("INSERT INTO filter_decisions(run_id,example_id,kept,reason) VALUES(1,?,?,?)",
                      (f"t{i}", int(kept), None if kept else "low_confidence"))
        for k, (lat, cost) in enumerate([(1.0, 0.001), (2.0, 0.002), (3.0, 0.003)]):
            c.execute("INSERT INTO teacher_calls(key,teacher,model,request,status,cost,latency_s,created_at) "
                      "VALUES(?,?,?,?,?,?,?,?)", (f"k{k}", "tt", "big-teacher-v1", "{}", "ok", cost, lat, now))
    p.store.put_run("train-1", "train", "done", str(tmp_path / "model"),
                    {"teacher": {"identity": {"name": "tt"}}, "config": {"base": "tiny-encoder"}, "data_sha256": "d4t4h45h",
                     "counts": {"train": 27, "validation": 3, "skipped": {"over_max_train_examples": 0}}})
    return p, FakeStudent(answers)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    p, student = build(tmp_path_factory.mktemp("ev"))
    res = evaluate(p, student=student, latency_samples=5, progress=False)
    return p, student, res.to_dict()


def test_student_and_teacher_numbers_match_hand_values(evaluated):
    _, _, d = evaluated
    gold = [g for _, _, g, _, _ in TEST]
    spred = [s for _, _, _, s, _ in TEST]
    tpred = [t if t is not None else "<failed>" for _, _, _, _, t in TEST]
    st, te = d["systems"]["student"], d["systems"]["teacher"]
    assert d["test"]["n"] == 20 and d["test"]["n_gold"] == 20 and d["test"]["teacher_failed"] == 1
    assert st["vs_gold"]["accuracy"]["value"] == pytest.approx(14 / 20)
    # The failed row counts as wrong for the teacher: 18 of 20, not 18 of 19.
    assert te["vs_gold"]["accuracy"]["value"] == pytest.approx(18 / 20)
    assert st["vs_gold"]["macro_f1"]["value"] == pytest.approx(f1_score(gold, spred, average="macro"))
    assert te["vs_gold"]["macro_f1"]["value"] == pytest.approx(f1_score(gold, tpred, labels=LABELS, average="macro"))
    # Agreement is measured where the teacher answered: 12 of 19 rows.
    assert st["vs_teacher"]["agreement"]["value"] == pytest.approx(12 / 19)
    assert st["vs_teacher"]["agreement"]["n"] == 19
    assert st["retention"]["accuracy"]["value"] == pytest.approx(0.7 / 0.9)
    for m in (st["vs_gold"]["accuracy"], te["vs_gold"]["accuracy"], st["retention"]["accuracy"]):
        assert m["ci"][0] <= m["value"] <= m["ci"][1] and m["ci"][0] < m["ci"][1]
    assert "teacher tt: accuracy 0.900" in d["teacher_quality"] and "n=20" in d["teacher_quality"]
    assert "1 row without a teacher answer counted as wrong" in d["teacher_quality"]


def test_segments_worst_segment_and_small_segments(evaluated):
    _, _, d = evaluated
    segs = {s["segment"]: s for s in d["systems"]["student"]["segments"]}
    assert segs["web"]["accuracy_vs_gold"]["value"] == pytest.approx(0.9)
    assert segs["email"]["accuracy_vs_gold"]["value"] == pytest.approx(5 / 8)
    assert segs["sms"]["accuracy_vs_gold"]["value"] == 0.0
    assert segs["sms"]["accuracy_vs_gold"]["gated"] is False  # 2 rows < min_segment_size 5: reported only
    assert d["gate"]["worst_segment"]["segment"] == "email"


def test_calibration_confusions_baseline(evaluated):
    _, _, d = evaluated
    cal = d["systems"]["student"]["calibration"]
    # 14 right at 0.8 (bin (0.7,0.8], acc 1), 6 wrong at 0.6 (bin (0.5,0.6], acc 0): 14/20·0.2 + 6/20·0.6
    assert cal["ece"] == pytest.approx(14 / 20 * 0.2 + 6 / 20 * 0.6)
    assert [b["count"] for b in cal["bins"]][5] == 6 and [b["count"] for b in cal["bins"]][7] == 14
    pairs = [(p["true"], p["pred"], p["count"]) for p in d["confusions"]["pairs"]]
    assert pairs[:2] == [("neg", "pos", 2), ("pos", "neg", 2)]
    assert set(pairs[2:]) == {("neu", "pos", 1), ("pos", "neu", 1)}
    assert d["confusions"]["pairs"][0]["examples"][0]["id"] == "e0"
    base = d["systems"]["base"]
    assert base["vs_gold"]["accuracy"]["value"] == 1.0           # keywords decide every test row
    assert base["vs_teacher"]["agreement"]["value"] == pytest.approx(18 / 19)


def test_latency_cost_lineage_and_files(evaluated):
    p, student, d = evaluated
    t = d["latency"]["teacher"]
    assert t["calls"] == 3 and t["batch1"]["p50_s"] == pytest.approx(2.0)
    assert d["cost"]["teacher"]["per_1m_usd"] == pytest.approx(0.002 * 1e6)
    s = d["latency"]["student"]
    assert s["batch1"]["n"] == 5 and s["size_bytes"] == 12345 and s["throughput"]["texts_per_s"] > 0
    assert d["cost"]["student"]["per_1m_usd"] == pytest.approx(s["batch1"]["mean_s"] * 0.10 / 3600 * 1e6)
    assert d["lineage"]["training_record"]["data_sha256"] == "d4t4h45h"
    assert d["teacher"] == "tt" and "tiny-encoder" in d["systems"]["student"]["description"]
    assert d["lineage"]["filter_run"]["dropped"] == 3
    path = p.reports_dir / "eval-train-1.json"
    assert json.loads(path.read_text()) == d
    run = p.store.latest_run("eval")
    assert run["id"] == "eval-train-1" and json.loads(run["record"])["gate"] == {"passed": True}


def test_gate_passes_and_fails_as_thresholds_say(tmp_path):
    p, student = build(tmp_path / "a", overall=0.7, worst=0.6)
    d = evaluate(p, student=student, latency_samples=0, progress=False).to_dict()
    assert d["gate"]["passed"] is True and d["gate"]["failures"] == []
    p, student = build(tmp_path / "b", overall=0.75, worst=0.65)
    d = evaluate(p, student=student, latency_samples=0, progress=False).to_dict()
    assert d["gate"]["passed"] is False
    overall, worst = d["gate"]["failures"]
    assert "student accuracy vs gold = 0.700" in overall and "quality.overall = 0.75" in overall
    assert "worst segment 'email' (n=8)" in worst and "0.625" in worst and "quality.worst_segment = 0.65" in worst
    assert any("'sms'" in w for w in d["gate"]["warnings"])


def test_clear_errors(tmp_path):
    p = Project.init(tmp_path / "empty", "classify", SPEC.format(overall=0.7, worst=0.6))
    with pytest.raises(DistillError, match="no trained model"):
        evaluate(p, progress=False)
    with pytest.raises(DistillError, match="test split is empty"):
        evaluate(p, student=FakeStudent({}), progress=False)
    p2, student = build(tmp_path / "c")
    student.labels = ["neg", "neu", "positive"]
    with pytest.raises(DistillError, match="not in distill.yaml"):
        evaluate(p2, student=student, progress=False)


def test_report_contains_key_numbers_and_escapes_user_text(evaluated):
    p, _, d = evaluated
    html_path, json_path = write_report(p, d)
    html = html_path.read_text()
    doc = json.loads(json_path.read_text())
    assert html_path.name == "report.html" and {k: doc[k] for k in d} == d
    funnel = {s["step"]: s for s in doc["funnel"]}
    assert funnel["unique inputs"]["count"] == 53 and funnel["locked test split"]["delta"] == -20
    assert funnel["filter: low_confidence"]["delta"] == -3 and funnel["kept by the filters"]["count"] == 30
    assert funnel["trained on: train"]["count"] == 27 and funnel["trained on: validation"]["count"] == 3
    assert "0.700" in html and "0.900" in html and "1.000" in html       # student / teacher / base accuracy
    assert "email" in html and "d4t4h45h" in html and "big-teacher-v1" in html
    assert "low_confidence" in html                                      # the funnel names the filter reason
    assert "<script>" not in html and "&lt;script&gt;alert(" in html     # hostile input text is escaped
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    # With no result given, the latest eval JSON is used.
    html2, _ = write_report(p)
    assert html2.read_text().count("0.700") == html.count("0.700")


def test_gate_against_teacher_uses_agreement(tmp_path):
    p, student = build(tmp_path)
    spec = (p.root / "distill.yaml").read_text().replace("against: gold", "against: teacher")
    (p.root / "distill.yaml").write_text(spec)
    p = Project.open(p.root)
    d = evaluate(p, student=student, latency_samples=0, progress=False).to_dict()
    g = d["gate"]
    assert (g["metric"], g["against"]) == ("agreement", "teacher")
    assert g["value"] == pytest.approx(12 / 19) and g["passed"] is False   # 0.632 < overall 0.7
    assert "student agreement vs teacher = 0.632" in g["failures"][0]
    # per segment, vs the teacher: web 9/10, email 3/7 (e7 has no teacher answer), sms 0/2 (not gated)
    assert g["worst_segment"]["segment"] == "email" and g["worst_segment"]["value"] == pytest.approx(3 / 7)


def test_real_classifier_student_from_a_model_folder(tmp_path):
    """The real ClassifierStudent (a tiny random BERT built in-process) loaded from --model FOLDER."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_bert_folder

    from distill.students.classifier import ClassifierStudent

    p, _ = build(tmp_path)
    tok_words = tiny_bert_folder(tmp_path / "bert")
    folder = ClassifierStudent.create(str(tok_words), LABELS, device="cpu").save(tmp_path / "model" / "final")
    p.store.put_run("tiny-1", "train", "done", str(folder.resolve()), {"teacher": {"identity": {"name": "tt"}}})
    res = evaluate(p, model_path=str(folder), latency_samples=3, progress=False)
    d = res.to_dict()
    assert d["model_run_id"] == "tiny-1" and Path(res.json_path).name == "eval-tiny-1.json"
    st = d["systems"]["student"]
    # Whatever the random head predicts, the scores must be those of its own predictions.
    loaded = ClassifierStudent.load(folder, device="cpu")
    texts = [text_of(rid, gold) for rid, _, gold, _, _ in TEST]
    pred = [LABELS[i] for i in loaded.predict_proba(texts).argmax(1)]
    gold = [g for _, _, g, _, _ in TEST]
    assert st["vs_gold"]["accuracy"]["value"] == pytest.approx(np.mean([a == b for a, b in zip(pred, gold)]))
    assert d["latency"]["student"]["size_bytes"] == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    with pytest.raises(DistillError, match="no such folder"):
        evaluate(p, model_path=str(tmp_path / "nope"), progress=False)


def test_without_gold_the_student_is_measured_against_the_teacher(tmp_path):
    p, student = build(tmp_path)
    p.store.conn.execute("UPDATE examples SET gold=NULL")
    d = evaluate(p, student=student, latency_samples=0, progress=False).to_dict()
    assert d["test"]["n_gold"] == 0 and d["systems"]["student"]["vs_gold"] is None
    assert "quality vs gold unknown" in d["teacher_quality"]
    assert d["gate"]["passed"] is False and "no gold labels" in d["gate"]["failures"][0]
    assert d["confusions"]["against"] == "teacher" and d["confusions"]["n"] == 19
    assert d["systems"]["student"]["calibration"]["against"] == "teacher"
    html_path, _ = write_report(p, d)                         # renders without gold numbers
    assert "GATE FAILED" in html_path.read_text()


def test_report_without_an_evaluation_says_what_to_do(tmp_path):
    p = Project.init(tmp_path / "fresh", "classify", SPEC.format(overall=0.7, worst=0.6))
    with pytest.raises(DistillError, match="no evaluation to report on") as e:
        write_report(p)
    assert "distill eval" in e.value.hint
