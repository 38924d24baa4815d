"""Export the labelled data set (JSONL or Parquet) with a provenance sidecar.

Why export at all: the data a teacher produced is an asset of its own (to train elsewhere, to audit, to
share). It should travel with what made it: which teacher (model and sampling parameters, never a key),
what its terms say about training on its outputs, which filters ran and what they dropped, and a hash of
the data so the sidecar provably belongs to the file. Both files are written to a temporary name and
renamed into place, so a crash never leaves a half-written export where the old one was.

Rows come from ``distill.dataset.rows`` (the one reader every stage uses): train/validation rows are
the latest filter run's kept rows, contaminated rows are never exported, and test rows are exported only
when asked (``splits`` includes "test"). Each record:

    id, text, label (classify) | answer (extract, generate), split, segment, gold, source
    ('teacher' | 'correction'), probs, confidence, agreement, rationale, samples, logprobs

All values are JSON-native. Both formats load with ``datasets.load_dataset("json" | "parquet",
data_files=...)``. In Parquet a column needs one type; if nested answers differ in shape across rows, the
nested columns are written as JSON strings instead, and the sidecar lists them under ``json_columns``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import distill
from distill.data.splits import SPLITS
from distill.dataset import latest_filter_run, rows
from distill.errors import DistillError
from distill.project import Project
from distill.task import TeacherSpec

NESTED = ("label", "answer", "gold", "probs", "samples", "logprobs")


def _record(kind: str, r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "text": r.text,
        ("label" if kind == "classify" else "answer"): r.answer,
        "split": r.split,
        "segment": r.segment,
        "gold": r.gold,
        "source": r.source,
        "probs": r.probs,
        "confidence": r.confidence,
        "agreement": r.agreement,
        "rationale": r.rationale,
        "samples": r.samples,
        "logprobs": r.logprobs,
    }


def _atomic_write(out: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``out``: readers see the old file or the new one, never half."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # same folder (so the rename is atomic); not mkstemp, whose 0600 mode would survive the rename
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_jsonl(records: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_parquet(records: list[dict], path: Path) -> list[str]:
    """Native nested types when Arrow can infer one type per column, else the nested columns as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(records)
        json_cols: list[str] = []
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        json_cols = [c for c in NESTED if c in records[0]]
        table = pa.Table.from_pylist([
            {k: (json.dumps(v, ensure_ascii=False) if k in json_cols and v is not None else v) for k, v in rec.items()}
            for rec in records
        ])
    pq.write_table(table, path)
    return json_cols


def _replay_provenance(project: Project, t: TeacherSpec) -> dict[str, Any]:
    """What the replay recording says about itself on its first line (who recorded which model, when)."""
    path = Path(t.path or "").expanduser()
    if not path.is_absolute():
        path = project.root / path
    info: dict[str, Any] = {"path": str(t.path)}
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        info["error"] = f"cannot read the recording: {e}"
        return info
    try:
        info["first_line"] = json.loads(first)
    except json.JSONDecodeError:
        info["first_line"] = first[:2000]
    return info


def _teacher_provenance(project: Project, t: TeacherSpec) -> dict[str, Any]:
    # identity() holds what changes answers and no secrets (the API key's env var name is left out too)
    out: dict[str, Any] = {"identity": t.identity(), "terms": t.terms.model_dump(mode="json")}
    if t.kind == "replay":
        out["replay"] = _replay_provenance(project, t)
    if t.kind == "ensemble":
        out["members"] = [_teacher_provenance(project, project.spec.get_teacher(m)) for m in t.members]
    return out


def _filter_provenance(project: Project, teacher: str) -> dict[str, Any]:
    spec = project.spec
    run_id = latest_filter_run(project, teacher)
    out: dict[str, Any] = {
        "settings": spec.filters.model_dump(mode="json"),
        "decontamination": spec.decontamination.model_dump(mode="json"),
        "contaminated_examples": project.store.one("SELECT COUNT(*) FROM contamination"),
        "run_id": run_id,
    }
    if run_id is not None:
        run = project.store.q("SELECT kept, dropped, created_at FROM filter_runs WHERE id=?", (run_id,))[0]
        out.update(kept=run["kept"], dropped=run["dropped"], run_at=run["created_at"])
        out["dropped_by_reason"] = {
            r[0]: r[1] for r in project.store.q(
                "SELECT reason, COUNT(*) FROM filter_decisions WHERE run_id=? AND kept=0 GROUP BY reason ORDER BY reason",
                (run_id,))
        }
    return out


def export_data(project: Project, out: str | Path, *, fmt: str = "jsonl", teacher: str | None = None,
                splits: Iterable[str] = ("train", "validation")) -> Path:
    """Write the labelled rows of ``splits`` to ``out`` and ``<out>.provenance.json``; returns ``out``."""
    out = Path(out)
    if fmt not in ("jsonl", "parquet"):
        raise DistillError(f"unknown export format {fmt!r}", hint="use jsonl or parquet")
    splits = list(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DistillError(f"unknown split(s) {bad or splits}", hint=f"choose from {', '.join(SPLITS)}")
    spec = project.spec
    t = spec.get_teacher(teacher)
    # test rows come back unfiltered and possibly unlabelled (for evaluation); only labelled ones are data
    data = [r for r in rows(project, t.name, splits, only_kept=True) if r.answer is not None]
    if not data:
        raise DistillError(
            f"nothing to export: no labelled rows of teacher '{t.name}' in {', '.join(splits)}",
            hint="run `distill label` (and `distill filter`) first, or choose other splits",
        )
    records = [_record(spec.kind, r) for r in data]

    json_cols: list[str] = []
    if fmt == "jsonl":
        _atomic_write(out, lambda p: _write_jsonl(records, p))
    else:
        def write(p: Path) -> None:
            json_cols.extend(_write_parquet(records, p))
        _atomic_write(out, write)

    provenance = {
        "distill_version": distill.__version__,
        "created_at": time.time(),
        "project": spec.name,
        "kind": spec.kind,
        "labels": spec.label_names if spec.kind == "classify" else None,
        "schema": spec.json_schema,
        "file": out.name,
        "format": fmt,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "rows": len(records),
        "by_split": dict(sorted(Counter(r.split for r in data).items())),
        "by_source": dict(sorted(Counter(r.source for r in data).items())),
        "json_columns": json_cols,
        "teacher": _teacher_provenance(project, t),
        "filters": _filter_provenance(project, t.name),
    }
    side = out.with_name(out.name + ".provenance.json")
    _atomic_write(side, lambda p: p.write_text(json.dumps(provenance, indent=2, ensure_ascii=False), encoding="utf-8"))
    return out
