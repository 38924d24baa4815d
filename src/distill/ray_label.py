"""Labelling with a local teacher on Ray Data: one model per actor, results streamed to one store writer.

    distill label PROJECT --engine ray                      # a local Ray on this machine, 2 actors
    distill label PROJECT --engine ray --actors 8 --ray-address HEAD:6379   # your cluster

Why: a local teacher (``kind: local``) answers one input at a time in one process. Ray Data's
``map_batches`` with a callable class runs a pool of actors, each holding its own copy of the model, and
streams their answers back as batches finish. Everything that decides what is stored stays in this
(driver) process, so the store keeps exactly one writer and needs no new locking:

1. take the project lock and check the teacher's terms, as ``distill label``;
2. plan with the labeller itself (``labeling._Run.plan``): the same inputs, prompts and cache keys. A local
   teacher decodes greedily, so it is never re-asked (``TeacherSpec.parse_retries`` is 0): one key per input;
3. inputs whose key is already in ``teacher_calls`` are answered from the cache here, never sent; the others
   are sent once per distinct key (identical prompts share one answer, as in-process);
4. the actors answer batches of ``batch_size`` inputs; each answer, as it arrives, goes through the
   labeller's own ``_Run.process`` (cache check, budget, parse, ledger row + labels row in ONE transaction),
   through a stand-in teacher that returns the actor's reply for the key. So keys, ledger rows, costs and
   label rows are written by the code that writes them for ``distill label``.

Crash safety: an input counts as done only when its transaction commits, one input at a time, as the
answers stream in. ``kill -9`` of the driver loses only the answers computed but not yet committed (at most
``actors x (in-flight batches per actor) x batch_size``); the next run plans again and sends only the inputs
without a committed answer. Ray ends the actors of a driver that dies.

Same numbers as in-process? Same keys, answers and rows; the scores (``labels.probs``, ``raw.scores``) can
differ in the last float digits, because an actor uses its own thread count and its own shared-prefix KV
cache (which input came before), and both change the order of float additions. Latency and the per-hour
cost are each actor's own measurements.

Ray is an optional dependency: ``pip install 'distill[ray]'`` (pinned ``ray[data]``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

from rich.console import Console

from distill.errors import DistillError
from distill.labeling import SPLITS, LabelReport, check_terms
# The labeller's own run, plan and progress bar: reused so that the Ray path cannot drift from `distill label`.
from distill.labeling import _check_splits, _Item, _progress_bar, _Run
from distill.project import Project
from distill.ratelimit import Limiter
from distill.redact import redact
from distill.task import TeacherSpec
from distill.teachers.base import TeacherReply, TeacherRequest, TeacherUnavailable

RAY_PIP = "pip install 'distill[ray]'  (or: pip install 'ray[data]==2.60.0')"
# Batches queued per actor besides the one it computes: enough that an actor never waits for work, few
# enough that a kill -9 loses little computed work.
IN_FLIGHT_PER_ACTOR = 2

_console = Console(stderr=True)


@dataclass
class RayConfig:
    actors: int = 2                   # model copies; each loads the whole teacher into its own memory
    address: str | None = None        # a running cluster ("HOST:6379", "ray://HOST:10001"); None = start a local Ray
    batch_size: int = 8               # inputs per actor call; each answer is committed as soon as its batch returns
    cpus_per_actor: float = 1.0       # CPU share (and torch threads) per actor: actors x this <= cores, or they fight
    gpus_per_actor: float = 0.0       # > 0 places each actor on a GPU (the teacher's `device: auto` then picks cuda)
    object_store_mb: int = 256        # local Ray only: the prompts and answers in flight, not the model
    start_timeout_s: int = 600        # every actor must have loaded its model by then (else: too few resources)

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise DistillError(f"--actors must be >= 1, got {self.actors}")
        if self.batch_size < 1:
            raise DistillError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.cpus_per_actor <= 0:
            raise DistillError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor < 0:
            raise DistillError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.start_timeout_s < 1:
            raise DistillError(f"start_timeout_s must be >= 1, got {self.start_timeout_s}")
        if self.object_store_mb < 80:
            raise DistillError(f"object_store_mb must be >= 80 (Ray's minimum), got {self.object_store_mb}")


@dataclass
class RayLabelReport:
    report: LabelReport                # the same report `distill label` gives (calls, cache hits, ok, failed, spend)
    actors: int
    address: str                       # "local" or the cluster's address
    sent: int = 0                      # distinct prompts sent to the actors (inputs already in the cache are not)
    answered: int = 0                  # answers that came back from the actors in this run
    ray_start_s: float = 0.0           # ray.init (and, for a local Ray, starting it)
    first_answer_s: float | None = None   # from the start of the run: Ray, the actors' model loads, one batch
    last_answer_s: float | None = None
    node_ids: list[str] = field(default_factory=list)   # the Ray nodes whose actors answered

    def message(self) -> str:
        return (f"{self.report.message()}; ray: {self.sent} sent to {self.actors} actor(s) on "
                f"{len(self.node_ids)} node(s), {self.answered} answered")


def import_ray():
    """``ray`` with Ray Data, or a DistillError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra: `ray` alone lacks Ray Data's dependencies)
    except ImportError as e:
        raise DistillError(f"--engine ray needs Ray Data, which is not installed ({e})",
                           hint=f"install it: {RAY_PIP}; or label in-process without --engine ray") from None
    return ray


