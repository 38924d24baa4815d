"""Importer: formats, column mapping, dedupe, rejections, and a clear DistillError for every bad input."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.data.importer import import_file, normalise, text_id
from distill.errors import DistillError
from distill.project import Project

ASSETS = Path(__file__).parent.parent / "assets"


def make_project(tmp_path: Path, kind: str = "classify") -> Project:
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(ASSETS / "recording.jsonl", root)
    return Project.init(root, kind, (ASSETS / f"{kind}_spec.yaml").read_text())


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def dump(project: Project) -> list:
    """Every row of every table: the store's full state, to prove a failed import changed nothing."""
    conn = project.store.conn
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    return [(t, sorted(tuple(r) for r in conn.execute(f"SELECT * FROM {t}"))) for t in tables]


# -- happy paths ------------------------------------------------------------------------------------


def test_csv_import_counts_columns_and_meta(tmp_path):
    p = make_project(tmp_path)
    rep = import_file(p, ASSETS / "reviews.csv", id="id", label="label")
    assert (rep.rows_read, rep.added, rep.dup_exact, rep.dup_normalised, rep.dup_existing) == (60, 60, 0, 0, 0)
    assert sum(rep.by_split.values()) == 60 and set(rep.by_split) == {"train", "validation", "test"}
    row = p.store.q("SELECT * FROM examples WHERE id='r001'")[0]
    assert row["text"] == "The blender works perfectly and was easy to clean."
    assert json.loads(row["gold"]) == "positive"
    assert row["segment"] == "web"                      # spec.segment_field = channel
    assert json.loads(row["meta"]) == {"rating_stars": "5"}   # unmapped columns go to meta
    imp = p.store.q("SELECT * FROM imports")[0]
    assert imp["added"] == 60 and len(imp["sha256"]) == 64


def test_jsonl_and_parquet_import_same_examples(tmp_path):
    p = make_project(tmp_path)
    rep = import_file(p, ASSETS / "reviews.jsonl", id="id", label="label")
    assert rep.added == 60
    table = pa.Table.from_pylist([json.loads(line) for line in (ASSETS / "reviews.jsonl").read_text().splitlines()])
    pq.write_table(table, tmp_path / "reviews.parquet")
    rep2 = import_file(p, tmp_path / "reviews.parquet", id="id", label="label")
    assert rep2.added == 0 and rep2.dup_existing == 60


def test_duplicates_inside_file_and_against_store(tmp_path):
    p = make_project(tmp_path)
    f = write(tmp_path, "d.csv", "text\nGreat product!\nGreat product!\ngreat   PRODUCT\n\"...great product.\"\nOther thing\n")
    rep = import_file(p, f)
    assert (rep.rows_read, rep.added, rep.dup_exact, rep.dup_normalised) == (5, 2, 1, 2)
    rep2 = import_file(p, write(tmp_path, "e.csv", "text\nGREAT product\nnew one\n"))
    assert (rep2.added, rep2.dup_existing) == (1, 1)
    assert p.store.one("SELECT COUNT(*) FROM examples") == 3


def test_rejects_empty_and_too_long_per_row(tmp_path):
    p = make_project(tmp_path)
    long_text = "x" * (p.spec.max_text_chars + 1)
    rep = import_file(p, write(tmp_path, "r.csv", f"text,n\nok text,1\n,2\n   ,3\n{long_text},4\n"))
    assert rep.added == 1
    assert rep.rejected == {"empty_text": 2, "too_long": 1}
    assert json.loads(p.store.q("SELECT rejected_reasons FROM imports")[0][0]) == {"empty_text": 2, "too_long": 1}


def test_hash_id_is_stable_and_normalisation():
    assert normalise("  ¡Hello,   WORLD!! ") == "hello, world"
    assert normalise("ﬁne") == "fine"                  # NFKC folds the ligature
    assert normalise("?!") == "?!"                      # punctuation-only text keeps its content
    assert text_id(normalise("Hello world")) == text_id(normalise("hello   world!"))
    assert text_id("a") != text_id("b")


