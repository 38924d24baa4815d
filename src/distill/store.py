"""The project store: one SQLite file (WAL) holding everything a run produces.

Why SQLite: a single file a user can copy, no server, atomic commits. ``DISTILL_DB_URL=postgresql://...`` puts the
store in PostgreSQL instead, one schema per project (``distill.store_pg``: the same SQL, translated), so that
`serve` replicas and labellers on several machines share it (``Store.shared``). Every paid teacher call is
committed in its own transaction before the labeller counts it as done, so ``kill -9`` at any moment
loses at most the calls that were in flight (and those carry an idempotency key, see teachers/openai_compat.py).

Tables (JSON columns hold JSON text):
- ``examples``        one row per unique input; ``split`` is train | validation | test. Test rows never move.
- ``imports``         one row per import: counts of rows read, added, duplicates, rejected.
- ``contamination``   train/validation inputs that near-duplicate a test input (excluded from training).
- ``teacher_calls``   the cache *and* the ledger: one row per paid call (key = cache_key(...)).
- ``labels``          the current answer of each teacher for each example (points at its call).
- ``decontam_sigs`` / ``label_plans``   what makes import and plan incremental at volume: each input's
                      decontamination keys; the prompt fingerprint each label was made under.
- ``corrections``     human fixes that override the teacher, with provenance.
- ``filter_runs`` / ``filter_decisions``   each filter run and each example's keep/drop with a reason;
  ``filter_relabels`` the label a run trains on instead of the teacher's (``suspect_labels.action: relabel``).
- ``runs``            trained models, evaluations and other artefacts with their lineage (JSON).
- ``meta``            schema version and flags.
- ``failure_queue``   serve: routed / shadow-disagreement / feedback / degraded inputs for the next round.
- ``api_keys``        serve: salted hashes of the service's API keys.
- ``label_history``   relabel: superseded labels (old answer + old call key) for audit.
- ``teacher_claims``  serve: the worker paying for a teacher call now (one payer per text across workers).
- ``review_decisions`` / ``review_leases``   `distill review`: each human decision (reviewer, time, queue, what it
                      replaced) and who holds which item now.
- ``teacher_checks``  `distill teacher check`: one teacher's scores on a gold sample, its verdict (``distill label``
                      warns when the latest one failed).
- ``teacher_batches`` Batch API teachers: each batch submitted, its keys, state and provider ids (crash-safe resume).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from distill.errors import DistillError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS imports(
  id INTEGER PRIMARY KEY,
  source TEXT NOT NULL, sha256 TEXT NOT NULL, rows_read INTEGER NOT NULL, added INTEGER NOT NULL,
  dup_exact INTEGER NOT NULL, dup_normalised INTEGER NOT NULL, dup_existing INTEGER NOT NULL,
  rejected INTEGER NOT NULL, rejected_reasons TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS examples(
  id TEXT PRIMARY KEY,
  text TEXT NOT NULL,
  norm TEXT NOT NULL UNIQUE,
  gold TEXT,                -- JSON answer or NULL
  segment TEXT,
  meta TEXT NOT NULL DEFAULT '{}',
  split TEXT NOT NULL CHECK (split IN ('train','validation','test')),
  import_id INTEGER,
  created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS examples_split ON examples(split);
CREATE TABLE IF NOT EXISTS contamination(
  example_id TEXT PRIMARY KEY, test_id TEXT NOT NULL, method TEXT NOT NULL, score REAL NOT NULL);
-- decontamination (distill.data.decontam): each input's keys (strong-normalised text + MinHash LSH bands, uint32
-- little-endian; empty when it has no words), made once when the input is first checked; n orders them
CREATE TABLE IF NOT EXISTS decontam_sigs(
  n INTEGER PRIMARY KEY, example_id TEXT NOT NULL UNIQUE, sig BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS teacher_calls(
  key TEXT PRIMARY KEY,
  teacher TEXT NOT NULL, model TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
  request TEXT NOT NULL,    -- JSON: messages + parameters; never an API key
  response TEXT,            -- JSON: the raw answer as received
  status TEXT NOT NULL,     -- ok | parse_error
  error TEXT,
  tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0,
  cost REAL NOT NULL DEFAULT 0, latency_s REAL NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0,
  created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS teacher_calls_teacher ON teacher_calls(teacher);
CREATE TABLE IF NOT EXISTS labels(
  example_id TEXT NOT NULL, teacher TEXT NOT NULL,
  status TEXT NOT NULL,     -- ok | failed
  answer TEXT,              -- JSON
  probs TEXT,               -- JSON {label: p} for classify
  confidence REAL,          -- p(top answer) when known
  agreement REAL,           -- share of samples / ensemble members agreeing with the answer
  samples TEXT,             -- JSON list of sampled answers (n > 1)
  rationale TEXT,
  logprobs TEXT,            -- JSON: per-token top_logprobs as returned
  reason TEXT,              -- why it failed
  call_key TEXT,
  created_at REAL NOT NULL,
  PRIMARY KEY (example_id, teacher));
-- labelling (distill.labeling.plan): the prompt fingerprint a label's call key was made under, so an unchanged
-- project is planned without rendering its prompts again (trusted only while labels.call_key starts with key16)
CREATE TABLE IF NOT EXISTS label_plans(
  example_id TEXT NOT NULL, teacher TEXT NOT NULL, fingerprint TEXT NOT NULL, key16 TEXT NOT NULL,
  PRIMARY KEY (example_id, teacher));
CREATE TABLE IF NOT EXISTS corrections(
  example_id TEXT PRIMARY KEY, answer TEXT NOT NULL, source TEXT NOT NULL, note TEXT, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS filter_runs(
  id INTEGER PRIMARY KEY, teacher TEXT NOT NULL, config TEXT NOT NULL, kept INTEGER NOT NULL,
  dropped INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS filter_decisions(
  run_id INTEGER NOT NULL, example_id TEXT NOT NULL, kept INTEGER NOT NULL, reason TEXT, detail TEXT,
  PRIMARY KEY (run_id, example_id));
-- filters.suspect_labels action relabel: the answer a filter run's kept row trains on instead of the teacher's
CREATE TABLE IF NOT EXISTS filter_relabels(
  run_id INTEGER NOT NULL, example_id TEXT NOT NULL, answer TEXT NOT NULL,   -- answer: JSON
  PRIMARY KEY (run_id, example_id));
CREATE TABLE IF NOT EXISTS runs(
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, path TEXT, record TEXT NOT NULL DEFAULT '{}',
  created_at REAL NOT NULL);
-- serve: inputs the deployed system wants a teacher/human look at; the next round consumes them
CREATE TABLE IF NOT EXISTS failure_queue(
  id INTEGER PRIMARY KEY,
  created_at REAL NOT NULL,
  text TEXT NOT NULL,
  student_answer TEXT, student_conf REAL,   -- student_answer / teacher_answer: JSON
  teacher_answer TEXT,
  reason TEXT NOT NULL CHECK (reason IN ('routed','shadow_disagreement','feedback','degraded')),
  note TEXT,
  status TEXT NOT NULL DEFAULT 'new' CHECK (status IN ('new','consumed')),
  round INTEGER);
CREATE INDEX IF NOT EXISTS failure_queue_status ON failure_queue(status);
-- serve: API keys, salted sha256 only; the raw key is shown once at creation and never stored
CREATE TABLE IF NOT EXISTS api_keys(
  id TEXT PRIMARY KEY, name TEXT NOT NULL, salt TEXT NOT NULL, hash TEXT NOT NULL,
  created_at REAL NOT NULL, revoked_at REAL);
-- relabel: labels replaced because the teacher's identity or prompt changed (the old teacher_calls rows stay)
CREATE TABLE IF NOT EXISTS label_history(
  id INTEGER PRIMARY KEY, example_id TEXT NOT NULL, teacher TEXT NOT NULL, status TEXT NOT NULL,
  answer TEXT, call_key TEXT, labelled_at REAL, recorded_at REAL NOT NULL, superseded_at REAL,
  UNIQUE (example_id, teacher, call_key));
-- few-shot: the demonstrations chosen for each input, kept so its teacher prompt (and cache key) never drifts
CREATE TABLE IF NOT EXISTS fewshot_choices(
  example_id TEXT NOT NULL, settings TEXT NOT NULL, demo_ids TEXT NOT NULL, created_at REAL NOT NULL,
  PRIMARY KEY (example_id, settings));
-- teacher check: one row per teacher per `distill teacher check` (a gold sample of train/validation, never test),
-- fingerprint = the teacher's identity + the prompt, so `distill label` can tell whether the check is still current
CREATE TABLE IF NOT EXISTS teacher_checks(
  id INTEGER PRIMARY KEY, teacher TEXT NOT NULL, created_at REAL NOT NULL, sample_ids_hash TEXT NOT NULL,
  fingerprint TEXT NOT NULL, verdict TEXT NOT NULL, summary TEXT NOT NULL, result TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS teacher_checks_teacher ON teacher_checks(teacher);
-- serve: which worker process is paying for a teacher call right now (several `serve --workers` processes never
-- pay twice for one text); deleted when the call is recorded or fails, taken over when stale
CREATE TABLE IF NOT EXISTS teacher_claims(key TEXT PRIMARY KEY, owner TEXT NOT NULL, at REAL NOT NULL);
-- review (distill.review): every human decision with its provenance, and who holds which item right now
CREATE TABLE IF NOT EXISTS review_decisions(
  id INTEGER PRIMARY KEY, item TEXT NOT NULL, queue TEXT NOT NULL, reviewer TEXT NOT NULL,
  action TEXT NOT NULL CHECK (action IN ('accept','correct','oos','skip')),
  answer TEXT, teacher_answer TEXT, prior_correction TEXT, prior_source TEXT, note TEXT,
  created_at REAL NOT NULL, undone_at REAL);
CREATE INDEX IF NOT EXISTS review_decisions_item ON review_decisions(item);
CREATE TABLE IF NOT EXISTS review_leases(item TEXT PRIMARY KEY, reviewer TEXT NOT NULL, expires_at REAL NOT NULL);
-- review: the serving student's answer on each train/validation input (the teacher-student disagreement queue)
CREATE TABLE IF NOT EXISTS student_predictions(
  example_id TEXT NOT NULL, run_id TEXT NOT NULL, answer TEXT NOT NULL, confidence REAL,
  PRIMARY KEY (example_id, run_id));
-- Batch API teachers (distill.teachers.batch): one row per batch. Each step is committed before the next starts
-- (an *_sent_at is set before its request goes out), so a kill -9 resumes by finding or polling, never resubmitting
CREATE TABLE IF NOT EXISTS teacher_batches(
  id TEXT PRIMARY KEY,      -- our local id; also in the upload's filename and the batch's metadata
  teacher TEXT NOT NULL,
  keys TEXT NOT NULL,       -- JSON {cache key: attempt} of the requests in it (custom_id = cache key)
  requests INTEGER NOT NULL,
  path TEXT NOT NULL,       -- the JSONL, written before this row; deleted once the batch is collected
  estimate REAL NOT NULL,   -- worst-case USD at the batch rate, held against --budget until collected
  state TEXT NOT NULL CHECK (state IN ('prepared','uploaded','submitted','collected')),
  input_file_id TEXT, batch_id TEXT, output_file_id TEXT, error_file_id TEXT,
  status TEXT,              -- the provider's: validating | in_progress | finalizing | completed | expired | ...
  counts TEXT,              -- JSON request_counts as last polled
  failed TEXT,              -- JSON {cache key: reason} of requests it did not answer (set when collected)
  answered INTEGER NOT NULL DEFAULT 0, cost REAL NOT NULL DEFAULT 0,
  created_at REAL NOT NULL, upload_sent_at REAL, create_sent_at REAL, submitted_at REAL, collected_at REAL);
CREATE INDEX IF NOT EXISTS teacher_batches_teacher ON teacher_batches(teacher, state);
"""


