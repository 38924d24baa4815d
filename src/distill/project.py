"""A project is a folder: ``distill.yaml`` (the spec, edited by people) + ``distill.db`` (the store) +
``models/`` and ``reports/`` (artefacts). Every CLI verb takes the folder as its first argument.

With ``DISTILL_DB_URL=postgresql://...`` the store is a schema in PostgreSQL named after the folder (see
``distill.store_pg.parse_url``) and there is no distill.db; the spec and the artefacts stay in the folder."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import filelock

from distill import runs
from distill.errors import DistillError
from distill.store import Store
from distill.task import ProjectSpec, TaskKind, load_spec, scaffold

SPEC_FILE = "distill.yaml"
STORE_FILE = "distill.db"


@dataclass
class Project:
    root: Path
    spec: ProjectSpec
    store: Store

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @classmethod
    def open(cls, root: str | Path) -> "Project":
        root = Path(root)
        if not (root / SPEC_FILE).exists():
            raise DistillError(
                f"{root}: no {SPEC_FILE} here, so this is not a distill project",
                hint=f"create one with `distill init {root} --kind classify`",
            )
        spec = load_spec(root / SPEC_FILE)
        return cls(root=root, spec=spec, store=Store(root / STORE_FILE))

    @classmethod
    def init(cls, root: str | Path, kind: TaskKind, spec_text: str | None = None) -> "Project":
        root = Path(root)
        if (root / SPEC_FILE).exists():
            raise DistillError(f"{root / SPEC_FILE} already exists", hint="edit it, or choose another folder")
        root.mkdir(parents=True, exist_ok=True)
        (root / SPEC_FILE).write_text(spec_text or scaffold(root.name, kind), encoding="utf-8")
        return cls.open(root)

    def close(self) -> None:
        self.store.close()

    # -- which model (see distill.runs) ---------------------------------------------------------------
    def serving_model(self, pinned: str | Path | None = None) -> runs.ModelRef:
        """The model serve/export/route/iterate use: ``pinned`` (``--model``) or the promoted one."""
        return runs.serving_model(self.store, self.root, pinned, self.spec.kind)

    def latest_model(self) -> runs.ModelRef | None:
        """The newest finished training run of this project's student kind (what `distill eval` scores)."""
        return runs.latest_model(self.store, self.root, self.spec.kind)

    def model(self, pinned: str | Path | None = None, run_id: str | None = None) -> runs.ModelRef:
        """``pinned`` folder, else run ``run_id``, else the latest trained model; a DistillError if none."""
        if pinned is not None:
            return runs.pinned_model(self.store, self.root, pinned)
        if run_id is not None:
            return runs.model_run(self.store, self.root, run_id)
        ref = self.latest_model()
        if ref is None:
            raise DistillError(f"{self.root}: no trained model", hint=f"run `distill train {self.root}` first, "
                               "or pass --model FOLDER")
        return runs._checked(ref)

    def promote(self, run_id: str, why: str) -> None:
        runs.promote(self.store, self.root, run_id, why)

    def record_run(self, run_id: str, kind: str, status: str, path: str | Path | None, record: dict) -> None:
        """Register a run; ``path`` is stored relative to the project folder (a moved project still works)."""
        runs.record_run(self.store, self.root, run_id, kind, status, path, record)

    @contextmanager
    def exclusive(self, what: str, wait: bool = False, shared: bool = False) -> Iterator[None]:
        """One writer stage at a time per project (e.g. two `distill label` runs would both pay for the
        same inputs). Refuses at once unless ``wait``; the lock goes when the process dies.

        On a shared store (PostgreSQL) the lock is the database's (``Store.stage_lock``), so it holds across
        machines, and ``shared`` holders run together: labellers, which claim each input before paying for it
        (``distill.labeling``), while a stage that needs the project alone (train, iterate) still waits for them.
        On SQLite every holder is exclusive, ``shared`` or not: one labeller per project, under a file lock."""
        if self.store.shared:
            lock = self.store.stage_lock(shared)
            if not lock.acquire(wait):
                raise self._busy(what)
            try:
                yield
            finally:
                lock.release()
            return
        lock = filelock.FileLock(str(self.root / ".distill.lock"))
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except filelock.Timeout:
            raise self._busy(what) from None
        try:
            yield
        finally:
            lock.release()

    def _busy(self, what: str) -> DistillError:
        return DistillError(f"{self.root}: another distill process holds this project (while starting `{what}`)",
                            hint="wait for it to finish, or pass --wait to queue behind it")
