"""The SQLite -> PostgreSQL translation of distill.store_pg, statement by statement (no server needed), and a scan
that every SQL statement in src/ translates. What the translations *do* on a real server is tested in test_store.py
and the other `backend` tests."""

import ast
import re
import sys
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.store import SCHEMA
from distill.store_pg import (Dialect, NotPortable, indexes_of, parse_url, schema_for, statements, tables_of,
                              translate_ddl)

SRC = Path(__file__).resolve().parents[2] / "src" / "distill"


@pytest.fixture(scope="module")
def d():
    return Dialect(SCHEMA)


def test_placeholders_and_percent_signs(d):
    t = d.translate("SELECT * FROM corrections WHERE source LIKE 'fb%' AND note = '?' AND example_id=?")
    assert t.sql == "SELECT * FROM corrections WHERE source ILIKE 'fb%%' AND note = '?' AND example_id=%s"
    assert not t.returns_id
    assert d.translate("SELECT a % 2, b == ? FROM t -- 50%?\n").sql == "SELECT a %% 2, b = %s FROM t -- 50%%?\n"


def test_null_safe_comparison_and_ifnull(d):
    assert d.translate("UPDATE t SET a=? WHERE k IS ? AND j IS NOT ? AND m IS NULL").sql == \
        "UPDATE t SET a=%s WHERE k IS NOT DISTINCT FROM %s AND j IS DISTINCT FROM %s AND m IS NULL"
    assert d.translate("SELECT 1 FROM r, f WHERE r.k IS NOT f.k AND r.j IS f.j AND r.m IS NOT NULL AND r.b IS TRUE").sql \
        == "SELECT 1 FROM r, f WHERE r.k IS DISTINCT FROM f.k AND r.j IS NOT DISTINCT FROM f.j AND r.m IS NOT NULL " \
           "AND r.b IS TRUE"
    assert d.translate("SELECT IFNULL(a, 0) FROM t").sql == "SELECT COALESCE(a, 0) FROM t"


def test_insert_or_replace_uses_the_primary_key_and_resets_unlisted_columns(d):
    t = d.translate("INSERT OR REPLACE INTO runs(id, kind, status, created_at) VALUES(?,?,?,?)")
    assert t.sql == ("INSERT INTO runs(id, kind, status, created_at) VALUES(%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE "
                     "SET kind = EXCLUDED.kind, status = EXCLUDED.status, path = DEFAULT, record = DEFAULT, "
                     "created_at = EXCLUDED.created_at")
    # a composite key; a table whose columns are all key columns has nothing to update
    assert "ON CONFLICT (example_id, settings) DO UPDATE SET demo_ids = EXCLUDED.demo_ids" in d.translate(
        "INSERT OR REPLACE INTO fewshot_choices(example_id, settings, demo_ids, created_at) VALUES(?,?,?,?)").sql
    tiny = Dialect("CREATE TABLE IF NOT EXISTS pairs(a TEXT, b TEXT, PRIMARY KEY (a, b));")
    assert tiny.translate("REPLACE INTO pairs(a, b) VALUES(?, ?);").sql == \
        "INSERT INTO pairs(a, b) VALUES(%s, %s) ON CONFLICT (a, b) DO NOTHING"


def test_insert_or_ignore_and_returning_the_integer_key(d):
    t = d.translate("INSERT OR IGNORE INTO label_history(example_id, teacher, status, recorded_at) VALUES(?,?,?,?)")
    assert t.sql.endswith("VALUES(%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING id") and t.returns_id
    t = d.translate("INSERT INTO failure_queue(created_at, text, reason) VALUES(?,?,?)")
    assert t.sql.endswith(" RETURNING id") and t.returns_id
    many = d.translate("INSERT INTO failure_queue(created_at, text, reason) VALUES(?,?,?)", True)
    assert not many.returns_id and "RETURNING" not in many.sql      # executemany has no lastrowid
    assert not d.translate("INSERT INTO meta(key, value) VALUES(?, ?)").returns_id   # a TEXT key: nothing to return


def test_boolean_sums_and_json_extract(d):
    assert d.translate("SELECT SUM(status = 'parse_error') AS n, SUM(cost), SUM(a IS NULL) FROM t").sql == \
        ("SELECT SUM(CASE WHEN status = 'parse_error' THEN 1 ELSE 0 END) AS n, SUM(cost), "
         "SUM(CASE WHEN a IS NULL THEN 1 ELSE 0 END) FROM t")
    already = "SELECT SUM(CASE WHEN a = 1 THEN 1 ELSE 0 END), SUM(CASE a WHEN 1 THEN 2 END) FROM t"
    assert d.translate(already).sql == already
    assert d.translate("SELECT COALESCE(json_extract(request, '$.source'), '') FROM teacher_calls").sql == \
        "SELECT COALESCE(((request)::jsonb #>> '{source}'), '') FROM teacher_calls"
    assert "#>> '{a,b}'" in d.translate("SELECT json_extract(t.x, '$.a.b') FROM t").sql


