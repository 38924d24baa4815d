"""Import inputs (and optional gold answers) from CSV, JSONL or Parquet into the project store, streaming.

The file is never held in memory and never written in one transaction, so a file of millions of rows imports
in memory that does not grow with it, and a crash costs at most the chunk being written. The steps, in order:

1. read the file as a stream (format from the extension or ``fmt``; CSV/TSV and JSONL line by line, Parquet
   one row group at a time); decoding and syntax errors name the file, the line as an editor shows it
   (1-based) and the column; a JSON string escape that is not text (a lone UTF-16 surrogate such as
   ``"\ud800"``) is such an error too, like a byte that is not UTF-8;
2. check the column mapping (missing columns list the ones the file has);
3. per row: reject empty and too-long texts (counted by reason), normalise, derive the example id and its
   split; gold answers and split-column values are validated. Accepted rows go to a scratch table (a TEMP
   table of the store's connection: on disk beyond a few MB, gone with the connection). Any bad value stops
   the import *before a write*, with the rows it occurs on (a half-imported labelled set is worse than none);
4. in the scratch table: drop exact and normalised duplicates inside the file (the first occurrence wins);
   an id used twice with different texts, or one the store has with another text, stops the import here too;
5. write in chunks of ``CHUNK_ROWS`` inputs, each chunk one transaction: skip inputs the store already has
   (they keep their split: see ``splits.py``), insert the rest with their hashed (or given) split, and run
   decontamination on them (``decontam.py``) so contaminated rows are excluded from the moment they exist.
   The first chunk records the ``imports`` row (its counters are updated by every chunk) and locks the test
   split on the first import. Test inputs are written first, so each train/validation input is checked
   against all the file's test inputs as it is inserted; then in normalised-text order, so the store's
   largest index grows in order (at 1M inputs the inserts took 8 s instead of 24: file order put each one at a
   random place of it).

A failed import before step 5 adds nothing. During step 5 each chunk records how far the import got (``meta``
key ``import_resume:<key>``, deleted by the last chunk): after a ``kill -9`` or a failed write, running the same
import again (same file bytes, same columns and options, same ``splits:`` settings) resumes after the last
chunk committed, under the same import id, and ends with the rows and counters an uninterrupted import would
have had (``ImportReport.resumed`` says so). Nothing is added twice and nothing is lost either way: any other
import of the file finds the stored inputs and counts them as ``dup_existing``.

Normalisation (used for duplicate detection and the store's ``norm`` column): NFKC, casefold, whitespace
collapsed, punctuation stripped at both ends. "Great product!!" and "great   product" are one input.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
import sqlite3
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import jsonschema

from distill.data.decontam import Checker, decontaminate_in
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
    resumed: bool = False       # this run continued an import a crash interrupted (same import id)


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


BATCH_ROWS = 5000      # rows read (Parquet) and written to the scratch table per step


def _utf8_error(path: Path) -> DistillError:
    """The first byte of ``path`` that is not UTF-8, as a DistillError with its line, column and byte offset.
    Called once a streaming read failed to decode: the file is scanned line by line (a multi-byte character
    never spans a newline byte), so the position is exact without holding the file."""
    bom = b"\xef\xbb\xbf"      # utf-8-sig: Excel writes a BOM
    with open(path, "rb") as f:
        offset = 0
        for n, line in enumerate(f, 1):
            skip = len(bom) if n == 1 and line.startswith(bom) else 0
            try:
                line[skip:].decode("utf-8")
            except UnicodeDecodeError as e:
                pos = offset + skip + e.start
                col = skip + e.start + 1
                return DistillError(
                    f"{path}, line {n}, column {col} (byte offset {pos}): not UTF-8 (byte 0x{line[skip + e.start]:02x})",
                    hint="re-encode the file as UTF-8, e.g. `iconv -f cp1252 -t utf-8 in.csv > out.csv` "
                    "(or save as 'CSV UTF-8' in your spreadsheet)",
                )
            offset += len(line)
    return DistillError(f"{path}: not UTF-8", hint="re-encode the file as UTF-8")   # not reached: it decoded


def _is_blank_file(path: Path) -> bool:
    """Nothing but whitespace (read until the first other byte, so a big file costs one block)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


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


