"""What is in a project's store, as one plain dict (the CLI renders it; tests and scripts read it).

Cache hits are not stored (they cost nothing and leave no row), so the ledger side reports paid calls,
parse errors among them, transport retries, tokens and spend per teacher.
"""

from __future__ import annotations

import json
from typing import Any

from distill.project import Project


def status(project: Project) -> dict[str, Any]:
    s = project.store
    out: dict[str, Any] = {"project": project.spec.name, "kind": project.spec.kind, "root": str(project.root)}

    out["examples"] = {"train": 0, "validation": 0, "test": 0}
    for r in s.q("SELECT split, COUNT(*) AS n FROM examples GROUP BY split"):
        out["examples"][r["split"]] = r["n"]
    out["examples"]["total"] = sum(out["examples"].values())
    out["examples"]["with_gold"] = s.one("SELECT COUNT(*) FROM examples WHERE gold IS NOT NULL")

    out["imports"] = [
        {k: (json.loads(r[k]) if k == "rejected_reasons" else r[k]) for k in r.keys()}
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

    # the latest filter run of each teacher, with its drops by reason
    filters: dict[str, dict[str, Any]] = {}
    for r in s.q("""SELECT * FROM filter_runs f WHERE id = (SELECT MAX(id) FROM filter_runs g
                    WHERE g.teacher = f.teacher) ORDER BY teacher"""):
        reasons = {x["reason"] or "unknown": x["n"] for x in s.q(
            """SELECT reason, COUNT(*) AS n FROM filter_decisions WHERE run_id = ? AND kept = 0
               GROUP BY reason ORDER BY n DESC""", (r["id"],))}
        filters[r["teacher"]] = {"run_id": r["id"], "kept": r["kept"], "dropped": r["dropped"],
                                 "dropped_by_reason": reasons, "created_at": r["created_at"]}
    out["filter"] = filters

    out["runs"] = [{"id": r["id"], "kind": r["kind"], "status": r["status"], "path": r["path"],
                    "created_at": r["created_at"]}
                   for r in s.q("SELECT id, kind, status, path, created_at FROM runs ORDER BY created_at")]
    return out