def test_utf8_bom_and_crlf(tmp_path):
    p = make_project(tmp_path)
    rep = import_file(p, write(tmp_path, "bom.csv", b"\xef\xbb\xbftext,label\r\nfine day,positive\r\n"), label="label")
    assert rep.added == 1
    assert p.store.one("SELECT text FROM examples") == "fine day"


def test_quoted_multiline_field_and_progress(tmp_path):
    p = make_project(tmp_path)
    rep = import_file(p, write(tmp_path, "m.csv", 'text\n"line one\nline two"\nsecond\n'), progress=True)
    assert rep.added == 2
    assert p.store.one("SELECT COUNT(*) FROM examples WHERE text=?", ("line one\nline two",)) == 1


def test_gold_label_case_variants_map_to_label(tmp_path):
    p = make_project(tmp_path)
    import_file(p, write(tmp_path, "g.csv", "text,label\na,POSITIVE\nb, negative \nc,\n"), label="label")
    golds = {r[0]: r[1] for r in p.store.q("SELECT text, gold FROM examples")}
    assert golds == {"a": '"positive"', "b": '"negative"', "c": None}


def test_extract_gold_json_parsed(tmp_path):
    p = make_project(tmp_path, "extract")
    rep = import_file(p, ASSETS / "orders.jsonl", label="gold")
    assert rep.added == 6
    gold = json.loads(p.store.one("SELECT gold FROM examples WHERE text LIKE 'I want to buy%'"))
    assert gold == {"intent": "buy", "item": "red scarf"}


def test_missing_segment_field_is_a_warning_not_an_error(tmp_path):
    p = make_project(tmp_path)
    rep = import_file(p, write(tmp_path, "s.csv", "text\nhello there\n"))
    assert rep.added == 1 and any("segment_field" in w for w in rep.warnings)


# -- bad input: DistillError naming the file and the line/column -------------------------------------


def _err(p, path, **kw) -> str:
    with pytest.raises(DistillError) as ei:
        import_file(p, path, **kw)
    return str(ei.value)


def test_unbalanced_quotes(tmp_path):
    p = make_project(tmp_path)
    f = write(tmp_path, "q.csv", 'text,label\nfine,positive\n"broken,negative\nlast,neutral\n')
    msg = _err(p, f)
    assert "q.csv, line 3" in msg and "never closed" in msg


def test_ragged_row(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "rag.csv", "text,label\na,positive\nb,positive,extra\n"))
    assert "rag.csv, line 3" in msg and "3 fields" in msg and "has 2" in msg


def test_missing_column_lists_available(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "c.csv", "body,label\na,positive\n"))
    assert "c.csv" in msg and "'text'" in msg and "body, label" in msg
    msg = _err(p, write(tmp_path, "c2.csv", "text\na\n"), label="gold")
    assert "'gold'" in msg and "the file has: text" in msg


def test_empty_and_header_only_files(tmp_path):
    p = make_project(tmp_path)
    assert "empty" in _err(p, write(tmp_path, "e.csv", ""))
    assert "empty" in _err(p, write(tmp_path, "e.jsonl", "\n\n"))
    assert "no data rows" in _err(p, write(tmp_path, "h.csv", "text,label\n"))


def test_non_utf8_names_line_and_byte(tmp_path):
    p = make_project(tmp_path)
    f = write(tmp_path, "latin.csv", "text\nok\ncaf".encode() + b"\xe9 au lait\n")
    msg = _err(p, f)
    assert "latin.csv, line 3, column 4 (byte offset 11)" in msg and "UTF-8" in msg and "iconv" in msg


def test_invalid_jsonl_line(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "b.jsonl", '{"text": "a"}\n{"text": "b",}\n'))
    assert "b.jsonl, line 2, column" in msg and "invalid JSON" in msg
    msg = _err(p, write(tmp_path, "arr.jsonl", '{"text": "a"}\n[1, 2]\n'))
    assert "arr.jsonl, line 2" in msg and "JSON object" in msg


def test_unreadable_parquet(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "x.parquet", b"PAR1 this is not really parquet"))
    assert "x.parquet" in msg and "unreadable Parquet" in msg


def test_unknown_format(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "x.json", "[]"))
    assert "x.json" in msg and "--format" in str(msg)


