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
