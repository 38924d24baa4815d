"""Human review of teacher labels: queues to work through, one item at a time, decisions with provenance.

    distill review PROJECT            # the web page (distill.review_app); this module is what it stands on

Queues, each in the order a reviewer's minute is worth most (train and validation examples only: the test split's
labels are never touched):

- ``suspect``: labels the noise filter flagged as probably wrong without gold (confident learning,
  ``filters.suspect_labels``), in the filter's review rank;
- ``disagreement``: examples where the serving student's answer differs from the teacher's, the student's most
  confident disagreements first (``student_predictions``: filled by ``predict_students`` when the page starts,
  for the serving model; classify only);
- ``low_confidence``: teacher labels by their margin, p(top1) - p(top2), smallest first (the confidence when the
  teacher gave no distribution);
- ``failures``: the serving failure queue's new entries (routed to the teacher, degraded, shadow disagreements,
  user feedback), oldest first; a decision resolves the entry (it stays in the queue table for `iterate`, which
  takes its text; the decision is kept with it);
- ``audit``: a seeded random sample of the teacher's labels -- the unbiased estimate of the teacher's accuracy
  (``stats``), which the other queues cannot give (they are chosen for being doubtful). Each audit item is
  decided by ``AUDIT_REVIEWS`` (2) different people, one after the other: the second opinion gives the reviewers'
  agreement (Cohen's kappa), i.e. how far a human label can be trusted.

Decisions: ``accept`` (the teacher is right), ``correct`` (another answer), ``oos`` (the input is out of scope:
no label of the task fits), ``skip``. Accept and correct write a correction (``corrections``: it overrides the
teacher everywhere, ``distill.dataset.rows``) whose source names the queue and the reviewer; every decision is a
row of ``review_decisions`` with the reviewer, time, queue, the teacher's answer and the correction it replaced,
so ``undo`` restores exactly what was there. Two reviewers never get the same item: ``next_item`` takes a lease
(``review_leases``, expiring after ``lease_s``) in the same transaction that picks the item; a decision is one
transaction, committed before the page hears "done", so a kill -9 of the server loses no submitted decision.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from distill.errors import DistillError
from distill.filters import list_suspects
from distill.project import Project

QUEUES = ("suspect", "disagreement", "low_confidence", "failures", "audit")
ACTIONS = ("accept", "correct", "oos", "skip")
LEASE_S = 300.0          # an item a reviewer opened is theirs for this long (then it goes back to the queue)
AUDIT_SEED = "audit-0"
AUDIT_REVIEWS = 2        # audit items are decided by two people: the second opinion measures reviewer agreement


@dataclass
class Item:
    item: str                        # "example:<id>"
    queue: str
    example_id: str
    text: str
    split: str
    teacher_answer: Any              # None when the teacher failed on it
    probs: dict[str, float] | None
    confidence: float | None
    gold: Any
    rationale: str | None
    correction: Any                  # the current correction, if any
    why: str                         # why it is in this queue (rank, margin)
    neighbours: list[dict] = field(default_factory=list)   # near-duplicates already labelled
    kind: str = "example"            # example | queue (a failure-queue entry: no stored example yet)
    student_answer: Any = None       # queue entries: what the served student said, and how sure it was
    student_conf: float | None = None
    reason: str | None = None        # queue entries: routed | degraded | shadow_disagreement | feedback


def _margin(probs: dict | None, confidence: float | None) -> float:
    if probs:
        top = sorted(probs.values(), reverse=True)
        return top[0] - (top[1] if len(top) > 1 else 0.0)
    return confidence if confidence is not None else 1.0


def queue_order(project: Project, queue: str) -> list[tuple[str, str]]:
    """(example id, why) of every item of ``queue``, in review order."""
    if queue not in QUEUES:
        raise DistillError(f"unknown review queue {queue!r}", hint="one of: " + ", ".join(QUEUES))
    store, teacher = project.store, project.spec.get_teacher().name
    if queue == "suspect":
        # the filter only judges train/validation rows, so no test row is ever in this queue
        return [(d["id"], f"flagged by the noise filter (rank {d['rank']}"
                          + (", relabelled)" if d["action"] == "relabelled" else ")"))
                for d in list_suspects(project, teacher)]
    if queue == "disagreement":
        run = _serving_run(project)
        rows = store.q("""SELECT sp.example_id, sp.answer, sp.confidence, l.answer AS teacher FROM student_predictions sp
                          JOIN labels l ON l.example_id = sp.example_id AND l.teacher = ? AND l.status = 'ok'
                          JOIN examples e ON e.id = sp.example_id
                          WHERE sp.run_id = ? AND e.split != 'test' AND sp.answer != l.answer
                          ORDER BY sp.confidence DESC, sp.example_id""", (teacher, run or ""))
        return [(r["example_id"], f"student says {json.loads(r['answer'])} ({r['confidence']:.3f})") for r in rows]
    if queue == "failures":
        return [(f"queue:{r['id']}", f"{r['reason']} in serving") for r in
                store.q("SELECT id, reason FROM failure_queue WHERE status='new' ORDER BY id")]
    rows = store.q("""SELECT e.id, l.probs, l.confidence FROM examples e
                      JOIN labels l ON l.example_id = e.id AND l.teacher = ? AND l.status = 'ok'
                      WHERE e.split != 'test'""", (teacher,))
    if queue == "low_confidence":
        scored = [(_margin(json.loads(r["probs"]) if r["probs"] else None, r["confidence"]), r["id"]) for r in rows]
        return [(i, f"teacher margin {m:.3f}") for m, i in sorted(scored)]
    # audit: a fixed pseudo-random order (the same for every reviewer and every restart)
    keyed = sorted(rows, key=lambda r: hashlib.sha256(f"{AUDIT_SEED}:{r['id']}".encode()).hexdigest())
    return [(r["id"], "random audit sample") for r in keyed]


def _decided(conn) -> dict[str, tuple[set[str], set[str]]]:
    """item -> (reviewers with a live accept/correct/oos decision on it, reviewers who skipped it)."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    for r in conn.execute("SELECT item, reviewer, action FROM review_decisions WHERE undone_at IS NULL"):
        done, skipped = out.setdefault(r["item"], (set(), set()))
        (skipped if r["action"] == "skip" else done).add(r["reviewer"])
    return out


