"""Import inputs (and optional gold answers) from CSV, JSONL or Parquet into the project store.

One import is one transaction: every row of the file is committed, or (on any error) none is, so a failed
import adds nothing and loses nothing. The steps, in order:

1. read the file (format from the extension or ``fmt``); decoding and syntax errors name the file, the
   line as an editor shows it (1-based) and the column; a JSON string escape that is not text (a lone
   UTF-16 surrogate such as ``"\ud800"``) is such an error too, like a byte that is not UTF-8;
2. check the column mapping (missing columns list the ones the file has);
3. per row: reject empty and too-long texts (counted by reason), normalise, derive the example id;
   gold answers and split-column values are validated, and any bad one stops the import *before* a
   write, with the rows it occurs on (a half-imported labelled set is worse than none);
4. drop exact and normalised duplicates inside the file (the first occurrence wins);
5. in one transaction: skip inputs the store already has (they keep their split: see ``splits.py``),
   insert the rest with their hashed (or given) split, record an ``imports`` row, lock the test split on
   the first import, and run decontamination (``decontam.py``) so contaminated rows are excluded from the
   moment they exist.

Normalisation (used for duplicate detection and the store's ``norm`` column): NFKC, casefold, whitespace
collapsed, punctuation stripped at both ends. "Great product!!" and "great   product" are one input.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from distill.data.decontam import decontaminate_in
from distill.data.splits import assign_split, lock_record, parse_split_value, settings_drift
from distill.errors import DistillError
from distill.project import Project
from distill.task import ProjectSpec

# Long texts are rejected per row with a reason (max_text_chars), not by the csv module's 128 KiB field
# limit, which would otherwise abort the whole file on one long row. The limit is process-wide.
csv.field_size_limit(2**31 - 1)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
           ".pq": "parquet"}
MAX_LISTED = 5  # rows/values shown in an error message; the rest are counted


@dataclass
class ImportReport:
    source: str
    rows_read: int = 0
    added: int = 0
    dup_exact: int = 0          # same text as an earlier row of this file
    dup_normalised: int = 0     # same normalised text as an earlier row of this file
    dup_existing: int = 0       # already in the store (keeps its stored split)
    rejected: dict[str, int] = field(default_factory=dict)   # reason -> rows
    by_split: dict[str, int] = field(default_factory=dict)   # split -> rows added
    contaminated_removed: int = 0   # new train/validation rows found to near-duplicate a test input
    import_id: int | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Record:
    line: int                   # 1-based line (CSV/JSONL) or row (Parquet) where the record starts
    values: dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Normalisation and ids


def _is_punct_or_space(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def normalise(text: str) -> str:
    """NFKC, casefold, collapse whitespace, strip punctuation at both ends. A text that is nothing but
    punctuation keeps it (so '?' and '!' stay distinct inputs instead of both becoming '')."""
    t = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    i, j = 0, len(t)
    while i < j and _is_punct_or_space(t[i]):
        i += 1
    while j > i and _is_punct_or_space(t[j - 1]):
        j -= 1
    return t[i:j] or t


def text_id(norm: str) -> str:
    """Stable id of an input without an id column: a hash of its normalised text."""
    return "x" + hashlib.sha256(norm.encode("utf-8")).hexdigest()[:20]


# ------------------------------------------------------------------------------------------------
# Reading files


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        f = fmt.lower().lstrip(".")
        if f not in {"csv", "tsv", "jsonl", "parquet"}:
            raise DistillError(f"unknown format {fmt!r}", hint="use csv, tsv, jsonl or parquet")
        return f
    f = FORMATS.get(path.suffix.lower())
    if f is None:
        raise DistillError(
            f"{path}: cannot tell the format from the extension '{path.suffix}'",
            hint="use a .csv, .tsv, .jsonl or .parquet file, or pass --format csv|tsv|jsonl|parquet"
            + (" (a .json file must be JSON Lines: one object per line)" if path.suffix.lower() == ".json" else ""),
        )
    return f


def _decode(path: Path, data: bytes) -> str:
    bom = b"\xef\xbb\xbf"
    off = len(bom) if data.startswith(bom) else 0   # utf-8-sig: Excel writes a BOM
    try:
        return data[off:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = off + e.start
        line = data[:pos].count(b"\n") + 1
        col = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
        raise DistillError(
            f"{path}, line {line}, column {col} (byte offset {pos}): not UTF-8 (byte 0x{data[pos]:02x})",
            hint="re-encode the file as UTF-8, e.g. `iconv -f cp1252 -t utf-8 in.csv > out.csv` "
            "(or save as 'CSV UTF-8' in your spreadsheet)",
        ) from None


def delimiter_mixup(fmt: str, header: list[str]) -> str | None:
    """A sentence when the header says the file uses the other delimiter: a tab-separated file saved as .csv
    reads as one column named 'text<TAB>label' (a comma-separated .tsv likewise), and the error that follows
    (no column 'text', or a row with the wrong number of fields) does not say why. None when it looks fine."""
    names = [str(h) for h in header]
    if fmt == "csv" and any("\t" in h for h in names):
        return ("the header contains tabs, so this file looks tab-separated (TSV), but it was read as "
                "comma-separated CSV because of its extension")
    if fmt == "tsv" and len(names) == 1 and "," in names[0]:
        return ("the header is one column containing commas, so this file looks comma-separated (CSV), but it was "
                "read as tab-separated because of its extension")
    return None


def _mixup_hint(fmt: str) -> str:
    other = "tsv" if fmt == "csv" else "csv"
    return (f"pass --format {other} (or rename the file to .{other}: distill picks the delimiter from the "
            f"extension), or save it again from your spreadsheet as {fmt.upper()}")


def _read_csv(path: Path, text: str, delimiter: str) -> tuple[list[str], list[_Record]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    header_line = 0
    out: list[_Record] = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            what = ("a quoted field starting on this line is never closed (unbalanced quotes)"
                    if "end of data" in str(e) else f"malformed CSV ({e})")
            raise DistillError(
                f"{path}, line {start}: {what}",
                hint='quote fields that contain the delimiter, newlines or quotes, and double quotes inside '
                'them ("she said ""hi"""); re-export the file from your spreadsheet as CSV',
            ) from None
        if not row:  # blank line
            continue
        if header is None:
            header, header_line = [h.strip() for h in row], start
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DistillError(f"{path}, line {start}: the header repeats column(s) {dupes}",
                                   hint="give every column a unique name")
            continue
        if len(row) != len(header):
            fmt = "tsv" if delimiter == "\t" else "csv"
            mixup = delimiter_mixup(fmt, header)
            raise DistillError(
                f"{path}, line {start}: {len(row)} fields, but the header (line {header_line}) has {len(header)}"
                + (f"; {mixup}" if mixup else ""),
                hint=_mixup_hint(fmt) if mixup
                else "a field containing the delimiter must be quoted; fix or remove that row",
            )
        out.append(_Record(start, dict(zip(header, row))))
    if header is None:
        raise DistillError(f"{path}: the file is empty", hint="export the data again; a header line is needed")
    return header, out