def test_unknown_gold_labels_list_labels_and_lines(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "u.csv", "text,label\na,positive\nb,happy\nc,angry\nd,happy\n"), label="label")
    assert "u.csv" in msg and "'happy' on lines 3, 5" in msg and "'angry' on lines 4" in msg
    assert "labels:" in msg
    assert p.store.one("SELECT COUNT(*) FROM examples") == 0


def test_extract_invalid_gold_names_row(tmp_path):
    p = make_project(tmp_path, "extract")
    f = write(tmp_path, "o.jsonl", '{"text": "buy a hat", "gold": "{\\"intent\\": \\"buy\\", \\"item\\": \\"hat\\"}"}\n'
              '{"text": "hmm", "gold": "{not json"}\n{"text": "cancel it", "gold": "{\\"intent\\": \\"nope\\", \\"item\\": \\"x\\"}"}\n')
    msg = _err(p, f, label="gold")
    assert "o.jsonl, line 2, column 'gold': not valid JSON" in msg
    assert "o.jsonl, line 3, column 'gold': does not match the schema at intent" in msg


def test_duplicate_ids_name_both_lines(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "i.csv", "id,text\n1,alpha\n2,beta\n1,gamma\n"), id="id")
    assert "i.csv" in msg and "'1'" in msg and "lines 2 and 4" in msg


def test_same_id_same_text_is_an_exact_duplicate_not_an_error(tmp_path):
    p = make_project(tmp_path)
    rep = import_file(p, write(tmp_path, "i.csv", "id,text\n1,alpha\n1,alpha\n"), id="id")
    assert (rep.added, rep.dup_exact) == (1, 1)


def test_bad_split_value(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "s.csv", "text,split\na,train\nb,holdout\n"), split="split")
    assert "s.csv, line 3" in msg and "'holdout'" in msg


# -- atomicity ----------------------------------------------------------------------------------------


def test_failed_import_leaves_store_unchanged(tmp_path):
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id", label="label")
    before = dump(p)
    # fails during validation (before the transaction)
    bad = (ASSETS / "reviews.csv").read_text().replace("r060,", "r061,") + "r999,new text,furious,web,1\n"
    with pytest.raises(DistillError):
        import_file(p, write(tmp_path, "bad.csv", bad), id="id", label="label")
    assert dump(p) == before
    # fails inside the transaction, after new rows were queued: id r001 now names a different text
    with pytest.raises(DistillError, match="already in the store with a different text"):
        import_file(p, write(tmp_path, "conflict.csv", "id,text\nbrand-new,never seen\nr001,changed text\n"), id="id")
    assert dump(p) == before


def test_failure_during_insert_rolls_back(tmp_path, monkeypatch):
    """A crash after rows were inserted (here: inside decontamination) rolls the whole import back."""
    p = make_project(tmp_path)
    import_file(p, ASSETS / "reviews.csv", id="id", label="label")
    before = dump(p)

    def boom(*a, **k):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr("distill.data.importer.decontaminate_in", boom)
    with pytest.raises((DistillError, sqlite3.OperationalError)):
        import_file(p, write(tmp_path, "n.csv", "text\nsomething new\nand another\n"))
    assert dump(p) == before


def test_lone_surrogate_escape_names_line_and_column_and_imports_nothing(tmp_path):
    p = make_project(tmp_path)
    before = dump(p)
    f = write(tmp_path, "s.jsonl", '{"text": "pair \\ud83d\\ude00 ok"}\n{"text": "x", "note": ["\\udc00"]}\n')
    msg = _err(p, f)
    assert "s.jsonl, line 2, column 'note'" in msg and "\\udc00" in msg and "surrogate" in msg
    assert dump(p) == before