def _open_for(queue: str, done: set[str], skipped: set[str], reviewer: str) -> bool:
    """Whether ``reviewer`` may still be given an item: not decided by them, and (audit) fewer than
    ``AUDIT_REVIEWS`` people decided it, (other queues) nobody did."""
    if reviewer in done or reviewer in skipped:
        return False
    return len(done) < (AUDIT_REVIEWS if queue == "audit" else 1)


def next_item(project: Project, queue: str, reviewer: str, *, lease_s: float = LEASE_S) -> Item | None:
    """The first item of ``queue`` nobody has decided (and this reviewer has not skipped) and nobody else holds,
    leased to ``reviewer``; None when the queue is done."""
    reviewer = _reviewer(reviewer)
    order = queue_order(project, queue)
    store = project.store
    now = time.time()
    with store.tx() as c:
        decided = _decided(c)
        leases = {r["item"]: (r["reviewer"], r["expires_at"]) for r in c.execute("SELECT * FROM review_leases")}
        for ex_id, why in order:
            key = _key(ex_id)
            done, skipped = decided.get(key, (set(), set()))
            if not _open_for(queue, done, skipped, reviewer):
                continue
            holder = leases.get(key)
            if holder is not None and holder[0] != reviewer and holder[1] > now:
                continue
            # one lease per reviewer at a time: opening the next item gives the previous one back
            c.execute("DELETE FROM review_leases WHERE reviewer=?", (reviewer,))
            c.execute("INSERT OR REPLACE INTO review_leases(item, reviewer, expires_at) VALUES(?,?,?)",
                      (key, reviewer, now + lease_s))
            break
        else:
            return None
    it = item_detail(project, ex_id, queue, why)
    if queue == "audit":
        it.correction = None        # a second reviewer judges on their own, not on the first one's answer
    return it


