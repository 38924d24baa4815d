"""The store on PostgreSQL: a connection that speaks the store's SQLite SQL (``DISTILL_DB_URL=postgresql://...``).

Why a dialect layer and not a rewrite: ~40 modules write raw SQLite SQL through ``Store.q/one/tx``. Rewriting them
all (or moving them to an ORM) is a large, risky change for one backend that few users need; instead each
statement is translated once, on first use, and the result cached. The translation is small and exact for the
SQL this codebase writes; anything it cannot translate faithfully raises ``NotPortable`` at once (never a
silently different query), and then that module's SQL is rewritten portably. sqlglot was measured for the job
(sqlglot 30.30, all of distill's statements): it leaves ``INSERT OR REPLACE/IGNORE`` and ``SUM(a = b)`` as they
are (invalid on PostgreSQL), writes ``ON CONFLICT(x NULLS FIRST)`` (invalid), leaves ``%`` in ``LIKE 'a%'``
unescaped (psycopg then fails), and cannot know a table's primary key for an upsert; so a tokenizer and the
schema's own primary keys do it here.

What ``translate`` does to a statement (tokens, so nothing inside a quoted string is touched except ``%``):
- ``?`` -> ``%s``, and a literal ``%`` -> ``%%`` (psycopg's placeholders);
- ``x IS y`` / ``x IS NOT y`` (y a value, column or ``?``, not NULL/TRUE/FALSE) -> ``IS [NOT] DISTINCT FROM``;
  ``==`` -> ``=``; ``IFNULL`` -> ``COALESCE``; ``LIKE`` -> ``ILIKE`` (SQLite's LIKE ignores ASCII case);
- ``INSERT OR IGNORE`` -> ``INSERT ... ON CONFLICT DO NOTHING``;
- ``INSERT OR REPLACE`` / ``REPLACE INTO`` -> ``INSERT ... ON CONFLICT (primary key) DO UPDATE`` setting every
  listed column to the new value and every other column to its DEFAULT, which is what SQLite's delete + insert
  leaves. Refused on a table with another UNIQUE constraint (SQLite would also delete the row clashing there);
- an INSERT into a table whose key is ``INTEGER PRIMARY KEY`` gets ``RETURNING <key>``, which the cursor keeps as
  ``lastrowid`` (sqlite3's attribute);
- ``SUM(a = b)`` (a comparison, counted as 0/1 by SQLite) -> ``SUM(CASE WHEN a = b THEN 1 ELSE 0 END)``;
- ``json_extract(col, '$.a.b')`` -> ``(col::jsonb #>> '{a,b}')``.
Refused with ``NotPortable``: PRAGMA, ``changes()``, ``last_insert_rowid()``, rowid, GLOB, sqlite_master, SQLite's
date functions, ``group_concat``, ``typeof``, ``printf``, ``:name`` parameters.

The schema DDL is translated by ``translate_ddl``: ``INTEGER PRIMARY KEY`` -> an identity column, REAL -> DOUBLE
PRECISION, BLOB -> BYTEA, and TEXT -> ``TEXT COLLATE "C"``: text sorts and compares byte by byte as in SQLite (and
Python), whatever the database's locale, so ORDER BY id, keyset pages and plans come out in the same order on both
stores. The rest of SQLite's DDL we use (CHECK, UNIQUE, DEFAULT, IF NOT EXISTS) is PostgreSQL already.

Rows are ``Row``: a tuple readable by index and by (case-insensitive) column name with ``keys()``, like
``sqlite3.Row``. Values come back as SQLite would give them: a Python bool is written as 0/1 (the columns are
INTEGER) and ``numeric`` results (AVG of integers) are read as float.

Imports psycopg lazily: SQLite users never need it (``pip install 'distill[postgres]'``).
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from distill.errors import DistillError

INSTALL_HINT = "install the PostgreSQL driver: pip install 'distill[postgres]' (or: pip install 'psycopg[binary]==3.3.9')"


class NotPortable(ValueError):
    """A statement uses SQLite SQL this layer does not translate: write that statement portably."""


# ------------------------------------------------------------------------------------------------
# the URL and the project's schema


@dataclass
class Target:
    conninfo: str         # what psycopg.connect takes (the URL as given)
    schema: str           # the PostgreSQL schema holding this project's tables
    shown: str            # the URL without its password, plus the schema: for messages and `distill status`


def parse_url(url: str, project_folder: str) -> Target:
    """``postgresql://user[:password]@host[:port]/database[?options=-csearch_path%3DSCHEMA]``.

    The schema is the URL's ``search_path`` when it names one, else ``distill_<project folder name>`` (lower-case,
    other characters as ``_``): copies of one project on several machines share their state when their folders
    have the same name, and two projects in one database stay apart when theirs differ."""
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise DistillError(f"DISTILL_DB_URL {redact_url(url)!r} is not a PostgreSQL URL",
                           hint="use postgresql://USER@HOST:PORT/DATABASE, or unset DISTILL_DB_URL for the "
                                "embedded SQLite store")
    psycopg = driver()
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise DistillError(f"DISTILL_DB_URL {redact_url(url)!r} cannot be read: {e}",
                           hint="e.g. postgresql://distill@db.internal:5432/distill") from None
    m = re.search(r"-c\s*search_path\s*=\s*([^\s,]+)", params.get("options") or "")
    schema = m.group(1).strip('"') if m else schema_for(project_folder)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise DistillError(f"schema {schema!r} in DISTILL_DB_URL: use lower-case letters, digits and _ "
                           "(at most 63, not starting with a digit)")
    where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/{params.get('dbname') or ''}"
    return Target(conninfo=url, schema=schema, shown=f"postgresql://{where} (schema {schema})")


def schema_for(project_folder: str) -> str:
    """``distill_<folder>``, made a valid unquoted identifier; names too long keep a hash of the whole."""
    name = "distill_" + re.sub(r"[^a-z0-9_]", "_", project_folder.lower())
    if len(name) > 63:
        name = name[:54] + "_" + hashlib.sha256(project_folder.encode()).hexdigest()[:8]
    return name


def redact_url(url: str) -> str:
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


def driver():
    try:
        import psycopg
    except ImportError:
        raise DistillError("DISTILL_DB_URL points at PostgreSQL, but the psycopg driver is not installed",
                           hint=INSTALL_HINT) from None
    return psycopg


def lock_key(schema: str, purpose: str) -> int:
    """A 64-bit advisory-lock key for one project's ``purpose`` (advisory locks are per database, not schema)."""
    return int.from_bytes(hashlib.blake2b(f"distill:{schema}:{purpose}".encode(), digest_size=8).digest(),
                          "big", signed=True)


