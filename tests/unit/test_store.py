"""The store refuses damaged files and never half-writes a transaction. Tests taking ``backend`` run on SQLite and
on PostgreSQL (tests/conftest.py starts a throwaway server): the same SQL must read and write the same there."""

import pytest

from distill.errors import DistillError
from distill.project import Project
from distill.store import Store


def test_not_a_database_is_refused_and_left_alone(tmp_path):
    f = tmp_path / "distill.db"
    f.write_bytes(b"this is not sqlite at all" * 10)
    with pytest.raises(DistillError, match="not a SQLite database"):
        Store(f)
    assert f.read_bytes().startswith(b"this is not sqlite")


def test_corrupted_pages_fail_the_integrity_check(tmp_path):
    f = tmp_path / "distill.db"
    s = Store(f)
    with s.tx() as c:
        c.executemany("INSERT INTO meta(key, value) VALUES(?, ?)", [(f"k{i}", "v" * 500) for i in range(400)])
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    data = bytearray(f.read_bytes())
    for i in range(4096 * 3, 4096 * 6):  # trash a few pages past the header
        data[i] = 0xAB
    f.write_bytes(bytes(data))
    with pytest.raises(DistillError):
        Store(f, check=True)                           # on demand


def test_integrity_is_checked_after_a_crash_not_on_every_open(tmp_path):
    """A process killed with the store open leaves its marker: the next open runs PRAGMA quick_check (once) and
    clears it; ordinary opens skip the check (it reads every page of the store)."""
    import os
    import signal
    import subprocess
    import sys

    f = tmp_path / "distill.db"
    s = Store(f)
    assert not s.checked
    s.close()
    assert not list((tmp_path / ".distill-open").iterdir())     # a clean close leaves no marker
    code = f"from distill.store import Store; s = Store({str(f)!r}); print('open', flush=True); import time; time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "open"
    s = Store(f)
    assert not s.checked                                       # the other process is alive: no crash
    s.close()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    s = Store(f)
    assert s.checked and [m.name for m in (tmp_path / ".distill-open").iterdir()] == [f"distill.db.{os.getpid()}"]
    s.close()
    s = Store(f)
    assert not s.checked                                       # checked once, then not again
    s.close()


def test_transaction_rolls_back_on_error(tmp_path, backend):
    s = Store(tmp_path / "d.db")
    with pytest.raises(RuntimeError):
        with s.tx() as c:
            c.execute("INSERT INTO meta(key, value) VALUES('a', '1')")
            raise RuntimeError("boom")
    assert s.get_meta("a") is None


def test_read_only_store_gives_a_clear_error(tmp_path):
    import os

    if os.geteuid() == 0:
        # root ignores file permissions; use SQLite's own read-only mode to get the same failure
        s = Store(tmp_path / "d.db")
        s.close()
        import sqlite3

        ro = Store.__new__(Store)
        ro.path = tmp_path / "d.db"
        ro.conn = sqlite3.connect(f"file:{ro.path}?mode=ro", uri=True, isolation_level=None)
        with pytest.raises(DistillError, match="read-only|readonly|cannot write|commit failed"):
            with ro.tx() as c:
                c.execute("INSERT INTO meta(key, value) VALUES('a', '1')")
    else:
        s = Store(tmp_path / "d.db")
        s.close()
        os.chmod(tmp_path / "d.db", 0o444)
        with pytest.raises(DistillError):
            st = Store(tmp_path / "d.db")
            with st.tx() as c:
                c.execute("INSERT INTO meta(key, value) VALUES('a', '1')")


def test_second_exclusive_holder_is_refused(tmp_path, backend):
    p = Project.init(tmp_path / "p", "classify")
    with p.exclusive("label"):
        q = Project.open(tmp_path / "p")
        with pytest.raises(DistillError, match="another distill process"):
            with q.exclusive("label"):
                pass


def test_open_without_spec_says_how_to_start(tmp_path):
    with pytest.raises(DistillError, match="distill init"):
        Project.open(tmp_path)