def _csv_rows(path: Path, f: IO[str], delimiter: str) -> Iterator[tuple[list[str], _Record]]:
    """(header, record) per data row of an open CSV/TSV file, line by line."""
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    header: list[str] | None = None
    header_line = 0
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
        yield header, _Record(start, dict(zip(header, row)))
    if header is None:
        raise DistillError(f"{path}: the file is empty", hint="export the data again; a header line is needed")


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


def _jsonl_rows(path: Path, f: IO[str]) -> Iterator[_Record]:
    """One record per non-blank line of an open JSON Lines file (opened with newline='\n': lines end at \n
    only, as JSON allows U+2028 and a raw \r inside a line)."""
    for i, line in enumerate(f, 1):
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
        yield _Record(i, obj)


def _unreadable_parquet(path: Path, e: Exception) -> DistillError:
    return DistillError(f"{path}: unreadable Parquet file ({e})",
                        hint="check that the file is complete and really Parquet, or export it as CSV/JSONL")


@contextmanager
def open_records(path: Path, fmt: str) -> Iterator[tuple[list[str] | None, Iterator[_Record]]]:
    """(columns, records) of a file, streamed: CSV/TSV/JSONL line by line, Parquet one row group at a time.
    ``columns`` is None for JSON Lines, whose columns are the keys of all its lines (known once read). Errors
    are DistillErrors naming the file and the line (row)."""
    if _is_blank_file(path):
        raise DistillError(f"{path}: the file is empty", hint="point at the file with your data")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            columns = pf.schema_arrow.names
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for damaged files
            raise _unreadable_parquet(path, e) from None

        def parquet_rows() -> Iterator[_Record]:
            n = 0
            try:
                for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                    for values in batch.to_pylist():
                        n += 1
                        yield _Record(n, values)
            except Exception as e:
                if isinstance(e, DistillError):
                    raise
                raise _unreadable_parquet(path, e) from None

        try:
            yield columns, parquet_rows()
        finally:
            pf.close()
        return
    # newline='' for CSV (the csv module handles line ends inside quoted fields), '\n' for JSON Lines
    with open(path, encoding="utf-8-sig", newline="\n" if fmt == "jsonl" else "") as f:
        try:
            if fmt == "jsonl":
                yield None, _jsonl_rows(path, f)
            else:
                rows = _csv_rows(path, f, "\t" if fmt == "tsv" else ",")
                first = next(rows, None)
                if first is None:
                    yield [], iter(())
                else:
                    yield first[0], itertools.chain([first[1]], (rec for _h, rec in rows))
        except UnicodeDecodeError:
            raise _utf8_error(path) from None


def read_records(path: Path, fmt: str, data: bytes | None = None) -> tuple[list[str], list[_Record]]:
    """Every record of a small file (corrections), in memory. ``data`` is unused (kept for callers that read
    the file already); the file is read from ``path``."""
    with open_records(path, fmt) as (columns, records):
        out = list(records)
    if columns is None:
        columns = list(dict.fromkeys(k for r in out for k in r.values))
    return columns, out


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


def listing(items: list[str], total: int | None = None) -> str:
    """The first MAX_LISTED items, one per line, and how many more there are of ``total`` (default: all)."""
    total = len(items) if total is None else total
    more = f"\n  ... and {total - MAX_LISTED} more" if total > MAX_LISTED else ""
    return "\n".join(f"  {s}" for s in items[:MAX_LISTED]) + more


# ------------------------------------------------------------------------------------------------
# The import

CHUNK_ROWS = 25_000            # new inputs per write transaction (and per decontamination step)
IMPORT_CACHE_KB = 32_768       # SQLite page cache of the store and of the scratch table while importing
RESUME_PREFIX = "import_resume:"   # meta key of an import interrupted during its writes