# ------------------------------------------------------------------------------------------------
# tokens

_TOKEN = re.compile(r"""
    (?P<str>'(?:[^']|'')*')
  | (?P<ident>"(?:[^"]|"")*")
  | (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<space>\s+)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)
  | (?P<param>\?\d*|[:@$][A-Za-z_]\w*)
  | (?P<op><=|>=|<>|!=|==|\|\||[-+*/%=<>(),.;])
  | (?P<other>.)
""", re.X | re.S)


@dataclass
class Tok:
    kind: str
    text: str

    @property
    def up(self) -> str:
        return self.text.upper() if self.kind == "word" else self.text


def tokens(sql: str) -> list[Tok]:
    return [Tok(m.lastgroup, m.group()) for m in _TOKEN.finditer(sql)]


def _sig(toks: list[Tok]) -> list[int]:
    """Indices of the tokens that mean something (no spaces, no comments)."""
    return [i for i, t in enumerate(toks) if t.kind not in ("space", "comment")]


def _close(toks: list[Tok], open_i: int) -> int:
    """Index of the ``)`` matching the ``(`` at ``open_i``."""
    depth = 0
    for i in range(open_i, len(toks)):
        if toks[i].text == "(":
            depth += 1
        elif toks[i].text == ")":
            depth -= 1
            if depth == 0:
                return i
    raise NotPortable("unbalanced parentheses")


def _split_top(toks: list[Tok]) -> list[list[Tok]]:
    """``toks`` split at commas outside parentheses."""
    parts, cur, depth = [], [], 0
    for t in toks:
        if t.text == "(":
            depth += 1
        elif t.text == ")":
            depth -= 1
        if t.text == "," and depth == 0:
            parts.append(cur)
            cur = []
        else:
            cur.append(t)
    parts.append(cur)
    return parts