def test_readonly_store_reads_and_refuses_every_write(tmp_path):
    import sqlite3

    f = tmp_path / "distill.db"
    s = Store(f)
    s.set_meta("k", "v")
    s.close()
    before = f.read_bytes()
    ro = Store(f, readonly=True)
    try:
        assert ro.get_meta("k") == "v" and ro.one("SELECT COUNT(*) FROM failure_queue") == 0
        with pytest.raises(DistillError, match="read-only"):
            ro.put_run("r", "train", "done", None, {})
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.set_meta("k", "w")
    finally:
        ro.close()
    assert f.read_bytes() == before
    with pytest.raises(DistillError, match="no store"):
        Store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


# -- both backends: what the code relies on, read back the same from SQLite and PostgreSQL --------------------------


def test_rows_read_by_name_and_index_with_sqlite_types(tmp_path, backend):
    s = Store(tmp_path / "distill.db")
    try:
        with s.tx() as c:
            cur = c.execute("INSERT INTO failure_queue(created_at, text, reason) VALUES(?,?,?)", (1.5, "a", "routed"))
            first = cur.lastrowid
            assert cur.fetchone() is None                      # an INSERT has no rows, as in sqlite3
            second = c.execute("INSERT INTO failure_queue(created_at, text, reason) VALUES(?,?,?)",
                               (2.0, "b%?'", "feedback")).lastrowid
            c.executemany("INSERT INTO filter_decisions(run_id, example_id, kept, reason) VALUES(?,?,?,?)",
                          [(1, "e1", True, None), (1, "e2", False, "x"), (1, "e3", True, "y")])
        assert isinstance(first, int) and second == first + 1
        r = s.q("SELECT id, text, created_at FROM failure_queue ORDER BY id")[0]
        assert r[0] == r["id"] == r["ID"] == first and r["text"] == "a" and r[2] == 1.5
        assert r.keys() == ["id", "text", "created_at"] and dict(r) == {"id": first, "text": "a", "created_at": 1.5}
        assert s.one("SELECT text FROM failure_queue WHERE text LIKE '%?''' AND id=?", (second,)) == "b%?'"
        assert s.one("SELECT COUNT(*) FROM failure_queue WHERE reason LIKE 'FEED%'") == 1     # ASCII case ignored
        assert [x["kept"] for x in s.q("SELECT kept FROM filter_decisions ORDER BY example_id")] == [1, 0, 1]
        agg = s.q("""SELECT SUM(kept = 1) AS k, SUM(reason IS NULL) AS nulls, COUNT(*) AS n, AVG(kept) AS mean,
                            COALESCE(SUM(run_id), 0) AS runs FROM filter_decisions""")[0]
        assert tuple(agg) == (2, 1, 3, pytest.approx(2 / 3), 3) and isinstance(agg["mean"], float)
        assert s.one("SELECT value FROM meta WHERE key=?", ("nothing",)) is None
        for row in s.conn.execute("SELECT example_id FROM filter_decisions WHERE kept=?", (False,)):
            assert row["example_id"] == "e2"
    finally:
        s.close()


