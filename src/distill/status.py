"""What is in a project's store, as one plain dict (the CLI renders it; tests and scripts read it).

Cache hits are not stored (they cost nothing and leave no row), so the ledger side reports paid calls,
parse errors among them, transport retries, tokens and spend per teacher.

Status only reads: ``open_readonly`` opens the store read-only, so it works on a read-only folder, store or
mount (an archived project, a colleague's copy) and can never change what it reports on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distill import runs
from distill.dataset import fix_kind, relabelled_count
from distill.errors import DistillError
from distill.project import SPEC_FILE, STORE_FILE, Project
from distill.store import Store, db_url
from distill.task import load_spec
from distill.teachers.batch import batches_in_flight


def open_readonly(root: str | Path, check: bool | None = None) -> Project:
    """The project at ``root`` with its store opened read-only (``Store(readonly=True)``): no schema creation,
    no WAL switch, no write of any kind. A project that has no store yet is opened as usual (which creates
    it), as every command does. ``check``: run SQLite's integrity check (``distill status --check``)."""
    root = Path(root)
    if not (root / SPEC_FILE).exists() or not (root / STORE_FILE).exists() or db_url():
        # not a project (its usual message), a fresh one, or a store in PostgreSQL (read-only mode is SQLite's)
        return Project.open(root)
    spec = load_spec(root / SPEC_FILE)
    return Project(root=root, spec=spec, store=Store(root / STORE_FILE, readonly=True, check=check))


def when(ts: float | None) -> str | None:
    """A stored epoch time as local 'YYYY-MM-DD HH:MM:SS' (what a person reads in `distill status`)."""
    return None if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def status(project: Project) -> dict[str, Any]:
    s = project.store
    out: dict[str, Any] = {"project": project.spec.name, "kind": project.spec.kind, "root": str(project.root)}
    if s.shared:
        out["store"] = s.where          # PostgreSQL: host, database and schema (never the password)

    out["examples"] = {"train": 0, "validation": 0, "test": 0}
    for r in s.q("SELECT split, COUNT(*) AS n FROM examples GROUP BY split"):
        out["examples"][r["split"]] = r["n"]
    out["examples"]["total"] = sum(out["examples"].values())
    out["examples"]["with_gold"] = s.one("SELECT COUNT(*) FROM examples WHERE gold IS NOT NULL")

    out["imports"] = [
        {k: (json.loads(r[k]) if k == "rejected_reasons" else when(r[k]) if k == "created_at" else r[k])
         for k in r.keys()}
        for r in s.q("SELECT * FROM imports ORDER BY id")
    ]

    # labels per teacher per split, ok / failed
    labels: dict[str, dict[str, dict[str, int]]] = {}
    for r in s.q("""SELECT l.teacher, e.split, l.status, COUNT(*) AS n FROM labels l
                    JOIN examples e ON e.id = l.example_id GROUP BY l.teacher, e.split, l.status"""):
        per = labels.setdefault(r["teacher"], {}).setdefault(r["split"], {"ok": 0, "failed": 0})
        per[r["status"]] = r["n"]
    out["labels"] = labels

    failures: dict[str, dict[str, int]] = {}
    for r in s.q("""SELECT teacher, COALESCE(reason, 'unknown') AS reason, COUNT(*) AS n FROM labels
                    WHERE status = 'failed' GROUP BY teacher, reason ORDER BY n DESC"""):
        failures.setdefault(r["teacher"], {})[r["reason"]] = r["n"]
    out["failures"] = failures

    calls: dict[str, dict[str, Any]] = {}
    for r in s.q("""SELECT teacher, COUNT(*) AS calls, SUM(status = 'parse_error') AS parse_errors,
                           SUM(retries) AS retries, SUM(tokens_in) AS tokens_in, SUM(tokens_out) AS tokens_out,
                           SUM(cost) AS spend, AVG(latency_s) AS mean_latency_s
                    FROM teacher_calls GROUP BY teacher ORDER BY teacher"""):
        calls[r["teacher"]] = {k: r[k] for k in r.keys() if k != "teacher"}
    out["calls"] = calls
    out["spend"] = s.spend()
    out["tokens_in"] = sum(c["tokens_in"] or 0 for c in calls.values())
    out["tokens_out"] = sum(c["tokens_out"] or 0 for c in calls.values())

    out["contamination"] = s.one("SELECT COUNT(*) FROM contamination")
    out["corrections"] = s.one("SELECT COUNT(*) FROM corrections")
    kinds: dict[str, int] = {}
    for r in s.q("SELECT source, COUNT(*) AS n FROM corrections GROUP BY source"):
        kinds[fix_kind(r["source"])] = kinds.get(fix_kind(r["source"]), 0) + r["n"]
    out["corrections_by_kind"] = dict(sorted(kinds.items()))   # review | feedback (lower trust) | file

    # the latest filter run of each teacher, with its drops by reason
    filters: dict[str, dict[str, Any]] = {}
    for r in s.q("""SELECT * FROM filter_runs f WHERE id = (SELECT MAX(id) FROM filter_runs g
                    WHERE g.teacher = f.teacher) ORDER BY teacher"""):
        reasons = {x["reason"] or "unknown": x["n"] for x in s.q(
            """SELECT reason, COUNT(*) AS n FROM filter_decisions WHERE run_id = ? AND kept = 0
               GROUP BY reason ORDER BY n DESC""", (r["id"],))}
        filters[r["teacher"]] = {"run_id": r["id"], "kept": r["kept"], "dropped": r["dropped"],
                                 "dropped_by_reason": reasons, "created_at": when(r["created_at"]),
                                 # kept, on the suspect filter's label instead of the teacher's (action relabel)
                                 "relabelled": relabelled_count(s, r["id"])}
    out["filter"] = filters

    out["runs"] = [{"id": r["id"], "kind": r["kind"], "status": r["status"], "path": r["path"],
                    "created_at": when(r["created_at"]), **_gate_of(s, r)}
                   for r in runs.all_runs(s)]

    try:
        ref = project.serving_model()
        out["serving_model"] = {"run_id": ref.run_id, "path": str(ref.path), "why": ref.why}
    except DistillError as e:
        out["serving_model"] = {"run_id": None, "why": e.message}
    out["queue"] = {r["reason"]: r["n"] for r in s.q(
        "SELECT reason, COUNT(*) AS n FROM failure_queue WHERE status='new' GROUP BY reason ORDER BY reason")}
    out["queue"]["total"] = sum(out["queue"].values())
    out["batches_in_flight"] = [{**b, "created_at": when(b["created_at"]), "submitted_at": when(b["submitted_at"])}
                                for b in batches_in_flight(s)]
    out["next_step"] = next_step(project, out)
    return out