# -- the recipe --------------------------------------------------------------------------------------


def label_ray(project: Project, teacher: str | None = None, *, config: RayConfig | None = None,
              budget: float | None = None, limit: int | None = None, splits: Iterable[str] = SPLITS,
              accept_terms: bool = False, wait: bool = False, progress: bool = True) -> RayLabelReport:
    """Label every input of ``splits`` with the local ``teacher`` on a pool of Ray actors. See the module
    docstring; ``budget``, ``limit``, ``splits``, ``accept_terms`` and ``wait`` mean what they mean for
    ``distill.labeling.label``."""
    cfg = config or RayConfig()
    import_ray()
    tspec = project.spec.get_teacher(teacher)
    if tspec.kind != "local":
        raise DistillError(f"--engine ray runs local teachers; teacher '{tspec.name}' has kind '{tspec.kind}'",
                           hint="label API teachers without --engine ray (their concurrency is the provider's "
                                "rate limit, not this machine)")
    splits = _check_splits(splits)
    if budget is not None and budget < 0:
        raise DistillError(f"--budget must be >= 0, got {budget}")
    with project.exclusive("label", wait=wait):
        check_terms(tspec, accept_terms)
        return _label(project, tspec, cfg, budget=budget, limit=limit, splits=splits, progress=progress)


def _label(project: Project, tspec: TeacherSpec, cfg: RayConfig, *, budget: float | None, limit: int | None,
           splits: tuple[str, ...], progress: bool) -> RayLabelReport:
    streamed = _StreamedTeacher(tspec)
    run = _Run(project, tspec, streamed, Limiter.from_spec(tspec), budget, [tspec.name], limit, splits, False)
    out = RayLabelReport(report=run.report, actors=cfg.actors, address=cfg.address or "local")
    t0 = time.monotonic()
    run.spent_before = run.store_spend()
    todo = run.plan()
    cached, by_key = _partition(project, todo)
    out.sent = len(by_key)
    bar = _progress_bar(progress)
    task_id = bar.add_task(f"{tspec.name} on ray", total=len(todo)) if bar else None
    # one event loop for the run's coroutines; Ray is driven synchronously between them, so Ctrl-C lands
    # between two commits (a transaction interrupted half-way rolls back as a whole)
    loop = asyncio.new_event_loop()

    def settle(item: _Item) -> None:
        ended = loop.run_until_complete(run.process(item))
        if bar:
            bar.update(task_id, advance=1 if ended else 0)

    try:
        if bar:
            bar.start()
        for item in cached:           # answered from teacher_calls: nothing to compute
            settle(item)
        if by_key and not run.report.stopped:
            with _ray_session(cfg, out):
                for key, reply, error, node in _answers(by_key, tspec, project, cfg):
                    out.answered += 1
                    out.last_answer_s = round(time.monotonic() - t0, 3)
                    out.first_answer_s = out.first_answer_s or out.last_answer_s
                    if node not in out.node_ids:
                        out.node_ids.append(node)
                    streamed.put(key, reply, error)
                    for item in by_key.pop(key, []):   # the first pays, the others are cache hits
                        settle(item)
                    if run.report.stopped:    # budget: stop streaming; the rest is planned again next run
                        break
    except KeyboardInterrupt:
        run.report.stopped = "interrupted"
    finally:
        if bar:
            bar.stop()
        loop.close()
    if run.fatal is not None:
        e = run.fatal
        raise type(e)(redact(e.message), hint=redact((e.hint + "; " if e.hint else "") + f"{run.report.ok} labels "
                      f"and {run.report.calls} calls from this run are saved; re-run to continue"))
    run.report.elapsed_s = time.monotonic() - t0
    run.report.ledger_spend = run.store_spend()
    return out