def test_upserts_and_null_comparisons_behave_as_on_sqlite(tmp_path, backend):
    s = Store(tmp_path / "distill.db")
    try:
        s.put_run("r1", "train", "done", "models/r1", {"a": 1})
        assert s.latest_run("train")["record"] == '{"a": 1}'
        with s.tx() as c:
            # OR REPLACE replaces the whole row: a column it does not list goes back to its default
            c.execute("INSERT OR REPLACE INTO runs(id, kind, status, created_at) VALUES(?,?,?,?)",
                      ("r1", "train", "failed", 2.0))
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('k', 'first')")
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('k', 'second')")
            c.execute("INSERT INTO corrections(example_id, answer, source, created_at) VALUES('e', '1', 'human', 1)")
            cur = c.execute("""INSERT INTO corrections(example_id, answer, source, created_at) VALUES('e', '2', 'fb', 2)
                               ON CONFLICT(example_id) DO UPDATE SET answer=excluded.answer
                               WHERE corrections.source LIKE 'fb%'""")
            assert cur.rowcount == 0                           # the WHERE kept the human correction
            c.executemany("INSERT OR IGNORE INTO label_history(example_id, teacher, status, call_key, recorded_at) "
                          "VALUES(?,?,?,?,?)", [("e", "t", "ok", None, 1.0), ("f", "t", "ok", "k1", 1.0)])
            c.execute("UPDATE label_history SET superseded_at=? WHERE example_id=? AND call_key IS ?", (5.0, "e", None))
        r = s.q("SELECT * FROM runs WHERE id='r1'")[0]
        assert (r["status"], r["path"], r["record"]) == ("failed", None, "{}")
        assert s.get_meta("k") == "first" and s.one("SELECT answer FROM corrections") == "1"
        assert s.one("SELECT superseded_at FROM label_history WHERE example_id='e'") == 5.0
        s.set_meta("j", '{"source": "serve", "n": {"m": 3}}')
        assert s.one("SELECT json_extract(value, '$.source') FROM meta WHERE key='j'") == "serve"
        assert str(s.one("SELECT json_extract(value, '$.n.m') FROM meta WHERE key='j'")) == "3"
    finally:
        s.close()


_INCREMENTS = """
import sys
from distill.store import Store
s = Store(sys.argv[1])
for _ in range(int(sys.argv[2])):
    with s.tx() as c:        # read, then write: safe only if writers take turns
        n = int(c.execute("SELECT value FROM meta WHERE key='n'").fetchone()[0])
        c.execute("UPDATE meta SET value=? WHERE key='n'", (str(n + 1),))
s.close()
"""


def test_writers_in_several_processes_take_turns(tmp_path, backend):
    """Read-modify-write transactions from 3 processes at once lose no update: tx() serialises a project's writers
    (BEGIN IMMEDIATE on SQLite, the project's advisory lock on PostgreSQL)."""
    import subprocess
    import sys

    s = Store(tmp_path / "distill.db")
    s.set_meta("n", "0")
    procs = [subprocess.Popen([sys.executable, "-c", _INCREMENTS, str(tmp_path / "distill.db"), "40"])
             for _ in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    assert s.get_meta("n") == "120"
    s.close()


def test_labellers_share_the_project_lock_other_stages_wait(tmp_path, backend):
    """PostgreSQL: labellers (shared holders) run together, an exclusive stage is refused while one runs. SQLite:
    every holder is exclusive (one labeller per project)."""
    p = Project.init(tmp_path / "p", "classify")
    q = Project.open(tmp_path / "p")
    try:
        with p.exclusive("label", shared=True):
            if backend == "postgres":
                with q.exclusive("label", shared=True):
                    pass
            else:
                with pytest.raises(DistillError, match="another distill process"):
                    with q.exclusive("label", shared=True):
                        pass
            with pytest.raises(DistillError, match="another distill process"):
                with q.exclusive("train"):
                    pass
        with q.exclusive("train"):          # released when the holder leaves
            pass
    finally:
        p.close()
        q.close()


# -- PostgreSQL only -------------------------------------------------------------------------------------------------


def test_pg_schema_is_named_after_the_project_folder(tmp_path, pg_server_url):
    """Without a search_path in the URL, copies of a project in folders of the same name (on two machines) share one
    schema, distill_<folder>; another folder name is another project."""
    import psycopg

    a = Store(tmp_path / "m1" / "Sentiment-v2" / "distill.db", url=pg_server_url)
    b = Store(tmp_path / "m2" / "Sentiment-v2" / "distill.db", url=pg_server_url)
    c = Store(tmp_path / "m1" / "other" / "distill.db", url=pg_server_url)
    try:
        assert a.where.endswith("(schema distill_sentiment_v2)") and a.shared and not (tmp_path / "m1").exists()
        a.set_meta("from", "m1")
        assert b.get_meta("from") == "m1" and c.get_meta("from") is None
    finally:
        for s in (a, b, c):
            s.close()
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA distill_sentiment_v2 CASCADE")
            conn.execute("DROP SCHEMA distill_other CASCADE")


def test_pg_connection_lost_fails_one_statement_then_reconnects(tmp_path, pg_url):
    import psycopg

    s = Store(tmp_path / "distill.db", url=pg_url)
    try:
        s.set_meta("k", "v")
        pid = s.one("SELECT pg_backend_pid()")
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DistillError, match="terminat|closed|lost|server"):
            s.get_meta("k")
        assert s.get_meta("k") == "v" and s.one("SELECT pg_backend_pid()") != pid
    finally:
        s.close()


