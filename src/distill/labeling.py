"""Labelling at volume: ask a teacher about every input once, pay once, lose nothing.

    distill label PROJECT [--teacher NAME] [--budget USD] [--limit N]      (the CLI runs ``label``)

The recipe, top to bottom (``label``):
1. take the project's exclusive lock (two labellers would pay twice for the same inputs);
2. refuse a teacher whose terms forbid training on its outputs unless ``accept_terms``;
3. find the work: every example of ``splits`` whose ok label is not *current*. A label is current when
   its ``call_key`` is one of the keys the example renders to now (attempt 0..max_parse_retries). So a
   new prompt template or new sampling parameters make new keys and the inputs are labelled again,
   while an unchanged project does no work. Failed inputs are always re-processed: with an unchanged
   prompt every attempt is answered from the cache, so they stay failed for free; with a changed prompt
   they get a fresh chance (new keys, new paid calls). The plan is streamed a page at a time (memory does
   not grow with the project) and incremental: an ok label remembers the prompt fingerprint its key was
   made under (``label_plans``; ``prompt_fingerprint``: teacher identity, templates, labels, few-shot pool,
   ...), so while the fingerprint is unchanged it is current without its prompt being rendered again, and
   a re-run over an unchanged project is a few SQL queries. A changed fingerprint renders every input again;
4. for each input, under the limiter (RPM/TPM/concurrency): for attempt 0..max_parse_retries, key =
   ``cache_key(identity, messages, attempt)``; a key already in ``teacher_calls`` is a cache hit (no
   call); otherwise check the budget, call the teacher, and commit in ONE transaction the ledger row
   (``distill.teachers.ledger``) and (when the answer parses, or when this was the last attempt) the
   labels row. An answer that does not parse is stored as a ``parse_error`` call and re-asked with the
   next attempt's key. Nothing is counted done before its commit, so ``kill -9`` loses at most the calls
   in flight - and those are sent again with the same Idempotency-Key, so a provider that honours it
   does not charge twice;
5. ensembles: label with each member (their own rows), then write one combined label per input.

Probabilities for classify (``labels.probs`` / ``confidence``), in order of preference:
- ``reply.label_probs`` (a local teacher that scored every label): exact, renormalised over the labels;
- n > 1 samples: vote shares among the samples that parsed;
- logprobs of one sample: confidence = exp(sum of the log-probabilities of the answer's tokens), the
  probability the teacher gave to the exact answer string. probs is an approximation from the
  first answer token's top_logprobs: each alternative token's probability goes to the labels whose name
  starts with that token (split equally between labels that share it), renormalised over the labels.
  It ignores later tokens, so labels with a common first token ("neg" in negative/negation) are not
  told apart; when no alternative matches a label, probs is None.
``agreement`` is the share of the n samples whose answer equals the first sample's (n > 1 only).

Several labellers on one project (a shared store: ``DISTILL_DB_URL=postgresql://...``, see distill.store_pg): no
file lock, every labeller plans all the work, and before paying for a key it takes the key's claim in
``teacher_claims`` (``ledger.claim``, one transaction under the project's write lock). A key claimed by another
labeller is skipped (that labeller writes its label; counted in ``claimed_elsewhere``), a key recorded meanwhile is
a cache hit, so no input is paid twice. Claims are renewed every ``CLAIM_RENEW_S`` while their calls run and are
taken over ``CLAIM_TTL_S`` after their labeller died; the budget check reads the shared ledger as often, so
together the labellers stay within ``--budget`` (up to the calls each has in flight).

asyncio + httpx: all sqlite writes happen in the event-loop thread (sqlite3 connections are
single-thread), and each is synchronous, so cancellation (Ctrl-C) can never interrupt half a transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distill.errors import DistillError
from distill.fewshot import FewShot, teacher_prompts
from distill.project import Project
from distill.ratelimit import Limiter, estimate_prompt_tokens
from distill.redact import redact
from distill.task import (DEFAULT_SYSTEM, ParseError, ProjectSpec, TeacherSpec, answer_key, cache_keys, parse_answer,
                          split_rationale)
from distill.teachers import make_teacher
from distill.teachers.base import NoAnswer, Teacher, TeacherAuthError, TeacherReply, TeacherRequest, TeacherUnavailable
from distill.teachers.ensemble import MemberAnswer, combine
from distill.teachers.ledger import (claim, claim_owner, cost_of, record_call, release, renew, reply_from_row,
                                      upsert_label)

SPLITS = ("train", "validation", "test")
# A single TeacherUnavailable is one input whose retries ran out (left unlabelled, retried next run). This
# many in a row with no success in between means the teacher is down: stop instead of burning retries.
MAX_CONSECUTIVE_UNAVAILABLE = 3
# Shared stores: a labeller renews its claims this often; a claim not renewed for CLAIM_TTL_S is a dead labeller's.
# (RENEW is also below serve's shortest claim ttl, 2 x teacher_timeout + 5 s, so a replica never takes one over.)
CLAIM_RENEW_S = 2.0
CLAIM_TTL_S = 30.0

_console = Console(stderr=True)


@dataclass
class LabelReport:
    teacher: str
    total: int = 0                    # examples in the requested splits
    already_labelled: int = 0         # had a current ok label; not touched
    cache_hits: int = 0               # attempts answered from teacher_calls (no call)
    calls: int = 0                    # paid calls made by this run
    ok: int = 0                       # inputs that ended this run with an ok label
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    spend: float = 0.0                # USD of this run's calls
    elapsed_s: float = 0.0
    stopped: str | None = None        # None | 'budget' | 'interrupted' | 'auth' | 'teacher_unavailable'
    budget: float | None = None
    ledger_spend: float = 0.0         # the teacher's total spend in the store after this run (what --budget caps)
    retries: int = 0                  # transport retries (429/5xx/timeouts) inside the calls
    tokens_in: int = 0
    tokens_out: int = 0
    members: list["LabelReport"] = field(default_factory=list)   # ensemble: one report per member
    claimed_elsewhere: int = 0        # shared store: inputs another labeller was paying for (it writes their labels)
    batch: dict[str, Any] | None = None   # Batch API teachers: distill.teachers.batch.BatchReport as a dict
    detail: str | None = None         # what a stop means when the generic message would not say (batch)

    def message(self) -> str:
        if self.detail:
            return self.detail
        if self.stopped == "budget":
            return (f"stopped at ${self.ledger_spend:.4f} of ${self.budget:.4f} budget; "
                    f"re-run with a larger --budget to continue")
        if self.stopped == "interrupted":
            return "interrupted; finished work is saved, re-run to continue"
        failed = sum(self.failed_by_reason.values())
        b = self.batch
        via_batch = (f"{b['answered']} answered by {len(b['batches'])} batch(es), "
                     f"{sum(b['retry_online'].values())} retried online, " if b and b["batches"] else "")
        return (f"{self.teacher}: {self.ok} ok, {failed} failed, {self.already_labelled} already labelled; "
                f"{via_batch}{self.calls} calls, {self.cache_hits} cache hits, ${self.spend:.4f}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the recipe --------------------------------------------------------------------------------------


def label(project: Project, teacher: str | None = None, *, budget: float | None = None, limit: int | None = None,
          splits: Iterable[str] = SPLITS, ids: Iterable[str] | None = None, accept_terms: bool = False,
          wait: bool = False, progress: bool = True, detach: bool = False) -> LabelReport:
    """Label every input of ``splits`` with ``teacher`` (default: the project's). See the module docstring.

    ``budget`` caps the teacher's *total* ledger spend in USD (all runs), so re-running with a larger budget
    continues. It is never exceeded: a call starts only if the spend so far, plus the worst-case estimate of
    every call in flight, plus this call's worst-case estimate (prompt + max_tokens * n) fits. Near the
    limit a run therefore stops up to ``concurrency`` worst-case calls below the budget. ``limit`` caps the number of inputs worked on in this
    run. ``ids`` restricts the work to those inputs of ``splits`` (``distill teacher check`` labels its gold sample
    this way, so a later full run answers them from the cache). Raises DistillError when the teacher rejects the
    key or is down (work already committed is kept). ``detach``: a Batch API teacher (``batch: true``) submits its
    batches, or checks on running ones, and returns instead of waiting for them (distill.teachers.batch)."""
    tspec = project.spec.get_teacher(teacher)
    splits = _check_splits(splits)
    if budget is not None and budget < 0:
        raise DistillError(f"--budget must be >= 0, got {budget}")
    # labellers of a shared store run together, except with a Batch API teacher: its batches are planned for the
    # whole project without per-key claims, so it labels alone
    batch = tspec.batch or any(project.spec.get_teacher(m).batch for m in tspec.members)
    with project.exclusive("label", wait=wait, shared=not batch):
        members = [project.spec.get_teacher(m) for m in tspec.members] if tspec.kind == "ensemble" else [tspec]
        for m in members:
            check_terms(m, accept_terms)
        scope = [m.name for m in members]
        if tspec.kind != "ensemble":
            return _label_one(project, tspec, budget=budget, budget_scope=scope, limit=limit, splits=splits,
                              ids=ids, progress=progress, detach=detach)
        report = LabelReport(teacher=tspec.name, budget=budget)
        t0 = time.monotonic()
        for m in members:
            r = _label_one(project, m, budget=budget, budget_scope=scope, limit=limit, splits=splits,
                           ids=ids, progress=progress, detach=detach)
            report.members.append(r)
            for f in ("calls", "cache_hits", "spend", "retries", "tokens_in", "tokens_out"):
                setattr(report, f, getattr(report, f) + getattr(r, f))
            report.ledger_spend = r.ledger_spend
            if r.stopped:
                report.stopped = r.stopped
                break
        write_ensemble_labels(project, tspec, splits, report)
        report.elapsed_s = time.monotonic() - t0
        return report


def _label_one(project: Project, tspec: TeacherSpec, *, budget: float | None, budget_scope: list[str],
               limit: int | None, splits: tuple[str, ...], ids: Iterable[str] | None,
               progress: bool, detach: bool = False) -> LabelReport:
    limiter = Limiter.from_spec(tspec)
    teacher = make_teacher(tspec, project, limiter)
    batch = None
    if tspec.batch:
        # Batch API first: it puts its answers in teacher_calls under the online keys; the online run below then
        # writes every label from that cache and asks online only what the batches did not answer
        from distill.teachers.batch import BatchItem, run_batches

        planner = _Run(project, tspec, teacher, limiter, budget, budget_scope, limit, splits, False,
                       None if ids is None else set(ids))
        todo = list(planner.plan())
        batch = run_batches(project, tspec, teacher, [BatchItem(i.keys, i.messages, i.labels) for i in todo],
                            budget=budget, spent=planner.store_spend, detach=detach, progress=progress)
        if batch.stopped:         # still running (--detach) or refused by --budget: nothing for the online run
            asyncio.run(teacher.aclose())
            return LabelReport(teacher=tspec.name, total=planner.report.total, stopped=batch.stopped,
                               already_labelled=planner.report.already_labelled, budget=budget, batch=batch.to_dict(),
                               detail=batch.detail, spend=batch.spend, tokens_in=batch.tokens_in,
                               tokens_out=batch.tokens_out, ledger_spend=planner.store_spend())
        ids = [i.id for i in todo]     # the online run works on the inputs the batches did (--limit holds)
    report = label_with(project, tspec, teacher, limiter=limiter, budget=budget, budget_scope=budget_scope,
                        limit=limit, splits=splits, ids=ids, progress=progress)
    if batch is not None:
        # the online run wrote the batch answers' labels as cache hits; their cost is this run's spend, and what
        # was labelled before this run is what the planner found (the online run saw only the batches' inputs)
        report.batch = batch.to_dict()
        report.total, report.already_labelled = planner.report.total, planner.report.already_labelled
        report.spend += batch.spend
        report.tokens_in += batch.tokens_in
        report.tokens_out += batch.tokens_out
    return report


def label_with(project: Project, tspec: TeacherSpec, teacher: Teacher, *, limiter: Limiter | None = None,
               budget: float | None = None, budget_scope: list[str] | None = None, limit: int | None = None,
               splits: Iterable[str] = SPLITS, ids: Iterable[str] | None = None,
               progress: bool = False) -> LabelReport:
    """Label with an already-built ``teacher`` object (no lock, no terms check: ``label`` does those).
    Useful to drive any Teacher implementation, e.g. a test double. Closes the teacher when done."""
    run = _Run(project, tspec, teacher, limiter or Limiter.from_spec(tspec), budget,
               budget_scope or [tspec.name], limit, _check_splits(splits), progress,
               None if ids is None else set(ids))
    report = asyncio.run(run.main())
    if run.fatal is not None:
        e = run.fatal     # its message may quote the provider's error body: redacted (distill.redact)
        raise type(e)(redact(e.message), hint=redact((e.hint + "; " if e.hint else "")
                      + f"{report.ok} labels and {report.calls} calls from this run are saved; re-run to continue"))
    return report


def check_terms(tspec: TeacherSpec, accept_terms: bool) -> None:
    terms = tspec.terms
    where = f" ({terms.url})" if terms.url else ""
    if terms.outputs_may_train_models is False and not accept_terms:
        raise DistillError(
            f"teacher '{tspec.name}': its terms{where} do not allow training models on its outputs "
            f"(distill.yaml: teachers[{tspec.name}].terms.outputs_may_train_models is false)",
            hint="use another teacher, or pass --accept-terms if you have permission (recorded with the data)",
        )
    if terms.outputs_may_train_models is None:
        _console.print(f"[yellow]warning[/]: teacher '{tspec.name}': terms.outputs_may_train_models is not set; "
                       f"check the provider's terms{where} and set it in distill.yaml")


def _check_splits(splits: Iterable[str]) -> tuple[str, ...]:
    out = tuple(splits)
    bad = [s for s in out if s not in SPLITS]
    if bad or not out:
        raise DistillError(f"unknown split(s) {bad or '(none given)'}", hint=f"use some of {list(SPLITS)}")
    return out


# -- one run against one teacher ---------------------------------------------------------------------


@dataclass
class _Item:
    id: str
    messages: list[dict[str, str]]
    keys: list[str]                   # one per attempt
    labels: list[str] | None = None   # classify: the candidates (all labels, or a few-shot shortlist)


PLAN_PAGE = 1000     # inputs read at a time: the plan's memory does not grow with the project
RENDER_BATCH = 32    # inputs rendered and hashed at a time (see Plan.pages)
PLAN_VERSION = 1     # bump when prompts or cache keys change in a way the fingerprint's parts cannot show


def prompt_fingerprint(project: Project, tspec: TeacherSpec, fewshot: FewShot | None) -> str:
    """What every input's prompt and cache keys depend on besides the input itself (its text, segment and meta,
    which never change once stored): the teacher's identity and attempts, the task's templates, labels, schema
    and description, the default system prompt, the few-shot settings and pool, and, as a check on the code
    that renders them, the whole prompt of the project's oldest input."""
    spec = project.spec
    probe = project.store.q("SELECT id, text, segment, meta FROM examples ORDER BY created_at, id LIMIT 1")
    parts = {
        "version": PLAN_VERSION, "identity": tspec.identity(), "attempts": tspec.parse_retries + 1,
        "kind": spec.kind, "description": spec.description, "prompt": spec.prompt.model_dump(mode="json"),
        "labels": [lab.model_dump(mode="json") for lab in spec.labels], "schema": spec.json_schema,
        "default_system": DEFAULT_SYSTEM[spec.kind], "fewshot": None if fewshot is None else fewshot.fingerprint(),
        "probe": [tp.messages for tp in teacher_prompts(project, probe, rationale=tspec.rationale,
                                                        fewshot=fewshot or False)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Plan:
    """The work of a labelling run: the inputs of ``splits`` (or of ``ids``) whose ok label is not current, a
    page at a time (``pages``), in id order, at most ``limit`` of them. ``total`` and ``already_labelled``
    count the inputs and the current labels (``already_labelled`` grows as pages find more).

    Incremental: ``label_plans`` keeps, per ok label, the fingerprint its key was made under and the key's first
    16 characters. A label whose row matches the current fingerprint and its own key is current without a render
    (counted in one query); every other input is rendered and hashed as before, and a label found current that
    way is remembered under the current fingerprint, so the next run skips it. Another writer of ``labels``
    (relabel, an ensemble) changes the key, so its rows are rendered again, never trusted."""

    def __init__(self, project: Project, tspec: TeacherSpec, splits: tuple[str, ...] = SPLITS,
                 ids: Iterable[str] | None = None, limit: int | None = None):
        self.project, self.tspec, self.splits, self.limit = project, tspec, splits, limit
        self.ids = None if ids is None else sorted(set(ids))
        self.fewshot = FewShot.for_project(project)
        self.fingerprint = prompt_fingerprint(project, tspec, self.fewshot)
        self.identity = tspec.identity()
        if set(splits) == set(SPLITS):
            # every split (the usual run): no condition on the example, so SQLite reads the id index alone and
            # touches an example's row only for inputs it renders (the rows lie in import order, not id order:
            # reading each one cost 10 of the 16 s of a re-run at 1M inputs)
            self._where, self._args = "1 = 1", ()
        else:
            # `|| ''`: without statistics SQLite would read a page through the index on split and sort all the
            # rows after it by id, every page (quadratic in the project's size); this way it walks the primary key
            self._where, self._args = f"e.split || '' IN ({','.join('?' * len(splits))})", tuple(splits)
        joins = ("FROM examples e LEFT JOIN labels l ON l.example_id = e.id AND l.teacher = ? "
                 "LEFT JOIN label_plans p ON p.example_id = e.id AND p.teacher = ?")
        self._from = (joins, (tspec.name, tspec.name))
        self._current = "(l.status = 'ok' AND p.fingerprint = ? AND p.key16 = substr(l.call_key, 1, 16))"
        self.total = sum(self._count("", chunk) for chunk in self._id_chunks())
        self.already_labelled = sum(self._count(f"AND {self._current} IS TRUE", chunk, (self.fingerprint,))
                                    for chunk in self._id_chunks())

    def _id_chunks(self) -> list[list[str] | None]:
        if self.ids is None:
            return [None]
        return [self.ids[i:i + 500] for i in range(0, len(self.ids), 500)]

    def _count(self, cond: str, chunk: list[str] | None, extra: tuple = ()) -> int:
        only = "" if chunk is None else f"AND e.id IN ({','.join('?' * len(chunk))})"
        return self.project.store.one(
            f"SELECT COUNT(*) {self._from[0]} WHERE {self._where} {only} {cond}",
            (*self._from[1], *self._args, *(chunk or ()), *extra))

    def _rows(self) -> Iterator[list[Any]]:
        """The inputs whose label is not known current, a page at a time (keyset pagination on the id)."""
        for chunk in self._id_chunks():
            only = "" if chunk is None else f"AND e.id IN ({','.join('?' * len(chunk))})"
            last = ""
            while True:
                rows = self.project.store.q(
                    f"""SELECT e.id, e.text, e.segment, e.meta, l.status AS lstatus, l.call_key {self._from[0]}
                        WHERE {self._where} {only} AND e.id > ? AND {self._current} IS NOT TRUE
                        ORDER BY e.id LIMIT ?""",
                    (*self._from[1], *self._args, *(chunk or ()), last, self.fingerprint, PLAN_PAGE))
                if not rows:
                    break
                last = rows[-1]["id"]
                yield rows

    def pages(self) -> Iterator[list[_Item]]:
        """The work in small pages (RENDER_BATCH inputs rendered at a time, read PLAN_PAGE at a time): the labeller
        plans while it labels, in the same event loop, and a long pause there is request quota the RPM limiter
        cannot give back; a page of RENDER_BATCH takes a few milliseconds."""
        left = self.limit
        for rows in self._rows():
            current = []
            for at in range(0, len(rows), RENDER_BATCH):
                if left is not None and left <= 0:
                    break
                batch = rows[at:at + RENDER_BATCH]
                todo = []
                # few-shot demonstrations (if any) are chosen once per input and kept, so the keys stay put
                prompts = teacher_prompts(self.project, batch, rationale=self.tspec.rationale,
                                          fewshot=self.fewshot or False)
                for r, tp in zip(batch, prompts):
                    keys = cache_keys(self.identity, tp.messages, self.tspec.parse_retries + 1)
                    if r["lstatus"] == "ok" and r["call_key"] in keys:
                        current.append((r["id"], r["call_key"]))
                    else:
                        todo.append(_Item(r["id"], tp.messages, keys, tp.labels))
                if left is not None:
                    todo, left = todo[:left], left - len(todo[:left])
                if todo:
                    yield todo
            if current and not self.project.store.readonly:
                with self.project.store.tx() as c:
                    for ex_id, key in current:
                        self.remember(c, ex_id, key)
            self.already_labelled += len(current)
            if left is not None and left <= 0:
                return

    def remember(self, c: Any, example_id: str, key: str) -> None:
        """Inside the transaction that writes (or confirms) an ok label made with ``key``."""
        c.execute("INSERT OR REPLACE INTO label_plans(example_id, teacher, fingerprint, key16) VALUES(?,?,?,?)",
                  (example_id, self.tspec.name, self.fingerprint, key[:16]))


def plan(project: Project, teacher: str | TeacherSpec | None = None, *, splits: Iterable[str] = SPLITS,
         ids: Iterable[str] | None = None, limit: int | None = None) -> Plan:
    """The inputs ``distill label`` would work on now (see ``Plan``), without calling the teacher."""
    tspec = teacher if isinstance(teacher, TeacherSpec) else project.spec.get_teacher(teacher)
    return Plan(project, tspec, _check_splits(splits), ids, limit)


class _Run:
    def __init__(self, project: Project, tspec: TeacherSpec, teacher: Teacher, limiter: Limiter,
                 budget: float | None, budget_scope: list[str], limit: int | None, splits: tuple[str, ...],
                 progress: bool, ids: set[str] | None = None):
        self.project, self.spec, self.store = project, project.spec, project.store
        self.tspec, self.teacher, self.limiter = tspec, teacher, limiter
        self.budget, self.limit, self.splits, self.show_progress = budget, limit, splits, progress
        self.budget_scope = budget_scope
        self.ids = ids                    # None = every input of the splits
        self.report = LabelReport(teacher=tspec.name, budget=budget)
        self.fatal: DistillError | None = None
        self.bug: BaseException | None = None
        self.spent_before = 0.0           # ledger spend of the budget's teachers when this run started
        self.reserved = 0.0               # estimated cost of calls in flight (counted against the budget)
        self.consecutive_unavailable = 0
        self.inflight: dict[str, asyncio.Future] = {}   # key -> reply, so identical prompts are paid once
        self.latency_sum, self.latency_n = 0.0, 0     # the mean latency so far (per-hour priced teachers)
        self.planner: Plan | None = None              # set by plan_pages
        # shared store: who holds this run's claims in teacher_claims (None: SQLite, one labeller under the file lock)
        self.claim_owner = claim_owner("label") if self.store.shared else None

    # -- plan -----------------------------------------------------------------------------------------
    def plan_pages(self) -> Iterator[list[_Item]]:
        """The work, a page at a time (``Plan``); the report's total and already_labelled follow it."""
        self.planner = Plan(self.project, self.tspec, self.splits, self.ids, self.limit)
        self.report.total, self.report.already_labelled = self.planner.total, self.planner.already_labelled
        for page in self.planner.pages():
            self.report.already_labelled = self.planner.already_labelled
            yield page
        self.report.already_labelled = self.planner.already_labelled

    def plan(self) -> list[_Item]:
        """All the work at once (the Batch API and Ray paths hand it on whole)."""
        return [item for page in self.plan_pages() for item in page]

    # -- main loop ------------------------------------------------------------------------------------
    async def main(self) -> LabelReport:
        t0 = time.monotonic()
        self.spent_before = self.store_spend()
        pages = self.plan_pages()           # streamed: a page is planned when the one before is under way
        first = next(pages, [])             # (planning it sets the report's total and already_labelled)
        bar = _progress_bar(self.show_progress)
        work = self.report.total - self.report.already_labelled
        task_id = bar.add_task(self._describe(t0), total=min(work, self.limit) if self.limit is not None else work) \
            if bar else None
        tasks: set[asyncio.Task] = set()
        shown = {"at": 0.0, "ended": 0, "current": self.report.already_labelled}

        def show(force: bool = False) -> None:
            # at most ~10 updates a second: at hundreds of inputs a second, one per input costs the event loop
            now = time.monotonic()
            if bar and (force or now - shown["at"] > 0.1):
                found = self.report.already_labelled - shown["current"]     # current labels the pages found
                bar.update(task_id, advance=shown["ended"] + found, description=self._describe(t0))
                shown.update(at=now, ended=0, current=self.report.already_labelled)

        def done(t: asyncio.Task) -> None:
            self.limiter.slots.release()
            tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and self.bug is None:
                self.bug = t.exception()
                self.report.stopped = self.report.stopped or "error"
            # advance for inputs that ended (ok or failed), not for those a stop left undone
            shown["ended"] += not t.cancelled() and t.exception() is None and bool(t.result())
            show()

        keep = asyncio.create_task(self.keep_claims()) if self.claim_owner is not None else None
        try:
            if bar:
                bar.start()
            for item in itertools.chain(first, itertools.chain.from_iterable(pages)):
                await self.limiter.slots.acquire()
                if self.report.stopped:
                    self.limiter.slots.release()
                    break
                t = asyncio.create_task(self.process(item))
                tasks.add(t)
                t.add_done_callback(done)
            # let the calls in flight finish and commit, also after a stop (budget, auth, teacher down)
            await asyncio.gather(*list(tasks), return_exceptions=True)
        except asyncio.CancelledError:
            # Ctrl-C: asyncio.run cancels us. Finished inputs are committed already; abandon the ones in flight
            # (their calls are re-sent with the same Idempotency-Key next time).
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*list(tasks), return_exceptions=True)
            self.report.stopped = "interrupted"
        finally:
            pages.close()
            if bar:
                show(force=True)
                bar.stop()
            await self.teacher.aclose()
            if keep is not None:
                keep.cancel()
                try:
                    release(self.store, None, self.claim_owner)    # claims of inputs a stop left undone
                except DistillError:
                    pass        # the store is unreachable: the claims lapse after CLAIM_TTL_S
        if self.bug is not None:
            raise self.bug
        self.report.elapsed_s = time.monotonic() - t0
        self.report.ledger_spend = self.store_spend()
        return self.report

    async def keep_claims(self) -> None:
        """Shared store: renew this run's claims, and re-read the ledger so the budget counts other labellers' spend."""
        while True:
            await asyncio.sleep(CLAIM_RENEW_S)
            try:
                renew(self.store, self.claim_owner)
                self.spent_before = self.store_spend() - self.report.spend
            except DistillError as e:      # the next renewal may get through; a claim lapses only after CLAIM_TTL_S
                _console.print(f"[yellow]warning[/]: could not renew this labeller's claims: {e.message}")

    def store_spend(self) -> float:
        marks = ",".join("?" * len(self.budget_scope))
        return float(self.store.one(f"SELECT COALESCE(SUM(cost),0) FROM teacher_calls WHERE teacher IN ({marks})",
                                    tuple(self.budget_scope)))

    def _describe(self, t0: float) -> str:
        r = self.report
        rate = r.calls / max(1e-9, time.monotonic() - t0)
        return f"{self.tspec.name}: {r.calls} calls ({rate:.1f}/s) {r.cache_hits} cached ${r.spend:.4f}"

    # -- one input ------------------------------------------------------------------------------------
    async def process(self, item: _Item) -> bool:
        """Work one input through its attempts; True when it ended with an ok or failed label."""
        for attempt, key in enumerate(item.keys):
            last = attempt == len(item.keys) - 1
            row = self.store.get_call(key)
            if row is not None:
                self.report.cache_hits += 1
                reply, paid = reply_from_row(row), False
            elif key in self.inflight:
                # the same prompt is being asked right now for another input: share that answer. The
                # owner commits the call row before we resume (no await between its reply and its commit).
                try:
                    reply = await asyncio.shield(self.inflight[key])
                except Exception:
                    return False
                self.report.cache_hits += 1
                paid = False
            elif self.claim_owner is not None and not claim(self.store, key, self.claim_owner, CLAIM_TTL_S):
                row = self.store.get_call(key)      # recorded by another labeller since our lookup: a cache hit
                if row is None:
                    self.report.claimed_elsewhere += 1    # being paid for elsewhere; that labeller writes the label
                    return False
                self.report.cache_hits += 1
                reply, paid = reply_from_row(row), False
            else:
                try:
                    reply = await self.call(item, key)
                except NoAnswer as e:
                    # nothing was paid: no ledger row, a failed label with the teacher's reason
                    with self.store.tx() as c:
                        upsert_label(c, item.id, self.tspec.name, status="failed", reason=redact(e.reason),
                                     call_key=None)
                    self.fail(redact(e.reason))
                    return True
                if reply is None:
                    return False
                paid = True
            try:
                # with a rationale the answer is the part after 'Answer:' (split_rationale; a text without
                # one is the answer as a whole)
                answer = parse_answer(self.spec, split_rationale(reply.texts[0])[1] if reply.texts else None)
            except ParseError as e:
                with self.store.tx() as c:
                    if paid:
                        self.insert_call(c, item, key, attempt, reply, "parse_error", e.reason)
                    if last:
                        upsert_label(c, item.id, self.tspec.name, status="failed", reason=e.reason, call_key=key)
                if last:
                    self.fail(e.reason)
                    return True
                continue
            fields = label_fields(self.spec, reply, answer)
            with self.store.tx() as c:
                if paid:
                    self.insert_call(c, item, key, attempt, reply, "ok", None)
                upsert_label(c, item.id, self.tspec.name, status="ok", call_key=key, **fields)
                if self.planner is not None:      # the fingerprint this key was made under: next plan skips it
                    self.planner.remember(c, item.id, key)
            self.report.ok += 1
            return True
        return True   # not reached: the last attempt returns above

    async def call(self, item: _Item, key: str) -> TeacherReply | None:
        """One paid call; None when the input is left for another run (stop, auth, teacher down), NoAnswer
        when the teacher says it can never answer this input."""
        if self.report.stopped:
            return None
        estimate = self.estimate_cost(item.messages)
        if self.budget is not None and self.spent_before + self.report.spend + self.reserved + estimate > self.budget:
            self.report.stopped = "budget"
            return None
        self.reserved += estimate
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            req = TeacherRequest(key=key, messages=item.messages, kind=self.spec.kind, labels=item.labels)
            reply = await self.teacher.ask(req)
        except NoAnswer as e:
            fut.set_exception(e)
            raise
        except TeacherAuthError as e:
            self.fatal, self.report.stopped = e, "auth"
            fut.set_exception(e)
            return None
        except TeacherUnavailable as e:
            self.fail("teacher_unavailable")
            self.consecutive_unavailable += 1
            if self.consecutive_unavailable >= MAX_CONSECUTIVE_UNAVAILABLE and self.fatal is None:
                self.fatal, self.report.stopped = e, "teacher_unavailable"
            fut.set_exception(e)
            return None
        except BaseException:
            fut.cancel()
            raise
        finally:
            self.reserved -= estimate
            self.inflight.pop(key, None)
            if self.claim_owner is not None and fut.done():    # no answer (a reply is set below): let others try
                release(self.store, key, self.claim_owner)
            if fut.done() and not fut.cancelled():
                fut.exception()   # mark it retrieved: usually nobody else waits for this key
        self.consecutive_unavailable = 0
        self.report.calls += 1
        self.report.retries += reply.retries
        self.latency_sum += reply.latency_s
        self.latency_n += 1
        fut.set_result(reply)
        return reply

    def estimate_cost(self, messages: list[dict[str, str]]) -> float:
        """Upper-ish estimate before a call: estimated prompt tokens, the full max_tokens for each of the n
        samples, and (for per-hour priced local teachers) the mean latency so far."""
        lat = self.latency_sum / self.latency_n if self.latency_n else 0.0
        return cost_of(self.tspec, estimate_prompt_tokens(messages), self.tspec.max_tokens * self.tspec.n, lat)

    def insert_call(self, c, item: _Item, key: str, attempt: int, reply: TeacherReply, status: str,
                    error: str | None) -> None:
        # a teacher's error text may quote the API key: nothing unredacted goes into the store
        cost = record_call(c, self.tspec, key, attempt, item.messages, reply, status, redact(error))
        if self.claim_owner is not None:
            c.execute("DELETE FROM teacher_claims WHERE key=?", (key,))     # recorded: the claim has done its job
        # counted only here, i.e. inside the transaction that records the call
        self.report.spend += cost
        self.report.tokens_in += reply.tokens_in
        self.report.tokens_out += reply.tokens_out

    def fail(self, reason: str) -> None:
        self.report.failed_by_reason[reason] = self.report.failed_by_reason.get(reason, 0) + 1


# -- plain functions shared by the run and the ensemble ------------------------------------------------


def _progress_bar(show: bool) -> Progress | None:
    if not show:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=_console)