def _key(i: str) -> str:
    """Queue order entries are example ids, or ``queue:<id>`` for failure-queue entries."""
    return i if i.startswith("queue:") else f"example:{i}"


def _queue_entry(project: Project, entry_id: str, queue: str, why: str) -> Item:
    r = project.store.q("SELECT * FROM failure_queue WHERE id=?", (entry_id,))
    if not r:
        raise DistillError(f"no failure-queue entry {entry_id!r}")
    r = r[0]

    def j(x):
        return None if x is None else json.loads(x)

    return Item(item=f"queue:{entry_id}", queue=queue, example_id=f"queue:{entry_id}", text=r["text"], split="serving",
                teacher_answer=j(r["teacher_answer"]), probs=None, confidence=None, gold=None, rationale=r["note"],
                correction=None, why=why or f"{r['reason']} in serving", kind="queue",
                student_answer=j(r["student_answer"]), student_conf=r["student_conf"], reason=r["reason"])


def item_detail(project: Project, ex_id: str, queue: str, why: str = "") -> Item:
    if ex_id.startswith("queue:"):
        return _queue_entry(project, ex_id.partition(":")[2], queue, why)
    teacher = project.spec.get_teacher().name
    r = project.store.q("""SELECT e.id, e.text, e.split, e.gold, l.status, l.answer, l.probs, l.confidence, l.rationale,
                                  c.answer AS canswer
                           FROM examples e LEFT JOIN labels l ON l.example_id = e.id AND l.teacher = ?
                           LEFT JOIN corrections c ON c.example_id = e.id WHERE e.id = ?""", (teacher, ex_id))
    if not r:
        raise DistillError(f"no example {ex_id!r} in this project")
    r = r[0]

    def j(x):
        return None if x is None else json.loads(x)

    sp = project.store.q("SELECT answer, confidence FROM student_predictions WHERE example_id=? AND run_id=?",
                         (ex_id, _serving_run(project) or ""))
    return Item(item=f"example:{ex_id}", queue=queue, example_id=ex_id, text=r["text"], split=r["split"],
                teacher_answer=j(r["answer"]) if r["status"] == "ok" else None, probs=j(r["probs"]),
                confidence=r["confidence"], gold=j(r["gold"]), rationale=r["rationale"], correction=j(r["canswer"]),
                why=why, student_answer=j(sp[0]["answer"]) if sp else None,
                student_conf=sp[0]["confidence"] if sp else None)


def decide(project: Project, item: str, queue: str, reviewer: str, action: str, answer: Any = None,
           note: str | None = None) -> int:
    """Record one decision (and for accept/correct, the correction) in one transaction; returns its id."""
    reviewer = _reviewer(reviewer)
    if action not in ACTIONS:
        raise DistillError(f"unknown review action {action!r}", hint="one of: " + ", ".join(ACTIONS))
    if queue not in QUEUES:
        raise DistillError(f"unknown review queue {queue!r}", hint="one of: " + ", ".join(QUEUES))
    kind, _, ex_id = item.partition(":")
    if kind not in ("example", "queue") or not ex_id:
        raise DistillError(f"unknown review item {item!r}")
    d = item_detail(project, item if kind == "queue" else ex_id, queue)
    if d.split == "test":
        raise DistillError("test-split labels are never reviewed here: the test split is locked")
    if action == "accept":
        if d.teacher_answer is None:
            raise DistillError("the teacher has no answer for this input to accept", hint="correct it instead")
        answer = d.teacher_answer
    elif action == "correct":
        answer = valid_answer(project, answer)
    else:
        answer = None
    now = time.time()
    with project.store.tx() as c:
        prior = c.execute("SELECT answer, source FROM corrections WHERE example_id=?", (ex_id,)).fetchone()
        cur = c.execute(
            """INSERT INTO review_decisions(item, queue, reviewer, action, answer, teacher_answer, prior_correction,
               prior_source, note, created_at) VALUES(?,?,?,?,?,?,?,?,?,?)""",
            (item, queue, reviewer, action, None if answer is None else json.dumps(answer),
             None if d.teacher_answer is None else json.dumps(d.teacher_answer),
             None if prior is None else prior["answer"], None if prior is None else prior["source"], note, now))
        if action in ("accept", "correct") and kind == "example":
            # a queue entry has no stored example yet: its decision waits in review_decisions for `iterate`
            c.execute("INSERT OR REPLACE INTO corrections(example_id, answer, source, note, created_at) VALUES(?,?,?,?,?)",
                      (ex_id, json.dumps(answer), f"review:{queue}:{reviewer}", note, now))
        c.execute("DELETE FROM review_leases WHERE item=? AND reviewer=?", (item, reviewer))
        return int(cur.lastrowid)