# a \uD800-\uDFFF escape: the only way a JSON line decoded from UTF-8 can carry a surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: Any) -> tuple[str, str] | None:
    """(column, the offending string) of the first string (key or value, at any depth) holding a lone UTF-16
    surrogate, which is not Unicode text: it cannot be stored (UTF-8) or hashed. None when there is none."""
    stack: list[tuple[str, Any]] = [(k, v) for k, v in obj.items()] if isinstance(obj, dict) else [("", obj)]
    while stack:
        col, v = stack.pop()
        for s in ((col, v) if isinstance(v, str) else (col,)):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                return col, s
        if isinstance(v, dict):
            stack.extend((col, x) for kv in v.items() for x in kv)
        elif isinstance(v, list):
            stack.extend((col, x) for x in v)
    return None


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[_Record]]:
    cols: dict[str, None] = {}
    out: list[_Record] = []
    # split on \n only: str.splitlines() would also split on U+2028 etc., which JSON allows inside strings
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillError(
                f"{path}, line {i}, column {e.colno}: invalid JSON ({e.msg})",
                hint="each line must be one complete JSON object; fix or remove that line",
            ) from None
        except (ValueError, RecursionError) as e:  # >4300-digit integers, thousands of nested brackets
            raise DistillError(f"{path}, line {i}: JSON value out of range ({str(e)[:120]})",
                               hint="each line must be one flat JSON object of columns") from None
        if not isinstance(obj, dict):
            raise DistillError(f"{path}, line {i}: expected a JSON object, got {type(obj).__name__}",
                               hint='each line must look like {"text": "...", ...}')
        bad = _lone_surrogate(obj) if _SURROGATE_ESCAPE.search(line) else None
        if bad is not None:
            col, s = bad
            cp = next(f"\\u{ord(c):04x}" for c in s if 0xD800 <= ord(c) <= 0xDFFF)
            col = col.encode("utf-8", "backslashreplace").decode("utf-8")     # the name itself may be the bad one
            raise DistillError(
                f"{path}, line {i}, column '{col}': the JSON escape {cp} is half of a UTF-16 surrogate pair "
                "with no other half, so the value is not text",
                hint="the program that wrote the file split a character (often an emoji) in two; fix or remove "
                     "that line (nothing was imported)",
            )
        for k in obj:
            cols.setdefault(k, None)
        out.append(_Record(i, obj))
    return list(cols), out


