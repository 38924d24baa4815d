"""The store refuses damaged files and never half-writes a transaction."""

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


def test_transaction_rolls_back_on_error(tmp_path):
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


def test_second_exclusive_holder_is_refused(tmp_path):
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