def undo(project: Project, reviewer: str) -> dict | None:
    """Take back ``reviewer``'s latest live decision: the correction it wrote is replaced by the one it replaced (or
    removed), and the item goes back to its queue. Returns the undone decision, None when there is nothing to undo."""
    reviewer = _reviewer(reviewer)
    with project.store.tx() as c:
        r = c.execute("""SELECT * FROM review_decisions WHERE reviewer=? AND undone_at IS NULL
                         ORDER BY id DESC LIMIT 1""", (reviewer,)).fetchone()
        if r is None:
            return None
        c.execute("UPDATE review_decisions SET undone_at=? WHERE id=?", (time.time(), r["id"]))
        if r["action"] in ("accept", "correct") and r["item"].startswith("example:"):
            ex_id = r["item"].partition(":")[2]
            if r["prior_correction"] is None:
                c.execute("DELETE FROM corrections WHERE example_id=?", (ex_id,))
            else:
                c.execute("INSERT OR REPLACE INTO corrections(example_id, answer, source, note, created_at) "
                          "VALUES(?,?,?,?,?)", (ex_id, r["prior_correction"], r["prior_source"], None, time.time()))
        return dict(r)


def stats(project: Project) -> dict[str, Any]:
    """Queue sizes (left / done), the teacher's accuracy on the audit sample with a Wilson 95% interval (first
    decision of each audit item), reviewer agreement on the doubly-reviewed audit items (Cohen's kappa), and each
    label's error rate among the reviewed examples the teacher gave that label."""
    store = project.store
    decided = _decided(store.conn)
    sizes = {}
    for q in QUEUES:
        order = queue_order(project, q)
        need = AUDIT_REVIEWS if q == "audit" else 1
        done = sum(1 for i, _ in order if len(decided.get(_key(i), (set(), set()))[0]) >= need)
        sizes[q] = {"total": len(order), "done": done, "left": len(order) - done}
    rows = store.q("""SELECT id, item, queue, action, answer, teacher_answer FROM review_decisions
                      WHERE undone_at IS NULL AND action != 'skip' ORDER BY id""")
    by_item: dict[str, list] = {}
    for r in rows:
        if r["queue"] == "audit":
            by_item.setdefault(r["item"], []).append(r)
    # the teacher's accuracy from each audit item's first decision (the second is for agreement only)
    audit = [v[0] for v in by_item.values()]
    right = sum(1 for r in audit if r["action"] == "accept")
    pairs = [(_verdict(v[0]), _verdict(v[1])) for v in by_item.values() if len(v) >= 2]
    per_label: dict[str, dict[str, int]] = {}
    # every decision outside the audit queue, and each audit item's first (second opinions are for agreement only)
    for r in [r for r in rows if r["queue"] != "audit"] + audit:
        t = json.loads(r["teacher_answer"]) if r["teacher_answer"] else None
        if not isinstance(t, str):
            continue
        s = per_label.setdefault(t, {"reviewed": 0, "wrong": 0})
        s["reviewed"] += 1
        s["wrong"] += r["action"] != "accept"
    return {"queues": sizes, "audit": {"reviewed": len(audit), "teacher_right": right,
                                       "accuracy": right / len(audit) if audit else None,
                                       "ci95": wilson(right, len(audit))},
            "agreement": {"items": len(pairs), "observed": (sum(a == b for a, b in pairs) / len(pairs)) if pairs else None,
                          "cohen_kappa": cohen_kappa(pairs)},
            "per_label": {k: {**v, "error_rate": v["wrong"] / v["reviewed"]} for k, v in sorted(per_label.items())},
            "decisions": len(rows), "rounds": rounds(project)}


