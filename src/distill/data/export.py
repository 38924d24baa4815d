"""Export the labelled data set (JSONL or Parquet) with a provenance sidecar.

Why export at all: the data a teacher produced is an asset of its own (to train elsewhere, to audit, to
share). It should travel with what made it: which teacher (model and sampling parameters, never a key),
what its terms say about training on its outputs, which filters ran and what they dropped, and a hash of
the data so the sidecar provably belongs to the file. Both files are written atomically (``distill.fsutil``:
a temporary name, then a rename), so a crash never leaves a half-written export where the old one was.

Rows come from ``distill.dataset.rows`` (the one reader every stage uses): train/validation rows are
the latest filter run's kept rows, contaminated rows are never exported, and test rows are exported only
when asked (``splits`` includes "test"). Each record:

    id, text, label (classify) | answer (extract, generate), split, segment, gold, source
    ('teacher' | 'correction'), probs, confidence, agreement, rationale, samples, logprobs

All values are JSON-native. Both formats load with ``datasets.load_dataset("json" | "parquet",
data_files=...)``. In Parquet a column needs one type; if nested answers differ in shape across rows, the
nested columns are written as JSON strings instead, and the sidecar lists them under ``json_columns``.

Where it may write: ``distill.fsutil.check_export_target``. An existing file is replaced only when it is a
previous data export (its ``.provenance.json`` sidecar names it, or its records have exactly the fields
above); anything else is refused, or with ``force`` moved aside to ``NAME.replaced-TIME``, never deleted. The
project folder, its store (``--out PROJECT/distill.db``), spec, recordings and what its store points at are
refused even with ``force``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import distill
from distill.data.splits import SPLITS
from distill.dataset import latest_filter_run, rows
from distill.errors import DistillError
from distill.fsutil import check_export_target, move_aside, project_protected, write_atomic, write_text_atomic
from distill.project import Project
from distill.task import TeacherSpec

NESTED = ("label", "answer", "gold", "probs", "samples", "logprobs")
# every record has these fields (+ label or answer): how a data export without its sidecar is recognised
FIELDS = frozenset({"id", "text", "split", "segment", "gold", "source", "probs", "confidence", "agreement",
                    "rationale", "samples", "logprobs"})


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


def is_data_export(path: Path) -> bool:
    """A file ``export_data`` wrote: its sidecar names it, or (sidecar lost) its first record has our fields."""
    if not path.is_file():
        return False
    try:
        side = json.loads(path.with_name(path.name + ".provenance.json").read_text(encoding="utf-8"))
        if isinstance(side, dict) and side.get("file") == path.name:
            return True
    except (OSError, ValueError):
        pass
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PAR1":
            import pyarrow.parquet as pq

            names = set(pq.read_schema(path).names)
        else:
            with open(path, encoding="utf-8") as f:
                names = set(json.loads(f.readline(1_000_000)))
    except Exception:  # unreadable, not JSON, not Parquet: not ours
        return False
    return FIELDS <= names and len(names & {"label", "answer"}) == 1 and len(names) == len(FIELDS) + 1


def export_data(project: Project, out: str | Path, *, fmt: str = "jsonl", teacher: str | None = None,
                splits: Iterable[str] = ("train", "validation"), force: bool = False,
                say: Callable[[str], None] | None = None) -> Path:
    """Write the labelled rows of ``splits`` to ``out`` and ``<out>.provenance.json``; returns ``out``.

    ``out`` is checked first (module docstring); ``force`` moves a file that is not a previous export aside
    (``say`` is told where) instead of refusing."""
    out = Path(out)
    if fmt not in ("jsonl", "parquet"):
        raise DistillError(f"unknown export format {fmt!r}", hint="use jsonl or parquet")

    def check() -> bool:
        return check_export_target(out, is_export=is_data_export, root=project.root,
                                   protected=project_protected(project), force=force,
                                   default=f"exports/train.{fmt} in the project",
                                   replaces="a previous data export (a file with its .provenance.json)")

    check()
    if out.is_dir():
        raise DistillError(f"export target {out} is a folder; {fmt} data goes to a file",
                           hint=f"give a file name, e.g. --out {out / ('train.' + fmt)}")
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
    if check():       # --force over a file that is not ours: keep it under another name
        moved = move_aside(out)
        if say:
            say(f"moved the existing {out} aside to {moved}")
    if fmt == "jsonl":
        write_atomic(out, lambda p: _write_jsonl(records, p))
    else:
        def write(p: Path) -> None:
            json_cols.extend(_write_parquet(records, p))
        write_atomic(out, write)

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
    write_text_atomic(side, json.dumps(provenance, indent=2, ensure_ascii=False))
    return out
