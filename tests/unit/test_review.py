"""Review queues and decisions (``distill.review``): order, leases, provenance, undo, the audit estimate, and the
test split never reviewed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_filters import ASSETS, make_project, put_label  # noqa: E402

from distill import review  # noqa: E402
from distill.data.importer import import_file  # noqa: E402
from distill.dataset import rows  # noqa: E402
from distill.errors import DistillError  # noqa: E402


@pytest.fixture()
def proj(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", label="label")
    ids = [r["id"] for r in p.store.q("SELECT id FROM examples WHERE split != 'test' ORDER BY id")]
    # teacher labels with known margins: example i has margin (i+1)/(n+1)
    n = len(ids)
    for i, ex in enumerate(ids):
        top = 0.5 + 0.5 * (i + 1) / (n + 1)
        put_label(p, ex, "positive", probs={"positive": top, "negative": 1 - top, "neutral": 0.0}, confidence=top)
    yield p
    p.close()


def train_ids(p):
    return [r["id"] for r in p.store.q("SELECT id FROM examples WHERE split != 'test' ORDER BY id")]


def test_low_confidence_queue_is_smallest_margin_first_and_never_test(proj):
    order = [i for i, _ in review.queue_order(proj, "low_confidence")]
    assert order == train_ids(proj)                       # margins grow with the id order by construction
    test = {r["id"] for r in proj.store.q("SELECT id FROM examples WHERE split='test'")}
    assert test and not test & {i for q in review.QUEUES for i, _ in review.queue_order(proj, q)}


def test_two_reviewers_never_get_the_same_item_and_a_lease_expires(proj):
    a = review.next_item(proj, "low_confidence", "ann")
    b = review.next_item(proj, "low_confidence", "bob")
    assert a.example_id != b.example_id
    # asking again without deciding (a reload) gives ann the same item, still hers
    assert review.next_item(proj, "low_confidence", "ann").example_id == a.example_id
    c = review.next_item(proj, "low_confidence", "cid")
    assert c.example_id not in (a.example_id, b.example_id)
    # an expired lease goes back to the queue: bob's item is the first free one for dan
    proj.store.conn.execute("UPDATE review_leases SET expires_at=? WHERE reviewer='bob'", (time.time() - 1,))
    assert review.next_item(proj, "low_confidence", "dan").example_id == b.example_id


def test_decisions_override_the_teacher_with_provenance_and_undo_restores(proj):
    it = review.next_item(proj, "low_confidence", "ann")
    review.decide(proj, it.item, "low_confidence", "ann", "correct", "negative", note="sarcasm")
    r = {x.id: x for x in rows(proj, "rec", only_kept=False)}[it.example_id]
    assert r.answer == "negative" and r.source == "correction"
    src = proj.store.q("SELECT source FROM corrections WHERE example_id=?", (it.example_id,))[0]["source"]
    assert src == "review:low_confidence:ann"
    d = proj.store.q("SELECT * FROM review_decisions")[0]
    assert (d["reviewer"], d["action"], json.loads(d["teacher_answer"]), json.loads(d["answer"])) == \
        ("ann", "correct", "positive", "negative")
    # decided items leave the queue for everyone
    assert review.next_item(proj, "low_confidence", "bob").example_id != it.example_id
    # undo: the correction is gone, the item is back
    assert review.undo(proj, "ann")["id"] == d["id"]
    assert not proj.store.q("SELECT 1 FROM corrections WHERE example_id=?", (it.example_id,))
    assert review.next_item(proj, "low_confidence", "cid").example_id == it.example_id
    assert review.undo(proj, "ann") is None


def test_undo_brings_back_an_earlier_correction(proj):
    ex = train_ids(proj)[0]
    with proj.store.tx() as c:
        c.execute("INSERT INTO corrections(example_id, answer, source, note, created_at) VALUES(?,?,?,?,0)",
                  (ex, json.dumps("neutral"), "file.csv", None))
    review.decide(proj, f"example:{ex}", "audit", "ann", "correct", "negative")
    review.undo(proj, "ann")
    row = proj.store.q("SELECT answer, source FROM corrections WHERE example_id=?", (ex,))[0]
    assert (json.loads(row["answer"]), row["source"]) == ("neutral", "file.csv")


def test_skip_hides_the_item_from_that_reviewer_only(proj):
    it = review.next_item(proj, "audit", "ann")
    review.decide(proj, it.item, "audit", "ann", "skip")
    assert review.next_item(proj, "audit", "ann").example_id != it.example_id
    assert review.next_item(proj, "audit", "bob").example_id == it.example_id


def test_audit_accuracy_and_per_label_errors(proj):
    order = [i for i, _ in review.queue_order(proj, "audit")]
    assert order == [i for i, _ in review.queue_order(proj, "audit")]      # fixed: same for everyone
    for k, ex in enumerate(order[:10]):
        review.decide(proj, f"example:{ex}", "audit", "ann", "accept" if k < 7 else "correct",
                      None if k < 7 else "negative")
    s = review.stats(proj)
    assert s["audit"]["reviewed"] == 10 and s["audit"]["accuracy"] == 0.7
    lo, hi = s["audit"]["ci95"]
    assert lo == pytest.approx(0.3968, abs=1e-3) and hi == pytest.approx(0.8922, abs=1e-3)   # Wilson, by hand
    assert s["per_label"]["positive"] == {"reviewed": 10, "wrong": 3, "error_rate": 0.3}
    assert s["queues"]["audit"]["done"] == 0                 # each audit item waits for a second reviewer
    assert review.next_item(proj, "audit", "bob").example_id == order[0]     # ... who gets it next
    assert review.next_item(proj, "audit", "ann").example_id == order[10]    # ann never sees her own again
    for k, ex in enumerate(order[:10]):
        review.decide(proj, f"example:{ex}", "audit", "bob", "accept" if k < 6 else "correct",
                      None if k < 6 else "negative")
    s = review.stats(proj)
    assert s["queues"]["audit"]["done"] == 10
    assert s["audit"]["accuracy"] == 0.7                     # still the first decisions: the estimate is unbiased
    # by hand: p_o = 9/10; marginals ann (pos 7, neg 3), bob (pos 6, neg 4): p_e = (42 + 12) / 100 = 0.54;
    # kappa = (0.9 - 0.54) / 0.46
    assert s["agreement"]["items"] == 10 and s["agreement"]["observed"] == 0.9
    assert s["agreement"]["cohen_kappa"] == pytest.approx(0.36 / 0.46)


def test_bad_decisions_are_refused_and_change_nothing(proj):
    ex = train_ids(proj)[0]
    test_ex = proj.store.q("SELECT id FROM examples WHERE split='test' LIMIT 1")[0]["id"]
    with pytest.raises(DistillError, match="not one of the task's labels"):
        review.decide(proj, f"example:{ex}", "audit", "ann", "correct", "nope")
    with pytest.raises(DistillError, match="locked"):
        review.decide(proj, f"example:{test_ex}", "audit", "ann", "correct", "negative")
    with pytest.raises(DistillError, match="reviewer"):
        review.decide(proj, f"example:{ex}", "audit", "  ", "accept")
    assert not proj.store.q("SELECT 1 FROM review_decisions") and not proj.store.q("SELECT 1 FROM corrections")


def test_the_failure_queue_is_reviewed_and_resolved_not_deleted(proj):
    from distill.serve import queue as fq

    ids = fq.enqueue_many(proj.store, [
        {"text": "routed text", "reason": "routed", "student_answer": "neutral", "student_conf": 0.4,
         "teacher_answer": "negative"},
        {"text": "the client disagrees", "reason": "feedback", "student_answer": "positive", "teacher_answer": "negative"},
        {"text": "teacher was down", "reason": "degraded", "student_answer": "neutral"}])
    order = [i for i, _ in review.queue_order(proj, "failures")]
    assert order == [f"queue:{i}" for i in ids]                          # oldest first
    it = review.next_item(proj, "failures", "ann")
    assert (it.kind, it.text, it.student_answer, it.teacher_answer, it.reason) == \
        ("queue", "routed text", "neutral", "negative", "routed")
    review.decide(proj, it.item, "failures", "ann", "accept")              # the teacher was right
    it2 = review.next_item(proj, "failures", "ann")
    review.decide(proj, it2.item, "failures", "ann", "correct", "neutral")  # the client was wrong
    it3 = review.next_item(proj, "failures", "ann")
    with pytest.raises(DistillError, match="no answer"):
        review.decide(proj, it3.item, "failures", "ann", "accept")         # degraded: nothing to accept
    review.decide(proj, it3.item, "failures", "ann", "oos")
    assert review.next_item(proj, "failures", "ann") is None
    # resolved, not deleted: the entries are still there for `iterate`, each with its decision
    assert [r["status"] for r in proj.store.q("SELECT status FROM failure_queue ORDER BY id")] == ["new"] * 3
    got = {r["item"]: (r["action"], json.loads(r["answer"]) if r["answer"] else None)
           for r in proj.store.q("SELECT item, action, answer FROM review_decisions")}
    assert got == {f"queue:{ids[0]}": ("accept", "negative"), f"queue:{ids[1]}": ("correct", "neutral"),
                   f"queue:{ids[2]}": ("oos", None)}
    assert not proj.store.q("SELECT 1 FROM corrections")                  # no example yet to correct
    assert review.stats(proj)["queues"]["failures"] == {"total": 3, "done": 3, "left": 0}


def test_iterate_turns_reviewed_queue_entries_into_corrections(proj, tmp_path):
    """What `iterate` does with a reviewed failure-queue entry once its text is imported: the reviewer's answer
    overrides the teacher (train/validation), an unreviewed one does not, a test-split input is left alone."""
    from distill.iterate import apply_reviews
    from distill.serve import queue as fq

    texts = [f"served text number {i}" for i in range(40)]
    ids = fq.enqueue_many(proj.store, [{"text": t, "reason": "routed", "teacher_answer": "positive"} for t in texts])
    for i in ids[:30]:
        review.decide(proj, f"queue:{i}", "failures", "ann", "correct", "neutral")
    f = tmp_path / "q.csv"
    f.write_text("text\n" + "\n".join(texts) + "\n")
    import_file(proj, f)
    with proj.store.tx() as c:
        c.executemany("UPDATE failure_queue SET status='consumed', round=1 WHERE id=?", [(i,) for i in ids])
    split = {r["text"]: r["split"] for r in proj.store.q("SELECT text, split FROM examples")}
    n = apply_reviews(proj, 1)
    want = [t for t in texts[:30] if split[t] != "test"]
    assert n == len(want) and 0 < n < 30                                    # some hashed to test: left alone
    got = {r["text"]: (json.loads(r["answer"]), r["source"]) for r in proj.store.q(
        "SELECT e.text, c.answer, c.source FROM corrections c JOIN examples e ON e.id = c.example_id")}
    assert got == {t: ("neutral", "review:failures:ann") for t in want}
    assert apply_reviews(proj, 1) == n                                      # a resumed round: the same, once
    assert len(proj.store.q("SELECT 1 FROM corrections")) == n


def _set_feedback_use(proj, use):
    from distill.project import Project

    y = proj.root / "distill.yaml"
    y.write_text(y.read_text() + f"feedback: {{use: {use}}}\n")
    proj.close()
    return Project.open(proj.root)


def test_feedback_answers_are_corrections_below_a_reviewer(proj, tmp_path):
    """A client's /v1/feedback answer becomes a correction with the lower trust level: training uses it (spec
    ``feedback.use: train``), it never replaces a reviewer's correction, a reviewer's replaces it, test inputs and
    answers the task refuses are counted, not stored; clients disagreeing on one text: the latest answer."""
    from distill.iterate import apply_feedback, apply_reviews
    from distill.serve import queue as fq

    texts = [f"feedback text number {i}" for i in range(40)]
    entries = [{"text": t, "reason": "feedback", "teacher_answer": "negative"} for t in texts]
    entries += [{"text": texts[0], "reason": "feedback", "teacher_answer": "neutral"},   # a second client, later
                {"text": texts[1], "reason": "feedback", "teacher_answer": "not-a-label"}]
    ids = fq.enqueue_many(proj.store, entries)
    f = tmp_path / "fb.csv"
    f.write_text("text\n" + "\n".join(texts) + "\n")
    import_file(proj, f)
    ex = {r["text"]: (r["id"], r["split"]) for r in proj.store.q("SELECT id, text, split FROM examples")}
    for t in texts:
        if ex[t][1] != "test":
            put_label(proj, ex[t][0], "positive", probs={"positive": 0.9, "negative": 0.1, "neutral": 0.0}, confidence=0.9)
    trained = [t for t in texts if ex[t][1] != "test"]
    reviewed = trained[2]
    proj.store.conn.execute("INSERT INTO corrections(example_id, answer, source, note, created_at) VALUES(?,?,?,?,?)",
                            (ex[reviewed][0], json.dumps("positive"), "review:suspect:ann", None, time.time()))
    with proj.store.tx() as c:
        c.executemany("UPDATE failure_queue SET status='consumed', round=1 WHERE id=?", [(i,) for i in ids])

    out = apply_feedback(proj, 1)
    n_test = sum(1 for t in texts if ex[t][1] == "test")
    assert n_test and out["test"] == n_test + (ex[texts[0]][1] == "test")
    assert out["invalid"] == (ex[texts[1]][1] != "test")                  # 'not-a-label' is not stored
    assert out["kept_trusted"] == 1 and out["conflicting"] == (ex[texts[0]][1] != "test")
    got = {r.text: (r.answer, r.source) for r in rows(proj, "rec", ("train", "validation"), only_kept=False)}
    assert got[reviewed] == ("positive", "correction")                   # the reviewer's word stays
    for t in trained[3:]:
        assert got[t] == ("negative", "feedback")
    if ex[texts[0]][1] != "test":
        assert got[texts[0]] == ("neutral", "feedback")                  # the later of two clients
    src = proj.store.one("SELECT source FROM corrections WHERE example_id=?", (ex[trained[3]][0],))
    assert src.startswith("feedback:queue:")
    assert apply_feedback(proj, 1) == out                                # a resumed round: the same

    # a reviewer's decision on a feedback entry replaces the client's answer
    target = trained[4]
    qid = next(i for i, e in zip(ids, entries) if e["text"] == target)
    review.decide(proj, f"queue:{qid}", "failures", "bob", "correct", "neutral")
    apply_feedback(proj, 1)
    apply_reviews(proj, 1)
    got = {r.text: (r.answer, r.source) for r in rows(proj, "rec", ("train", "validation"), only_kept=False)}
    assert got[target] == ("neutral", "correction")
    assert apply_feedback(proj, 1)["kept_trusted"] == 2                  # and feedback does not take it back
    from distill.status import status
    n_fb = len(trained) - 2                                            # all but the 2 reviewed
    assert status(proj)["corrections_by_kind"] == {"feedback": n_fb, "review": 2}

    # a few-shot pool (and a teacher check, same join) never takes a client's answer as a reference
    from distill.fewshot import gold_pool
    pool = {d.id: d.source for d in gold_pool(proj)}
    assert pool[ex[reviewed][0]] == "correction" and all(pool.get(ex[t][0]) != "correction" for t in trained[5:])

    # feedback.use: review -> stored, but training sees the teacher's answer until a reviewer accepts it
    proj = _set_feedback_use(proj, "review")
    got = {r.text: (r.answer, r.source) for r in rows(proj, "rec", ("train", "validation"), only_kept=False)}
    assert got[trained[5]] == ("positive", "teacher") and got[target] == ("neutral", "correction")
    proj.close()


def test_cohen_kappa_by_hand():
    assert review.cohen_kappa([]) is None
    assert review.cohen_kappa([("a", "a"), ("b", "b")]) == 1.0
    assert review.cohen_kappa([("a", "b"), ("b", "a")]) == -1.0              # p_o 0, p_e 0.5
    assert review.cohen_kappa([("a", "a")] * 5) == 1.0                         # one category: p_e = 1


def test_the_disagreement_queue_reads_the_serving_students_answers(proj, tmp_path):
    import torch

    from distill.students.classifier import ClassifierStudent
    from tiny_models import tiny_bert_folder

    assert review.predict_students(proj) == 0                 # nothing served yet: nothing to compare
    torch.manual_seed(0)
    st = ClassifierStudent.create(str(tiny_bert_folder(tmp_path / "base")), ["positive", "negative", "neutral"],
                                  device="cpu")
    with torch.no_grad():                                      # planted: says 'negative' unless a text is 'positive'
        st.model.classifier.weight.zero_()
        st.model.classifier.bias.copy_(torch.tensor([0.0, 3.0, 0.0]))
    d = st.save(proj.root / "models" / "s1" / "final")
    proj.record_run("s1", "train", "done", d, {})
    proj.promote("s1", "test")
    ids = train_ids(proj)
    put_label(proj, ids[0], "negative", probs={"positive": 0.1, "negative": 0.9, "neutral": 0.0}, confidence=0.9)
    assert review.predict_students(proj) == len(ids)
    assert review.predict_students(proj) == 0                 # stored: a restart computes nothing again
    order = [i for i, _ in review.queue_order(proj, "disagreement")]
    assert set(order) == set(ids) - {ids[0]}                   # the teacher said 'negative' there: no disagreement
    it = review.next_item(proj, "disagreement", "ann")
    assert it.student_answer == "negative" and it.teacher_answer == "positive" and 0 < it.student_conf < 1


def test_neighbours_are_the_most_alike_labelled_inputs(proj):
    ex = proj.store.q("SELECT id, text FROM examples WHERE split != 'test' ORDER BY id LIMIT 1")[0]
    nb = review.Neighbours(proj)
    got = nb.nearest(ex["text"] + " really", k=3)
    assert got and got[0]["id"] == ex["id"] and got[0]["answer"] == "positive" and got[0]["similarity"] > 0.5
    assert all(g["id"] != ex["id"] for g in nb.nearest(ex["text"], exclude=ex["id"]))
    assert nb.nearest("zzzz qqqq") == []                       # nothing alike: nothing shown


def test_queue_list_shows_ids_confidences_and_review_decisions(proj):
    from typer.testing import CliRunner

    from distill.cli import app
    from distill.serve import queue as fq

    ids = fq.enqueue_many(proj.store, [
        {"text": "routed text", "reason": "routed", "student_answer": "neutral", "student_conf": 0.4123,
         "teacher_answer": "negative"},
        {"text": "not reviewed yet", "reason": "feedback", "student_answer": "positive", "teacher_answer": "negative"}])
    review.decide(proj, f"queue:{ids[0]}", "failures", "ann", "correct", "positive")
    res = CliRunner().invoke(app, ["queue", "list", str(proj.root)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    first = next(line for line in res.output.splitlines() if line.startswith(f"#{ids[0]}"))
    assert "routed" in first and "conf=0.412" in first and "review: correct -> positive (ann)" in first
    second = next(line for line in res.output.splitlines() if line.startswith(f"#{ids[1]}"))
    assert "review:" not in second


def test_generate_corrections_are_text_and_an_empty_one_is_refused(tmp_path):
    """generate: the reviewer's answer is free text; an empty answer is not one (and saves nothing)."""
    import yaml

    from distill.project import SPEC_FILE, Project

    root = tmp_path / "gen"
    root.mkdir()
    raw = yaml.safe_load((ASSETS / "classify_spec.yaml").read_text())
    raw.update(kind="generate", labels=[], quality={"metric": "exact_match"})
    (root / SPEC_FILE).write_text(yaml.safe_dump(raw))
    import shutil
    shutil.copy(ASSETS / "recording.jsonl", root)
    p = Project.open(root)
    import_file(p, ASSETS / "reviews.csv")
    ex = p.store.q("SELECT id FROM examples WHERE split != 'test' ORDER BY id")[0]["id"]
    put_label(p, ex, "a first summary")
    with pytest.raises(DistillError):
        review.decide(p, f"example:{ex}", "low_confidence", "ann", "correct", "   ")
    assert not p.store.q("SELECT 1 FROM corrections")
    review.decide(p, f"example:{ex}", "low_confidence", "ann", "correct", "A better summary.")
    r = {x.id: x for x in rows(p, raw["teachers"][0]["name"], only_kept=False)}[ex]
    assert (r.answer, r.source) == ("A better summary.", "correction")
    p.close()