def rounds(project: Project) -> dict[str, Any]:
    """What the fixes did and will do to `distill iterate`: ``last`` — the latest round's new fixes and, for classify,
    how many of the inputs they changed the new and the serving model answer as fixed (from its record); ``next``
    — the fixes training would use now that the latest round did not (by kind), plus reviewed failure-queue
    entries and client feedback still waiting in the queue (they become fixes when the round imports them)."""
    from distill.dataset import fix_kind, fixes

    store = project.store
    its = store.q("SELECT id, record FROM runs WHERE kind='iterate'")
    last_row = max(its, key=lambda r: int(r["id"].rpartition("-")[2]), default=None)
    rec = json.loads(last_row["record"] or "{}") if last_row else {}
    f = rec.get("fixes") or {}
    last = None if last_row is None else {
        "round": rec.get("round"), "new": f.get("new", 0), "by_kind": f.get("by_kind", {}),
        "changed_teacher_label": f.get("changed_teacher_label", 0), "effect": f.get("effect"),
        "promoted": rec.get("promoted")}
    try:
        teacher = project.spec.get_teacher().name
    except DistillError:
        teacher = None
    prev = f.get("snapshot", {})
    now = fixes(project, teacher) if teacher else {}
    by_kind: dict[str, int] = {}
    for i, x in now.items():
        if prev.get(i) != x["answer"]:
            by_kind[fix_kind(x["source"])] = by_kind.get(fix_kind(x["source"]), 0) + 1
    waiting = store.one("""SELECT COUNT(DISTINCT d.item) FROM review_decisions d JOIN failure_queue q
                           ON d.item = 'queue:' || q.id WHERE q.status = 'new' AND d.undone_at IS NULL
                           AND d.action IN ('accept', 'correct')""")
    feedback = 0 if project.spec.feedback.use == "ignore" else store.one(
        "SELECT COUNT(*) FROM failure_queue WHERE status='new' AND reason='feedback'")
    return {"last": last, "next": {"new": sum(by_kind.values()), "by_kind": by_kind, "queue_reviewed": waiting,
                                   "queue_feedback": feedback}}


def _verdict(r) -> str:
    """What a decision says the answer is, comparable across reviewers: the answer (accepted or corrected), or oos."""
    return "(out of scope)" if r["action"] == "oos" else r["answer"]


def cohen_kappa(pairs: list[tuple[Any, Any]]) -> float | None:
    """Cohen's kappa (Cohen 1960) between the first and the second reviewer of each doubly-reviewed item:
    (p_o - p_e) / (1 - p_e), p_o the observed agreement, p_e the agreement expected from each position's label
    frequencies. None without pairs; 1.0 when both always agree on a single category (p_e = 1)."""
    n = len(pairs)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in pairs) / n
    first, second = {}, {}
    for a, b in pairs:
        first[a] = first.get(a, 0) + 1
        second[b] = second.get(b, 0) + 1
    p_e = sum(first[k] * second.get(k, 0) for k in first) / (n * n)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval for k successes of n (better than the normal one for small n or p near 0/1)."""
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def _reviewer(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 80:
        raise DistillError("a review decision needs the reviewer's name (1-80 characters)",
                           hint="enter your name on the review page")
    return name


def valid_answer(project: Project, answer: Any) -> Any:
    """The corrected answer, checked as the teacher's would be: a label of the set (classify), a JSON object valid
    against the task's schema (extract: the message says which field breaks which rule), non-empty text (generate)."""
    from distill.task import ParseError, parse_answer

    spec = project.spec
    if spec.kind == "classify":
        if answer not in spec.label_names:
            raise DistillError(f"{answer!r} is not one of the task's labels", hint="pick a label from the list")
        return answer
    text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
    if spec.kind == "extract" and not text.strip().startswith("{"):
        raise DistillError("the answer is not a JSON object", hint="write the object, e.g. {\"field\": \"value\"}")
    try:
        return parse_answer(spec, text)
    except ParseError as e:
        raise DistillError(f"the answer is not valid for this task: {e.reason}: {e.detail}",
                           hint="fix it to match the task's schema" if spec.kind == "extract" else None) from None