def _words(toks: list[Tok]) -> list[str]:
    return [t.up for t in toks if t.kind not in ("space", "comment")]


# ------------------------------------------------------------------------------------------------
# the schema: DDL translation and each table's keys


@dataclass
class Table:
    name: str
    columns: list[str]
    pk: list[str]
    integer_pk: bool = False                                 # INTEGER PRIMARY KEY: SQLite's rowid, an identity here
    unique: list[list[str]] = field(default_factory=list)    # other UNIQUE constraints


def statements(script: str) -> list[str]:
    """A SQL script split into statements (a ';' inside a comment or a string does not end one)."""
    out, cur = [], []
    for t in tokens(script):
        if t.kind == "comment":
            continue
        if t.text == ";":
            text = "".join(x.text for x in cur).strip()
            if text:
                out.append(text)
            cur = []
        else:
            cur.append(t)
    text = "".join(x.text for x in cur).strip()
    return out + ([text] if text else [])


def tables_of(script: str) -> dict[str, Table]:
    """Every ``CREATE TABLE`` of the script with its columns, primary key and UNIQUE constraints."""
    out = {}
    for stmt in statements(script):
        toks = tokens(stmt)
        sig = _sig(toks)
        w = [toks[i].up for i in sig]
        if w[:2] != ["CREATE", "TABLE"] and w[:3] != ["CREATE", "TEMP", "TABLE"]:
            continue
        name_at = w.index("TABLE") + 1
        if w[name_at: name_at + 3] == ["IF", "NOT", "EXISTS"]:
            name_at += 3
        name = toks[sig[name_at]].text.lower()
        open_i = sig[name_at + 1]
        t = Table(name, [], [])
        for part in _split_top(toks[open_i + 1: _close(toks, open_i)]):
            pw = _words(part)
            if not pw:
                continue
            if pw[0] in ("PRIMARY", "UNIQUE", "CHECK", "FOREIGN", "CONSTRAINT"):
                cols = [x.lower() for x in pw[pw.index("(") + 1: pw.index(")")] if x != ","] if "(" in pw else []
                if pw[0] == "PRIMARY":
                    t.pk = cols
                elif pw[0] == "UNIQUE":
                    t.unique.append(cols)
                continue
            col = pw[0].lower()
            t.columns.append(col)
            if "PRIMARY" in pw:
                t.pk = [col]
                t.integer_pk = len(pw) > 1 and pw[1] == "INTEGER"
            elif "UNIQUE" in pw:
                t.unique.append([col])
        out[name] = t
    return out


def indexes_of(script: str) -> set[str]:
    """The names of the script's ``CREATE INDEX`` statements."""
    out = set()
    for stmt in statements(script):
        w = [t.text for t in tokens(stmt) if t.kind not in ("space", "comment")]
        if [x.upper() for x in w[:2]] == ["CREATE", "INDEX"]:
            out.add((w[5] if [x.upper() for x in w[2:5]] == ["IF", "NOT", "EXISTS"] else w[2]).lower())
    return out