def _partition(project: Project, todo: list[_Item]) -> tuple[list[_Item], dict[str, list[_Item]]]:
    """(inputs the cache answers, {key: inputs} to send, one send per distinct key)."""
    cached, by_key = [], {}
    for item in todo:
        # a local teacher is never re-asked (TeacherSpec.parse_retries == 0): one key per input
        assert len(item.keys) == 1, "local teachers have exactly one attempt"
        if project.store.get_call(item.keys[0]) is not None:
            cached.append(item)
        else:
            by_key.setdefault(item.keys[0], []).append(item)
    return cached, by_key


class _StreamedTeacher:
    """The teacher the labeller's run talks to in the driver: it answers with the reply an actor computed for
    the request's key. Keeps the Teacher protocol, so ``_Run.process`` treats it like any teacher."""

    def __init__(self, spec: TeacherSpec):
        self.spec = spec
        self._replies: dict[str, TeacherReply | str] = {}

    def put(self, key: str, reply: TeacherReply | None, error: str) -> None:
        self._replies[key] = reply if reply is not None else error

    async def ask(self, req: TeacherRequest) -> TeacherReply:
        got = self._replies.pop(req.key, None)
        if got is None:   # only an answer of this run is ever asked for; kept as a guard against a mix-up
            raise TeacherUnavailable(f"teacher '{self.spec.name}': no answer from the Ray actors for {req.key[:12]}")
        if isinstance(got, str):
            # the model failed in the actor (as it would have in-process): stop, as `distill label` does
            raise DistillError(f"teacher '{self.spec.name}' failed in a Ray actor: {got}")
        return got

    async def aclose(self) -> None:
        self._replies.clear()


# -- Ray -----------------------------------------------------------------------------------------------


@contextmanager
def _ray_session(cfg: RayConfig, out: RayLabelReport) -> Iterator[None]:
    """Connect to ``cfg.address``, or start a local Ray sized for the actors; shut it down afterwards."""
    ray = import_ray()
    t0 = time.monotonic()
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if ray.is_initialized():          # the caller's own Ray session (a notebook, a test): use it, leave it up
        owned = False
    elif cfg.address:
        _check_reachable(cfg.address)
        try:
            ray.init(address=cfg.address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise DistillError(f"cannot connect to the Ray cluster at {cfg.address}: {e}",
                               hint="start it with `ray start --head` (workers: `ray start --address HEAD:6379`), "
                                    "or leave out --ray-address to start a local Ray") from None
        owned = True
    else:
        cores = os.cpu_count() or 1
        need = cfg.actors * cfg.cpus_per_actor
        if need > cores:
            _console.print(f"[yellow]warning[/]: {cfg.actors} actors x {cfg.cpus_per_actor:g} CPUs > {cores} cores: "
                           "the actors share cores and each runs slower")
        # loopback only, no dashboard, a small object store: what this machine's labelling needs, nothing more
        ray.init(address="local", num_cpus=max(cores, math.ceil(need)), num_gpus=None,
                 include_dashboard=False, object_store_memory=cfg.object_store_mb << 20,
                 _node_ip_address="127.0.0.1", **quiet)
        owned = True
    out.ray_start_s = round(time.monotonic() - t0, 3)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False          # the labeller's own bar counts committed inputs
    ctx.print_on_execution_start = False
    # start every actor (its model loaded) before the first batch: work is spread over all of them from the
    # start, and a cluster without room for the pool fails with a message instead of waiting forever
    ctx.wait_for_min_actors_s = cfg.start_timeout_s
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)   # "progress bars disabled"
    try:
        yield
    finally:
        if owned:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """A DistillError at once when nothing listens at a HOST:PORT address: ray.init would retry for minutes."""
    if "://" in address or address == "auto":    # Ray Client, or "the cluster this machine runs": Ray knows
        return
    from ray._private.services import canonicalize_bootstrap_address   # the host:port ray.init will dial

    try:
        host, _, port = canonicalize_bootstrap_address(address).rpartition(":")
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise DistillError(f"no Ray cluster answers at {address} ({e})",
                           hint="start one with `ray start --head` and pass the address it prints, or leave out "
                                "--ray-address to start a local Ray") from None