def test_pg_readonly_session_reads_and_refuses_writes(tmp_path, pg_url):
    with pytest.raises(DistillError, match="no store to read"):
        Store(tmp_path / "distill.db", url=pg_url, readonly=True)
    w = Store(tmp_path / "distill.db", url=pg_url)
    w.set_meta("k", "v")
    ro = Store(tmp_path / "distill.db", url=pg_url, readonly=True)
    try:
        assert ro.get_meta("k") == "v"
        with pytest.raises(DistillError, match="read-only"):
            ro.put_run("r", "train", "done", None, {})
        with pytest.raises(Exception, match="read-only"):
            ro.set_meta("k", "w")
    finally:
        ro.close()
        w.close()


def test_a_stage_started_right_after_another_gets_the_lock(tmp_path, backend):
    """iterate releases its lock and starts labelling at once: the release is done when exclusive() returns (on
    PostgreSQL the server would end a closed session only a moment later)."""
    p = Project.init(tmp_path / "p", "classify")
    try:
        for _ in range(30):
            with p.exclusive("iterate"):
                pass
            with p.exclusive("label", shared=True):
                pass
    finally:
        p.close()


def test_pg_a_missing_index_is_made_at_the_next_open_and_nested_transactions_refused(tmp_path, pg_url):
    """A newer distill may add an index to SCHEMA: the next open makes it. A transaction inside another is refused
    (PostgreSQL itself would only warn, and the inner COMMIT would end the outer one)."""
    s = Store(tmp_path / "distill.db", url=pg_url)
    s.conn.native("DROP INDEX examples_split")
    s.close()
    s = Store(tmp_path / "distill.db", url=pg_url)
    try:
        assert s.one("SELECT COUNT(*) FROM pg_indexes WHERE indexname='examples_split'") == 1
        with s.tx():
            with pytest.raises(DistillError, match="already open"):
                with s.tx():
                    pass
    finally:
        s.close()


def test_pg_text_sorts_byte_by_byte_as_in_sqlite_whatever_the_database_locale(tmp_path, pg_server_url):
    """In a database whose default collation is en-US (ICU), ORDER BY on the store's text columns is still SQLite's
    (and Python's) byte order, so plans and keyset pages come out in the same order on both stores."""
    import uuid

    import psycopg

    db = "distill_icu_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg_server_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {db} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
    url = pg_server_url.rsplit("/", 1)[0] + "/" + db
    ids = ["b", "B", "a", "_x", "a-2", "a1", "Z", "é"]
    s = Store(tmp_path / "p" / "distill.db", url=url)
    try:
        with s.tx() as c:
            c.executemany("INSERT INTO meta(key, value) VALUES(?, '')", [(i,) for i in ids])
        assert [r[0] for r in s.q("SELECT key FROM meta WHERE key != 'schema_version' ORDER BY key")] == sorted(ids)
        assert s.one("SELECT COUNT(*) FROM meta WHERE key > 'a' AND key < 'b'") == 2     # a-2, a1: bytewise
    finally:
        s.close()
        with psycopg.connect(pg_server_url, autocommit=True) as c:
            c.execute(f"DROP DATABASE {db}")