def predict_students(project: Project, batch_size: int = 64) -> int:
    """The serving model's answers on the train/validation inputs it has not answered yet, stored in
    ``student_predictions`` (what the ``disagreement`` queue reads). Classify only; a project without a serving
    model has nothing to compare. Returns how many were added."""
    from distill import runs
    from distill.students.predictor import load_predictor

    if project.spec.kind != "classify" or _serving_run(project) is None:
        return 0
    ref = runs.serving_model_or_none(project.store, project.root, project.spec.kind)
    todo = project.store.q("""SELECT e.id, e.text FROM examples e WHERE e.split != 'test' AND NOT EXISTS
                              (SELECT 1 FROM student_predictions sp WHERE sp.example_id = e.id AND sp.run_id = ?)
                              ORDER BY e.id""", (ref.run_id,))
    if not todo:
        return 0
    pred = load_predictor(ref.path)
    n = 0
    for i in range(0, len(todo), 1024):       # committed in chunks: a restart resumes, nothing is computed twice
        chunk = todo[i:i + 1024]
        probs = pred.predict_proba([r["text"] for r in chunk], batch_size)
        with project.store.tx() as c:
            c.executemany("INSERT OR REPLACE INTO student_predictions(example_id, run_id, answer, confidence) "
                          "VALUES(?,?,?,?)", [(r["id"], ref.run_id, json.dumps(pred.labels[int(p.argmax())]),
                                               float(p.max())) for r, p in zip(chunk, probs)])
        n += len(chunk)
    return n


def _serving_run(project: Project) -> str | None:
    """Run id of the model `distill serve` would serve (None when nothing may be served, or its folder is gone)."""
    from distill import runs

    try:
        ref = runs.serving_model_or_none(project.store, project.root, project.spec.kind)
    except DistillError:
        return None
    return None if ref is None else ref.run_id


class Neighbours:
    """The labelled train/validation inputs most like a given text (TF-IDF word 1-2-grams, cosine), with their
    current answers: what a reviewer checks a label against ("is this consistent with the ones already labelled?").
    Built once when the page starts; a few seconds for 100k inputs."""

    def __init__(self, project: Project):
        from sklearn.feature_extraction.text import TfidfVectorizer

        from distill.dataset import rows

        labelled = [r for r in rows(project, project.spec.get_teacher().name, ("train", "validation"), only_kept=False)
                    if r.answer is not None]
        self.rows = labelled
        self.vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        self.matrix = self.vec.fit_transform([r.text for r in labelled]) if labelled else None

    def nearest(self, text: str, k: int = 3, exclude: str | None = None, min_similarity: float = 0.2) -> list[dict]:
        if self.matrix is None:
            return []
        sims = (self.matrix @ self.vec.transform([text]).T).toarray().ravel()    # rows are L2-normalised: cosine
        out = []
        for i in sims.argsort()[::-1]:
            if len(out) == k or sims[i] < min_similarity:
                break
            r = self.rows[i]
            if r.id != exclude:
                out.append({"id": r.id, "text": r.text, "answer": r.answer, "source": r.source,
                            "similarity": round(float(sims[i]), 3)})
        return out