def _read_parquet(path: Path, data: bytes) -> tuple[list[str], list[_Record]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for damaged files
        raise DistillError(f"{path}: unreadable Parquet file ({e})",
                           hint="check that the file is complete and really Parquet, or export it as CSV/JSONL") from None
    return table.column_names, [_Record(i, r) for i, r in enumerate(table.to_pylist(), 1)]


def read_records(path: Path, fmt: str, data: bytes) -> tuple[list[str], list[_Record]]:
    if not data.strip():
        raise DistillError(f"{path}: the file is empty", hint="point at the file with your data")
    if fmt == "parquet":
        return _read_parquet(path, data)
    text = _decode(path, data)
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    return _read_csv(path, text, "\t" if fmt == "tsv" else ",")


# ------------------------------------------------------------------------------------------------
# Values


def is_blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def parse_gold(spec: ProjectSpec, value: Any) -> Any:
    """A gold value from a file as a JSON-native answer, None when blank. Raises ValueError(reason)."""
    if is_blank(value):
        return None
    if spec.kind == "classify":
        s = str(value).strip()
        if s in spec.label_names:
            return s
        # tolerate case / spacing variants ('Not Spam' for 'not_spam'), as the teacher parser does
        folded = {" ".join(n.replace("_", " ").replace("-", " ").casefold().split()): n for n in spec.label_names}
        hit = folded.get(" ".join(s.replace("_", " ").replace("-", " ").casefold().split()))
        if hit is None:
            raise ValueError(s)
        return hit
    if spec.kind == "extract":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg} at char {e.pos})") from None
            except (ValueError, RecursionError) as e:  # >4300-digit integers, absurd nesting
                raise ValueError(f"not valid JSON ({str(e)[:120]})") from None
        try:
            jsonschema.validate(value, spec.json_schema or {})
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise ValueError(f"does not match the schema at {where}: {e.message}") from None
        return value
    return str(value)


def location(path: Path, fmt: str, line: int) -> str:
    return f"{path}, {'row' if fmt == 'parquet' else 'line'} {line}"


def listing(items: list[str]) -> str:
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "\n".join(f"  {s}" for s in items[:MAX_LISTED]) + more


# ------------------------------------------------------------------------------------------------
# The import


@dataclass
class _New:
    id: str
    text: str
    norm: str
    gold: Any
    segment: str | None
    meta: dict
    split: str | None      # from the split column, else None (hashed at insert)
    line: int