def _answers(by_key: dict[str, list[_Item]], tspec: TeacherSpec, project: Project,
             cfg: RayConfig) -> Iterator[tuple[str, TeacherReply | None, str, str]]:
    """(key, reply or None, error, node id) for each distinct prompt, as the actors finish them."""
    import ray
    import ray.data

    from distill.models import resolve_model
    from distill.teachers.local import LocalTeacher

    # resolve the model here for a clear error before any actor starts; actors get the resolved path (the
    # project folder may not exist on a worker: the model must, at the same path or as a packaged model).
    # The cache keys were made from the teacher as written in distill.yaml; the actors never make keys.
    ref = LocalTeacher(tspec, project)._model_ref()
    resolve_model(ref)
    actor_spec = tspec.model_copy(update={"path": ref})
    rows = [{"key": k, "messages": json.dumps(items[0].messages, ensure_ascii=False),
             "labels": json.dumps(items[0].labels)} for k, items in by_key.items()]
    # one input block per batch: an actor's answers stream back batch by batch, not block by block
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / cfg.batch_size)))
    ds = ds.map_batches(
        TeacherActor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors, max_tasks_in_flight_per_actor=IN_FLIGHT_PER_ACTOR),
        fn_constructor_kwargs={"spec": actor_spec, "kind": project.spec.kind,
                               "threads": max(1, int(cfg.cpus_per_actor))},
        num_cpus=cfg.cpus_per_actor, **({"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor else {}))
    it = iter(ds.iter_rows())
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except DistillError:
            raise
        except ray.exceptions.GetTimeoutError:
            raise DistillError(f"the {cfg.actors} Ray actors did not all start within {cfg.start_timeout_s} s",
                               hint=f"the cluster needs {cfg.actors} x ({cfg.cpus_per_actor:g} CPU"
                                    + (f", {cfg.gpus_per_actor:g} GPU" if cfg.gpus_per_actor else "")
                                    + " and the model's memory) free; use fewer --actors or a bigger cluster") from None
        except Exception as e:        # an actor that could not start (model load) or died: Ray's error, shortened
            raise DistillError(f"Ray labelling failed: {_first_line(e)}",
                               hint="committed answers are kept; fix the cause and re-run to continue") from e
        reply = TeacherReply(**json.loads(row["reply"])) if row["reply"] else None
        yield str(row["key"]), reply, str(row["error"]), str(row["node"])


def _first_line(e: BaseException) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


class TeacherActor:
    """One Ray Data actor: loads the local teacher once, then answers each batch input by input (the model
    itself answers one input at a time; batching is what each actor call carries). Runs in a Ray worker."""

    def __init__(self, spec: TeacherSpec, kind: str, threads: int):
        import ray
        import torch

        # the actor's CPU share: more threads than its cores would fight the other actors on the node
        torch.set_num_threads(threads)
        from distill.teachers.local import LocalTeacher

        self.teacher = LocalTeacher(spec, None)
        self.teacher.load()
        self.kind = kind
        self.node = ray.get_runtime_context().get_node_id()
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"key": [], "reply": [], "error": [], "node": []}
        for key, messages, labels in zip(batch["key"], batch["messages"], batch["labels"]):
            req = TeacherRequest(key=str(key), messages=json.loads(messages), kind=self.kind,
                                 labels=json.loads(labels))
            try:
                reply, error = json.dumps(asdict(self.loop.run_until_complete(self.teacher.ask(req)))), ""
            except Exception as e:    # reported per input; the driver stops the run as `distill label` would
                reply, error = "", f"{type(e).__name__}: {e}"
            out["key"].append(str(key))
            out["reply"].append(reply)
            out["error"].append(error)
            out["node"].append(self.node)
        return out
