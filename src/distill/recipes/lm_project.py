"""`distill train` for extract and generate projects: a causal-LM student per project.

    distill train PROJECT [--teacher NAME]          # settings come from `student:` in distill.yaml

(`distill export PROJECT --format merged`, the LoRA merged into its base, is ``distill.export.lm``.)

This is the project-level shell around the recipe ``train_causal_lm.train_lm`` (which owns the loop,
the losses and checkpointing). Top to bottom: config (``student:``, or the one given) -> training rows ->
run id -> lock -> reuse / resume / train -> record -> store. ``distill.recipes.train.train`` calls it
under the project lock, with CLI overrides applied to the config.

Several processes (``distill train PROJECT --processes N``, torchrun, accelerate launch): every process runs
this with the same project and settings; rank 0 alone takes the run lock and writes the store and the run
folder, the others train alongside it (``train_causal_lm``, ``distributed``). The number of processes is not
part of the run id; the global batch (batch_size x grad_accum) is, and it is the same for any number.

Crash safety: the run folder is ``models/<run_id>``, where run_id hashes (the settings that change the
weights, the training data, the teacher). A rerun after ``kill -9`` computes the same id, finds the same
folder, and ``train_lm`` resumes from its latest complete checkpoint there (it checks that the checkpoint
was written with the same settings and data). A finished run is returned as is unless ``force=True``.

``student:`` takes every field of ``distill.student_config.LMStudentConfig`` (``distill train --help``
lists them); it is validated when distill.yaml loads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any


from distill.runinfo import teacher_record
from distill.errors import DistillError
from distill.fsutil import write_json_atomic
from distill.project import Project
from distill.recipes.distributed import join, take_run_lock
from distill.recipes.train_causal_lm import (
    RECORD_FILE,
    examples_from_project,
    data_hash,
    train_lm,
)
from distill.student_config import LMStudentConfig, TrainReport, json_ready

RUN_KIND = "train_lm"


def run_id_for(config: LMStudentConfig, dhash: str, teacher_identity: dict) -> str:
    """12 hex digits of sha256 over (weight-changing settings, data hash, teacher identity)."""
    blob = json.dumps({"config": config.identity(), "data": dhash, "teacher": teacher_identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_lm_project(project: Project, *, teacher: str | None = None, config: LMStudentConfig | None = None,
                     progress: bool = True, force: bool = False) -> TrainReport:
    """Train (or resume, or reuse) the causal-LM student of an extract/generate project. ``config`` defaults
    to ``student:`` of distill.yaml. The project lock is the caller's (``distill.recipes.train.train``)."""
    spec = project.spec
    if spec.kind not in ("extract", "generate"):
        raise DistillError(f"{project.root}: a causal-LM student is trained for kind extract/generate "
                           f"(this project is {spec.kind})", hint="classify projects train an encoder student")
    config = config or spec.student_config()
    teacher_name = spec.get_teacher(teacher).name
    # a 4-bit base that cannot load here fails before a run is recorded as running
    from distill.models import pick_device
    from distill.students.causal_lm import check_quantize_base

    check_quantize_base(config.quantize_base, pick_device(config.device))
    procs = join(pick_device(config.device))      # 1 of 1 unless launched on several processes
    log = (lambda msg: print(msg, flush=True)) if progress and procs.main else None

    # -- data and run id ------------------------------------------------------------------------------
    examples = examples_from_project(project, teacher_name)
    dhash = data_hash(examples)
    teacher_rec = teacher_record(project, teacher_name)
    run_id = run_id_for(config, dhash, teacher_rec["identity"])
    run_dir = project.models_dir / run_id

    lock = take_run_lock(project.models_dir, run_id, procs.main)
    try:
        # -- finished already? ------------------------------------------------------------------------
        rec_file = run_dir / RECORD_FILE
        if force and procs.main:
            shutil.rmtree(run_dir, ignore_errors=True)
        procs.barrier()     # the others look at the run folder only once rank 0 has cleared a forced one
        if not force and rec_file.is_file() and \
                json.loads(rec_file.read_text(encoding="utf-8")).get("status") == "done":
            record = json.loads(rec_file.read_text(encoding="utf-8"))
            path = run_dir / Path(record["path"]).name     # 'adapter' or 'model', here even if the project moved
            if procs.main:
                project.record_run(run_id, RUN_KIND, "done", path, record)  # in case we died before registering it
            if log:
                log(f"run {run_id} already finished: {path} (pass --force to retrain)")
            return TrainReport(run_id=run_id, path=path, record=record, reused=True)
        if procs.main:
            project.record_run(run_id, RUN_KIND, "running", None,
                               {"config": config.model_dump(), "data_hash": dhash, "teacher": teacher_rec})
        if log:
            log(f"training run {run_id}: {len(examples)} train rows, loss={config.loss}, base={config.base_model}"
                + (" (resuming)" if (run_dir / "checkpoints").is_dir() else ""))

        # -- the recipe (resumes from run_dir/checkpoints when a killed run left some) -----------------
        t0 = time.perf_counter()
        record = train_lm(examples, config, run_dir, log=log)

        # -- the record, with what the recipe cannot know: run id, teacher, filter run -----------------
        record.update({
            "run_id": run_id, "recipe": "train_causal_lm", "teacher": teacher_rec,
            "filter": _filter_record(project, teacher_name),
            "counts": {"train": len(examples)},
            "wall_time_s": round(time.perf_counter() - t0, 3),
        })
        record = json_ready(record)
        path = Path(record["path"])
        if procs.main:
            write_json_atomic(run_dir / RECORD_FILE, record)
            project.record_run(run_id, RUN_KIND, "done", path, record)
        if log:
            loss = record["final_loss"]            # None when the loss diverged (NaN)
            log(f"saved {path}  ({record['steps']} steps, final loss "
                f"{'nan' if loss is None else f'{loss:.4f}'}, {record['tokens_per_s'] or 0:.0f} tokens/s)")
        return TrainReport(run_id=run_id, path=path, record=record)
    finally:
        if procs.main:
            lock.release()


def _filter_record(project: Project, teacher_name: str) -> dict[str, Any] | None:
    from distill.dataset import latest_filter_run

    fid = latest_filter_run(project, teacher_name)
    if fid is None:
        return None
    r = project.store.q("SELECT * FROM filter_runs WHERE id=?", (fid,))[0]
    return {"run_id": fid, "config": json.loads(r["config"]), "kept": r["kept"], "dropped": r["dropped"]}


def trained_lm_path(project: Project, run_id: str | None = None) -> tuple[str, Path]:
    """(run id, adapter/model folder) of ``run_id``, or of the latest finished ``train_lm`` run."""
    if run_id is None:
        latest = project.latest_model()
        if latest is None or latest.kind != RUN_KIND:
            raise DistillError(f"{project.root}: no finished generative-student run",
                               hint=f"run `distill train {project.root}` first")
        run_id = latest.run_id
    ref = project.model(run_id=run_id)          # checks that the folder is still there
    if ref.kind != RUN_KIND:
        raise DistillError(f"{project.root}: run {run_id} is not a generative-student run ({ref.kind})",
                           hint="`distill status PROJECT` lists the runs")
    return ref.run_id, ref.path