@pytest.mark.parametrize("sql", [
    "PRAGMA quick_check", "SELECT changes()", "SELECT last_insert_rowid()", "SELECT rowid FROM meta",
    "SELECT name FROM sqlite_master", "SELECT group_concat(key) FROM meta", "SELECT * FROM meta WHERE key GLOB 'a*'",
    "SELECT strftime('%s', 'now')", "SELECT * FROM meta WHERE key = :k", "SELECT json_extract(a, '$[0]') FROM t",
    "INSERT OR REPLACE INTO nowhere(a) VALUES(?)",
])
def test_sqlite_only_sql_is_refused_not_mistranslated(d, sql):
    with pytest.raises(NotPortable):
        d.translate(sql)


def test_or_replace_is_refused_where_another_unique_constraint_would_change_its_meaning():
    t = Dialect("CREATE TABLE IF NOT EXISTS u(id TEXT PRIMARY KEY, norm TEXT NOT NULL UNIQUE);")
    with pytest.raises(NotPortable, match="UNIQUE"):
        t.translate("INSERT OR REPLACE INTO u(id, norm) VALUES(?, ?)")


def test_schema_tables_keys_and_ddl():
    tables = tables_of(SCHEMA)
    assert all(t.pk for t in tables.values()), [n for n, t in tables.items() if not t.pk]   # every table has a key
    assert tables["labels"].pk == ["example_id", "teacher"] and not tables["labels"].integer_pk
    assert tables["failure_queue"].integer_pk and tables["failure_queue"].columns[:3] == ["id", "created_at", "text"]
    assert tables["examples"].unique == [["norm"]] and tables["label_history"].unique == [
        ["example_id", "teacher", "call_key"]]
    assert {"examples_split", "failure_queue_status", "teacher_calls_teacher"} <= indexes_of(SCHEMA)
    ddl = "\n".join(translate_ddl(SCHEMA))
    assert "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY" in ddl and " REAL" not in ddl
    assert "DOUBLE PRECISION" in ddl and "--" not in ddl
    assert 'text TEXT COLLATE "C" NOT NULL' in ddl and "split TEXT COLLATE \"C\" NOT NULL CHECK (split IN" in ddl
    assert statements("CREATE TABLE a(x TEXT); -- a comment; with a semicolon\nCREATE TABLE b(y TEXT DEFAULT ';')") == \
        ["CREATE TABLE a(x TEXT)", "CREATE TABLE b(y TEXT DEFAULT ';')"]


def _sql_literals():
    """Every string in src/ that starts like a statement; an f-string's {...} parts stand for one ? each."""
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "?" for v in node.values)
            else:
                continue
            if re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE)\s", text) and re.search(r"\b(FROM|INTO|SET)\b", text):
                yield f"{path.relative_to(SRC)}:{node.lineno}", text


def test_every_statement_in_src_translates(d):
    """A new SQLite-only statement anywhere in distill fails here, not on a user's PostgreSQL store."""
    bad, n = [], 0
    for where, sql in _sql_literals():
        n += 1
        if "INSERT ?INTO" in sql:        # ledger.record_call's f"INSERT {'OR IGNORE '}INTO": both forms
            sql = sql.replace("INSERT ?INTO", "INSERT OR IGNORE INTO")
        if where.startswith("store.py") and "sqlite_master" in sql:
            continue                     # the SQLite store's own read-only helper (_temp_missing_tables)
        try:
            d.translate(sql)
        except NotPortable as e:
            bad.append(f"{where}: {e}")
    assert n > 100 and not bad, "\n".join(bad)


def test_url_checks_and_schema_names(monkeypatch):
    with pytest.raises(DistillError, match="not a PostgreSQL URL"):
        parse_url("mysql://u@h/db", "p")
    assert parse_url("postgresql://u:secret@db:5433/distill", "My Project").shown == \
        "postgresql://db:5433/distill (schema distill_my_project)"
    assert parse_url("postgres://u@h/d?options=-csearch_path%3Dteam_a", "p").schema == "team_a"
    with pytest.raises(DistillError, match="lower-case"):
        parse_url("postgresql://u@h/d?options=-csearch_path%3DBad-Name", "p")
    long = schema_for("x" * 100)
    assert len(long) == 63 and long != schema_for("x" * 101)
    monkeypatch.setitem(sys.modules, "psycopg", None)            # the driver is not installed
    with pytest.raises(DistillError, match="psycopg") as e:
        parse_url("postgresql://u@h/d", "p")
    assert "pip install 'distill[postgres]'" in e.value.hint


def test_unreachable_server_says_where_and_what_to_check(tmp_path):
    from distill.store import Store

    with pytest.raises(DistillError, match=r"cannot connect to PostgreSQL at postgresql://127\.0\.0\.1:9/nodb") as e:
        Store(tmp_path / "distill.db", url="postgresql://nobody:pw@127.0.0.1:9/nodb")
    assert "DISTILL_DB_URL" in e.value.hint and "pw" not in str(e.value)