def label_fields(spec: ProjectSpec, reply: TeacherReply, answer: Any) -> dict[str, Any]:
    """Everything the labels row holds besides status/key, for an answer that parsed."""
    rationale, answer_text = split_rationale(reply.texts[0])
    samples = None
    agreement = None
    if len(reply.texts) > 1:
        samples = [_try_parse(spec, t) for t in reply.texts]
        key = answer_key(spec, answer)
        agreement = sum(1 for s in samples if s is not None and answer_key(spec, s) == key) / len(samples)
    probs, confidence = None, None
    if spec.kind == "classify" and reply.label_probs:
        probs = _normalise({n: float(reply.label_probs.get(n, 0.0)) for n in spec.label_names})
        confidence = probs.get(answer) if probs else None
    elif spec.kind == "classify" and samples is not None:
        parsed = [s for s in samples if s is not None]
        probs = {n: sum(1 for s in parsed if s == n) / len(parsed) for n in spec.label_names}
        confidence = probs[answer]
    elif reply.logprobs:
        span = answer_token_span(reply.logprobs, answer_text)
        confidence = math.exp(sum(reply.logprobs[i]["logprob"] for i in span)) if span else None
        if spec.kind == "classify" and span:
            probs = first_token_distribution(reply.logprobs[span[0]], spec.label_names)
    return {"answer": answer, "probs": probs, "confidence": confidence, "agreement": agreement,
            "samples": samples, "rationale": rationale, "logprobs": reply.logprobs}