def import_file(project: Project, path: str | Path, *, text: str = "text", label: str | None = None,
                segment: str | None = None, id: str | None = None, split: str | None = None,
                fmt: str | None = None, progress: bool = False) -> ImportReport:
    """Import one file into ``project``. See the module docstring for the steps and guarantees.

    ``text``/``label``/``segment``/``id``/``split`` name the file's columns; ``segment`` defaults to the
    spec's ``segment_field`` and ``split`` to ``splits.column``. Columns not mapped go into ``meta``."""
    spec = project.spec
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: no such file", hint="check the path (relative paths start from where you run distill)")
    fmt = detect_format(path, fmt)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DistillError(f"{path}: cannot read ({e.strerror})", hint="check the file's permissions") from None
    sha = hashlib.sha256(data).hexdigest()
    columns, records = read_records(path, fmt, data)
    report = ImportReport(source=str(path), rows_read=len(records))
    if not records:
        raise DistillError(f"{path}: no data rows (only a header)", hint="add rows under the header")

    # -- column mapping ----------------------------------------------------------------------------
    seg_col = segment if segment is not None else spec.segment_field
    split_col = split if split is not None else spec.splits.column
    wanted = {"text": text, "label": label, "id": id, "split": split_col}
    if segment is not None:
        wanted["segment"] = segment
    for arg, col in wanted.items():
        if col is not None and col not in columns:
            src = "splits.column in distill.yaml" if arg == "split" and split is None else f"--{arg}"
            mixup = delimiter_mixup(fmt, columns)
            shown = ", ".join(repr(c) if mixup else str(c) for c in columns)    # repr shows the \t
            raise DistillError(
                f"{path}: no column '{col}' (asked for by {src}); the file has: {shown}"
                + (f"; {mixup}" if mixup else ""),
                hint=_mixup_hint(fmt) if mixup else f"pass --{arg} with one of those column names, or add the column "
                "to the file",
            )
    if seg_col is not None and seg_col not in columns:
        report.warnings.append(f"segment_field '{seg_col}' is not a column of {path.name}; rows get no segment")
        seg_col = None
    mapped = {c for c in (text, label, id, split_col, seg_col) if c is not None}

    # -- per-row checks (nothing is written yet) ------------------------------------------------------
    rejected: dict[str, int] = {}
    unknown_labels: dict[str, list[int]] = {}
    bad_gold: list[str] = []
    bad_split: list[str] = []
    ids_seen: dict[str, tuple[int, str]] = {}
    by_text: set[str] = set()
    by_norm: dict[str, _New] = {}
    gold_conflicts = 0
    new: list[_New] = []

    rows_iter: Any = records
    prog = None
    if progress:
        from rich.progress import Progress

        prog = Progress(transient=True)
        prog.start()
        rows_iter = prog.track(records, description=f"reading {path.name}")
    try:
        for rec in rows_iter:
            v = rec.values
            where = location(path, fmt, rec.line)
            raw = v.get(text)
            if is_blank(raw):
                reason = "empty_text"
            elif not isinstance(raw, str):
                reason = "text_not_a_string"
            elif len(raw) > spec.max_text_chars:
                reason = "too_long"
            else:
                reason = None
            if reason:
                rejected[reason] = rejected.get(reason, 0) + 1
                continue
            norm = normalise(raw)
            if id is not None:
                if is_blank(v.get(id)):
                    raise DistillError(f"{where}, column '{id}': the id is empty",
                                       hint="give every row an id, or leave out --id to key inputs by their text")
                ex_id = str(v[id]).strip()
                if ex_id in ids_seen:
                    first_line, first_text = ids_seen[ex_id]
                    if first_text != raw:
                        raise DistillError(
                            f"{path}: id {ex_id!r} is used twice, on {'rows' if fmt == 'parquet' else 'lines'} "
                            f"{first_line} and {rec.line}, with different texts",
                            hint="ids must be unique; fix one of them (or leave out --id to key inputs by text)",
                        )
                else:
                    ids_seen[ex_id] = (rec.line, raw)
            else:
                ex_id = text_id(norm)
            gold = None
            if label is not None:
                try:
                    gold = parse_gold(spec, v.get(label))
                except ValueError as e:
                    if spec.kind == "classify":
                        unknown_labels.setdefault(str(e), []).append(rec.line)
                    else:
                        bad_gold.append(f"{where}, column '{label}': {e}")
            row_split = None
            if split_col is not None:
                try:
                    row_split = parse_split_value(v.get(split_col), where, split_col)
                except DistillError as e:
                    bad_split.append(e.message)
            if raw in by_text:
                report.dup_exact += 1
                gold_conflicts += by_norm[norm].gold != gold
                continue
            by_text.add(raw)
            if norm in by_norm:
                report.dup_normalised += 1
                gold_conflicts += by_norm[norm].gold != gold
                continue
            seg = v.get(seg_col) if seg_col else None
            item = _New(
                id=ex_id, text=raw, norm=norm, gold=gold, segment=None if is_blank(seg) else str(seg),
                meta={k: val for k, val in v.items() if k not in mapped}, split=row_split, line=rec.line,
            )
            by_norm[norm] = item
            new.append(item)
    finally:
        if prog is not None:
            prog.stop()

    if unknown_labels:
        known = ", ".join(spec.label_names)
        lines = [f"{lab!r} on {'rows' if fmt == 'parquet' else 'lines'} {', '.join(map(str, ls[:MAX_LISTED]))}"
                 + (f" (+{len(ls) - MAX_LISTED} more)" if len(ls) > MAX_LISTED else "")
                 for lab, ls in sorted(unknown_labels.items())]
        raise DistillError(
            f"{path}, column '{label}': {len(unknown_labels)} gold label(s) are not in the label set ({known}):\n"
            + listing(lines),
            hint="add them to `labels:` in distill.yaml, or fix the data; nothing was imported",
        )
    if bad_gold:
        raise DistillError(f"{len(bad_gold)} gold answer(s) are invalid:\n" + listing(bad_gold),
                           hint="gold answers must be JSON objects matching `schema:`; nothing was imported")
    if bad_split:
        raise DistillError(f"{len(bad_split)} row(s) have an unknown split:\n" + listing(bad_split),
                           hint="use train, validation (dev/val/valid) or test; nothing was imported")
    if gold_conflicts:
        report.warnings.append(f"{gold_conflicts} duplicate row(s) had a different gold answer than the first "
                               "occurrence; the first was kept")
    report.rejected = rejected

    # -- one transaction: skip what exists, insert the rest, decontaminate ------------------------------
    store = project.store
    with store.tx() as conn:
        existing_ids = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, norm, split FROM examples")}
        existing_norms = {norm: i for i, (norm, _s) in existing_ids.items()}
        conflicts: list[str] = []
        kept_split_over_file = 0
        to_add: list[_New] = []
        for item in new:
            stored = existing_ids.get(item.id)
            if stored is not None and stored[0] != item.norm:
                conflicts.append(f"{location(path, fmt, item.line)}: id {item.id!r}")
                continue
            other = existing_norms.get(item.norm)
            if stored is not None or other is not None:
                report.dup_existing += 1
                stored_split = existing_ids[item.id if stored is not None else other][1]
                kept_split_over_file += item.split is not None and item.split != stored_split
                continue
            to_add.append(item)
        if conflicts:
            raise DistillError(
                f"{len(conflicts)} id(s) are already in the store with a different text:\n" + listing(conflicts),
                hint="an id must always name the same input: give changed inputs new ids; nothing was imported",
            )
        if kept_split_over_file:
            report.warnings.append(f"{kept_split_over_file} input(s) already stored keep their stored split, "
                                   "although the split column says otherwise (the test split is locked)")
        drift = settings_drift(store.get_meta("test_locked"), spec.splits)
        if drift and to_add and split_col is None:
            report.warnings.append(drift)

        now = time.time()
        cur = conn.execute(
            "INSERT INTO imports(source, sha256, rows_read, added, dup_exact, dup_normalised, dup_existing, "
            "rejected, rejected_reasons, created_at) VALUES(?,?,?,?,?,?,?,?,?,?)",
            (str(path), sha, report.rows_read, len(to_add), report.dup_exact, report.dup_normalised,
             report.dup_existing, sum(rejected.values()), json.dumps(rejected, sort_keys=True), now),
        )
        report.import_id = cur.lastrowid
        rows = []
        for item in to_add:
            sp = item.split or assign_split(item.id, spec.splits)
            report.by_split[sp] = report.by_split.get(sp, 0) + 1
            rows.append((item.id, item.text, item.norm, None if item.gold is None else json.dumps(item.gold, ensure_ascii=False),
                         item.segment, json.dumps(item.meta, ensure_ascii=False, default=str), sp,
                         report.import_id, now))
        conn.executemany(
            "INSERT INTO examples(id, text, norm, gold, segment, meta, split, import_id, created_at) "
            "VALUES(?,?,?,?,?,?,?,?,?)", rows)
        report.added = len(rows)
        if rows and store.get_meta("test_locked") is None:
            store.set_meta("test_locked", lock_record(spec.splits, report.import_id))
        if rows:
            report.contaminated_removed = decontaminate_in(conn, spec.decontamination)
    return report