def test_tab_separated_csv_says_so_and_csv_as_tsv_too(tmp_path):
    p = make_project(tmp_path)
    msg = _err(p, write(tmp_path, "t.csv", "text\tlabel\na\tpositive\n"), label="label")
    assert "'text\\tlabel'" in msg and "tab-separated" in msg and "rename the file to .tsv" in msg
    msg = _err(p, write(tmp_path, "t2.csv", "text\tlabel\na, b\tpositive\n"), label="label")
    assert "t2.csv, line 2: 2 fields" in msg and "tab-separated" in msg
    msg = _err(p, write(tmp_path, "c.tsv", "text,label\na,positive\n"), label="label")
    assert "comma-separated" in msg and "rename the file to .csv" in msg
    # an ordinary missing column keeps its plain hint
    assert "tab-separated" not in _err(p, write(tmp_path, "c3.csv", "body,label\na,positive\n"))


# -- streaming writes: chunks, resume after a crash, incremental decontamination ----------------------------------

WORDS = ("blender kettle toaster screen battery charger cable strap zipper handle lid hinge motor fan filter pump "
         "sole lace button pocket sleeve collar seam stitch box parcel label").split()


def _bulk_rows(n: int, seed: int = 1) -> list[tuple[str, str]]:
    """(text, split) rows: random product sentences, a test share, in-file duplicates and near-copies of test rows."""
    import random

    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for i in range(n):
        if i % 17 == 16:
            rows.append((rows[rng.randrange(len(rows))][0].upper() + "!", "train"))       # normalised duplicate
        elif i % 29 == 28:
            rows.append(rows[rng.randrange(len(rows))])                                 # exact duplicate
        elif i % 23 == 22:
            tests = [t for t, s in rows if s == "test"]
            # a test row with one word changed near its end: near-duplicate, caught by decontamination
            w = rng.choice(tests).split() if tests else ["x"]
            w[-1] = "changed"
            rows.append((" ".join(w), "train"))
        else:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 20)))
            rows.append((f"item {i}: {words}", "test" if i % 5 == 0 else "train"))
    return rows


def _write_split_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv as csv_

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv_.writer(f)
        w.writerow(["text", "split"])
        w.writerows(rows)
    return path


def _fresh(tmp_path: Path, name: str) -> Project:
    (tmp_path / name).mkdir()
    return make_project(tmp_path / name)


def _outcome(p: Project) -> tuple:
    """What an import leaves in the store, without the times (which differ run to run)."""
    q = p.store.q
    return (sorted(tuple(r) for r in q("SELECT id, text, norm, gold, segment, meta, split, import_id FROM examples")),
            [tuple(r) for r in q("SELECT id, source, sha256, rows_read, added, dup_exact, dup_normalised, "
                                 "dup_existing, rejected, rejected_reasons FROM imports ORDER BY id")],
            sorted(tuple(r) for r in q("SELECT * FROM contamination")),
            [r[0] for r in q("SELECT key FROM meta WHERE key LIKE 'import_resume:%'")])


def _report(r) -> tuple:
    return (r.rows_read, r.added, r.dup_exact, r.dup_normalised, r.dup_existing, r.by_split, r.contaminated_removed,
            r.import_id, r.warnings)


def test_chunked_import_equals_one_chunk_and_writes_test_rows_first(tmp_path, monkeypatch):
    rows = _bulk_rows(400)
    data = _write_split_csv(tmp_path / "bulk.csv", rows)
    whole = _fresh(tmp_path, "a")
    one = import_file(whole, data, split="split")
    monkeypatch.setattr("distill.data.importer.CHUNK_ROWS", 37)
    chunked = _fresh(tmp_path, "b")
    many = import_file(chunked, data, split="split")
    assert _report(one) == _report(many) and _outcome(whole) == _outcome(chunked)
    assert one.contaminated_removed > 5 and one.dup_exact > 5 and one.dup_normalised > 5
    # every test input was stored before every train input, so each train input met all of them
    order = [r[0] for r in chunked.store.q("SELECT split FROM examples ORDER BY rowid")]
    assert order == sorted(order, key=lambda s: s != "test")