def _try_parse(spec: ProjectSpec, text: str) -> Any:
    try:
        return parse_answer(spec, split_rationale(text)[1])
    except ParseError:
        return None


def _normalise(d: dict[str, float]) -> dict[str, float] | None:
    total = sum(d.values())
    return {k: v / total for k, v in d.items()} if total > 0 else None


def answer_token_span(logprobs: list[dict[str, Any]], answer_text: str) -> list[int]:
    """Indices of the tokens that spell ``answer_text`` (the last occurrence in the generated text, since a
    rationale comes first). Falls back to every token when the answer is not found verbatim."""
    tokens = [t.get("token", "") for t in logprobs]
    joined = "".join(tokens)
    start = joined.rfind(answer_text) if answer_text else -1
    if start < 0:
        return list(range(len(tokens)))
    end = start + len(answer_text)
    span, pos = [], 0
    for i, tok in enumerate(tokens):
        if pos < end and pos + len(tok) > start:
            span.append(i)
        pos += len(tok)
    return span


def first_token_distribution(position: dict[str, Any], labels: list[str]) -> dict[str, float] | None:
    """Approximate p(label) from the alternatives at the answer's first token (see module docstring)."""
    alts = {a["token"]: a["logprob"] for a in position.get("top_logprobs") or []}
    alts.setdefault(position.get("token", ""), position.get("logprob", -math.inf))
    mass = {n: 0.0 for n in labels}
    for tok, lp in alts.items():
        t = tok.strip().lower()
        if not t:
            continue
        hits = [n for n in labels if n.lower().startswith(t) or t.startswith(n.lower())]
        for n in hits:
            mass[n] += math.exp(lp) / len(hits)
    return _normalise(mass)