class Store:
    """Thin wrapper over one sqlite3 connection. Not shared across threads; open one per process.

    ``readonly=True`` (``distill status``): the file is opened with SQLite's ``mode=ro``, no schema is created and
    nothing is written, so a read-only project folder, store or mount can still be inspected (see
    ``_readonly_uri`` for the one case SQLite needs ``immutable=1``). Tables an older store lacks are created
    empty in the connection's TEMP schema, in memory, never on disk. ``tx()`` refuses; SQLite refuses the rest.

    On PostgreSQL (``url``, default ``$DISTILL_DB_URL``) ``conn`` is a ``store_pg.PgConnection`` that takes the same
    SQL, rows read the same, and ``tx()`` serialises a project's writers like BEGIN IMMEDIATE; ``shared`` is True.
    SQLite's WAL, integrity check, crash markers and header check do not apply there."""

    readonly = False
    shared = False        # PostgreSQL: processes on other machines write this store too (no file lock helps)

    def __init__(self, path: Path, *, check: bool | None = None, readonly: bool = False, url: str | None = None):
        """``check``: run ``PRAGMA quick_check`` (reads every page: seconds on a big store) always (True), never
        (False), or — the default — only when a process that had the store open died without closing it
        (``_crashed_openers``): after a crash, not on every command. ``url``: a PostgreSQL URL (None: from
        ``DISTILL_DB_URL``; empty: SQLite at ``path`` whatever the environment says)."""
        self.path = Path(path)
        self.readonly = readonly
        self.url = db_url() if url is None else url
        self.where = str(self.path)     # what messages call this store
        if self.url:
            self._open_pg()
            return
        self._key = str(self.path.resolve())
        if readonly and not self.path.is_file():
            raise DistillError(f"{self.path}: no store to read (the project has never been written to)",
                               hint="run a command that writes, e.g. `distill import`, in a writable folder")
        if self.path.exists() and self.path.stat().st_size > 0 and not _OPEN.get(self._key):
            # Read the header only while this process has no Store open on the file: closing *any* fd of a
            # file drops all of the process's POSIX locks on it, including SQLite's. Without its SHARED lock
            # another process's last close may checkpoint and delete the WAL under our open connection,
            # whose later reads then miss commits made by others (seen with a server + a second Store).
            with open(self.path, "rb") as f:
                head = f.read(16)
            if head != b"SQLite format 3\x00":
                raise DistillError(
                    f"{self.path}: not a SQLite database (the file is damaged or was overwritten)",
                    hint="restore it from a backup; distill will not overwrite it",
                )
        try:
            if readonly:
                self.conn = sqlite3.connect(_readonly_uri(self.path), uri=True, timeout=30.0, isolation_level=None)
                self.conn.row_factory = sqlite3.Row
            else:
                self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
                self.conn.row_factory = sqlite3.Row
                self.conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL is durable across process crashes (kill -9) in WAL mode; FULL adds power-loss safety.
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self.conn.execute("PRAGMA foreign_keys=ON")
            dead = [] if readonly or check is False else _crashed_openers(self.path)
            if check or dead:
                res = self.conn.execute("PRAGMA quick_check").fetchone()[0]
                if res != "ok":
                    raise DistillError(
                        f"{self.path}: integrity check failed: {res}",
                        hint="restore the store from a backup; nothing was written",
                    )
                for m in dead:
                    m.unlink(missing_ok=True)
            self.checked = bool(check or dead)
            if readonly:
                _temp_missing_tables(self.conn)
            else:
                self.conn.executescript(SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as e:
            raise DistillError(f"{self.path}: cannot open the store: {e}", hint=_db_hint(e)) from None
        _OPEN[self._key] = _OPEN.get(self._key, 0) + 1
        self._counted = True
        if not readonly and _OPEN[self._key] == 1:
            _mark_open(self.path)

    def _check_version(self) -> None:
        cur = self.get_meta("schema_version")
        if cur is None:
            if not self.readonly:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(cur) > SCHEMA_VERSION:
            raise DistillError(f"{self.where}: made by a newer distill (schema {cur})", hint="upgrade distill")

    def _open_pg(self) -> None:
        """The project's schema in PostgreSQL (``store_pg.parse_url``: the URL's search_path, else one named after
        the project folder), its tables created on first use by whichever process comes first."""
        from distill import store_pg

        self.target = store_pg.parse_url(self.url, self.path.resolve().parent.name)
        self.where, self.shared, self.checked = self.target.shown, True, False
        self._lock_key = store_pg.lock_key(self.target.schema, "write")
        self.conn = store_pg.PgConnection(self.target, _dialect(), readonly=self.readonly)
        try:
            have = {r[0] for r in self.q("SELECT table_name FROM information_schema.tables WHERE table_schema=?",
                                         (self.target.schema,))}
            if self.readonly and "meta" not in have:
                raise DistillError(f"{self.where}: no store to read (the project has never been written to)",
                                   hint="run a command that writes, e.g. `distill import`")
            # the schema script runs only when a table or an index of SCHEMA is missing (a new store, a newer
            # distill): on every open it would take the write lock and, for each index, a lock on its table
            have |= {r[0] for r in self.q("SELECT indexname FROM pg_indexes WHERE schemaname=?", (self.target.schema,))}
            if not self.readonly and not set(_dialect().tables) | _dialect().indexes <= have:
                with self.tx() as c:     # under the write lock: two first openers do not race to create
                    c.native(f'CREATE SCHEMA IF NOT EXISTS "{self.target.schema}"')
                    for stmt in store_pg.translate_ddl(SCHEMA):
                        c.native(stmt)
            self._check_version()
        except BaseException:
            self.conn.close()
            raise

    def stage_lock(self, shared: bool):
        """PostgreSQL: the lock ``Project.exclusive`` takes instead of its file lock (``store_pg.StageLock``)."""
        from distill import store_pg

        return store_pg.StageLock(self.target, shared)

    def close(self) -> None:
        if self.shared:
            self.conn.close()
            return
        if getattr(self, "_counted", False):
            self._counted = False
            _OPEN[self._key] -= 1
            if not self.readonly and _OPEN[self._key] == 0:
                self.conn.close()
                _marker(self.path, os.getpid()).unlink(missing_ok=True)
                return
        self.conn.close()

    # -- transactions -------------------------------------------------------------------------------
    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic write. BEGIN IMMEDIATE takes the write lock up front so two processes never
        interleave half-written work; on any error the whole transaction rolls back."""
        if self.readonly:
            raise DistillError(f"{self.where}: opened read-only, so nothing can be written",
                               hint="this command only reads the store; a writing command opens it normally")
        if self.shared:
            with self.conn.transaction(self._lock_key) as c:
                yield c
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise DistillError(f"{self.path}: cannot write: {e}", hint=_db_hint(e)) from None
        try:
            yield self.conn
        except sqlite3.OperationalError as e:
            # read-only file, disk full, lock timeout: the transaction is undone as a whole
            self._rollback()
            raise DistillError(f"{self.path}: write failed: {e}", hint=_db_hint(e)) from None
        except BaseException:
            self._rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._rollback()   # SQLite may already have rolled back (e.g. SQLITE_FULL at COMMIT)
                raise DistillError(f"{self.path}: commit failed: {e}", hint=_db_hint(e)) from None

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def q(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple | dict = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # -- meta ---------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        return self.one("SELECT value FROM meta WHERE key=?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    # -- teacher calls (cache + ledger) --------------------------------------------------------------
    def get_call(self, key: str) -> sqlite3.Row | None:
        rows = self.q("SELECT * FROM teacher_calls WHERE key=?", (key,))
        return rows[0] if rows else None

    def spend(self, teacher: str | None = None) -> float:
        if teacher:
            return float(self.one("SELECT COALESCE(SUM(cost),0) FROM teacher_calls WHERE teacher=?", (teacher,)))
        return float(self.one("SELECT COALESCE(SUM(cost),0) FROM teacher_calls"))

    # -- runs ----------------------------------------------------------------------------------------
    def put_run(self, run_id: str, kind: str, status: str, path: str | None, record: dict) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO runs(id, kind, status, path, record, created_at) VALUES(?,?,?,?,?,?)",
                (run_id, kind, status, path, json.dumps(record), time.time()),
            )

    def latest_run(self, kind: str, status: str | None = "done") -> sqlite3.Row | None:
        sql = "SELECT * FROM runs WHERE kind=?" + (" AND status=?" if status else "") + " ORDER BY created_at DESC LIMIT 1"
        rows = self.q(sql, (kind, status) if status else (kind,))
        return rows[0] if rows else None


# resolved path -> Stores of this process open on it (see the header check in Store.__init__)
_OPEN: dict[str, int] = {}


def db_url() -> str | None:
    """``DISTILL_DB_URL`` (a PostgreSQL URL) when set and not empty: the store lives there, not in distill.db."""
    return os.environ.get("DISTILL_DB_URL", "").strip() or None


@lru_cache(maxsize=1)
def _dialect():
    """SCHEMA's tables and the statement translator for PostgreSQL (built once per process)."""
    from distill import store_pg

    return store_pg.Dialect(SCHEMA)


def _readonly_uri(path: Path) -> str:
    """``file:...?mode=ro``, plus ``immutable=1`` when the folder is not writable and holds no WAL index (-shm):
    reading a WAL database needs one, and SQLite cannot create it there. A store closed cleanly has neither
    -wal nor -shm, so nothing is missed. The costs of immutable, in the rare cases it applies: a -wal copied
    without its -shm is not read (its last commits are not shown), and SQLite takes no lock, so a writer reaching
    the same file through another, writable path could be read mid-write (status then shows an error; re-run)."""
    from urllib.parse import quote

    p = path.resolve()
    shm = p.with_name(p.name + "-shm")
    immutable = not _writable(p.parent) and not shm.exists()
    return f"file:{quote(str(p))}?mode=ro" + ("&immutable=1" if immutable else "")


def _writable(folder: Path) -> bool:
    """Could this process create a file in ``folder``? Without trying: ``os.access`` for permissions, and the
    mount's read-only flag, which ``os.access`` misses for root."""
    import os

    try:
        return os.access(folder, os.W_OK) and not os.statvfs(folder).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _temp_missing_tables(conn: sqlite3.Connection) -> None:
    """Tables of SCHEMA an older store lacks, created empty in TEMP (memory), so readers can query them."""
    import re

    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    stmt = ""
    for part in SCHEMA.split(";"):            # a ';' inside a comment does not end a statement
        stmt += part + ";"
        if not sqlite3.complete_statement(stmt):
            continue
        m = re.search(r"CREATE TABLE IF NOT EXISTS (\w+)", stmt)
        if m and m.group(1) not in have:
            conn.execute(stmt.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE IF NOT EXISTS", 1))
        stmt = ""


def _db_hint(e: Exception) -> str:
    s = str(e).lower()
    if "readonly" in s or "read-only" in s:
        return "the project folder is read-only; make it writable (nothing was changed)"
    if "full" in s or "disk" in s:
        return "the disk is full; free space and re-run (the last committed work is kept)"
    if "locked" in s or "busy" in s:
        return "another distill process is writing to this project; wait for it or stop it"
    return "check the file and its folder's permissions"


def loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


# ------------------------------------------------------------------------------------------------
# crash detection: an integrity check after a crash, not on every open

def _marker(path: Path, pid: int) -> Path:
    return path.parent / ".distill-open" / f"{path.name}.{pid}"


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux: /proc/<pid>/stat field 22), so a reused pid is not taken for the dead one;
    None where /proc is missing (then liveness is os.kill(pid, 0) alone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _mark_open(path: Path) -> None:
    """A writing process leaves ``.distill-open/<store>.<pid>`` (its start time inside) while it has the store open;
    ``close`` removes it. A marker whose process is gone means that process died with the store open."""
    m = _marker(path, os.getpid())
    try:
        m.parent.mkdir(exist_ok=True)
        m.write_text(_start_time(os.getpid()) or "")
    except OSError:
        pass      # a read-only folder: no crash detection, the store itself still refuses writes


def _crashed_openers(path: Path) -> list[Path]:
    """Markers (``_mark_open``) of processes that are no longer running."""
    d = path.parent / ".distill-open"
    if not d.is_dir():
        return []
    dead = []
    for m in d.glob(f"{path.name}.*"):
        try:
            pid = int(m.name.rpartition(".")[2])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if alive:
            try:
                alive = (m.read_text() or None) in (None, _start_time(pid))
            except OSError:
                alive = False
        if not alive:
            dead.append(m)
    return dead
