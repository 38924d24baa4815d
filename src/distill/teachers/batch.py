"""OpenAI Batch API teachers (``batch: true``): the requests online labelling would send, at the batch price.

    teachers:
      - name: gpt
        kind: openai
        base_url: https://api.openai.com/v1
        model: gpt-4o-mini
        api_key_env: OPENAI_API_KEY
        batch: true              # label through the Batch API (answers within 24 h)
        batch_poll_s: 60         # seconds between two status checks of a running batch
        batch_retry: online      # what a batch did not answer: online (default) or batch (a follow-up batch)
        price: {input_per_1m: 0.15, output_per_1m: 0.60, batch_factor: 0.5}   # batch = 0.5 x these

    distill label PROJECT [--detach] [--budget USD]

``distill label`` calls ``run_batches`` before its online run (``distill.labeling._label_one``). This module
fills the cache: every answered line becomes a ``teacher_calls`` row (``ledger.record_call``, source "batch",
priced at ``price.batch_factor`` x the per-1M prices) under the key the online call would use (``custom_id`` =
that cache key, ``body`` = ``OpenAITeacher.body``, the exact JSON an online call sends). The online run that
follows writes every label from the cache - the same parse -> label path as an online answer - and asks online
only what the batches left unanswered. So the cache, the ledger and ``--budget`` are shared both ways: a batch
answer is a cache hit for any later online call and the reverse, and re-running after a collected batch pays
nothing.

The recipe (``run_batches``), in rounds until nothing is left for a batch:
1. finish every batch of this teacher that is not collected (from this run or an earlier one): upload, create,
   poll every ``batch_poll_s`` (``--detach``: once, then return), download the output and error files, record;
2. find what each input still needs: its first attempt key without a ``teacher_calls`` row (a row that did not
   parse moves it on to the next attempt, as online);
3. a request never tried goes into a new batch; a request a batch did not answer (an error-file line, an
   expired, cancelled or failed batch, an answer that does not parse) goes online (``batch_retry: online``) or
   into a follow-up batch (``batch_retry: batch``; a request is put in at most two batches, then online);
4. check ``--budget`` against the new batches' worst-case cost *before* anything is written or sent; batches
   that could exceed it are refused whole, with the numbers;
5. write each JSONL (<= ``batch_max_requests`` lines, <= 190 MB) and commit its ``teacher_batches`` row; go to 1.

Crash safety, 0 duplicate paid requests. Every step is committed before the next one starts, and the intent of
each write request (``upload_sent_at``, ``create_sent_at``) is committed before the request goes out. So after
a kill -9 (or a timeout, a reset, a 5xx on upload/create):
- upload never sent: upload;
- upload sent, file id not committed: find our file (``GET /files``: filename ``<local id>.jsonl``, same size)
  and take it; upload only if it is not there (files are free, batches are not);
- create sent, batch id not committed: wait until the request cannot be in flight any more (``timeout_s`` after
  it was sent), find our batch (``GET /batches``: ``metadata.distill_batch`` = the local id) and take it; create
  only if there is none. The create also carries ``Idempotency-Key: <local id>`` for providers that honour it;
- submitted: poll it; a finished batch is downloaded and recorded again, skipping keys already in the ledger,
  so a kill while collecting loses nothing and pays nothing.
The window left open: a provider whose batch list lags more than ``timeout_s`` behind an accepted create.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import httpx
from rich.console import Console

from distill.errors import DistillError
from distill.fsutil import write_atomic, write_text_atomic
from distill.ratelimit import estimate_prompt_tokens
from distill.redact import redact, register
from distill.task import ParseError, TeacherSpec, parse_answer
from distill.teachers.base import TeacherAuthError, TeacherRequest, TeacherUnavailable
from distill.teachers.ledger import cost_of, record_call
from distill.teachers.openai_compat import (MAX_RETRY_AFTER_S, RETRY_STATUS, _server_message, _Transient,
                                            backoff_delay, parse_retry_after, reply_from_completion)

if TYPE_CHECKING:
    from distill.project import Project

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
MAX_FILE_BYTES = 190_000_000     # OpenAI refuses batch files over 200 MB; keep a margin
FINAL = ("completed", "failed", "expired", "cancelled")
MAX_BATCHES_PER_REQUEST = 2      # batch_retry: batch puts a request in at most this many batches, then online
INGEST_CHUNK = 1000              # output lines recorded per transaction

_console = Console(stderr=True)


@dataclass
class BatchItem:
    """One input the labeller wants answered (``labeling._Item`` without the id)."""
    keys: list[str]                   # one per attempt, as the online run computes them
    messages: list[dict[str, str]]
    labels: list[str] | None = None


@dataclass
class BatchReport:
    batches: list[str] = field(default_factory=list)    # local ids this run submitted or collected
    submitted: int = 0                # requests this run put into new batches
    answered: int = 0                 # batch answers this run recorded in the ledger (paid, batch rate)
    parse_errors: int = 0             # of those, answers that did not parse (their input moves to the next attempt)
    retry_batch: dict[str, int] = field(default_factory=dict)    # requests put in a follow-up batch, by reason
    retry_online: dict[str, int] = field(default_factory=dict)   # requests left to the online run, by reason
    pending: int = 0                  # requests in batches still running when this run returned
    spend: float = 0.0                # USD of the answers this run recorded
    tokens_in: int = 0
    tokens_out: int = 0
    stopped: str | None = None        # None | 'budget' (refused before submitting) | 'batch_pending' (--detach)
    detail: str | None = None         # what a stop means, for the user

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the recipe --------------------------------------------------------------------------------------


def run_batches(project: "Project", tspec: TeacherSpec, teacher: Any, items: list[BatchItem], *,
                budget: float | None, spent: Callable[[], float], detach: bool = False,
                progress: bool = True) -> BatchReport:
    """Get ``items`` answered through the Batch API (see the module docstring). ``teacher`` is the online
    ``OpenAITeacher``: its ``body()`` is what each line sends, its ``unwrap()`` reads each answer. ``spent()`` is the ledger spend ``budget`` caps.
    Returns with ``stopped`` set when batches are still running (``detach``) or the budget refused new ones;
    otherwise every request a batch could answer is in the ledger and the rest is counted in ``retry_online``."""
    store = project.store
    report = BatchReport()
    client = BatchClient(tspec)
    try:
        while True:
            for row in _rows(store, tspec.name, "state IN ('prepared', 'uploaded')"):
                _submit(store, client, tspec, row, progress)
            running = _wait(project, client, tspec, teacher, report, detach, progress)
            if running:
                report.pending = sum(r["requests"] for r in running)
                report.stopped = "batch_pending"
                report.detail = (f"{tspec.name}: {len(running)} batch(es) with {report.pending} requests still running "
                                 f"({', '.join(r['id'] for r in running)}); re-run `distill label {project.root}` to "
                                 "collect them (without --detach it waits)")
                return report
            new, online, retried = _next_requests(store, tspec, items)
            report.retry_online = dict(Counter(online.values()))
            if not new:
                return report
            estimate = sum(_estimate(tspec, messages) for _, messages, _ in new.values())
            if budget is not None and spent() + estimate > budget:
                report.stopped = "budget"
                report.detail = (f"{tspec.name}: refused to submit a batch of {len(new)} requests: its worst-case "
                                 f"cost ${estimate:.4f} (batch rate) on top of ${spent():.4f} spent exceeds the "
                                 f"${budget:.4f} budget; nothing was sent. Raise --budget, or submit fewer with "
                                 "--limit N")
                return report
            for reason, n in Counter(retried.values()).items():
                report.retry_batch[reason] = report.retry_batch.get(reason, 0) + n
            report.submitted += len(new)
            _prepare(project, tspec, teacher, new, report, progress)
    finally:
        client.close()


def _next_requests(store, tspec: TeacherSpec, items: list[BatchItem]
                   ) -> tuple[dict[str, tuple[int, list, list | None]], dict[str, str], dict[str, str]]:
    """What the inputs still need: ``new`` {key: (attempt, messages, labels)} to put in batches (identical
    prompts share a key, so they are asked once), ``online`` {key: reason} left to the online run and
    ``retried`` {key: reason}, the part of ``new`` a batch has tried before."""
    status = _call_status(store, [k for it in items for k in it.keys])
    tried = _batch_failures(store, tspec.name)
    new: dict[str, tuple[int, list, list | None]] = {}
    online: dict[str, str] = {}
    retried: dict[str, str] = {}
    for it in items:
        need = None
        for attempt, key in enumerate(it.keys):
            if key not in status:
                need = attempt, key
                break
            if status[key] != "parse_error":
                break             # answered: the online run writes its label from the cache
        if need is None:
            continue              # answered, or every attempt did not parse (the online run marks it failed)
        attempt, key = need
        failures = tried.get(key, [])
        if attempt == 0 and not failures:
            new[key] = (attempt, it.messages, it.labels)
            continue
        reason = failures[-1] if failures else "parse_error"
        if tspec.batch_retry == "batch" and len(failures) < MAX_BATCHES_PER_REQUEST:
            new[key] = (attempt, it.messages, it.labels)
            retried[key] = reason
        else:
            online[key] = reason
    return new, online, retried


def _prepare(project: "Project", tspec: TeacherSpec, teacher: Any, new: dict[str, tuple[int, list, list | None]],
             report: BatchReport, progress: bool) -> None:
    """Write the JSONL of each new batch, then commit its row (nothing is sent here: ``_submit`` does that).
    A file without a row (a kill between the two) is never sent and is removed by the next ``_prepare``."""
    folder = project.root / "batches"
    known = {r["path"] for r in project.store.q("SELECT path FROM teacher_batches")}
    for stray in [*folder.glob("*.jsonl"), *folder.glob(".*.tmp")] if folder.is_dir() else ():
        if str(stray) not in known:     # also downloads a kill cut short
            stray.unlink(missing_ok=True)
    chunk: list[tuple[str, int, str, float]] = []
    size = 0
    for key, (attempt, messages, labels) in new.items():
        body = teacher.body(TeacherRequest(key=key, messages=messages, kind=project.spec.kind, labels=labels))
        line = json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}, ensure_ascii=False)
        if chunk and (len(chunk) >= tspec.batch_max_requests or size + len(line.encode()) + 1 > MAX_FILE_BYTES):
            _commit_batch(project, tspec, chunk, report, progress)
            chunk, size = [], 0
        chunk.append((key, attempt, line, _estimate(tspec, messages)))
        size += len(line.encode()) + 1
    if chunk:
        _commit_batch(project, tspec, chunk, report, progress)


def _commit_batch(project: "Project", tspec: TeacherSpec, chunk: list[tuple[str, int, str, float]],
                  report: BatchReport, progress: bool) -> None:
    local_id = f"distill-{uuid.uuid4().hex[:16]}"
    path = project.root / "batches" / f"{local_id}.jsonl"
    write_text_atomic(path, "".join(line + "\n" for _, _, line, _ in chunk))
    with project.store.tx() as c:
        c.execute("""INSERT INTO teacher_batches(id, teacher, keys, requests, path, estimate, state, created_at)
                     VALUES(?,?,?,?,?,?, 'prepared', ?)""",
                  (local_id, tspec.name, json.dumps({k: a for k, a, _, _ in chunk}), len(chunk), str(path),
                   sum(e for *_, e in chunk), time.time()))
    report.batches.append(local_id)
    if progress:
        _console.print(f"{tspec.name}: batch {local_id}: {len(chunk)} requests prepared")


# -- one batch: submit (crash-safe), poll, collect ------------------------------------------------------


def _submit(store, client: "BatchClient", tspec: TeacherSpec, row, progress: bool) -> None:
    """prepared -> uploaded -> submitted, looking on the server before resending anything (module docstring)."""
    local_id, path = row["id"], Path(row["path"])
    if row["state"] == "prepared":
        if path.exists():
            data = path.read_bytes()
            file_id = _retrying(tspec, lambda: _upload_once(store, client, local_id, path.name, data))
        else:
            # the JSONL is gone (deleted by hand): use the upload if it reached the server (the answers are then
            # recorded with the requests read back from it); otherwise nothing was sent and the row goes
            file_id = (_retrying(tspec, lambda: client.find_file(path.name, None, row["created_at"]))
                       if row["upload_sent_at"] is not None else None)
            if file_id is None:
                with store.tx() as c:
                    c.execute("DELETE FROM teacher_batches WHERE id=? AND state='prepared'", (local_id,))
                return
        _update(store, local_id, input_file_id=file_id, state="uploaded")
        row = _row(store, local_id)
    if row["state"] == "uploaded":
        b = _retrying(tspec, lambda: _create_once(store, client, tspec, local_id, row["input_file_id"]))
        _update(store, local_id, batch_id=b["id"], status=b.get("status"), state="submitted", submitted_at=time.time())
        if progress:
            _console.print(f"{tspec.name}: batch {local_id} submitted as {b['id']} ({row['requests']} requests)")


def _upload_once(store, client: "BatchClient", local_id: str, name: str, data: bytes) -> str:
    row = _row(store, local_id)
    if row["upload_sent_at"] is not None:
        found = client.find_file(name, len(data), row["created_at"])
        if found is not None:
            return found
    _update(store, local_id, upload_sent_at=time.time())
    return client.upload(name, data)


def _create_once(store, client: "BatchClient", tspec: TeacherSpec, local_id: str, file_id: str) -> dict:
    row = _row(store, local_id)
    if row["create_sent_at"] is not None:
        # a create still in flight would not be listed yet: wait until it would have timed out
        settle = row["create_sent_at"] + tspec.timeout_s - time.time()
        if settle > 0:
            time.sleep(settle)
        found = client.find_batch(local_id, row["created_at"])
        if found is not None:
            return found
    _update(store, local_id, create_sent_at=time.time())
    return client.create(file_id, local_id, tspec.name)


def _wait(project: "Project", client: "BatchClient", tspec: TeacherSpec, teacher: Any, report: BatchReport,
          detach: bool, progress: bool) -> list:
    """Poll the submitted batches (every ``batch_poll_s``; ``detach``: once), collect each one that ended.
    Returns the rows still running (none unless ``detach``)."""
    while True:
        running = []
        for row in _rows(project.store, tspec.name, "state = 'submitted'"):
            b = _retrying(tspec, lambda: client.get_batch(row["batch_id"]))
            counts = json.dumps(b.get("request_counts") or {}, sort_keys=True)
            if (b.get("status"), counts) != (row["status"], row["counts"]):
                _update(project.store, row["id"], status=b.get("status"), counts=counts)
                if progress:
                    rc = b.get("request_counts") or {}
                    _console.print(f"{tspec.name}: batch {row['id']} ({row['batch_id']}): {b.get('status')}, "
                                   f"{rc.get('completed', 0)}/{rc.get('total', row['requests'])} done, "
                                   f"{rc.get('failed', 0)} failed")
            if b.get("status") in FINAL:
                _collect(project, client, tspec, teacher, _row(project.store, row["id"]), b, report)
            else:
                running.append(row)
        if not running or detach:
            return running
        time.sleep(tspec.batch_poll_s)


def _collect(project: "Project", client: "BatchClient", tspec: TeacherSpec, teacher: Any, row, b: dict,
             report: BatchReport) -> None:
    """Record every answer of an ended batch in the ledger (a key already there is skipped, so collecting again
    after a kill pays and counts nothing twice), note why the other requests were not answered, mark it done."""
    store, spec = project.store, project.spec
    keys: dict[str, int] = json.loads(row["keys"])
    messages = _request_messages(client, tspec, row)
    answered: set[str] = set()
    failed: dict[str, str] = {}
    cost = 0.0
    if b.get("output_file_id"):
        pending: list[tuple[str, Any]] = []
        for line in _download(client, tspec, b["output_file_id"], Path(row["path"]).with_suffix(".output.jsonl")):
            key = line.get("custom_id")
            if key not in keys:
                continue          # not a request of ours
            resp = line.get("response") or {}
            if line.get("error") or resp.get("status_code") != 200:
                failed[key] = _error_reason(line)
                continue
            try:
                reply = reply_from_completion(resp.get("body"))      # as an online answer is read
            except ValueError:
                failed[key] = "bad_response"
                continue
            teacher.unwrap(reply)
            answered.add(key)
            cost += cost_of(tspec, reply.tokens_in, reply.tokens_out, 0.0, batch=True)
            pending.append((key, reply))
            if len(pending) >= INGEST_CHUNK:
                _record(store, spec, tspec, keys, messages, pending, report)
                pending = []
        _record(store, spec, tspec, keys, messages, pending, report)
    if b.get("error_file_id"):
        for line in _download(client, tspec, b["error_file_id"], Path(row["path"]).with_suffix(".errors.jsonl")):
            if line.get("custom_id") in keys and line["custom_id"] not in answered:
                failed[line["custom_id"]] = _error_reason(line)
    for key in keys:
        if key not in answered and key not in failed:
            # a failed (invalid file) / expired / cancelled batch leaves requests in no file at all
            failed[key] = b.get("status") if b.get("status") != "completed" else "missing"
    if b.get("status") == "failed":
        errs = (b.get("errors") or {}).get("data") or []
        _console.print(f"[yellow]warning[/]: {tspec.name}: batch {row['id']} ({row['batch_id']}) failed: "
                       + redact("; ".join(str(e.get("message", e)) for e in errs[:3]) or "no reason given"))
    _update(store, row["id"], state="collected", output_file_id=b.get("output_file_id"),
            error_file_id=b.get("error_file_id"), status=b.get("status"), failed=json.dumps(failed),
            answered=len(answered), cost=cost, collected_at=time.time())
    Path(row["path"]).unlink(missing_ok=True)      # the answers are in the ledger now
    if row["id"] not in report.batches:
        report.batches.append(row["id"])


def _record(store, spec, tspec: TeacherSpec, keys: dict[str, int], messages: dict[str, list],
            replies: list[tuple[str, Any]], report: BatchReport) -> None:
    """One transaction of batch answers -> ``teacher_calls`` rows, through the ledger like online calls. The
    status is the parse outcome, so the online run re-asks (next attempt) an answer that did not parse."""
    with store.tx() as c:
        for key, reply in replies:
            if c.execute("SELECT 1 FROM teacher_calls WHERE key=?", (key,)).fetchone():
                continue          # recorded before a kill, or answered online meanwhile
            try:
                parse_answer(spec, reply.texts[0] if reply.texts else None)
                status, error = "ok", None
            except ParseError as e:
                status, error = "parse_error", e.reason
            report.spend += record_call(c, tspec, key, keys[key], messages.get(key, []), reply, status, error,
                                        source="batch")
            report.answered += 1
            report.parse_errors += status == "parse_error"
            report.tokens_in += reply.tokens_in
            report.tokens_out += reply.tokens_out


def _request_messages(client: "BatchClient", tspec: TeacherSpec, row) -> dict[str, list]:
    """custom_id -> messages of a batch's requests (stored with each answer): from the JSONL we wrote, or, if it
    is gone, from the input file on the server."""
    path = Path(row["path"])
    lines = _jsonl(path) if path.exists() else _download(client, tspec, row["input_file_id"],
                                                         path.with_suffix(".input.jsonl"))
    return {x["custom_id"]: (x.get("body") or {}).get("messages", []) for x in lines if "custom_id" in x}


def _download(client: "BatchClient", tspec: TeacherSpec, file_id: str, path: Path) -> Iterator[dict]:
    """The lines of a file on the server: streamed to ``path`` (a large output is never held in memory), read
    back one at a time, removed once read."""
    _retrying(tspec, lambda: client.download(file_id, path))
    try:
        yield from _jsonl(path)
    finally:
        path.unlink(missing_ok=True)


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for raw in f:
            try:
                obj = json.loads(raw) if raw.strip() else None
            except ValueError:
                obj = None    # a damaged line: its request counts as unanswered ("missing") and is asked again
            if isinstance(obj, dict):
                yield obj


def _error_reason(line: dict) -> str:
    err = line.get("error") or ((line.get("response") or {}).get("body") or {}).get("error") or {}
    code = err.get("code") if isinstance(err, dict) else None
    if code:
        return str(code)
    status = (line.get("response") or {}).get("status_code")
    return f"http_{status}" if status else "error"


# -- the store side -------------------------------------------------------------------------------------


def _rows(store, teacher: str, where: str) -> list:
    return store.q(f"SELECT * FROM teacher_batches WHERE teacher=? AND {where} ORDER BY created_at", (teacher,))


def _row(store, local_id: str):
    return store.q("SELECT * FROM teacher_batches WHERE id=?", (local_id,))[0]


def _update(store, local_id: str, **cols: Any) -> None:
    sets = ", ".join(f"{k}=?" for k in cols)
    with store.tx() as c:
        c.execute(f"UPDATE teacher_batches SET {sets} WHERE id=?", (*cols.values(), local_id))


def _call_status(store, keys: list[str]) -> dict[str, str]:
    """key -> teacher_calls.status for the keys that have a row (in chunks: SQLite caps bound parameters)."""
    out: dict[str, str] = {}
    for i in range(0, len(keys), 500):
        part = keys[i:i + 500]
        rows = store.q(f"SELECT key, status FROM teacher_calls WHERE key IN ({','.join('?' * len(part))})", tuple(part))
        out.update({r["key"]: r["status"] for r in rows})
    return out


def _batch_failures(store, teacher: str) -> dict[str, list[str]]:
    """key -> why each collected batch that held it did not answer it, oldest first."""
    out: dict[str, list[str]] = {}
    for r in _rows(store, teacher, "state = 'collected' AND failed IS NOT NULL"):
        for key, reason in json.loads(r["failed"]).items():
            out.setdefault(key, []).append(reason)
    return out


def _estimate(tspec: TeacherSpec, messages: list[dict[str, str]]) -> float:
    """Worst-case cost of one request at the batch rate: estimated prompt tokens + max_tokens for each sample."""
    return cost_of(tspec, estimate_prompt_tokens(messages), tspec.max_tokens * tspec.n, 0.0, batch=True)


def batches_in_flight(store) -> list[dict[str, Any]]:
    """Batches not collected yet, for ``distill status``."""
    return [{"id": r["id"], "teacher": r["teacher"], "batch_id": r["batch_id"], "state": r["state"],
             "status": r["status"], "requests": r["requests"], "counts": json.loads(r["counts"] or "{}"),
             "estimate": r["estimate"], "created_at": r["created_at"], "submitted_at": r["submitted_at"]}
            for r in store.q("SELECT * FROM teacher_batches WHERE state != 'collected' ORDER BY created_at")]


# -- the HTTP side ---------------------------------------------------------------------------------------


def _retrying(tspec: TeacherSpec, fn: Callable[[], Any]) -> Any:
    """``fn()`` with the online teacher's retry policy for 429/5xx/timeouts (full-jitter backoff, Retry-After).
    Each attempt of an upload/create looks on the server first (``_upload_once``), so retrying never duplicates."""
    reason = "no attempt made"
    for attempt in range(tspec.max_retries + 1):
        try:
            return fn()
        except _Transient as e:
            reason = e.reason
            if attempt == tspec.max_retries:
                break
            delay = e.retry_after if e.retry_after is not None else backoff_delay(attempt)
            time.sleep(min(delay, MAX_RETRY_AFTER_S))
    raise TeacherUnavailable(
        redact(f"teacher '{tspec.name}' at {tspec.base_url}: Batch API gave up after {tspec.max_retries + 1} "
               f"attempts; last error: {reason}"),
        hint="check that the server is up; re-run to continue (submitted batches are kept and polled, not resent)")


class BatchClient:
    """The Batch API requests: files (upload, list, content) and batches (create, get, list). One attempt
    each; ``_retrying`` adds the retries."""

    def __init__(self, spec: TeacherSpec, transport: httpx.BaseTransport | None = None):
        self.spec = spec
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise DistillError(
                    f"teacher '{spec.name}': the environment variable ${spec.api_key_env} is not set",
                    hint=f"export {spec.api_key_env}=... (the key is read from the environment and never stored)")
            register(key)       # from here on, distill.redact removes it from every message
            headers["Authorization"] = f"Bearer {key}"
        self.base = spec.base_url.rstrip("/")
        self._client = httpx.Client(headers=headers, transport=transport,
                                    timeout=httpx.Timeout(spec.timeout_s, connect=min(10.0, spec.timeout_s)))

    def close(self) -> None:
        self._client.close()

    def upload(self, name: str, data: bytes) -> str:
        r = self._send("POST", "/files", files={"file": (name, data, "application/jsonl")},
                       data={"purpose": "batch"})
        return r.json()["id"]

    def create(self, file_id: str, local_id: str, teacher: str) -> dict:
        body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": COMPLETION_WINDOW,
                "metadata": {"distill_batch": local_id, "distill_teacher": teacher}}
        return self._send("POST", "/batches", json=body, headers={"Idempotency-Key": local_id}).json()

    def get_batch(self, batch_id: str) -> dict:
        return self._send("GET", f"/batches/{batch_id}").json()

    def download(self, file_id: str, path: Path) -> None:
        """A file's content, streamed to ``path`` (written atomically: a cut download leaves no file)."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f, self._client.stream("GET", f"{self.base}/files/{file_id}/content") as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                for chunk in r.iter_bytes():
                    f.write(chunk)

        try:
            write_atomic(path, write)
        except httpx.TimeoutException as e:
            raise _Transient(f"timeout downloading {file_id} ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Transient(redact(f"connection error downloading {file_id}: {type(e).__name__}: {e}")) from None

    def find_file(self, name: str, size: int | None, since: float) -> str | None:
        """Our uploaded file (by filename and size), if the server has it."""
        for f in self._pages("/files", {"purpose": "batch"}, since):
            if f.get("filename") == name and (size is None or f.get("bytes") == size):
                return f["id"]
        return None

    def find_batch(self, local_id: str, since: float) -> dict | None:
        """Our batch (by ``metadata.distill_batch``), if the server has it."""
        for b in self._pages("/batches", {}, since):
            if (b.get("metadata") or {}).get("distill_batch") == local_id:
                return b
        return None

    def _pages(self, path: str, params: dict, since: float) -> Iterator[dict]:
        """Every object of a list endpoint, newest first, down to those created an hour before ``since`` (the
        lists are ordered by creation time; the hour covers clock skew between us and the provider)."""
        after = None
        while True:
            page = self._send("GET", path, params={**params, "limit": 100, **({"after": after} if after else {})}).json()
            data = page.get("data") or []
            for obj in data:
                if (obj.get("created_at") or since) < since - 3600:
                    return
                yield obj
            if not page.get("has_more") or not data:
                return
            after = data[-1]["id"]

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._client.request(method, self.base + path, **kw)
        except httpx.TimeoutException as e:
            raise _Transient(f"timeout after {self.spec.timeout_s}s on {method} {path} ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Transient(redact(f"connection error on {method} {path}: {type(e).__name__}: {e}")) from None
        self._check(r)
        try:
            r.json()
        except ValueError:
            raise _Transient(f"unreadable response body on {method} {path}") from None
        return r

    def _check(self, r: httpx.Response) -> None:
        where = f"{r.request.method} {r.request.url.path}"
        if r.status_code in (401, 403):
            raise TeacherAuthError(
                f"teacher '{self.spec.name}': the API rejected the key in ${self.spec.api_key_env} "
                f"(HTTP {r.status_code} on {where}: {_server_message(r.content)})",
                hint=f"check the value of {self.spec.api_key_env} and that it may use the Batch API")
        if r.status_code in RETRY_STATUS:
            ra = parse_retry_after(r.headers.get("retry-after")) if r.status_code in (429, 503) else None
            raise _Transient(f"HTTP {r.status_code} on {where}: {_server_message(r.content)}", retry_after=ra)
        if r.status_code >= 400:
            raise TeacherUnavailable(
                f"teacher '{self.spec.name}': HTTP {r.status_code} on {where}: {_server_message(r.content)}",
                hint="the Batch API refused the request; check base_url (does the provider offer /batches?), "
                     "model and parameters in distill.yaml")
