"""`distill train` / `distill export` for extract and generate projects: a causal-LM student per project.

    distill train PROJECT [--teacher NAME]          # settings come from `student:` in distill.yaml
    distill export PROJECT [--run RUN] [--out DIR]  # merged Hugging Face folder (no peft needed to serve)

This is the project-level shell around the recipe ``train_causal_lm.train_lm`` (which owns the loop,
the losses and checkpointing). Top to bottom: config (``student:`` + overrides) -> training rows -> run
id -> lock -> reuse / resume / train -> record -> store.

Crash safety: the run folder is ``models/<run_id>``, where run_id hashes (the settings that change the
weights, the training data, the teacher). A rerun after ``kill -9`` computes the same id, finds the same
folder, and ``train_lm`` resumes from its latest complete checkpoint there (it checks that the checkpoint
was written with the same settings and data). A finished run is returned as is unless ``force=True``.

``student:`` takes every field of ``LMTrainConfig`` (see ``distill.recipes.train_causal_lm``). ``base``
is accepted as another name for ``base_model``, because classify projects call their student's starting
model ``base``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock

from distill.runinfo import teacher_record
from distill.errors import DistillError
from distill.project import Project
from distill.recipes.train_causal_lm import (
    RECORD_FILE,
    LMTrainConfig,
    _atomic_json,
    examples_from_project,
    data_hash,
    train_lm,
)

RUN_KIND = "train_lm"


@dataclass
class LMTrainReport:
    run_id: str
    path: Path                 # the adapter folder (or 'model' for a full fine-tune): load_student(path)
    record: dict[str, Any]     # what training_record.json holds
    reused: bool = False       # True when a finished run was found and nothing was trained


def lm_config(project: Project, overrides: dict | None = None) -> LMTrainConfig:
    """``student:`` of distill.yaml with ``overrides`` on top (e.g. from CLI flags). Unknown keys in either
    fail with a DistillError naming them and listing the valid ones."""
    raw = dict(project.spec.student or {})
    for where, d in (("student", raw), ("overrides", overrides or {})):
        if "base" in d and "base_model" in d:
            raise DistillError(f"`{where}`: both `base` and `base_model` are set",
                               hint="keep one of them (they mean the same: the model the student starts from)")
    merged = {**raw, **(overrides or {})}
    if "base" in merged:
        merged["base_model"] = merged.pop("base")
    unknown = sorted(set(overrides or {}) - {f for f in LMTrainConfig.__dataclass_fields__} - {"base"})
    if unknown:
        raise DistillError(f"unknown training override(s) {unknown}",
                           hint="valid: " + ", ".join(sorted(LMTrainConfig.__dataclass_fields__)))
    return LMTrainConfig.from_dict(merged, where=f"{project.root / 'distill.yaml'}: student")




def run_id_for(config: LMTrainConfig, dhash: str, teacher_identity: dict) -> str:
    """12 hex digits of sha256 over (weight-changing settings, data hash, teacher identity)."""
    blob = json.dumps({"config": config.identity(), "data": dhash, "teacher": teacher_identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_lm_project(project: Project, *, teacher: str | None = None, overrides: dict | None = None,
                     progress: bool = True, force: bool = False) -> LMTrainReport:
    """Train (or resume, or reuse) the causal-LM student of an extract/generate project."""
    spec = project.spec
    if spec.kind not in ("extract", "generate"):
        raise DistillError(f"{project.root}: a causal-LM student is trained for kind extract/generate "
                           f"(this project is {spec.kind})", hint="classify projects train an encoder student")
    config = lm_config(project, overrides)
    teacher_name = spec.get_teacher(teacher).name
    log = (lambda msg: print(msg, flush=True)) if progress else None

    # -- data and run id ------------------------------------------------------------------------------
    examples = examples_from_project(project, teacher_name)
    dhash = data_hash(examples)
    teacher_rec = teacher_record(project, teacher_name)
    run_id = run_id_for(config, dhash, teacher_rec["identity"])
    run_dir = project.models_dir / run_id
    project.models_dir.mkdir(parents=True, exist_ok=True)

    lock = filelock.FileLock(str(project.models_dir / f".{run_id}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise DistillError(f"{run_dir}: another process is training this exact run",
                           hint="wait for it to finish; its result will be reused") from None
    try:
        # -- finished already? ------------------------------------------------------------------------
        rec_file = run_dir / RECORD_FILE
        if force:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif rec_file.is_file() and json.loads(rec_file.read_text(encoding="utf-8")).get("status") == "done":
            record = json.loads(rec_file.read_text(encoding="utf-8"))
            path = Path(record["path"])
            project.store.put_run(run_id, RUN_KIND, "done", str(path.resolve()), record)  # in case we died before
            if log:
                log(f"run {run_id} already finished: {path} (pass --force to retrain)")
            return LMTrainReport(run_id=run_id, path=path, record=record, reused=True)
        project.store.put_run(run_id, RUN_KIND, "running", None,
                              {"config": asdict(config), "data_hash": dhash, "teacher": teacher_rec})
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
        _atomic_json(run_dir / RECORD_FILE, record)
        path = Path(record["path"])
        project.store.put_run(run_id, RUN_KIND, "done", str(path.resolve()), record)
        if log:
            log(f"saved {path}  ({record['steps']} steps, final loss {record['final_loss']:.4f}, "
                f"{record['tokens_per_s'] or 0:.0f} tokens/s)")
        return LMTrainReport(run_id=run_id, path=path, record=record)
    finally:
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
    if run_id:
        rows = project.store.q("SELECT * FROM runs WHERE id=? AND kind=? AND status='done'", (run_id, RUN_KIND))
        row = rows[0] if rows else None
    else:
        row = project.store.latest_run(RUN_KIND)
    if row is None or not row["path"]:
        raise DistillError(f"{project.root}: no finished generative-student run"
                           + (f" with id {run_id}" if run_id else ""),
                           hint=f"run `distill train {project.root}` first")
    path = Path(row["path"])
    if not path.exists():
        raise DistillError(f"run {row['id']}: its folder {path} is missing", hint="retrain with `distill train`")
    return row["id"], path


def export_lm_project(project: Project, run_id: str | None = None, out: str | Path | None = None,
                      device: str = "cpu") -> Path:
    """Merge the run's LoRA adapter into its base and save an ordinary HF folder (``lm_export.merge_and_save``).

    Default ``out``: ``exports/<run_id>-merged`` in the project. Refuses to overwrite a non-empty folder.
    Registers an ``export_lm`` run pointing at the folder."""
    from distill.lm_export import merge_and_save

    rid, adapter = trained_lm_path(project, run_id)
    dest = Path(out) if out is not None else project.root / "exports" / f"{rid}-merged"
    merged = merge_and_save(adapter, dest, device=device)
    project.store.put_run(f"export-{rid}", "export_lm", "done", str(merged.resolve()),
                          {"model_run_id": rid, "adapter": str(adapter), "format": "hf-merged"})
    return merged
