"""`distill cost`: what serving costs teacher-only vs routed vs student-only, and when distilling pays off.

    distill cost PROJECT [--requests 1000000] [--cpu-hour-usd 0.10]

Every input is a figure the project already *measured*; nothing is assumed except the two prices you pass
(the CPU-hour price, and the teacher's price in distill.yaml, which the ledger already applied):

- teacher USD per request: mean ``cost`` per call in the ledger (``teacher_calls``), i.e. what labelling
  actually paid per call. A local teacher priced by the hour with no cost in the ledger: ``price.per_hour``
  x mean ledger latency.
- student USD per request: the latest evaluation's measured mean latency of one request at batch 1
  (``reports/eval-<run>.json``: ``latency.student.batch1.mean_s``) x ``cpu_hour_usd`` / 3600.
- routed share: ``1 - achieved_coverage`` from the serving model's ``router.json`` (measured on the
  validation split at calibration), unless ``routed_share`` is given (e.g. read off /metrics in production).
  No router.json: the service answers everything with the student, so the share is 0.
- one-off distillation cost: the ledger spend of labelling (serve-time routed calls excluded: those are
  running costs) + the training time of every finished training run (``train_seconds`` of each training
  record, i.e. every epoch ever run, across rounds) x ``cpu_hour_usd`` / 3600.

Per request: teacher-only = t; routed = share x t + s (the student runs on every request, the teacher on
the routed share); student-only = s. Break-even volume = one-off cost / (t - routed cost per request): the
number of requests after which distilling has paid for itself (None when routing saves nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.project import Project

PER = 1_000_000


def teacher_cost_per_request(project: Project, teacher: str) -> dict[str, Any]:
    """Mean USD per call of ``teacher`` from the ledger (all calls: labelling and serving)."""
    tspec = project.spec.get_teacher(teacher)
    n, total, mean_lat = project.store.q(
        "SELECT COUNT(*), COALESCE(SUM(cost), 0), COALESCE(AVG(latency_s), 0) FROM teacher_calls WHERE teacher=?",
        (tspec.name,))[0]
    if n == 0:
        raise DistillError(f"{project.root}: teacher '{tspec.name}' has no calls in the ledger, so its cost per "
                           "request is unknown", hint=f"run `distill label {project.root}` first")
    if total > 0:
        return {"usd": total / n, "calls": n, "basis": "ledger mean cost per call"}
    if tspec.price.per_hour > 0:
        return {"usd": mean_lat * tspec.price.per_hour / 3600, "calls": n,
                "basis": "price.per_hour x mean ledger latency"}
    return {"usd": 0.0, "calls": n, "basis": "ledger: the teacher's calls cost nothing (no price set in distill.yaml)"}


def labelling_spend(project: Project, teacher: str) -> float:
    """Ledger spend of ``teacher`` excluding calls made by the running service (request.source = 'serve')."""
    return float(project.store.one(
        "SELECT COALESCE(SUM(cost), 0) FROM teacher_calls WHERE teacher=? "
        "AND COALESCE(json_extract(request, '$.source'), '') != 'serve'", (teacher,)))


def _costed_model(project: Project):
    """The serving model (``distill.runs``); before anything is promoted, the latest trained model, whose
    cost is what the advisor can say anything about."""
    from distill import runs

    return runs.serving_model_or_none(project.store, project.root, project.spec.kind) or project.latest_model()


def student_cost_per_request(project: Project, model_run_id: str | None, cpu_hour_usd: float) -> dict[str, Any]:
    """From the eval of ``model_run_id`` (or the latest eval): measured mean seconds at batch 1 x CPU price."""
    from distill.runs import latest_eval

    run, path = latest_eval(project.store, project.root, model_run_id) if model_run_id else (None, None)
    if run is None:
        run, path = latest_eval(project.store, project.root)
    if run is None or path is None:
        raise DistillError(f"{project.root}: no evaluation, so the student's latency is unknown",
                           hint=f"run `distill eval {project.root}` first (it measures latency)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        mean_s = float(report["latency"]["student"]["batch1"]["mean_s"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DistillError(f"{path}: cannot read the student's measured latency ({type(e).__name__}: {e})",
                           hint=f"re-run `distill eval {project.root}`") from None
    return {"usd": mean_s * cpu_hour_usd / 3600, "mean_latency_s": mean_s, "eval": run["id"],
            "basis": "eval mean latency at batch 1 x cpu_hour_usd"}


def routed_share_from_router(model_path: str | None) -> dict[str, Any]:
    """1 - achieved coverage of the router.json next to the model (or its ONNX export)."""
    if model_path:
        p = Path(model_path)
        for d in (p, p.parent / "onnx", p / "onnx"):
            f = d / "router.json"
            if f.is_file():
                try:
                    cov = json.loads(f.read_text(encoding="utf-8"))["achieved_coverage"]
                except (OSError, ValueError, KeyError) as e:
                    raise DistillError(f"{f}: unreadable ({e})", hint="re-run `distill route calibrate`") from None
                if cov is not None:
                    return {"share": 1.0 - float(cov), "basis": f"1 - achieved_coverage in {f}"}
    return {"share": 0.0, "basis": "no router.json next to the model: the student answers every request"}


def training_seconds(project: Project) -> float:
    """Seconds of every epoch of every finished training run (all rounds: all of it was paid for)."""
    total = 0.0
    from distill.runs import train_runs

    for r in train_runs(project.store):
        rec = json.loads(r["record"] or "{}")
        total += float(rec.get("train_seconds") or rec.get("wall_time_s") or 0.0)
    return total


def cost_figures(teacher_usd: float, student_usd: float, routed_share: float, one_off_usd: float,
                 monthly_requests: float) -> dict[str, Any]:
    """The arithmetic, apart from where the numbers come from (unit-tested against hand-computed values)."""
    routed_usd = routed_share * teacher_usd + student_usd
    per_1m = {"teacher_only": teacher_usd * PER, "routed": routed_usd * PER, "student_only": student_usd * PER}
    monthly = {k: v * monthly_requests / PER for k, v in per_1m.items()}

    def break_even(per_request: float) -> float | None:
        saving = teacher_usd - per_request
        return one_off_usd / saving if saving > 0 else None

    return {"per_1m_requests_usd": per_1m, "monthly_usd": monthly, "monthly_requests": monthly_requests,
            "one_off_usd": one_off_usd,
            "break_even_requests": {"routed": break_even(routed_usd), "student_only": break_even(student_usd)},
            "saving_per_1m_usd": {"routed": (teacher_usd - routed_usd) * PER, "student_only": (teacher_usd - student_usd) * PER}}


def cost_report(project: Project, *, monthly_requests: float = 1e6, cpu_hour_usd: float = 0.10,
                routed_share: float | None = None, teacher: str | None = None) -> dict:
    """See the module docstring. Raises DistillError when a needed measurement does not exist yet."""
    if monthly_requests < 0:
        raise DistillError(f"--requests must be >= 0, got {monthly_requests}")
    if cpu_hour_usd < 0:
        raise DistillError(f"--cpu-hour-usd must be >= 0, got {cpu_hour_usd}")
    if routed_share is not None and not 0.0 <= routed_share <= 1.0:
        raise DistillError(f"routed share must be in [0, 1], got {routed_share}")
    model = _costed_model(project)
    if model is None:
        raise DistillError(f"{project.root}: no trained model", hint=f"run `distill train {project.root}` first")
    record = model.record
    tname = teacher or ((record.get("teacher") or {}).get("identity") or {}).get("name") \
        or project.spec.get_teacher(None).name
    t = teacher_cost_per_request(project, tname)
    s = student_cost_per_request(project, model.run_id, cpu_hour_usd)
    r = ({"share": routed_share, "basis": "given"} if routed_share is not None
         else routed_share_from_router(str(model.path)))
    label_usd = labelling_spend(project, tname)
    train_s = training_seconds(project)
    one_off = label_usd + train_s * cpu_hour_usd / 3600
    out = cost_figures(t["usd"], s["usd"], r["share"], one_off, monthly_requests)
    out.update({
        "model_run_id": model.run_id, "teacher": tname, "cpu_hour_usd": cpu_hour_usd,
        "inputs": {"teacher_per_request": t, "student_per_request": s, "routed_share": r,
                   "one_off": {"labelling_usd": label_usd, "training_seconds": train_s,
                               "training_usd": train_s * cpu_hour_usd / 3600}},
    })
    return out
