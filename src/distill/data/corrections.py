"""Human corrections: a file of fixed answers that override the teacher's.

Why a separate table rather than editing labels: the teacher's answer stays as it was (it is what we paid
for and what the cache replays), the correction sits next to it with its provenance, and
``distill.dataset.rows`` applies "correction, else teacher" in one place. A later correction for the same
example replaces the earlier one.

The file (CSV, or TSV/JSONL/Parquet by extension) has an answer column and either an id column (matched
to example ids) or a text column (matched by normalised text, as the importer normalises). An optional
``note`` column is stored too. Nothing is written unless every row matches a stored input and every
answer is valid for the task (a label in the set / a JSON object matching the schema).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from distill.data.importer import is_blank, listing, location, detect_format, normalise, parse_gold, read_records
from distill.errors import DistillError
from distill.project import Project


def import_corrections(project: Project, path: str | Path, *, id_col: str = "id", text_col: str = "text",
                       answer_col: str = "label", source: str | None = None) -> int:
    """Store the corrections in ``path``; returns how many were stored. ``source`` names who made them
    (default: the file name); the file's sha256 and the time are recorded with it."""
    spec = project.spec
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: no such file", hint="check the path to the corrections file")
    fmt = detect_format(path, None)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DistillError(f"{path}: cannot read ({e.strerror})", hint="check the file's permissions") from None
    columns, records = read_records(path, fmt, data)
    if not records:
        raise DistillError(f"{path}: no rows under the header", hint="add one row per correction")
    by_id = id_col in columns
    key_col = id_col if by_id else text_col
    for col in (key_col, answer_col):
        if col not in columns:
            raise DistillError(
                f"{path}: no column '{col}'; the file has: {', '.join(map(str, columns))}",
                hint=f"corrections need an answer column ('{answer_col}') and an id column ('{id_col}') or a "
                f"text column ('{text_col}'); rename the columns or pass the names",
            )

    if by_id:
        stored = {r[0]: r[0] for r in project.store.q("SELECT id FROM examples")}
    else:
        stored = {r[1]: r[0] for r in project.store.q("SELECT id, norm FROM examples")}

    unknown: list[str] = []
    bad: list[str] = []
    fixes: dict[str, tuple[int, object, str | None]] = {}   # example id -> (line, answer, note)
    for rec in records:
        where = location(path, fmt, rec.line)
        key = rec.values.get(key_col)
        if is_blank(key):
            bad.append(f"{where}: column '{key_col}' is empty")
            continue
        ex_id = stored.get(str(key).strip() if by_id else normalise(str(key)))
        if ex_id is None:
            unknown.append(f"{where}: {key_col} {str(key)[:60]!r}")
            continue
        raw = rec.values.get(answer_col)
        if is_blank(raw):
            bad.append(f"{where}: column '{answer_col}' is empty")
            continue
        try:
            answer = parse_gold(spec, raw)
        except ValueError as e:
            what = f"{str(e)!r} is not one of the labels {spec.label_names}" if spec.kind == "classify" else str(e)
            bad.append(f"{where}, column '{answer_col}': {what}")
            continue
        if ex_id in fixes and fixes[ex_id][1] != answer:
            bad.append(f"{where}: corrects the same input as line {fixes[ex_id][0]} with a different answer")
            continue
        note = rec.values.get("note")
        fixes[ex_id] = (rec.line, answer, None if is_blank(note) else str(note))

    if unknown:
        raise DistillError(
            f"{path}: {len(unknown)} row(s) match no imported input:\n" + listing(unknown),
            hint=("check the ids against `distill status`" if by_id else
                  "the text must match an imported input (case, spacing and end punctuation are ignored)")
            + "; import the inputs first, or remove those rows. Nothing was stored",
        )
    if bad:
        raise DistillError(f"{path}: {len(bad)} invalid correction(s):\n" + listing(bad),
                           hint="fix those rows; nothing was stored")

    provenance = json.dumps({
        "by": source or path.name, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    now = time.time()
    with project.store.tx() as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO corrections(example_id, answer, source, note, created_at) VALUES(?,?,?,?,?)",
            [(ex_id, json.dumps(ans, ensure_ascii=False), provenance, note, now)
             for ex_id, (_line, ans, note) in sorted(fixes.items())],
        )
    return len(fixes)