def write_ensemble_labels(project: Project, tspec: TeacherSpec, splits: tuple[str, ...],
                          report: LabelReport) -> None:
    """One combined label per input for which every member has a label row (ok or failed)."""
    store, spec = project.store, project.spec
    members = tspec.members
    marks, mmarks = ",".join("?" * len(splits)), ",".join("?" * len(members))
    rows = store.q(
        f"""SELECT e.id, l.teacher, l.status, l.answer, l.probs FROM examples e
            JOIN labels l ON l.example_id = e.id WHERE e.split IN ({marks}) AND l.teacher IN ({mmarks})""",
        (*splits, *members))
    by_ex: dict[str, dict[str, Any]] = {}
    for r in rows:
        by_ex.setdefault(r["id"], {})[r["teacher"]] = r
    report.total = store.one(f"SELECT COUNT(*) FROM examples WHERE split IN ({marks})", splits)
    with store.tx() as c:
        for ex_id, got in by_ex.items():
            if len(got) < len(members):
                continue      # a member has not finished this input yet (budget/limit): combine next run
            answers = []
            for m in members:
                r = got[m]
                ok = r["status"] == "ok"
                answers.append(MemberAnswer(m, json.loads(r["answer"]) if ok else None,
                                            json.loads(r["probs"]) if ok and r["probs"] else None))
            comb = combine(spec, answers)
            if comb is None:
                upsert_label(c, ex_id, tspec.name, status="failed", reason="no_member_answer")
                report.failed_by_reason["no_member_answer"] = report.failed_by_reason.get("no_member_answer", 0) + 1
                continue
            upsert_label(c, ex_id, tspec.name, status="ok", answer=comb.answer, probs=comb.probs,
                         confidence=comb.confidence, agreement=comb.agreement, samples=comb.samples)
            report.ok += 1
