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
    assert s["queues"]["audit"]["done"] == 10


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