def test_failed_chunk_resumes_to_the_same_store_and_counters(tmp_path, monkeypatch):
    rows = _bulk_rows(400)
    data = _write_split_csv(tmp_path / "bulk.csv", rows)
    existing = _write_split_csv(tmp_path / "first.csv", rows[100:130] + [("a text only the store has", "train")])
    reference = _fresh(tmp_path, "ref")
    import_file(reference, existing, split="split")
    expected = import_file(reference, data, split="split")

    p = _fresh(tmp_path, "p")
    base = import_file(p, existing, split="split").added
    monkeypatch.setattr("distill.data.importer.CHUNK_ROWS", 50)
    real, calls = __import__("distill.data.importer", fromlist=["_write_chunk"])._write_chunk, []

    def disk_full_on_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise sqlite3.OperationalError("database or disk is full")
        return real(*a, **k)

    monkeypatch.setattr("distill.data.importer._write_chunk", disk_full_on_the_fourth)
    with pytest.raises(DistillError, match="disk is full") as e:
        import_file(p, data, split="split")
    assert "run the same import again to continue" in str(e.value)
    stored = p.store.one("SELECT COUNT(*) FROM examples") - base
    assert 0 < stored < expected.added                          # three chunks are in, the fourth rolled back
    assert f"{stored} new inputs of this file are stored" in str(e.value)
    assert len(_outcome(p)[3]) == 1                             # and where to go on is recorded
    monkeypatch.setattr("distill.data.importer._write_chunk", real)
    resumed = import_file(p, data, split="split")
    assert resumed.resumed and not expected.resumed
    assert _report(resumed) == _report(expected) and _outcome(p) == _outcome(reference)
    again = import_file(p, data, split="split")                 # a finished import is not resumed: all stored
    assert not again.resumed and again.added == 0 and again.dup_existing == expected.added + expected.dup_existing


def test_kill9_mid_import_then_rerun_adds_nothing_twice_and_loses_nothing(tmp_path):
    """A real SIGKILL while chunks are being written (small chunks, slowed down): the re-run resumes and the store
    ends as after one uninterrupted import."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = _write_split_csv(tmp_path / "bulk.csv", _bulk_rows(600))
    reference = _fresh(tmp_path, "ref")
    expected = import_file(reference, data, split="split")
    p = _fresh(tmp_path, "p")
    p.close()
    child = (
        "import sys, time\n"
        "from distill.data import importer\n"
        "from distill.project import Project\n"
        "importer.CHUNK_ROWS = 40\n"
        "real = importer._write_chunk\n"
        "def slow(*a, **k):\n"
        "    real(*a, **k)\n"
        "    time.sleep(0.15)   # inside the chunk's transaction: the kill may land mid-chunk\n"
        "importer._write_chunk = slow\n"
        "importer.import_file(Project.open(sys.argv[1]), sys.argv[2], split='split')\n")
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "p" / "proj"), str(data)],
                            env={**os.environ, "PYTHONPATH": str(src)})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            con = sqlite3.connect(tmp_path / "p" / "proj" / "distill.db", timeout=30)
            n = con.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
            con.close()
            if n >= 120:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    p = Project.open(tmp_path / "p" / "proj")
    assert 0 < p.store.one("SELECT COUNT(*) FROM examples") < expected.added
    resumed = import_file(p, data, split="split")
    assert resumed.resumed
    assert _report(resumed) == _report(expected) and _outcome(p) == _outcome(reference)


def test_decontamination_signs_each_input_once(tmp_path, monkeypatch):
    """A second import signs (MinHash) only its own inputs; a new test input still catches an older train input."""
    from distill.data import decontam

    p = make_project(tmp_path)
    rows = _bulk_rows(300)
    import_file(p, _write_split_csv(tmp_path / "a.csv", [r for r in rows if r[1] == "train"]), split="split")
    signed: list[int] = []
    real = decontam.sign
    monkeypatch.setattr(decontam, "sign", lambda items, b: signed.append(len(items)) or real(items, b))
    tests = [r for r in rows if r[1] == "test"]
    rep = import_file(p, _write_split_csv(tmp_path / "b.csv", tests), split="split")
    assert rep.contaminated_removed == p.store.one("SELECT COUNT(*) FROM contamination") > 5
    # the new tests, then only the few old train inputs they matched (their texts, to confirm the pairs)
    assert signed[0] == rep.added and sum(signed[1:]) <= 2 * rep.contaminated_removed
    assert p.store.one("SELECT COUNT(*) FROM decontam_sigs") == p.store.one("SELECT COUNT(*) FROM examples")
