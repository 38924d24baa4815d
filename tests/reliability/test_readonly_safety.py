"""`distill status` on a read-only project: it only reads, so it must work (it used to fail with "cannot open the
store: unable to open database file", because opening the store switched on WAL and created the schema).

What each test proves, honestly:
- ``test_status_works_on_a_read_only_mount`` makes the project really read-only: a read-only bind mount when
  this process may mount (root in a container; chmod does not stop root), else chmod for a non-root user;
  skipped when neither is possible. It runs the real CLI, and the store is byte-identical afterwards.
- ``test_status_sees_commits_still_in_the_wal_of_a_read_only_mount``: the same, while another process holds the
  store open with a commit not yet checkpointed (its -wal and -shm are on the read-only mount): status reports it.
- ``test_readonly_store_never_writes`` runs everywhere, root or not, mount or not, but only *simulates*: it opens
  the store the way status does, in a writable folder, and checks that the SQLite connection itself refuses
  writes (mode=ro), that status ran over it, and that the store file is byte-identical. It does not prove that
  a read-only file system works; the mount test does.
"""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distill
from distill.errors import DistillError
from distill.project import Project

SRC = Path(distill.__file__).resolve().parents[1]


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "300"}, timeout=timeout)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(root: Path) -> Path:
    from tiny_models import tiny_classify_project

    p = tiny_classify_project(root, n=20)
    with p.store.tx() as c:
        c.execute("INSERT INTO teacher_calls(key,teacher,model,request,status,cost,created_at) "
                  "VALUES('k1','rec','m','{}','ok',0.5,0)")
    p.close()
    return root


def can_mount(tmp_path: Path) -> bool:
    d = tmp_path / "probe"
    d.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(d)], check=True)
    return ok


class ReadOnly:
    """``src`` seen read-only at ``self.view``: a read-only bind mount (root), else chmod (non-root)."""

    def __init__(self, tmp_path: Path, src: Path):
        self.src = src
        if os.geteuid() != 0:
            self.view = src
            for f in [src, *src.rglob("*")]:
                f.chmod(0o555 if f.is_dir() else 0o444)
        elif can_mount(tmp_path):
            self.view = tmp_path / "ro"
            self.view.mkdir()
            subprocess.run(["mount", "--bind", str(src), str(self.view)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(self.view)], check=True)
        else:
            pytest.skip("running as root without mount rights: no way to make the project read-only")

    def close(self):
        if self.view != self.src:
            subprocess.run(["umount", str(self.view)])
        else:
            for f in [self.src, *self.src.rglob("*")]:
                f.chmod(0o755 if f.is_dir() else 0o644)


def test_status_works_on_a_read_only_mount(tmp_path):
    src = tmp_path / "src"
    make(src / "p")
    before = sha(src / "p" / "distill.db")
    ro = ReadOnly(tmp_path, src)
    try:
        r = run_cli("status", ro.view / "p", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        st = json.loads(r.stdout)
        assert st["examples"]["total"] == 20 and st["spend"] == 0.5 and st["labels"]["rec"]["train"]["ok"] == 16
        r = run_cli("status", ro.view / "p", "--contamination")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    finally:
        ro.close()
    assert sha(src / "p" / "distill.db") == before


def test_status_sees_commits_still_in_the_wal_of_a_read_only_mount(tmp_path):
    src = tmp_path / "src"
    make(src / "p")
    holder = subprocess.Popen([sys.executable, "-c", """
import sys, time
from distill.store import Store
s = Store(sys.argv[1])
s.conn.execute("PRAGMA wal_autocheckpoint=0")
with s.tx() as c:
    c.execute("INSERT INTO teacher_calls(key,teacher,model,request,status,cost,created_at) VALUES('k2','rec','m','{}','ok',1.25,0)")
print("ready", flush=True)
time.sleep(120)
""", str(src / "p" / "distill.db")], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert (src / "p" / "distill.db-wal").stat().st_size > 0        # the commit is only in the WAL
        ro = ReadOnly(tmp_path, src)
        try:
            r = run_cli("status", ro.view / "p", "--json")
            assert r.returncode == 0, r.stderr[-3000:]
            assert json.loads(r.stdout)["spend"] == 1.75
        finally:
            ro.close()
    finally:
        holder.kill()
        holder.wait()


def test_readonly_store_never_writes(tmp_path):
    from distill.status import open_readonly, status

    root = make(tmp_path / "p")
    db = root / "distill.db"
    before, mtime = sha(db), db.stat().st_mtime_ns
    time.sleep(0.01)
    p = open_readonly(root)
    try:
        assert p.store.readonly
        st = status(p)
        assert st["examples"]["total"] == 20 and st["spend"] == 0.5
        with pytest.raises(sqlite3.OperationalError, match="readonly"):   # SQLite itself refuses, not just distill
            p.store.conn.execute("INSERT INTO meta(key, value) VALUES('x', 'y')")
        with pytest.raises(DistillError, match="read-only"):
            with p.store.tx():
                pass
    finally:
        p.close()
    assert sha(db) == before and db.stat().st_mtime_ns == mtime
    # a writing command afterwards opens the store normally and finds everything
    p = Project.open(root)
    try:
        assert p.store.one("SELECT COUNT(*) FROM teacher_calls") == 1
    finally:
        p.close()


def test_readonly_store_of_an_older_schema_reads_missing_tables_as_empty(tmp_path):
    """A store made before a table existed (here: label_history, failure_queue) is not upgraded by status:
    the missing tables read as empty from the connection's TEMP schema and the file is left alone."""
    from distill.status import open_readonly, status

    root = make(tmp_path / "p")
    db = root / "distill.db"
    with sqlite3.connect(db) as c:
        c.execute("DROP TABLE label_history")
        c.execute("DROP TABLE failure_queue")
    before = sha(db)
    p = open_readonly(root)
    try:
        assert status(p)["queue"] == {"total": 0}
    finally:
        p.close()
    assert sha(db) == before
    with sqlite3.connect(db) as c:
        assert "failure_queue" not in {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
