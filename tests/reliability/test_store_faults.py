"""The store under hostile conditions, through the CLI: a full disk, a read-only project, a damaged file,
two labellers at once. Each must end in a clear error (exit 2, the message names the file), keep every
committed row, write nothing half-way, and never make the teacher charge twice.

How "disk full" is produced, honestly:
- ``RLIMIT_FSIZE`` (works unprivileged, runs everywhere): the `distill` child may not write past N bytes in
  any file. SQLite then gets short writes / EFBIG, exactly the failure path of a full disk (SQLITE_FULL /
  SQLITE_IOERR). Python ignores SIGXFSZ, so the process sees the error instead of dying.
- a real 16 MB tmpfs filled up with a filler file (real ENOSPC), when this process may mount (root in a
  container); skipped otherwise.
Read-only: root ignores file modes, so a read-only *bind mount* of the project is used when mounting is
allowed, else ``chmod`` for non-root; skipped when neither gives a read-only project.
"""

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai_server import make_project, start_server

from distill.project import Project

REPO = Path(__file__).resolve().parents[2]


def distill(*args, env=None, fsize: int | None = None, timeout=180) -> subprocess.CompletedProcess:
    def limit():                       # runs in the child before exec
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), "FAKE_KEY": "k", "COLUMNS": "300", **(env or {})},
                          timeout=timeout, preexec_fn=limit)


def counts(root: Path) -> dict:
    p = Project.open(root)
    try:
        return {t: p.store.one(f"SELECT COUNT(*) FROM {t}") for t in ("examples", "imports", "teacher_calls", "labels")}
    finally:
        p.close()


def one_line(stderr: str) -> str:
    return " ".join(stderr.split())     # rich wraps long messages; compare on collapsed whitespace


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def can_mount(tmp_path: Path) -> bool:
    d = tmp_path / "probe"
    d.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(d)], check=True)
    return ok


@pytest.fixture
def server(tmp_path):
    h = start_server(tmp_path, delay_s=0.02)
    yield h
    h.stop()


def check_charged_once(project_root: Path, server, n: int) -> None:
    charged = Counter(x["key"] for x in server.log_lines() if x["charged"])
    assert all(c == 1 for c in charged.values())
    p = Project.open(project_root)
    try:
        assert p.store.one("SELECT COUNT(*) FROM labels WHERE status='ok'") == n
        assert {r["key"] for r in p.store.q("SELECT key FROM teacher_calls")} == set(charged)
    finally:
        p.close()


# -- disk full ---------------------------------------------------------------------------------------------