# the file's accepted rows, in file order (seq), while the import runs: a TEMP table of the store's connection
# (SQLite keeps it in memory up to its cache size, then in a temporary file; it goes with the connection)
_SCRATCH = """CREATE TEMP TABLE import_rows(
  seq INTEGER PRIMARY KEY, line INTEGER NOT NULL, id TEXT NOT NULL, text TEXT NOT NULL, norm TEXT NOT NULL,
  gold TEXT, gold_key TEXT, segment TEXT, meta TEXT NOT NULL, file_split TEXT, split TEXT NOT NULL)"""
# the first occurrence of each normalised text, in write order (ord): test inputs first, then by normalised
# text, so a first import fills the store's largest index (norm) in order instead of at random places
_FIRSTS = """CREATE TEMP TABLE import_firsts(
  ord INTEGER PRIMARY KEY, seq INTEGER NOT NULL, line INTEGER NOT NULL, id TEXT NOT NULL, text TEXT NOT NULL,
  norm TEXT NOT NULL, gold TEXT, gold_key TEXT, segment TEXT, meta TEXT NOT NULL, file_split TEXT,
  split TEXT NOT NULL)"""


@dataclass
class _Listed:
    """The first MAX_LISTED of many problems, and how many there were (memory stays small on a bad file)."""

    items: list[str] = field(default_factory=list)
    n: int = 0

    def add(self, item: str) -> None:
        self.n += 1
        if len(self.items) < MAX_LISTED:
            self.items.append(item)

    def listing(self) -> str:
        return listing(self.items, self.n)


@dataclass
class _Problems:
    """What reading the file found wrong; reported after the read, before anything is written."""

    unknown_labels: dict[str, _Listed] = field(default_factory=dict)    # label -> its lines
    bad_gold: _Listed = field(default_factory=_Listed)
    bad_split: _Listed = field(default_factory=_Listed)
    empty_id: str | None = None                                         # where the first empty id is


@dataclass
class _Columns:
    text: str
    label: str | None
    id: str | None
    split: str | None
    segment: str | None          # the effective segment column (the spec's segment_field by default)
    segment_asked: bool          # --segment was given (a missing one is an error, not a warning)
    split_from_spec: bool

    @property
    def mapped(self) -> set[str]:
        return {c for c in (self.text, self.label, self.id, self.split, self.segment) if c is not None}


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
        sha = _sha256(path)
    except OSError as e:
        raise DistillError(f"{path}: cannot read ({e.strerror})", hint="check the file's permissions") from None
    cols = _Columns(text, label, id, split if split is not None else spec.splits.column,
                    segment if segment is not None else spec.segment_field, segment is not None, split is None)
    report = ImportReport(source=str(path))
    conn = project.store.conn
    conn.execute("DROP TABLE IF EXISTS import_rows")
    conn.execute("DROP TABLE IF EXISTS import_firsts")
    conn.execute(_SCRATCH)
    cache = None if project.store.shared else conn.execute("PRAGMA cache_size").fetchone()[0]
    if cache is not None:
        # the inserts land at random places of the id and norm indexes; SQLite's default cache (2 MB) then reads
        # most index pages from the OS on every chunk (at 1M inputs, half the import's time was system time)
        conn.execute(f"PRAGMA cache_size=-{IMPORT_CACHE_KB}")
        conn.execute(f"PRAGMA temp.cache_size=-{IMPORT_CACHE_KB}")
    try:
        with _Progress(progress) as prog:
            problems = _read(project, path, fmt, cols, report, prog)
            _refuse_problems(project, path, fmt, cols, problems)
            total = _first_occurrences(project, path, fmt, cols, report)
            _write(project, path, fmt, cols, report, sha, total, prog)
    finally:
        try:
            conn.execute("DROP TABLE IF EXISTS import_rows")
            conn.execute("DROP TABLE IF EXISTS import_firsts")
            if cache is not None:
                conn.execute(f"PRAGMA cache_size={cache}")
        except sqlite3.OperationalError:
            pass    # a full disk can refuse even this; TEMP tables go with the connection, and the error that
            # brought us here (a DistillError saying so) is the one to report
    return report


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class _Progress:
    """A rich progress line for the CLI (reading: rows so far; writing: inputs of the total); nothing when off."""

    def __init__(self, show: bool):
        self.bar, self.task = None, None
        if show:
            from rich.progress import Progress

            self.bar = Progress(transient=True)

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def stage(self, description: str, total: int | None) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, n)