_PG_TYPES = {"TEXT": 'TEXT COLLATE "C"', "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}


def translate_ddl(script: str) -> list[str]:
    """The schema's statements for PostgreSQL (see the module docstring): each column's type, the word after its
    name (a column may be called ``text``), is rewritten; other statements pass as they are."""
    out = []
    for stmt in statements(script):
        toks = tokens(stmt)
        sig = _sig(toks)
        if [toks[i].up for i in sig[:2]] == ["CREATE", "TABLE"]:
            open_i = next(i for i in sig if toks[i].text == "(")
            for part in _split_top(toks[open_i + 1: _close(toks, open_i)]):
                words = [t for t in part if t.kind not in ("space", "comment")]
                if len(words) < 2 or words[0].up in ("PRIMARY", "UNIQUE", "CHECK", "FOREIGN", "CONSTRAINT"):
                    continue
                kind, rest = words[1], [t.up for t in words[2:4]]
                if kind.up == "INTEGER" and rest == ["PRIMARY", "KEY"]:
                    kind.text = "BIGINT GENERATED BY DEFAULT AS IDENTITY"
                elif kind.up in _PG_TYPES:
                    kind.text = _PG_TYPES[kind.up]
        out.append("".join(t.text for t in toks))
    return out


# ------------------------------------------------------------------------------------------------
# statements

_REFUSED_WORDS = {"PRAGMA", "ROWID", "GLOB", "SQLITE_MASTER", "SQLITE_SCHEMA"}
_REFUSED_FUNCS = {"CHANGES", "LAST_INSERT_ROWID", "JULIANDAY", "STRFTIME", "DATETIME", "DATE", "TIME",
                  "GROUP_CONCAT", "TYPEOF", "PRINTF", "TOTAL", "TOTAL_CHANGES", "RANDOMBLOB", "UNIXEPOCH"}
# what may follow IS (NOT) in PostgreSQL too; anything else (a value, a column, ?) is SQLite's null-safe equality
_IS_KEYWORDS = {"NULL", "NOT", "TRUE", "FALSE", "UNKNOWN", "DISTINCT"}
_COMPARISON = {"=", "==", "!=", "<>", "<", ">", "<=", ">=", "IS", "IN", "LIKE", "BETWEEN", "NOT", "AND", "OR",
               "EXISTS"}


@dataclass(frozen=True)
class Translated:
    sql: str
    returns_id: bool      # RETURNING <integer key> was added: the cursor reads it as lastrowid


class Dialect:
    """Translates the statements of one schema's tables (see the module docstring); caches each result."""

    def __init__(self, schema_script: str):
        self.tables = tables_of(schema_script)
        self.indexes = indexes_of(schema_script)
        self.translate = lru_cache(maxsize=4096)(self._translate)

    def _translate(self, sql: str, many: bool = False) -> Translated:
        toks = tokens(sql)
        self._refuse(sql, toks)
        toks, conflict, table = self._insert_or(sql, toks)
        self._rewrite(toks)
        returns_id = (not many and table is not None and table.integer_pk
                      and "RETURNING" not in {t.up for t in toks})
        tail = ""
        if conflict:
            tail += " " + conflict
        if returns_id:
            tail += f" RETURNING {table.pk[0]}"
        text = "".join(t.text for t in toks)
        if tail:
            text = self._append(text, tail)
        return Translated(text, returns_id)

    @staticmethod
    def _refuse(sql: str, toks: list[Tok]) -> None:
        sig = _sig(toks)
        for n, i in enumerate(sig):
            t = toks[i]
            is_call = n + 1 < len(sig) and toks[sig[n + 1]].text == "("
            if t.kind == "param" and t.text != "?":
                raise NotPortable(f"parameter {t.text} (only ? is translated): {sql[:200]}")
            if t.kind == "word" and (t.up in _REFUSED_WORDS or (is_call and t.up in _REFUSED_FUNCS)):
                raise NotPortable(f"SQLite-only {t.text} has no translation to PostgreSQL; write the statement "
                                  f"portably: {sql[:200]}")

    def _insert_or(self, sql: str, toks: list[Tok]) -> tuple[list[Tok], str | None, Table | None]:
        """Drop ``OR REPLACE`` / ``OR IGNORE`` (and turn ``REPLACE INTO`` into ``INSERT INTO``); return the tokens,
        the ON CONFLICT clause to append, and the INSERT's table (None for other statements)."""
        sig = _sig(toks)
        if not sig or toks[sig[0]].up not in ("INSERT", "REPLACE"):
            return toks, None, None
        w = [toks[i].up for i in sig]
        mode = None
        if w[0] == "REPLACE":
            mode, drop, toks[sig[0]].text = "REPLACE", [], "INSERT"
        elif w[1:3] in (["OR", "REPLACE"], ["OR", "IGNORE"]):
            mode, drop = w[2], range(sig[1], sig[3])      # "OR X " up to INTO
        else:
            drop = range(0)
        into = w.index("INTO")
        name = toks[sig[into + 1]].text.lower()
        table = self.tables.get(name)
        if mode is None:
            return toks, None, table
        if table is None:
            raise NotPortable(f"INSERT OR {mode} into {name!r}, a table not in the schema: {sql[:200]}")
        for i in drop:
            toks[i].text = ""
        if mode == "IGNORE":
            return toks, "ON CONFLICT DO NOTHING", table
        if table.unique:
            raise NotPortable(f"INSERT OR REPLACE into {name!r}, which has UNIQUE {table.unique} besides its "
                              f"primary key: SQLite would delete the row clashing there too; use ON CONFLICT "
                              f"(...) DO UPDATE explicitly: {sql[:200]}")
        after = sig[into + 2] if into + 2 < len(sig) else None
        if after is not None and toks[after].text == "(" and toks[sig[sig.index(after) + 1]].up != "SELECT":
            listed = [t.text.lower() for t in toks[after + 1: _close(toks, after)] if t.kind in ("word", "ident")]
        else:
            listed = table.columns
        sets = [f"{c} = EXCLUDED.{c}" if c in listed else f"{c} = DEFAULT"
                for c in table.columns if c not in table.pk]
        conflict = f"ON CONFLICT ({', '.join(table.pk)}) " + (f"DO UPDATE SET {', '.join(sets)}" if sets else "DO NOTHING")
        return toks, conflict, table

    def _rewrite(self, toks: list[Tok]) -> None:
        """The token-level rewrites, in place (placeholders last: the others look for ``?``)."""
        sig = _sig(toks)
        for n, i in enumerate(sig):
            t = toks[i]
            nxt = [toks[j] for j in sig[n + 1: n + 3]]
            if t.up == "IS" and nxt and nxt[0].up not in _IS_KEYWORDS:
                t.text = "IS NOT DISTINCT FROM"        # SQLite's x IS y: equal, NULLs included
            elif t.up == "IS" and len(nxt) == 2 and nxt[0].up == "NOT" and nxt[1].up not in _IS_KEYWORDS:
                t.text = "IS DISTINCT FROM"
                for j in range(sig[n + 1], sig[n + 2]):     # NOT and the space after it
                    toks[j].text = ""
            elif t.text == "==":
                t.text = "="
            elif t.up == "LIKE":
                t.text = "ILIKE"       # SQLite's LIKE ignores the case of ASCII letters
            elif t.up == "IFNULL" and nxt and nxt[0].text == "(":
                t.text = "COALESCE"
            elif t.up == "SUM" and nxt and nxt[0].text == "(":
                self._boolean_sum(toks, sig[n + 1])
            elif t.up == "JSON_EXTRACT" and nxt and nxt[0].text == "(":
                self._json_extract(toks, i, sig[n + 1])
        for t in toks:
            if t.kind == "param":
                t.text = "%s"
            elif t.kind in ("str", "ident", "op", "other", "comment"):
                t.text = t.text.replace("%", "%%")

    @staticmethod
    def _boolean_sum(toks: list[Tok], open_i: int) -> None:
        close_i = _close(toks, open_i)
        depth, boolean = 0, False
        for t in toks[open_i + 1: close_i]:
            depth += t.text == "(" or t.up == "CASE"      # a CASE ... END inside is already a number
            depth -= t.text == ")" or t.up == "END"
            if depth == 0 and (t.up in _COMPARISON and t.kind in ("op", "word")):
                boolean = True
        if boolean:
            toks[open_i].text = "(CASE WHEN "
            toks[close_i].text = " THEN 1 ELSE 0 END)"

    @staticmethod
    def _json_extract(toks: list[Tok], name_i: int, open_i: int) -> None:
        close_i = _close(toks, open_i)
        args = _split_top(toks[open_i + 1: close_i])
        path = [t for t in args[-1] if t.kind not in ("space", "comment")] if len(args) == 2 else []
        m = re.fullmatch(r"'\$((?:\.\w+)+)'", path[0].text) if len(path) == 1 and path[0].kind == "str" else None
        if m is None:
            raise NotPortable("json_extract(column, '$.a.b') is the only form translated")
        col = "".join(t.text for t in args[0]).strip()
        keys = ",".join(m.group(1).strip(".").split("."))
        toks[name_i].text = ""
        for t in toks[open_i: close_i + 1]:
            t.text = ""
        toks[close_i].text = f"(({col})::jsonb #>> '{{{keys}}}')"

    @staticmethod
    def _append(text: str, tail: str) -> str:
        """``tail`` added at the end of the statement: before RETURNING when there is one, and before a final ';'."""
        body = text.rstrip().rstrip(";").rstrip()
        m = re.search(r"\bRETURNING\b(?=(?:[^']|'[^']*')*$)", body, re.I)
        if m:
            return body[:m.start()].rstrip() + tail + " " + body[m.start():]
        return body + tail


# ------------------------------------------------------------------------------------------------
# rows, cursors, the connection


class Row(tuple):
    """One result row: by index like a tuple, by column name (any case) like ``sqlite3.Row``; ``keys()``."""

    __slots__ = ()
    _index: dict[str, int] = {}
    _names: tuple[str, ...] = ()

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._index[key.lower()])
            except KeyError:
                raise IndexError(f"No item with that key: {key!r}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


@lru_cache(maxsize=1024)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        index.setdefault(n.lower(), i)      # like sqlite3.Row: the first of two same-named columns
    return type("Row", (Row,), {"__slots__": (), "_index": index, "_names": names})


def _row_factory(cursor) -> Callable[[Any], Any]:
    if cursor.description is None:
        return tuple
    return _row_class(tuple(d.name for d in cursor.description))


class Cursor:
    """What ``PgConnection.execute`` returns: sqlite3.Cursor's fetchone/fetchall/iteration/rowcount/lastrowid."""

    def __init__(self, cur, returns_id: bool = False):
        self._cur = cur
        self.lastrowid = None
        self._spent = False
        if returns_id:
            row = cur.fetchone()
            self.lastrowid = None if row is None else row[0]
            self._spent = True          # like sqlite3: an INSERT has no rows to fetch

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def description(self):
        return None if self._spent else self._cur.description

    def _has_rows(self) -> bool:
        return not self._spent and self._cur.description is not None

    def fetchone(self):
        return self._cur.fetchone() if self._has_rows() else None

    def fetchall(self) -> list:
        return self._cur.fetchall() if self._has_rows() else []

    def __iter__(self) -> Iterator:
        return iter(self._cur) if self._has_rows() else iter(())


class PgConnection:
    """A psycopg connection (autocommit) with sqlite3.Connection's ``execute``/``executemany``, translating each
    statement with ``dialect``. A connection lost between statements (a server restart, a failover) is opened again
    at the next statement outside a transaction; the statement that met the loss fails (a DistillError)."""

    def __init__(self, target: Target, dialect: Dialect, *, readonly: bool = False):
        self.target, self.dialect, self.readonly = target, dialect, readonly
        self.raw = self._connect()
        self._in_tx = False

    def _connect(self):
        psycopg = driver()
        try:
            conn = psycopg.connect(self.target.conninfo, autocommit=True, connect_timeout=10,
                                   row_factory=_row_factory)
        except psycopg.OperationalError as e:
            raise DistillError(f"cannot connect to PostgreSQL at {self.target.shown}: {_first_line(e)}",
                               hint="is the server running and reachable from here? check DISTILL_DB_URL (user, "
                                    "host, port, database) and the server's pg_hba.conf") from None
        _adapt(conn)
        # search_path: this project's schema first (public after it, where the server keeps its functions)
        conn.execute(f'SET search_path TO "{self.target.schema}", public')
        # a writer waits at most this long for another's transaction (SQLite's busy timeout is also 30 s)
        conn.execute("SET lock_timeout = '30s'")
        if self.readonly:
            conn.execute("SET default_transaction_read_only = on")
        return conn

    def _live(self):
        if self.raw.closed and not self._in_tx:
            self.raw = self._connect()
        return self.raw

    def execute(self, sql: str, params: tuple | list | dict = ()) -> Cursor:
        if isinstance(params, dict):
            raise NotPortable(f"named parameters: {sql[:200]}")
        t = self.dialect.translate(sql)
        return Cursor(self._run(lambda c: c.execute(t.sql, tuple(params))), t.returns_id)

    def executemany(self, sql: str, seq) -> Cursor:
        t = self.dialect.translate(sql, True)
        return Cursor(self._run(lambda c: c.executemany(t.sql, [tuple(p) for p in seq])))

    def _run(self, fn):
        psycopg = driver()
        cur = self._live().cursor()
        try:
            fn(cur)
        except psycopg.OperationalError as e:
            raise DistillError(f"{self.target.shown}: {_first_line(e)}", hint=pg_hint(e)) from None
        return cur

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    @contextmanager
    def transaction(self, key: int) -> Iterator["PgConnection"]:
        """BEGIN, then the project's writer lock (``pg_advisory_xact_lock``, released at COMMIT/ROLLBACK): writers
        of one project take turns like SQLite's BEGIN IMMEDIATE, so a read-then-write inside a transaction (a
        claim, a queue consume) sees every earlier commit and no other writer in between."""
        if self._in_tx:       # PostgreSQL would only warn, and the inner COMMIT would end the outer transaction
            raise DistillError(f"{self.target.shown}: cannot write: a transaction is already open on this connection")
        self._run(lambda c: c.execute("BEGIN"))
        self._in_tx = True
        try:
            self._run(lambda c: c.execute("SELECT pg_advisory_xact_lock(%s)", (key,)))
            yield self
        except BaseException:
            self._in_tx = False
            try:
                self.raw.execute("ROLLBACK")
            except driver().Error:
                pass            # the connection is gone, and the transaction with it
            raise
        self._in_tx = False
        self._run(lambda c: c.execute("COMMIT"))

    def native(self, sql: str) -> None:
        """A statement already in PostgreSQL's SQL (the translated schema), run as it is."""
        self._run(lambda c: c.execute(sql))

    def close(self) -> None:
        self.raw.close()


def _adapt(conn) -> None:
    """Values as the SQLite store has them: bools stored as 0/1 in INTEGER columns, numeric read as float."""
    from psycopg.adapt import Dumper
    from psycopg.types.numeric import FloatLoader

    class BoolAsInt(Dumper):
        oid = conn.adapters.types["int8"].oid

        def dump(self, obj: bool) -> bytes:
            return b"1" if obj else b"0"

    conn.adapters.register_dumper(bool, BoolAsInt)
    conn.adapters.register_loader("numeric", FloatLoader)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def pg_hint(e: Exception) -> str:
    s = str(e).lower()
    if "lock timeout" in s or "canceling statement due to lock" in s:
        return "another distill process held this project's write lock for over 30 s; wait for it or stop it"
    if "read-only" in s:
        return "this connection is read-only (distill status); a writing command opens the store normally"
    return "check that the PostgreSQL server is up and reachable (DISTILL_DB_URL); committed work is kept"


class StageLock:
    """The project-wide lock between stages (``Project.exclusive``) on PostgreSQL: a session advisory lock on a
    connection of its own, so the server releases it when this process dies, on whichever machine it runs.
    ``shared`` holders (labellers, which claim inputs row by row) run together; an exclusive holder (train,
    iterate) runs alone."""

    def __init__(self, target: Target, shared: bool):
        self.target, self.shared = target, shared
        self.key = lock_key(target.schema, "stage")
        self.conn = None

    def acquire(self, wait: bool) -> bool:
        psycopg = driver()
        kind = "_shared" if self.shared else ""
        try:
            self.conn = psycopg.connect(self.target.conninfo, autocommit=True, connect_timeout=10)
            if wait:
                self.conn.execute(f"SELECT pg_advisory_lock{kind}(%s)", (self.key,))
                return True
            got = self.conn.execute(f"SELECT pg_try_advisory_lock{kind}(%s)", (self.key,)).fetchone()[0]
        except psycopg.OperationalError as e:
            self.release()
            raise DistillError(f"{self.target.shown}: {_first_line(e)}", hint=pg_hint(e)) from None
        if not got:
            self.release()
        return bool(got)

    def release(self) -> None:
        if self.conn is None:
            return
        try:
            # unlock before closing: the server ends a closed session a moment later, and a stage started right
            # after this one (iterate's label) would find the lock still held
            self.conn.execute("SELECT pg_advisory_unlock_all()")
        except driver().Error:
            pass                    # the session is gone, and its locks with it
        self.conn.close()
        self.conn = None