def test_disk_full_during_import_is_a_clear_error_and_writes_nothing(tmp_path):
    project = make_project(tmp_path / "p", 5, "http://127.0.0.1:9/v1")
    project.close()
    before = counts(project.root)
    big = tmp_path / "big.csv"
    big.write_text("text\n" + "".join(f"customer message {i} " + "x" * 300 + "\n" for i in range(3000)))
    limit = (project.root / "distill.db").stat().st_size + 64 * 1024
    r = distill("import", project.root, big, fsize=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    msg = one_line(r.stderr)
    assert "distill.db" in msg and "disk" in msg, msg
    assert "Traceback" not in r.stderr
    assert counts(project.root) == before            # the import was one transaction: all or nothing
    ok = distill("import", project.root, big)        # with space again it goes through in full
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert counts(project.root)["examples"] == before["examples"] + 3000


def test_disk_full_while_labelling_keeps_commits_and_never_pays_twice(tmp_path, server):
    n = 300
    project = make_project(tmp_path / "p", n, server.base_url, concurrency=4)
    project.close()
    limit = (project.root / "distill.db").stat().st_size + 48 * 1024
    r = distill("label", project.root, "--no-progress", fsize=limit)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    msg = one_line(r.stderr)
    assert "distill.db" in msg and ("disk" in msg or "full" in msg), msg
    mid = counts(project.root)
    assert 0 < mid["labels"] < n and mid["labels"] == mid["teacher_calls"]   # each commit = call + label
    ok = distill("label", project.root, "--no-progress")
    assert ok.returncode == 0, ok.stderr[-2000:]
    check_charged_once(project.root, server, n)       # the call whose commit failed was replayed, not re-charged


def test_real_full_filesystem_while_labelling(tmp_path, server):
    if not can_mount(tmp_path):
        pytest.skip("cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN); the RLIMIT_FSIZE tests cover the path")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        n = 200
        project = make_project(mnt / "p", n, server.base_url, concurrency=4)
        project.close()
        filler = mnt / "filler"
        with open(filler, "wb") as f:               # leave ~40 KB free: a few commits fit, then ENOSPC
            free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
            f.write(b"\0" * max(0, free - 40 * 1024))
        r = distill("label", project.root, "--no-progress")
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        msg = one_line(r.stderr)
        assert "distill.db" in msg and "Traceback" not in r.stderr, msg
        filler.unlink()
        ok = distill("label", project.root, "--no-progress")
        assert ok.returncode == 0, ok.stderr[-2000:]
        check_charged_once(project.root, server, n)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# -- read-only ---------------------------------------------------------------------------------------------


def test_read_only_project_is_refused_before_any_paid_call(tmp_path, server):
    src = tmp_path / "src"
    project = make_project(src / "p", 5, server.base_url)
    project.close()
    db_sha = sha(src / "p" / "distill.db")
    if os.geteuid() != 0:
        view = src
        for f in [src / "p", *(src / "p").iterdir()]:
            f.chmod(0o555 if f.is_dir() else 0o444)
    elif can_mount(tmp_path):
        view = tmp_path / "ro"
        view.mkdir()
        subprocess.run(["mount", "--bind", str(src), str(view)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
    else:
        pytest.skip("running as root without mount rights: no way to make the project read-only")
    try:
        r = distill("label", view / "p", "--no-progress")
        assert r.returncode == 2, r.stderr[-2000:]
        assert "distill.db" in one_line(r.stderr) and "Traceback" not in r.stderr
        assert server.log_lines() == []                    # refused before paying for anything
    finally:
        if view != src:
            subprocess.run(["umount", str(view)])
        else:
            for f in [src / "p", *(src / "p").iterdir()]:
                f.chmod(0o755 if f.is_dir() else 0o644)
    assert sha(src / "p" / "distill.db") == db_sha


# -- a damaged file ----------------------------------------------------------------------------------------


def test_corrupted_store_is_refused_and_left_byte_for_byte(tmp_path, server):
    project = make_project(tmp_path / "p", 400, server.base_url)   # enough rows for several table pages
    project.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    project.close()
    db = project.root / "distill.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 6 * 4096
    for i in range(3 * 4096 + 100, 5 * 4096, 7):       # flip bytes inside pages 4-5, past the 100-byte header
        data[i] ^= 0x5A
    db.write_bytes(bytes(data))
    damaged = sha(db)
    for verb in (["status"], ["label", "--no-progress"], ["import", str(tmp_path / "none.csv")]):
        r = distill(verb[0], project.root, *verb[1:])
        assert r.returncode == 2, (verb, r.returncode, r.stderr[-2000:])
        msg = one_line(r.stderr)
        assert str(db) in msg or "distill.db" in msg, msg
        assert "integrity" in msg or "malformed" in msg or "not a database" in msg, msg
        assert "Traceback" not in r.stderr
    assert sha(db) == damaged                          # untouched: the user can still try to salvage it
    assert server.log_lines() == []


# -- two labellers -----------------------------------------------------------------------------------------


def test_two_labellers_one_refuses_one_waits_nothing_paid_twice(tmp_path):
    n = 40
    server = start_server(tmp_path, delay_s=0.1)
    try:
        project = make_project(tmp_path / "p", n, server.base_url, concurrency=2)
        project.close()
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FAKE_KEY": "k"}
        cmd = [sys.executable, "-m", "distill.cli", "label", str(project.root), "--no-progress"]
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not server.log_lines() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "the first labeller finished before the second could start"
        waiter = subprocess.Popen(cmd + ["--wait"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        refused = distill("label", project.root, "--no-progress")
        assert refused.returncode == 2 and "another distill process" in one_line(refused.stderr)
        assert first.wait(120) == 0
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err[-2000:]
        assert "0 calls" in out and f"{n} already labelled" in out   # it queued behind, then had nothing to do
        check_charged_once(project.root, server, n)
        assert sum(x["charged"] for x in server.log_lines()) == n
    finally:
        server.stop()
        for proc in ("first", "waiter"):
            pr = locals().get(proc)
            if pr is not None and pr.poll() is None:
                pr.send_signal(signal.SIGKILL)