# -- step 1-3: read and check every row; accepted rows go to the scratch table ---------------------------------


def _check_columns(path: Path, fmt: str, columns: list[str], cols: _Columns, report: ImportReport) -> None:
    """Every column asked for must exist (the error lists those the file has); a missing segment_field of the
    spec is a warning, and then rows get no segment."""
    wanted = {"text": cols.text, "label": cols.label, "id": cols.id, "split": cols.split}
    if cols.segment_asked:
        wanted["segment"] = cols.segment
    for arg, col in wanted.items():
        if col is not None and col not in columns:
            src = "splits.column in distill.yaml" if arg == "split" and cols.split_from_spec else f"--{arg}"
            mixup = delimiter_mixup(fmt, columns)
            shown = ", ".join(repr(c) if mixup else str(c) for c in columns)    # repr shows the \t
            raise DistillError(
                f"{path}: no column '{col}' (asked for by {src}); the file has: {shown}"
                + (f"; {mixup}" if mixup else ""),
                hint=_mixup_hint(fmt) if mixup else f"pass --{arg} with one of those column names, or add the column "
                "to the file",
            )
    if cols.segment is not None and cols.segment not in columns:
        report.warnings.append(f"segment_field '{cols.segment}' is not a column of {path.name}; rows get no segment")
        cols.segment = None


def _read(project: Project, path: Path, fmt: str, cols: _Columns, report: ImportReport,
          prog: _Progress) -> _Problems:
    """Stream the file once: reject rows by reason, check values, and put the rest into ``import_rows``. Nothing
    is written to the store; a file that is not readable stops here."""
    spec = project.spec
    problems = _Problems()
    rejected: dict[str, int] = {}
    seen_cols: dict[str, None] = {}      # JSON Lines: the columns are the keys of all lines
    batch: list[tuple] = []
    conn = project.store.conn
    prog.stage(f"reading {path.name}", None)
    with open_records(path, fmt) as (columns, records):
        for rec in records:
            if report.rows_read == 0 and columns is not None:
                _check_columns(path, fmt, columns, cols, report)
            report.rows_read += 1
            v = rec.values
            if columns is None:
                seen_cols.update(dict.fromkeys(v))
            row = _row(spec, path, fmt, cols, rec, problems, rejected)
            if row is not None:
                batch.append((report.rows_read, *row))
            if len(batch) >= BATCH_ROWS:
                _to_scratch(conn, batch, project.store.path)
                prog.advance(len(batch))
                batch = []
        _to_scratch(conn, batch, project.store.path)
    if report.rows_read == 0:
        raise DistillError(f"{path}: no data rows (only a header)", hint="add rows under the header")
    if columns is None:
        _check_columns(path, fmt, list(seen_cols), cols, report)
    report.rejected = rejected
    return problems


def _row(spec: ProjectSpec, path: Path, fmt: str, cols: _Columns, rec: _Record, problems: _Problems,
         rejected: dict[str, int]) -> tuple | None:
    """One record as a scratch row (line, id, text, norm, gold, gold_key, segment, meta, file_split, split), or None
    when it is rejected (counted by reason) or has an empty id (a problem)."""
    v = rec.values
    raw = v.get(cols.text)
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
        return None
    norm = normalise(raw)
    if cols.id is not None:
        if is_blank(v.get(cols.id)):
            problems.empty_id = problems.empty_id or location(path, fmt, rec.line)
            return None
        ex_id = str(v[cols.id]).strip()
    else:
        ex_id = text_id(norm)
    gold = None
    if cols.label is not None:
        try:
            gold = parse_gold(spec, v.get(cols.label))
        except ValueError as e:
            if spec.kind == "classify":
                problems.unknown_labels.setdefault(str(e), _Listed()).add(str(rec.line))
            else:
                problems.bad_gold.add(f"{location(path, fmt, rec.line)}, column '{cols.label}': {e}")
    row_split = None
    if cols.split is not None:
        try:
            row_split = parse_split_value(v.get(cols.split), location(path, fmt, rec.line), cols.split)
        except DistillError as e:
            problems.bad_split.add(e.message)
    seg = v.get(cols.segment) if cols.segment else None
    mapped = cols.mapped
    meta = {k: val for k, val in v.items() if k not in mapped}
    return (rec.line, ex_id, raw, norm, None if gold is None else json.dumps(gold, ensure_ascii=False),
            None if gold is None else json.dumps(gold, sort_keys=True, ensure_ascii=False),
            None if is_blank(seg) else str(seg), json.dumps(meta, ensure_ascii=False, default=str), row_split,
            row_split or assign_split(ex_id, spec.splits))


