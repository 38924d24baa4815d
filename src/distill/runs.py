"""Which model? Trained runs, their evaluations, and the project's **serving model** — the one module that
reads and writes model rows of the ``runs`` table.

Two questions, two answers:

- ``latest_model``: the newest finished training run (the *candidate*). ``distill eval`` scores it by default,
  because you evaluate what you just trained.
- ``serving_model``: what the service may answer with. It is the model named by ``meta.serving_model``,
  set only by a promotion — ``distill iterate`` promoting a model that passed the gate without regressing,
  or ``distill eval`` whose gate passed. A model whose gate failed, or that was never evaluated, is never
  served unless pinned with ``--model`` (and then the answer says so). Every stage that needs a deployable
  model (serve, export, route calibrate, iterate, cost) asks here.

Paths are stored relative to the project folder when they lie inside it, so a copied or moved project
finds its own models, never the original's. Older stores hold absolute paths; those still load, and when the
project has since been copied or moved they resolve to the same file inside *this* project (see
``from_store_path``), so a copy never serves the original's model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.store import Store

SERVING_KEY = "serving_model"        # meta: run id of the serving model
SERVING_WHY_KEY = "serving_why"      # meta: one sentence, why it serves
TRAIN_KIND = {"classify": "train", "extract": "train_lm", "generate": "train_lm"}
MODEL_KINDS = ("train", "train_lm")


@dataclass(frozen=True)
class ModelRef:
    """A model a stage should load: its training run (if known), folder, record, and why it was chosen."""

    run_id: str
    kind: str                  # 'train' (encoder classifier) | 'train_lm' (causal LM) | 'pinned' (unknown run)
    path: Path                 # absolute
    record: dict[str, Any] = field(default_factory=dict, compare=False)
    why: str = ""

    def describe(self) -> str:
        return f"{self.run_id} ({self.path}): {self.why}" if self.why else f"{self.run_id} ({self.path})"


# ------------------------------------------------------------------------------------------------
# paths: relative in the store, absolute in memory


def to_store_path(root: Path, path: str | Path | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute():
        p = Path.cwd() / p
    try:
        return str(p.resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(p.resolve())    # outside the project (e.g. a shared model folder): keep it absolute


def from_store_path(root: Path, stored: str | None) -> Path | None:
    """A stored path as an absolute one: relative paths are under ``root``; an absolute one written by an older
    distill inside a project that has since been copied or moved is mapped into ``root`` (``_relocated``)."""
    if not stored:
        return None
    p = Path(stored)
    if not p.is_absolute():
        return Path(root).resolve() / p
    return _relocated(Path(root).resolve(), p) or p


# the folders under a project's root that runs point into (models, evaluations, rounds, exports)
_RUN_DIRS = ("models", "reports", "rounds", "exports")


def _relocated(root: Path, p: Path) -> Path | None:
    """``OLD/models/r1/final`` -> ``root/models/r1/final`` when OLD is not ``root``, OLD is gone or is a distill
    project (the original of this copy), and the same file exists here. None otherwise: a path outside any
    project (a shared model folder) stays as stored."""
    if p == root or root in p.parents:
        return None
    parts = p.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] not in _RUN_DIRS:
            continue
        old_root, here = Path(*parts[:i]), root.joinpath(*parts[i:])
        if here.exists() and (not old_root.exists() or (old_root / "distill.yaml").is_file()):
            return here
    return None


# ------------------------------------------------------------------------------------------------
# writing runs


def record_run(store: Store, root: Path, run_id: str, kind: str, status: str, path: str | Path | None,
               record: dict[str, Any]) -> None:
    """Insert or replace one run row (its ``created_at`` becomes now)."""
    store.put_run(run_id, kind, status, to_store_path(root, path), record)


def record_eval(store: Store, root: Path, model_run_id: str, json_path: Path, gate_passed: bool,
                extra: dict[str, Any] | None = None) -> str:
    """Register an evaluation of ``model_run_id``; returns the eval run id (``eval-<model run id>``)."""
    eid = f"eval-{model_run_id}"
    record_run(store, root, eid, "eval", "done", json_path,
               {"model_run_id": model_run_id, "gate": {"passed": bool(gate_passed)}, **(extra or {})})
    return eid


# ------------------------------------------------------------------------------------------------
# reading runs


def _row_to_ref(root: Path, row, why: str = "") -> ModelRef:
    return ModelRef(run_id=row["id"], kind=row["kind"], path=from_store_path(root, row["path"]),
                    record=json.loads(row["record"] or "{}"), why=why)


def get_run(store: Store, run_id: str):
    rows = store.q("SELECT * FROM runs WHERE id=?", (run_id,))
    return rows[0] if rows else None


def all_runs(store: Store) -> list:
    """Every run (train, eval, export, iterate), oldest first."""
    return store.q("SELECT * FROM runs ORDER BY created_at")


def train_runs(store: Store, kind: str | None = None, status: str = "done") -> list:
    """Finished model runs, newest first."""
    kinds = (kind,) if kind else MODEL_KINDS
    marks = ",".join("?" * len(kinds))
    return store.q(f"SELECT * FROM runs WHERE kind IN ({marks}) AND status=? ORDER BY created_at DESC",
                   (*kinds, status))


def model_run(store: Store, root: Path, run_id: str) -> ModelRef:
    """A finished training run by id."""
    row = get_run(store, run_id)
    if row is None or row["kind"] not in MODEL_KINDS or row["status"] != "done" or not row["path"]:
        raise DistillError(f"{root}: no finished training run with id {run_id!r}",
                           hint="`distill status PROJECT` lists the runs")
    return _checked(_row_to_ref(root, row, "chosen by run id"))


def latest_model(store: Store, root: Path, task_kind: str | None = None) -> ModelRef | None:
    """The newest finished training run (of the project's student kind when ``task_kind`` is given)."""
    rows = train_runs(store, TRAIN_KIND.get(task_kind) if task_kind else None)
    return _row_to_ref(root, rows[0], "the latest finished training run") if rows else None


def run_for_path(store: Store, root: Path, path: str | Path, kinds: tuple[str, ...] = MODEL_KINDS) -> ModelRef | None:
    """The run (a training run by default) whose folder is ``path`` (as typed, resolved, or project-relative)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(root) / p
    target = p.resolve()
    marks = ",".join("?" * len(kinds))
    for row in store.q(f"SELECT * FROM runs WHERE kind IN ({marks}) AND status='done' ORDER BY created_at DESC",
                       kinds):
        stored = from_store_path(root, row["path"])
        if stored is not None and stored.resolve() == target:
            return _row_to_ref(root, row)
    return None


def pinned_model(store: Store, root: Path, path: str | Path) -> ModelRef:
    """``--model PATH``: as typed, else relative to the project folder. Served/evaluated as asked, gate or not."""
    p = Path(path)
    if not p.exists() and (Path(root) / p).exists():
        p = Path(root) / p
    if not p.is_dir():
        raise DistillError(f"--model {path}: no such model folder (no such folder as typed, nor inside the project)",
                           hint="pass a model folder written by `distill train` "
                           "(or its ONNX export)")
    p = p.resolve()
    run = run_for_path(store, root, p)
    if run is None and p.name in ("onnx",):        # an ONNX export beside its model folder
        run = run_for_path(store, root, p.parent / "final") or run_for_path(store, root, p.parent)
    if run is not None:
        return ModelRef(run.run_id, run.kind, p, run.record, "pinned with --model")
    return ModelRef(p.name, "pinned", p, {}, "pinned with --model (not a training run of this project)")


def latest_eval(store: Store, root: Path, model_run_id: str | None = None):
    """(eval run row, absolute JSON path) of ``model_run_id``'s evaluation, or the newest one."""
    if model_run_id:
        row = get_run(store, f"eval-{model_run_id}")
    else:
        rows = store.q("SELECT * FROM runs WHERE kind='eval' AND status='done' ORDER BY created_at DESC LIMIT 1")
        row = rows[0] if rows else None
    if row is None:
        return None, None
    return row, from_store_path(root, row["path"])


def gate_passed(store: Store, model_run_id: str) -> bool | None:
    """True/False from the model's latest evaluation, None when it was never evaluated."""
    row = get_run(store, f"eval-{model_run_id}")
    if row is None:
        return None
    return bool((json.loads(row["record"] or "{}").get("gate") or {}).get("passed"))


# ------------------------------------------------------------------------------------------------
# the serving model


def serving_model_or_none(store: Store, root: Path, task_kind: str | None = None) -> ModelRef | None:
    """The serving model, or None when no model may be served yet (iterate's first round)."""
    try:
        return serving_model(store, root, None, task_kind)
    except DistillError:
        if store.get_meta(SERVING_KEY):
            raise           # a promoted model whose folder is gone is an error, not "nothing served"
        return None


def serving_model(store: Store, root: Path, pinned: str | Path | None = None,
                  task_kind: str | None = None) -> ModelRef:
    """The model to deploy: ``pinned`` if given, else the promoted one. Raises a DistillError that says what
    to do when nothing may be served (nothing trained; trained but not evaluated; gate failed)."""
    if pinned is not None:
        return pinned_model(store, root, pinned)
    ref = promoted_model(store, root)
    if ref is not None:
        return _checked(ref)
    latest = latest_model(store, root, task_kind)
    if latest is not None and gate_passed(store, latest.run_id):
        # a project evaluated before promotions were recorded: its passing latest model is the serving one
        return _checked(ModelRef(latest.run_id, latest.kind, latest.path, latest.record,
                                 f"its eval (eval-{latest.run_id}) passed the quality gate"))
    if latest is None:
        raise DistillError(f"{root}: no trained model yet",
                           hint=f"train and evaluate one: `distill train {root}` then `distill eval {root}`")
    passed = gate_passed(store, latest.run_id)
    if passed is None:
        raise DistillError(f"{root}: the latest model {latest.run_id} has not been evaluated, so it is not served",
                           hint=f"run `distill eval {root}` (a model whose quality gate passes becomes the serving "
                                "model), or pin one with --model PATH")
    raise DistillError(f"{root}: the latest model {latest.run_id} failed its quality gate, and no model has passed one",
                       hint="improve the data or the student and re-train, lower `quality:` in distill.yaml if the bar "
                            "is wrong, or pin a model with --model PATH to serve it anyway")


def promoted_model(store: Store, root: Path) -> ModelRef | None:
    """The model named by ``meta.serving_model`` (None when nothing was promoted)."""
    run_id = store.get_meta(SERVING_KEY)
    if not run_id:
        return None
    row = get_run(store, run_id)
    if row is None or row["kind"] not in MODEL_KINDS or row["status"] != "done":
        raise DistillError(f"{root}: the serving model {run_id!r} is not a finished training run of this project",
                           hint="promote another model (`distill eval` of a model that passes the gate), or pin one "
                                "with --model PATH")
    return _row_to_ref(root, row, store.get_meta(SERVING_WHY_KEY) or "promoted")


def promote(store: Store, root: Path, run_id: str, why: str) -> None:
    """Make ``run_id`` the serving model, with the sentence ``why`` (shown by serve and status)."""
    row = get_run(store, run_id)
    if row is None or row["kind"] not in MODEL_KINDS or row["status"] != "done":
        raise DistillError(f"cannot promote {run_id!r}: not a finished training run")
    with store.tx() as c:
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (SERVING_KEY, run_id))
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)",
                  (SERVING_WHY_KEY, f"{why} ({time.strftime('%Y-%m-%d %H:%M', time.localtime())})"))


def _checked(ref: ModelRef) -> ModelRef:
    if not ref.path.is_dir():
        raise DistillError(f"model {ref.run_id}: its folder {ref.path} is missing",
                           hint="restore it, retrain with `distill train`, or pin another model with --model PATH")
    return ref
