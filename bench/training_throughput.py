"""Training throughput: our `distill train` recipes vs a plain Hugging Face `Trainer` on the same model,
data and batch shape (samples/s, and the peak RSS of each), issue #7 suite 5.

    OMP_NUM_THREADS=1 .venv/bin/python bench/training_throughput.py   # ~11 min on 2 shared cores (load ~5)
    .venv/bin/python bench/training_throughput.py --smoke             # tiny random models, < 60 s; temp file

Two side-by-side comparisons:

A. Encoder classifier (SNIPS intents, packaged all-MiniLM-L6-v2, the example project's `student:` settings:
   max_length 32, batch 16, lr 1e-4, signal mix).
   ours  = `distill.recipes.train_classifier.train` on a project built the way `distill demo` builds it
           (import -> replayed teacher labels -> filters): KD+CE loss, eval + checkpoint every epoch,
           best-model reload at the end -- what `distill train` does.
   plain = `transformers.Trainer` + `AutoModelForSequenceClassification`, CE on the same rows' teacher
           labels, same tokenisation, seed, batch size, epochs, lr schedule; no eval, no checkpoints.
B. Causal-LM LoRA (SNIPS slots, text -> gold JSON, the user text as the only prompt turn, packaged
   SmolLM2-135M-Instruct, max_length 128, batch 8, same number of optimizer steps, same lr).
   ours  = `distill.recipes.train_causal_lm.train_lm(examples, LMStudentConfig(loss="sft", ...), out)`: its
           own PyTorch loop, with a checkpoint at the last step.
   plain = `transformers.Trainer` on `peft.get_peft_model` with the LoraConfig ours builds (`add_lora`), the
           sequences tokenised by ours' `encode_example` (identical input_ids/labels), fed in the order
           ours uses (`train_sampling_strategy="sequential"` over ours' permutation), so every step sees
           the same padded batch. Trainer's own loss (the model's mean CE) and optimizer default.

Method. Every arm runs in its own subprocess (so its peak RSS is that process's ``ru_maxrss``), with the
same torch thread count (``--threads``, default 1: on this shared 2-core machine a second thread mostly
waits). Arms are interleaved, and which arm goes first alternates between repeats (ours, plain, plain,
ours, ...) so a drift in machine load hits both alike. The reported samples/s is the median over
``--repeats`` of the *training phase*: Trainer's ``on_train_begin`` -> ``on_train_end`` (ours' loop start
-> after its last checkpoint for the LM), i.e. model loading and the final save are excluded; ours'
per-epoch eval/checkpoints are included because `distill train` does them. Each child also reports the
pure compute time (epochs without eval/save; LM optimizer steps without checkpoint) so overhead can be
attributed, and the padded tokens it trained on, which must be equal between the arms of a comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SNIPS_INTENTS = ROOT / "examples" / "snips-intents"
SNIPS_SLOTS = ROOT / "examples" / "snips-slots" / "snips_slots.csv"
sys.path.insert(0, str(ROOT / "tests" / "unit"))     # tiny_models / tiny_lm, for --smoke only

ARMS = {"classifier": ("ours", "plain"), "lm": ("ours", "plain")}


# ------------------------------------------------------------------------------------------------
# 1. Data, prepared once in the parent (so both arms read exactly the same rows)


def build_classifier_project(root: Path, n_inputs: int) -> tuple[Path, str]:
    """The SNIPS intents example project on the first ``n_inputs`` rows, labelled by the replayed teacher
    and filtered, as `distill demo` does it. Returns (project folder, teacher name)."""
    from distill.data.importer import import_file
    from distill.demo import sample_csv
    from distill.filters import run_filters
    from distill.labeling import label
    from distill.project import Project

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copy(SNIPS_INTENTS / "distill.yaml", root / "distill.yaml")
    for f in SNIPS_INTENTS.glob("teacher_*.jsonl"):
        shutil.copy(f, root / f.name)
    project = Project.open(root)
    data = sample_csv(SNIPS_INTENTS / "snips_intents.csv", root / "subset.csv", n_inputs)
    import_file(project, data, text="text", label="intent", id="id")
    teacher = project.spec.get_teacher().name
    label(project, teacher, progress=False)
    run_filters(project, teacher)
    project.close()
    return root, teacher


def lm_rows(n: int) -> list[dict]:
    """The first ``n`` SNIPS slots rows: user text -> gold JSON answer (no system prompt)."""
    with open(SNIPS_SLOTS, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    return [{"id": r["id"], "text": r["text"], "answer": r["gold"]} for r in rows]


# ------------------------------------------------------------------------------------------------
# 2. The arms. Each runs in a child process: `training_throughput.py --child ARM --spec spec.json`.


def _phase_timer():
    """A Trainer callback that times the training phase, the epochs (without the eval/save Trainer runs
    after ``on_epoch_end``) and the optimizer steps, and marks when a training batch is being collated."""
    from transformers import TrainerCallback

    class PhaseTimer(TrainerCallback):
        def __init__(self):
            self.begin = self.end = None
            self.epoch_s = self.step_s = 0.0
            self.epochs = 0
            self.in_epoch = False
            self._t_epoch = self._t_step = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

        def on_epoch_begin(self, args, state, control, **kw):
            self.in_epoch, self._t_epoch = True, time.perf_counter()

        def on_epoch_end(self, args, state, control, **kw):
            self.in_epoch = False
            self.epoch_s += time.perf_counter() - self._t_epoch
            self.epochs += 1

        def on_step_begin(self, args, state, control, **kw):
            self._t_step = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s += time.perf_counter() - self._t_step

    return PhaseTimer()


def _setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def arm_classifier_ours(spec: dict) -> dict:
    import distill.recipes.train_classifier as tc
    from distill.project import Project

    timer, padded = _phase_timer(), [0]
    original = tc._collate

    def counting_collate(tokenizer):   # measurement only: counts the padded tokens of training batches
        inner = original(tokenizer)

        def collate(features):
            batch = inner(features)
            if timer.in_epoch:
                padded[0] += batch["input_ids"].numel()
            return batch
        return collate

    tc._collate = counting_collate
    project = Project.open(spec["project"])
    config = tc.EncoderStudentConfig(**spec["config"])
    report = tc.train(project, teacher=spec["teacher"], config=config, progress=False, force=True,
                      callbacks=[timer])
    n = report.record["counts"]["train"]
    return {"n_train": n, "epochs": timer.epochs, "samples": n * timer.epochs,
            "phase_s": timer.end - timer.begin, "epochs_s": timer.epoch_s, "steps_s": timer.step_s,
            "padded_tokens": padded[0], "train_loss": report.record["train_loss"],
            "recipe_wall_s": report.record["wall_time_s"]}


def arm_classifier_plain(spec: dict) -> dict:
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              PrinterCallback, Trainer, TrainingArguments, set_seed)

    from distill.students.classifier import resolve_base

    cfg, rows = spec["config"], spec["train_rows"]
    folder = resolve_base(cfg["base_model"])
    set_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(spec["labels"]))
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=cfg["max_length"])
    dataset = [{**{k: enc[k][i] for k in enc.keys()}, "labels": r["label"]} for i, r in enumerate(rows)]

    timer, padded = _phase_timer(), [0]
    pad = DataCollatorWithPadding(tokenizer)

    def collate(features):   # the stock collator, plus the same padded-token count as ours
        batch = pad(features)
        if timer.in_epoch:
            padded[0] += batch["input_ids"].numel()
        return batch

    args = TrainingArguments(
        output_dir=spec["out_dir"], num_train_epochs=cfg["epochs"], learning_rate=cfg["learning_rate"],
        weight_decay=cfg["weight_decay"], warmup_steps=cfg["warmup_ratio"],
        per_device_train_batch_size=cfg["batch_size"], eval_strategy="no", save_strategy="no",
        seed=cfg["seed"], data_seed=cfg["seed"], use_cpu=True, dataloader_num_workers=0,
        report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    return {"n_train": len(rows), "epochs": timer.epochs, "samples": len(rows) * timer.epochs,
            "phase_s": timer.end - timer.begin, "epochs_s": timer.epoch_s, "steps_s": timer.step_s,
            "padded_tokens": padded[0], "train_loss": result.training_loss}


def _lm_examples(spec: dict):
    from distill.recipes.train_causal_lm import LMExample

    return [LMExample(id=r["id"], messages=[{"role": "user", "content": r["text"]}], answer=r["answer"])
            for r in spec["rows"]]


def arm_lm_ours(spec: dict) -> dict:
    import distill.recipes.train_causal_lm as tl

    padded, started = [0], [0.0]
    original = tl.pad_batch

    def counting_pad_batch(encoded, pad_id):   # measurement only
        batch = original(encoded, pad_id)
        padded[0] += batch["input_ids"].numel()
        return batch

    tl.pad_batch = counting_pad_batch
    cfg = tl.LMStudentConfig(**spec["config"])
    record = tl.train_lm(_lm_examples(spec), cfg, spec["out_dir"], log=None,
                         on_start=lambda model: started.__setitem__(0, time.perf_counter()))
    samples = record["steps"] * cfg.batch_size * cfg.grad_accum
    return {"n_train": len(spec["rows"]), "steps": record["steps"], "samples": samples,
            "phase_s": record["train_s_this_process"], "steps_s": sum(h["step_s"] for h in record["history"]),
            "padded_tokens": padded[0], "final_loss": record["final_loss"],
            "trainable_params": record["trainable_params"], "truncated": record["data"]["truncated"]}


def arm_lm_plain(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from distill.models import load_causal_lm
    from distill.recipes.train_causal_lm import step_indices
    from distill.students.causal_lm import encode_example

    cfg = spec["config"]
    model, tok = load_causal_lm(cfg["base_model"], device="cpu", dtype="float32")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = False    # as ours does: a KV cache only costs memory in training
    examples = _lm_examples(spec)
    encoded = [encode_example(tok, e.messages, e.answer, cfg["max_length"]) for e in examples]
    # Ours' batch order, so each step of both arms pads the same sequences to the same length.
    order = [i for s in range(cfg["max_steps"]) for i in step_indices(s, len(encoded), cfg["batch_size"], cfg["seed"])]
    dataset = [{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels} for i in order]

    torch.manual_seed(cfg["seed"])
    model = get_peft_model(model, LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"],
                                             lora_dropout=cfg["lora_dropout"],
                                             target_modules=cfg["lora_target_modules"], bias="none",
                                             task_type="CAUSAL_LM"))
    timer, padded = _phase_timer(), [0]

    def collate(features):   # right padding, labels -100 on pads (what DataCollatorForSeq2Seq does)
        t = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), t), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(features), t), dtype=torch.long)
        lab = torch.full((len(features), t), -100, dtype=torch.long)
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            ids[b, :n], att[b, :n], lab[b, :n] = torch.tensor(f["input_ids"]), 1, torch.tensor(f["labels"])
        padded[0] += ids.numel()
        return {"input_ids": ids, "attention_mask": att, "labels": lab}

    args = TrainingArguments(
        output_dir=spec["out_dir"], max_steps=cfg["max_steps"], per_device_train_batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"], weight_decay=cfg["weight_decay"], warmup_steps=cfg["warmup_steps"],
        max_grad_norm=cfg["max_grad_norm"], train_sampling_strategy="sequential", save_strategy="no",
        eval_strategy="no", seed=cfg["seed"], use_cpu=True, dataloader_num_workers=0, label_names=["labels"],
        remove_unused_columns=False, report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    steps = trainer.state.global_step
    return {"n_train": len(examples), "steps": steps, "samples": steps * cfg["batch_size"],
            "phase_s": timer.end - timer.begin, "steps_s": timer.step_s, "padded_tokens": padded[0],
            "final_loss": result.training_loss,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def arm_lm_warm(spec: dict) -> dict:
    """Not timed: converts a packaged GGUF to the cached HF folder once (and warms the page cache), so no
    timed arm pays for the conversion in its time or its peak RSS."""
    from distill.models import load_causal_lm

    load_causal_lm(spec["config"]["base_model"], device="cpu", dtype="float32")
    return {}


CHILD_ARMS = {"classifier_ours": arm_classifier_ours, "classifier_plain": arm_classifier_plain,
              "lm_ours": arm_lm_ours, "lm_plain": arm_lm_plain, "lm_warm": arm_lm_warm}


def child_main(arm: str, spec_path: Path, threads: int) -> int:
    t0 = time.perf_counter()
    _setup_threads(threads)
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    out = CHILD_ARMS[arm](spec)
    import torch

    out.update(arm=arm, torch_threads=torch.get_num_threads(), child_wall_s=time.perf_counter() - t0,
               # ru_maxrss is KiB on Linux: the high-water mark of this process, model load included
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if out.get("samples") and out.get("phase_s"):
        out["samples_per_s"] = out["samples"] / out["phase_s"]
        compute_s = out.get("epochs_s") or out.get("steps_s")
        out["compute_samples_per_s"] = out["samples"] / compute_s if compute_s else None
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# 3. The parent: prepare, run the arms interleaved in child processes, summarise


def run_child(arm: str, spec_path: Path, threads: int, log: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n===== {arm} {time.strftime('%H:%M:%S')}\n")
        f.flush()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", arm, "--spec", str(spec_path),
                               "--threads", str(threads)], stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"arm {arm} failed (exit {proc.returncode}); see {log}\n{proc.stdout[-2000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    print(f"{arm}: {res.get('samples_per_s', 0):.2f} samples/s, phase {res.get('phase_s', 0):.1f} s, "
          f"peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return res


def summarise(runs: dict[str, list[dict]]) -> dict:
    def med(arm, key):
        vals = [r[key] for r in runs[arm] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    keys = ("samples_per_s", "compute_samples_per_s", "phase_s", "peak_rss_mb")
    return {arm: {"median": {k: med(arm, k) for k in keys}, "runs": rs} for arm, rs in runs.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random models and a few rows: checks the code path")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm (interleaved)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every arm")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch folder, emptied first (default bench/.work/training_throughput)")
    ap.add_argument("--clf-inputs", type=int, default=400, help="SNIPS intents rows imported (~70%% end up in train)")
    ap.add_argument("--clf-epochs", type=int, default=2)
    ap.add_argument("--lm-examples", type=int, default=80)
    ap.add_argument("--lm-steps", type=int, default=10)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(a.child, a.spec, a.threads)

    from distill.runinfo import bench_result, environment, target, write_json_atomic

    t_start, env0 = time.perf_counter(), environment()
    if a.smoke:
        a.repeats, a.clf_inputs, a.clf_epochs, a.lm_examples, a.lm_steps = 1, 60, 1, 16, 2
    out = a.out or (Path(tempfile.gettempdir()) / "training_throughput.smoke.json" if a.smoke
                    else HERE / "results" / "training_throughput.json")
    work = a.work or (Path(tempfile.mkdtemp(prefix="training_throughput-")) if a.smoke
                      else HERE / ".work" / "training_throughput")
    if a.work and a.work.is_dir() and any(a.work.iterdir()) and not (a.work / "children.log").exists():
        raise SystemExit(f"--work {a.work} is not empty and was not made by this script; it would be emptied")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "children.log"

    # -- A. classifier data: the project and the exact rows ours will train on ------------------------
    from distill.project import Project
    from distill.recipes.train_classifier import training_examples

    project_root, teacher = build_classifier_project(work / "snips-project", a.clf_inputs)
    project = Project.open(project_root)
    over: dict = {"epochs": a.clf_epochs, "device": "cpu"}
    if a.smoke:
        from tiny_models import tiny_bert_folder

        over["base_model"] = str(tiny_bert_folder(work / "tiny-bert"))
    clf_cfg = project.spec.student_config(over)
    train_rows, _, counts = training_examples(project, teacher, clf_cfg)
    labels = project.spec.label_names
    project.close()
    clf_spec = {"project": str(project_root), "teacher": teacher, "config": clf_cfg.model_dump(),
                "labels": labels, "train_rows": [{"text": r["text"], "label": r["label"]} for r in train_rows],
                "out_dir": str(work / "clf-plain")}
    (work / "classifier.json").write_text(json.dumps(clf_spec), encoding="utf-8")

    # -- B. LM data and settings ----------------------------------------------------------------------
    from distill.student_config import LMStudentConfig

    base_lm = "smollm2-135m-instruct"
    if a.smoke:
        from tiny_lm import save_tiny_base

        base_lm = str(save_tiny_base(work / "tiny-lm"))
    lm_cfg = LMStudentConfig(base_model=base_lm, loss="sft", max_steps=a.lm_steps, batch_size=8, max_length=128,
                           device="cpu", cpu_threads=a.threads, prompt="teacher", seed=0)
    lm_spec = {"config": lm_cfg.model_dump(), "rows": lm_rows(a.lm_examples)}
    lm_spec_path = work / "lm.json"
    lm_spec_path.write_text(json.dumps(lm_spec), encoding="utf-8")
    if not Path(base_lm).is_dir():
        run_child("lm_warm", lm_spec_path, a.threads, log)

    # -- run: interleaved, the first arm alternating between repeats ----------------------------------
    runs: dict[str, list[dict]] = {f"{s}_{arm}": [] for s in ARMS for arm in ARMS[s]}
    for r in range(a.repeats):
        for suite, arms in ARMS.items():
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                spec = json.loads((work / ("classifier.json" if suite == "classifier" else "lm.json")).read_text())
                spec["out_dir"] = str(work / f"{suite}-{arm}-{r}")
                path = work / f"{suite}-{arm}-{r}.json"
                path.write_text(json.dumps(spec), encoding="utf-8")
                runs[f"{suite}_{arm}"].append(run_child(f"{suite}_{arm}", path, a.threads, log))
                shutil.rmtree(spec["out_dir"], ignore_errors=True)   # LM adapters/checkpoints: disk only

    results = summarise(runs)
    m = {k: v["median"] for k, v in results.items()}
    same_batches = {s: len({r["padded_tokens"] for arm in ARMS[s] for r in runs[f"{s}_{arm}"]}) == 1 for s in ARMS}
    results["same_padded_batches"] = same_batches
    ratios = {
        "classifier_samples_per_s_ours_over_plain": ratio(m["classifier_ours"]["samples_per_s"], m["classifier_plain"]["samples_per_s"]),
        "lm_samples_per_s_ours_over_plain": ratio(m["lm_ours"]["samples_per_s"], m["lm_plain"]["samples_per_s"]),
        "classifier_peak_rss_ours_over_plain": ratio(m["classifier_ours"]["peak_rss_mb"], m["classifier_plain"]["peak_rss_mb"]),
        "lm_peak_rss_ours_over_plain": ratio(m["lm_ours"]["peak_rss_mb"], m["lm_plain"]["peak_rss_mb"]),
        # the same, counting compute only (classifier: epochs without eval/checkpoints; LM: optimizer steps
        # without the final checkpoint): how much of a gap is the loop and how much is the extra work
        "classifier_compute_samples_per_s_ours_over_plain": ratio(m["classifier_ours"]["compute_samples_per_s"], m["classifier_plain"]["compute_samples_per_s"]),
        "lm_compute_samples_per_s_ours_over_plain": ratio(m["lm_ours"]["compute_samples_per_s"], m["lm_plain"]["compute_samples_per_s"]),
    }
    targets = [
        target("classifier training samples/s, ours / plain HF Trainer", ratios["classifier_samples_per_s_ours_over_plain"],
               ">=", 1.0, "issue #7: `distill train` must not be slower than a plain Trainer on the same model, data and batch shape"),
        target("lm training samples/s, ours / plain HF Trainer", ratios["lm_samples_per_s_ours_over_plain"],
               ">=", 1.0, "issue #7: the LoRA recipe's own loop must not be slower than Trainer + peft"),
    ]
    config = {
        "repeats": a.repeats, "threads": a.threads, "order": "interleaved; the first arm alternates between repeats",
        "classifier": {"data": f"examples/snips-intents/snips_intents.csv, first {a.clf_inputs} rows, teacher labels "
                               f"(replayed Qwen2.5-Coder-1.5B) after the example's filters",
                       "train_rows": counts["train"], "validation_rows": counts["validation"],
                       "base": clf_cfg.base_model if not a.smoke else "tiny random BERT (tests/unit/tiny_models.py)",
                       "ours_config": clf_spec["config"],
                       "plain": "Trainer + AutoModelForSequenceClassification, CE on the teacher labels, "
                                "DataCollatorWithPadding, eval/save off, Trainer's default optimizer"},
        "lm": {"data": f"examples/snips-slots/snips_slots.csv, first {a.lm_examples} rows, user text -> gold JSON",
               "base": base_lm if not a.smoke else "tiny random Llama (tests/unit/tiny_lm.py)",
               "ours_config": lm_spec["config"],
               "plain": "Trainer on peft.get_peft_model(same LoraConfig), ours' encode_example tokens in ours' "
                        "batch order (sequential sampler), model's mean CE, Trainer's default optimizer, save off"},
        "timing": "samples_per_s = samples / training phase (Trainer on_train_begin -> on_train_end; ours' LM: "
                  "loop incl. its last checkpoint); compute_samples_per_s = samples / (epochs without eval+save, "
                  "or LM optimizer steps); peak_rss_mb = ru_maxrss of the arm's own process",
    }
    res = bench_result("training_throughput", smoke=a.smoke, config=config, results=results, ratios=ratios,
                       targets=targets, started=t_start, environment_start=env0)
    write_json_atomic(out, res)
    print(json.dumps({"ratios": ratios, "medians": m, "same_padded_batches": same_batches,
                      "load": env0["load_average"], "out": str(out)}, indent=1))
    if a.smoke:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