def _to_scratch(conn: sqlite3.Connection, batch: list[tuple], where: Path) -> None:
    if not batch:
        return
    conn.execute("BEGIN")      # one transaction per batch, on the TEMP database only: the store is not locked
    try:
        conn.executemany("INSERT INTO import_rows(seq, line, id, text, norm, gold, gold_key, segment, meta, "
                         "file_split, split) VALUES(?,?,?,?,?,?,?,?,?,?,?)", batch)
    except sqlite3.OperationalError as e:
        # a full disk (or a file size limit) fails the scratch table's spill to disk; SQLite may already have
        # rolled back, and nothing of this import reached the store
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        from distill.store import _db_hint

        raise DistillError(f"{where}: import failed, nothing was stored: {e}", hint=_db_hint(e)) from None
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _refuse_problems(project: Project, path: Path, fmt: str, cols: _Columns, problems: _Problems) -> None:
    """Any bad value stops the import before a write, with the rows it occurs on (a half-imported labelled set
    is worse than none)."""
    spec = project.spec
    rows_word = "rows" if fmt == "parquet" else "lines"
    if problems.empty_id is not None:
        raise DistillError(f"{problems.empty_id}, column '{cols.id}': the id is empty",
                           hint="give every row an id, or leave out --id to key inputs by their text")
    if cols.id is not None:
        # an id is the input it names: the same id twice with different texts is an error (the same text twice
        # is an exact duplicate); reported at its first occurrence and the first row that contradicts it
        conn = project.store.conn
        conn.execute("CREATE INDEX import_rows_id ON import_rows(id, seq)")
        clash = conn.execute(
            """SELECT b.id, a.line, b.line FROM import_rows b
               JOIN import_rows a ON a.seq = (SELECT MIN(seq) FROM import_rows WHERE id = b.id)
               WHERE b.text != a.text ORDER BY b.seq LIMIT 1""").fetchone()
        if clash is not None:
            raise DistillError(
                f"{path}: id {clash[0]!r} is used twice, on {rows_word} {clash[1]} and {clash[2]}, with different texts",
                hint="ids must be unique; fix one of them (or leave out --id to key inputs by text)",
            )
    if problems.unknown_labels:
        known = ", ".join(spec.label_names)
        lines = [f"{lab!r} on {rows_word} {', '.join(ls.items)}" + (f" (+{ls.n - MAX_LISTED} more)" if ls.n > MAX_LISTED
                                                                    else "")
                 for lab, ls in sorted(problems.unknown_labels.items())]
        raise DistillError(
            f"{path}, column '{cols.label}': {len(problems.unknown_labels)} gold label(s) are not in the label set "
            f"({known}):\n" + listing(lines),
            hint="add them to `labels:` in distill.yaml, or fix the data; nothing was imported",
        )
    if problems.bad_gold.n:
        raise DistillError(f"{problems.bad_gold.n} gold answer(s) are invalid:\n" + problems.bad_gold.listing(),
                           hint="gold answers must be JSON objects matching `schema:`; nothing was imported")
    if problems.bad_split.n:
        raise DistillError(f"{problems.bad_split.n} row(s) have an unknown split:\n" + problems.bad_split.listing(),
                           hint="use train, validation (dev/val/valid) or test; nothing was imported")


# -- step 4: duplicates inside the file, ids the store knows with another text ----------------------------------