def _gate_of(s, r) -> dict[str, Any]:
    if r["kind"] not in runs.MODEL_KINDS:
        return {}
    passed = runs.gate_passed(s, r["id"])
    return {"gate": "not evaluated" if passed is None else "passed" if passed else "failed"}


def next_step(project: Project, st: dict[str, Any]) -> str:
    """The one command a user most likely wants next, from what the store holds."""
    root = project.root
    ex = st["examples"]
    if not ex["total"]:
        return f"import inputs: `distill import {root} data.csv --text text`"
    if st.get("batches_in_flight"):
        return (f"{len(st['batches_in_flight'])} batch(es) at the provider: `distill label {root}` collects them "
                "(it waits for them; --detach checks once)")
    labelled = sum(v.get("ok", 0) for t in st["labels"].values() for v in t.values())
    if not labelled:
        return f"label them with the teacher: `distill label {root}`"
    if not st["filter"]:
        return f"filter the teacher's labels: `distill filter {root}`"
    latest = project.latest_model()
    if latest is None:
        return f"train a student: `distill train {root}`"
    passed = runs.gate_passed(project.store, latest.run_id)
    if passed is None:
        return f"evaluate the latest model {latest.run_id}: `distill eval {root}`"
    if st["serving_model"]["run_id"] is None:
        return (f"the latest model failed its quality gate: see `distill report {root}`, improve the data or the "
                "student, and train again")
    if st["queue"]["total"]:
        return f"{st['queue']['total']} inputs wait in the failure queue: `distill iterate {root}`"
    return f"serve the model: `distill serve {root}`"