def _first_occurrences(project: Project, path: Path, fmt: str, cols: _Columns, report: ImportReport) -> int:
    """Fill ``import_firsts`` (the first row of each normalised text: the first occurrence wins) and count the
    duplicates: a row repeating an earlier row's text exactly is ``dup_exact``, one repeating only its normalised
    text ``dup_normalised``. Returns the number of first occurrences."""
    conn = project.store.conn
    conn.execute("CREATE INDEX import_rows_norm ON import_rows(norm, seq)")
    # distinct texts = normalised texts seen once + distinct texts among the rows whose normalised text repeats
    # (counting distinct texts over all rows sorts every text; this reads the norm index and sorts only repeats)
    rows, norms, once, repeated_texts = conn.execute(
        """WITH g AS (SELECT norm, COUNT(*) AS n FROM import_rows GROUP BY norm)
           SELECT (SELECT COUNT(*) FROM import_rows), (SELECT COUNT(*) FROM g), (SELECT COUNT(*) FROM g WHERE n = 1),
                  (SELECT COUNT(*) FROM (SELECT DISTINCT r.norm, r.text FROM import_rows r
                                         JOIN g ON g.norm = r.norm WHERE g.n > 1) t)""").fetchone()
    texts = once + repeated_texts
    report.dup_exact, report.dup_normalised = rows - texts, texts - norms
    conn.execute(_FIRSTS)
    conn.execute("BEGIN")
    conn.execute(
        """INSERT INTO import_firsts SELECT ROW_NUMBER() OVER (ORDER BY r.split != 'test', r.norm), r.*
           FROM import_rows r WHERE r.seq IN (SELECT MIN(seq) FROM import_rows GROUP BY norm)""")
    conn.execute("COMMIT")
    conn.execute("CREATE INDEX import_firsts_norm ON import_firsts(norm)")
    if cols.label is not None:
        conflicts = conn.execute(
            """SELECT COUNT(*) FROM import_rows r JOIN import_firsts f ON f.norm = r.norm
               WHERE r.seq != f.seq AND r.gold_key IS NOT f.gold_key""").fetchone()[0]
        if conflicts:
            report.warnings.append(f"{conflicts} duplicate row(s) had a different gold answer than the first "
                                   "occurrence; the first was kept")
    clash = _Listed()
    for line, ex_id in conn.execute(
            "SELECT f.line, f.id FROM import_firsts f JOIN examples e ON e.id = f.id WHERE e.norm != f.norm "
            "ORDER BY f.seq"):
        clash.add(f"{location(path, fmt, line)}: id {ex_id!r}")
    if clash.n:
        raise DistillError(
            f"{clash.n} id(s) are already in the store with a different text:\n" + clash.listing(),
            hint="an id must always name the same input: give changed inputs new ids; nothing was imported",
        )
    return conn.execute("SELECT COUNT(*) FROM import_firsts").fetchone()[0]


# -- step 5: write in chunks, resumably ----------------------------------------------------------------------------


def _resume_key(project: Project, sha: str, fmt: str, cols: _Columns) -> str:
    """What makes two imports the same import: the file's bytes, how it is read and mapped, and every setting
    that decides a row's id, split or acceptance."""
    spec = project.spec
    what = {"sha256": sha, "fmt": fmt, "columns": [cols.text, cols.label, cols.id, cols.split, cols.segment],
            "splits": spec.splits.model_dump(mode="json"), "max_text_chars": spec.max_text_chars,
            "kind": spec.kind, "labels": spec.label_names, "schema": spec.json_schema}
    return RESUME_PREFIX + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _write(project: Project, path: Path, fmt: str, cols: _Columns, report: ImportReport, sha: str, total: int,
           prog: _Progress) -> None:
    """Write ``import_firsts`` in chunks of CHUNK_ROWS, each one transaction that also records how far the import
    got (``meta``), so a killed import resumes after its last chunk under the same import id."""
    spec, store = project.spec, project.store
    key = _resume_key(project, sha, fmt, cols)
    saved = store.get_meta(key)
    state = json.loads(saved) if saved else {"next": 1, "added": 0, "dup_existing": 0, "by_split": {},
                                             "contaminated": 0, "kept_split": 0}
    report.import_id, report.resumed = state.get("import_id"), saved is not None
    drift = settings_drift(store.get_meta("test_locked"), spec.splits)
    checker = Checker(spec.decontamination)
    now = time.time()
    prog.stage(f"writing {path.name}", total)
    prog.advance(state["next"] - 1)
    while True:
        lo = state["next"]
        hi = min(lo + CHUNK_ROWS, total + 1)
        committed = json.loads(json.dumps(state))     # the chunk below counts into state before its commit
        try:
            with store.tx() as conn:
                if report.import_id is None:
                    report.import_id = conn.execute(
                        "INSERT INTO imports(source, sha256, rows_read, added, dup_exact, dup_normalised, dup_existing, "
                        "rejected, rejected_reasons, created_at) VALUES(?,?,?,?,?,?,?,?,?,?)",
                        (str(path), sha, report.rows_read, 0, report.dup_exact, report.dup_normalised, 0,
                         sum(report.rejected.values()), json.dumps(report.rejected, sort_keys=True), now)).lastrowid
                    state["import_id"] = report.import_id
                _write_chunk(conn, project, state, lo, hi, report.import_id, now, checker)
                state["next"] = hi
                conn.execute("UPDATE imports SET added=?, dup_existing=? WHERE id=?",
                             (state["added"], state["dup_existing"], report.import_id))
                if hi > total:
                    conn.execute("DELETE FROM meta WHERE key=?", (key,))
                else:
                    store.set_meta(key, json.dumps(state))
        except DistillError as e:
            if lo == 1 and not report.resumed:
                raise           # nothing was committed: the import left no trace
            raise DistillError(e.message, hint=(e.hint + "; " if e.hint else "") +
                               f"{committed['added']} new inputs of this file are stored; run the same import again "
                               "to continue after them") from None
        prog.advance(hi - lo)
        if hi > total:
            break
    report.added, report.dup_existing = state["added"], state["dup_existing"]
    report.by_split, report.contaminated_removed = state["by_split"], state["contaminated"]
    if state["kept_split"]:
        report.warnings.append(f"{state['kept_split']} input(s) already stored keep their stored split, "
                               "although the split column says otherwise (the test split is locked)")
    if drift and report.added and cols.split is None:
        report.warnings.append(drift)


def _write_chunk(conn: sqlite3.Connection, project: Project, state: dict, lo: int, hi: int, import_id: int,
                 now: float, checker: Checker) -> None:
    """Rows ``lo <= ord < hi`` of ``import_firsts``: those the store has (by normalised text, so by id too: an id
    stored with another text was refused) keep their stored split; the rest are inserted and decontaminated."""
    rows = conn.execute(
        """SELECT f.id, f.text, f.split, f.file_split, e.split AS stored FROM import_firsts f
           LEFT JOIN examples e ON e.norm = f.norm WHERE f.ord >= ? AND f.ord < ? ORDER BY f.ord""", (lo, hi)).fetchall()
    new = []
    for ex_id, text, split, file_split, stored in rows:
        if stored is not None:
            state["dup_existing"] += 1
            state["kept_split"] += file_split is not None and file_split != stored
        else:
            new.append((ex_id, text, split))
            state["by_split"][split] = state["by_split"].get(split, 0) + 1
    if not new:
        return
    conn.execute(
        """INSERT INTO examples(id, text, norm, gold, segment, meta, split, import_id, created_at)
           SELECT f.id, f.text, f.norm, f.gold, f.segment, f.meta, f.split, ?, ? FROM import_firsts f
           WHERE f.ord >= ? AND f.ord < ? AND NOT EXISTS (SELECT 1 FROM examples e WHERE e.norm = f.norm)
           ORDER BY f.ord""", (import_id, now, lo, hi))
    state["added"] += len(new)
    if project.store.get_meta("test_locked") is None:
        project.store.set_meta("test_locked", lock_record(project.spec.splits, import_id))
    state["contaminated"] += decontaminate_in(conn, project.spec.decontamination, new=new, checker=checker)
