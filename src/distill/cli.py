"""`distill` — one subcommand per pipeline stage, each a thin shim over one public function.

Heavy imports (torch, transformers) happen inside the commands so `distill --help` and `distill status`
stay instant. Every user-fixable problem is a DistillError: printed as one message + hint, exit code 2.
A failed quality gate exits 3, so CI pipelines can tell "broken" from "not good enough".
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from distill.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0].strip("` "))
console = Console(stderr=True, soft_wrap=True)  # never hard-wrap paths in messages
out = Console(soft_wrap=True)

EXIT_ERROR = 2
EXIT_GATE = 3
EXIT_BUDGET = 4  # stopped cleanly at --budget; re-run with a larger budget to continue


# Choices as Enums: typer lists them in --help and rejects anything else before a command starts.
class Kind(str, Enum):
    classify = "classify"
    extract = "extract"
    generate = "generate"


class InputFormat(str, Enum):
    csv = "csv"
    tsv = "tsv"
    jsonl = "jsonl"
    parquet = "parquet"


class ExportFormat(str, Enum):
    jsonl = "jsonl"
    parquet = "parquet"
    onnx = "onnx"
    merged = "merged"
    gguf = "gguf"


class Engine(str, Enum):
    inprocess = "inprocess"   # this process: an event loop of calls (API teachers) or the model in a thread (local)
    ray = "ray"               # a local teacher on a pool of Ray actors (distill.ray_label)


class Backend(str, Enum):
    auto = "auto"
    onnx = "onnx"
    torch = "torch"


class Confidence(str, Enum):
    max_prob = "max_prob"
    margin = "margin"
    entropy = "entropy"


class Ood(str, Enum):
    mahalanobis = "mahalanobis"
    knn = "knn"
    combined = "combined"
    energy = "energy"
    none = "none"


class QueueReason(str, Enum):
    routed = "routed"
    shadow_disagreement = "shadow_disagreement"
    feedback = "feedback"
    degraded = "degraded"


class QueueStatus(str, Enum):
    new = "new"
    consumed = "consumed"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("distill")
        except PackageNotFoundError:  # running from a source tree that was never installed
            import distill

            v = getattr(distill, "__version__", "unknown")
        out.print(f"distill {v}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Model distillation for production: teacher labels -> filtered -> small student -> honest eval -> served."""


def _run(fn):
    """Call fn(); turn DistillError into a clean message and a non-zero exit, and Ctrl-C into 130.

    Everything printed here goes through ``distill.redact`` (a message built from a provider's error body can
    repeat the API key) and is escaped for rich (a body with ``[/]`` in it would otherwise be markup). A bug
    keeps its traceback, redacted the same way, and exits 1."""
    import sqlite3
    import traceback

    from rich.markup import escape
    from typer.exceptions import TyperException

    from distill.redact import redact

    try:
        return fn()
    except DistillError as e:
        console.print(f"[bold red]error:[/] {escape(redact(e.message) or '')}", highlight=False)
        if e.hint:
            console.print(f"[yellow]hint:[/] {escape(redact(e.hint) or '')}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: committed work is kept; re-run the same command to resume")
        raise typer.Exit(130) from None
    except sqlite3.DatabaseError as e:
        # the store's integrity is checked after a crash, not on every open (store.Store): damage from elsewhere
        # (a bad copy, a failing disk) shows up when SQLite reads a bad page, which refuses before writing
        if not any(w in str(e).lower() for w in ("malformed", "not a database", "corrupt")):
            print(redact(traceback.format_exc()), file=sys.stderr, end="", flush=True)
            raise typer.Exit(1) from None
        console.print(f"[bold red]error:[/] the project's store (distill.db) is damaged: {escape(str(e))}",
                      highlight=False)
        console.print("[yellow]hint:[/] `distill status PROJECT --check` runs SQLite's integrity check; restore "
                      "distill.db from a backup (distill does not write to a damaged store)", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except (typer.Exit, typer.Abort, TyperException):    # typer's own ways out
        raise
    except Exception:
        print(redact(traceback.format_exc()), file=sys.stderr, end="", flush=True)
        raise typer.Exit(1) from None


def _open(project: Path):
    from distill.project import Project

    return Project.open(project)


# ----------------------------------------------------------------------------------------- init
@app.command()
def init(
    project: Path = typer.Argument(..., help="Folder to create; it will hold distill.yaml and the store."),
    kind: Kind = typer.Option(Kind.classify, "--kind", help="What the task answers."),
):
    """Create a project folder with a commented distill.yaml to edit."""

    def go():
        from distill.project import Project

        p = Project.init(project, kind.value)  # type: ignore[arg-type]
        out.print(f"created {p.root / 'distill.yaml'} — edit the labels, prompt and teachers, then `distill import`")

    _run(go)


# --------------------------------------------------------------------------------------- import
@app.command("import")
def import_(
    project: Path = typer.Argument(..., help="Project folder."),
    path: Path = typer.Argument(..., help="CSV, JSONL or Parquet file."),
    text: str = typer.Option("text", help="Column with the input text."),
    label: Optional[str] = typer.Option(None, help="Column with the gold label/answer (optional)."),
    segment: Optional[str] = typer.Option(None, help="Column naming the segment (default: spec.segment_field)."),
    id: Optional[str] = typer.Option(None, "--id", help="Column with a stable example id (default: hash of the text)."),
    split: Optional[str] = typer.Option(None, help="Column with train/validation/test (default: hash split)."),
    format: Optional[InputFormat] = typer.Option(None, "--format", help="File format (default: by extension)."),
):
    """Import inputs: dedupe, split (the test split is locked once created), decontaminate."""

    def go():
        from distill.data.importer import import_file

        p = _open(project)
        r = import_file(p, path, text=text, label=label, segment=segment, id=id, split=split,
                        fmt=format.value if format else None, progress=True)
        _print_dataclass(f"imported {path}", r)

    _run(go)


# ---------------------------------------------------------------------------------------- label
@app.command()
def label(
    project: Path = typer.Argument(..., help="Project folder."),
    teacher: Optional[str] = typer.Option(None, help="Teacher name from distill.yaml (default: `teacher:`)."),
    budget: Optional[float] = typer.Option(None, help="Stop cleanly before total spend (USD) would exceed this."),
    limit: Optional[int] = typer.Option(None, help="Label at most this many new inputs."),
    splits: str = typer.Option("train,validation,test", help="Comma-separated splits to label."),
    accept_terms: bool = typer.Option(False, help="Label even if the teacher's terms forbid training on outputs."),
    wait: bool = typer.Option(False, help="Wait for another process holding the project instead of refusing."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    engine: Engine = typer.Option(Engine.inprocess, help="ray: a local teacher on a pool of Ray actors, one model "
                                  "each (needs `pip install 'distill\\[ray]'`)."),
    actors: Optional[int] = typer.Option(None, help="--engine ray: model copies (default 2)."),
    cpus_per_actor: Optional[float] = typer.Option(None, help="--engine ray: CPUs (torch threads) per actor "
                                                   "(default 1)."),
    gpus_per_actor: Optional[float] = typer.Option(None, help="--engine ray: GPUs per actor (default 0)."),
    ray_address: Optional[str] = typer.Option(None, help="--engine ray: a running Ray cluster (HOST:6379); "
                                              "default: start a local Ray on this machine."),
    detach: bool = typer.Option(False, help="Batch API teachers (batch: true): submit the batch, or check on the "
                                            "running one, and return instead of waiting; re-run to collect."),
):
    """Ask the teacher for every unlabelled input. Cached: re-running never pays twice; resumes after a crash."""

    def go():
        from rich.markup import escape

        from distill.labeling import label as run_label
        from distill.teacher_check import label_warning

        ray_opts = {"--actors": ("actors", actors), "--cpus-per-actor": ("cpus_per_actor", cpus_per_actor),
                    "--gpus-per-actor": ("gpus_per_actor", gpus_per_actor), "--ray-address": ("address", ray_address)}
        given = {flag: kv for flag, kv in ray_opts.items() if kv[1] is not None}
        if given and engine != Engine.ray:
            raise DistillError(f"{', '.join(given)} only apply with --engine ray",
                               hint="add --engine ray to label a local teacher on Ray actors")
        p = _open(project)
        warning = label_warning(p, teacher)      # before anything is spent: the teacher's latest check failed
        if warning:
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        split_names = tuple(s.strip() for s in splits.split(","))
        if engine == Engine.ray:
            from distill.ray_label import RayConfig, label_ray

            rr = label_ray(p, teacher, config=RayConfig(**dict(given.values())), budget=budget, limit=limit, splits=split_names,
                           accept_terms=accept_terms, wait=wait, progress=progress)
            r = rr.report
            out.print(rr.message(), highlight=False)
        else:
            r = run_label(p, teacher, budget=budget, limit=limit, splits=split_names, accept_terms=accept_terms,
                          wait=wait, progress=progress, detach=detach)
            out.print(r.message(), highlight=False)
        for reason, n in (r.failed_by_reason or {}).items():
            out.print(f"  failed: {reason}: {n}", highlight=False)
        for where, what in (("retry_batch", "retried in a follow-up batch"), ("retry_online", "retried online")):
            for reason, n in ((r.batch or {}).get(where) or {}).items():    # requests a batch did not answer
                out.print(f"  {what}: {reason}: {n}", highlight=False)
        if r.stopped == "budget":
            console.print("[yellow]" + r.message() + "[/]")
            raise typer.Exit(EXIT_BUDGET)
        if r.stopped == "interrupted":
            console.print("[yellow]" + r.message() + "[/]")
            raise typer.Exit(130)

    _run(go)


teacher_app = typer.Typer(help="Teachers: check one on gold inputs before labelling everything with it.",
                          no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("check")
def teacher_check(
    project: Path = typer.Argument(..., help="Project folder."),
    teachers: Optional[list[str]] = typer.Option(None, "--teacher", help="A candidate teacher from distill.yaml; "
                                                 "repeat to compare several (default: `teacher:`)."),
    sample: int = typer.Option(200, help="Gold inputs to check on (train/validation only, stratified by answer)."),
    seed: int = typer.Option(0, help="Seed of the sample and of the cross-validation folds."),
    budget: Optional[float] = typer.Option(None, help="Stop cleanly before a teacher's total spend (USD) would "
                                                      "exceed this, as `distill label --budget`."),
    accept_terms: bool = typer.Option(False, help="Check a teacher whose terms forbid training on its outputs."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Label a stratified gold sample with each candidate (cached: `distill label` reuses the calls) and compare it
    with the majority answer and TF-IDF + LR on the same inputs; verdict, cost and time to label the rest. Exit 3
    when no candidate is better than a trivial baseline."""

    def go():
        from distill.teacher_check import check, render

        res = check(_open(project), teachers, sample=sample, seed=seed, budget=budget, accept_terms=accept_terms,
                    say=lambda m: console.print(m, highlight=False, markup=False))
        if as_json:
            out.print_json(json.dumps(res))
        else:
            out.print(render(res), highlight=False, markup=False)
        if res["best"] is None:
            raise typer.Exit(EXIT_GATE)

    _run(go)


# -------------------------------------------------------------------------------------- correct
@app.command()
def correct(
    project: Path = typer.Argument(..., help="Project folder."),
    path: Path = typer.Argument(..., help="CSV of fixes: id (or text) and the right answer."),
    id_col: str = typer.Option("id", help="Id column (if absent, rows match by text)."),
    text_col: str = typer.Option("text", help="Text column, used when there is no id column."),
    answer_col: str = typer.Option("label", help="Column with the corrected answer."),
):
    """Import human corrections; they override the teacher and keep their provenance."""

    def go():
        from distill.data.corrections import import_corrections

        p = _open(project)
        n = import_corrections(p, path, id_col=id_col, text_col=text_col, answer_col=answer_col)
        out.print(f"stored {n} corrections from {path}")

    _run(go)


# --------------------------------------------------------------------------------------- filter
@app.command("filter")
def filter_(
    project: Path = typer.Argument(..., help="Project folder."),
    teacher: Optional[str] = typer.Option(None, help="Whose labels to filter (default: `teacher:`)."),
):
    """Drop unusable training labels (malformed, disagreeing with gold, unsure, duplicates), each with a reason."""

    def go():
        from dataclasses import asdict

        from distill.filters import run_filters

        p = _open(project)
        r = run_filters(p, teacher)
        suspects, r.suspects = r.suspects, []
        _print_dataclass("filtered", {k: v for k, v in asdict(r).items() if k != "suspects"})
        if suspects:
            # the labels confident learning doubts most, in review order: fix them with `distill correct`
            done = "relabelled to the likely label" if r.relabelled else "dropped"
            t = Table(title=f"suspect labels: {len(suspects)} {done}, most suspect first (review these; "
                            "`distill correct` keeps a fix)", box=None)
            for col in ("rank", "id", "text", "teacher", "likely", "p(teacher)"):
                t.add_column(col)
            for s in suspects[:15]:
                t.add_row(str(s["rank"]), str(s["id"]), s["text"][:60], str(s["teacher"]), str(s["likely"]),
                          f"{s['p_given']:.3f}")
            out.print(t)
            if len(suspects) > 15:
                out.print(f"... {len(suspects) - 15} more: `distill status {project} --suspects` lists them all")

    _run(go)


# --------------------------------------------------------------------------------------- status
@app.command()
def status(
    project: Path = typer.Argument(..., help="Project folder."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    contamination: bool = typer.Option(False, help="List the training inputs removed as near-duplicates of test."),
    suspects: bool = typer.Option(False, help="List the labels the latest filter run dropped as suspect "
                                              "(filters.suspect_labels), most suspect first: what to review."),
    check: bool = typer.Option(False, "--check", help="Also verify the store's integrity (SQLite quick_check, reads "
                                                      "every page; otherwise run only after a crash)."),
):
    """Inputs per split, labels, failures by reason, calls, spend, filters and models."""

    def go():
        from distill.status import open_readonly, status as get_status

        p = open_readonly(project, check=check or None)   # status only reads: it works on a read-only project
        s = get_status(p)
        if check:                        # a failed check raised with its message
            s["integrity"] = ("not checked: --check is SQLite's quick_check, and the store is in PostgreSQL"
                              if p.store.shared else "ok")
        if contamination:
            from distill.data.decontam import list_contamination

            s["contamination_pairs"] = list_contamination(p)
        if suspects:
            from distill.filters import list_suspects

            s["suspect_labels"] = list_suspects(p)
        if as_json:
            out.print_json(json.dumps(s, default=str))
        else:
            _print_nested(s)

    _run(go)


# --------------------------------------------------------------------------------------- export
@app.command()
def export(
    project: Path = typer.Argument(..., help="Project folder."),
    format: ExportFormat = typer.Option(ExportFormat.jsonl, "--format",
                                        help="jsonl | parquet (training data), onnx (encoder student), merged "
                                             "(LoRA LM student merged into its base, bf16) or gguf (merged, then "
                                             "quantized for llama.cpp/ollama, parity-checked on the test split)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Output file/folder (default: inside PROJECT)."),
    teacher: Optional[str] = typer.Option(None, help="Whose labels (default: `teacher:`)."),
    splits: str = typer.Option("train,validation", help="Comma-separated splits to export."),
    model: Optional[Path] = typer.Option(None, help="onnx: pin a student folder (default: the serving model)."),
    quantize: bool = typer.Option(True, help="onnx: also write the dynamic int8 model."),
    run: Optional[str] = typer.Option(None, help="merged/gguf: the LoRA run id (default: the serving model)."),
    quant: str = typer.Option("Q8_0", "--quant", help="gguf: Q8_0 (default: closest to the merged model), Q4_K_M, "
                              "Q4_0 (smaller) or F16 (no quantization)."),
    parity_limit: Optional[int] = typer.Option(None, "--parity-limit", help="gguf: measure parity on a fixed subset "
                                               "of N test rows (default: all)."),
    no_parity: bool = typer.Option(False, "--no-parity", help="gguf: skip the parity report."),
    force: bool = typer.Option(False, "--force", help="Move an existing --out that is not a previous export "
                               "aside (NAME.replaced-TIME) instead of refusing. Never the project or its files."),
):
    """Export labelled training data (JSONL/Parquet + provenance) or the serving student (ONNX fp32 + int8,
    parity-checked; a merged LM folder; or a quantized GGUF of it for llama.cpp/ollama, parity-checked on the test
    split). Replaces only a previous export of its own; never writes over the project folder, its store or spec, or
    what its store points at."""

    def say(msg: str) -> None:
        console.print(msg, style="yellow", highlight=False, markup=False)

    def go():
        if format is ExportFormat.gguf:
            from distill.export.gguf import export_gguf_project, parity_headline

            r = export_gguf_project(_open(project), run_id=run, out=out_path, quant=quant, parity_limit=parity_limit,
                                    parity=not no_parity, force=force, say=say)
            out.print(f"wrote {r.gguf_file} ({r.report['gguf_bytes'] / 1e6:.0f} MB, {r.quantization}) with a "
                      f"Modelfile and README.md; report: {r.out_dir / 'export.json'}", highlight=False)
            out.print(parity_headline(r.report["parity"]), highlight=False)
            return
        if format is ExportFormat.merged:
            from distill.export.lm import export_lm_project

            path = export_lm_project(_open(project), run_id=run, out=out_path, force=force, say=say)
            out.print(f"wrote {path} (AutoModelForCausalLM.from_pretrained loads it)")
            return
        if format is ExportFormat.onnx:
            from distill.export.onnx import export_project

            r = export_project(project, model_path=model, out_dir=out_path, quantize=quantize, teacher=teacher,
                               force=force)
            if r.moved_aside:
                say(f"moved the existing {r.out_dir} aside to {r.moved_aside}")
            _print_dataclass("exported", r)
            return
        from distill.data.export import export_data

        p = _open(project)
        dest = out_path or (p.root / "exports" / f"train.{format.value}")
        path = export_data(p, dest, fmt=format.value, teacher=teacher,
                           splits=tuple(s.strip() for s in splits.split(",")), force=force, say=say)
        out.print(f"wrote {path} (+ {path.name}.provenance.json)")

    _run(go)


# ---------------------------------------------------------------------------------------- train
def _student_settings() -> str:
    from rich.markup import escape

    from distill.student_config import describe_fields

    return escape(describe_fields())


@app.command(epilog=_student_settings())
def train(
    project: Path = typer.Argument(..., help="Project folder."),
    teacher: Optional[str] = typer.Option(None, help="Whose labels to learn from (default: `teacher:`)."),
    force: bool = typer.Option(False, help="Retrain even if an identical finished run exists."),
    epochs: Optional[int] = typer.Option(None, help="Override student.epochs from distill.yaml."),
    progress: bool = typer.Option(True, help="Show progress."),
    processes: int = typer.Option(1, min=1, help="Train on N local processes, data parallel (gloo on CPU, one "
                                  "GPU each with nccl). Same global batch, same run id as 1. Under torchrun or "
                                  "`accelerate launch` leave it out: the launcher's processes are used."),
):
    """Train the student on the filtered teacher labels (resumes from the last checkpoint after a crash).

    classify: an encoder student; extract/generate: a causal LM with LoRA. Settings: `student:` (listed below).
    """

    def go():
        from distill.recipes import distributed

        if processes > 1 and not distributed.launched():
            # Start this same command on N processes through torchrun (loopback rendezvous); each of them
            # sees WORLD_SIZE and trains its share. The options are passed on one by one.
            argv = ["-m", "distill.cli", "train", str(project), "--processes", str(processes),
                    "--force" if force else "--no-force", "--progress" if progress else "--no-progress"]
            argv += (["--teacher", teacher] if teacher else []) + (["--epochs", str(epochs)] if epochs else [])
            raise typer.Exit(distributed.launch(processes, argv))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if processes > 1 and processes != world:
            raise DistillError(f"--processes {processes}, but this was launched on {world} processes",
                               hint="leave --processes out under torchrun / accelerate launch")
        overrides = {"epochs": epochs} if epochs else None
        if distributed.launched_rank() == 0:
            from distill.recipes.train import train as run_train

            r = run_train(_open(project), teacher=teacher, overrides=overrides, force=force, progress=progress)
            out.print(r.message(), highlight=False)
        else:
            _train_other_rank(project, teacher, overrides, force)

    _run(go)


def _train_other_rank(project: Path, teacher: Optional[str], overrides: Optional[dict], force: bool) -> None:
    """A process of rank > 0 of a multi-process `distill train`: the recipe of ``recipes.train.train``
    without the project lock (rank 0 holds it) and with the store opened read-only (only rank 0 writes:
    a write from here would fail instead of racing it). The recipe itself syncs with rank 0."""
    from distill.status import open_readonly

    p = open_readonly(project)
    config = p.spec.student_config(overrides)
    if p.spec.kind == "classify":
        from distill.recipes import train_classifier

        train_classifier.train(p, teacher=teacher, config=config, force=force, progress=False)
    else:
        from distill.recipes import lm_project

        lm_project.train_lm_project(p, teacher=teacher, config=config, force=force, progress=False)


# ----------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    project: Path = typer.Argument(..., help="Project folder."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the latest trained model, the candidate)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher to compare with (default: `teacher:`)."),
    cpu_hour_usd: float = typer.Option(0.10, help="Price of one CPU-hour, for the student's cost per 1M requests."),
    report: bool = typer.Option(True, help="Also write the HTML report."),
    latency_samples: int = typer.Option(200, help="Single-text requests timed for the student's p50/p95."),
    max_new_tokens: Optional[int] = typer.Option(None, help="extract/generate: generation budget per answer."),
    limit: Optional[int] = typer.Option(None, help="extract/generate: evaluate a fixed hashed subset of the test split."),
    no_base: bool = typer.Option(False, "--no-base", help="extract/generate: skip the untuned base model."),
):
    """Evaluate student vs teacher vs baseline on the locked test split; exit 3 if the quality gate fails."""

    def go():
        from distill.evaluate import evaluate_project
        from distill.evaluate.common import promote_if_passed

        p = _open(project)
        d = evaluate_project(p, model_path=str(model) if model else None, teacher=teacher, cpu_hour_usd=cpu_hour_usd,
                             latency_samples=latency_samples, max_new_tokens=max_new_tokens, limit=limit,
                             base=not no_base)
        _print_eval(d)
        if report:
            from distill.report.html import write_report

            html, js = write_report(p, d)
            out.print(f"report: {html}")
        # a model whose gate passed becomes the serving model; one that failed never does
        out.print(promote_if_passed(p, d), highlight=False)
        gate = d.get("gate", {})
        if not gate.get("passed", False):
            for f in gate.get("failures", []):
                console.print(f"[bold red]gate failed:[/] {f}")
            raise typer.Exit(EXIT_GATE)
        out.print("[green]gate passed[/]")

    _run(go)


@app.command("report")
def report_(project: Path = typer.Argument(..., help="Project folder.")):
    """Write the self-contained HTML report (+ JSON) from the latest evaluation."""

    def go():
        from distill.report.html import write_report

        p = _open(project)
        html, js = write_report(p, None)
        out.print(f"report: {html}\njson:   {js}")

    _run(go)


# ---------------------------------------------------------------------------------------- serve
@app.command()
def serve(
    project: Path = typer.Argument(..., help="Project folder."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port."),
    model: Optional[Path] = typer.Option(None, help="Pin a student folder, its ONNX export or (extract/generate) its "
                                         "GGUF export, gate or not (default: the serving model, promoted after its "
                                         "gate passed)."),
    backend: Backend = typer.Option(Backend.auto, help="auto = the int8 ONNX export when there is one."),
    device: str = typer.Option("auto", help="torch backend: auto | cpu | cuda:N"),
    shadow: float = typer.Option(0.0, help="Share of student-answered requests the teacher re-checks."),
    seed: int = typer.Option(0, help="Seed of the shadow sampling."),
    teacher: Optional[str] = typer.Option(None, help="Fallback teacher (default: `teacher:`)."),
    teacher_timeout: float = typer.Option(10.0, help="Seconds a routed request waits for the teacher."),
    max_texts: int = typer.Option(64, help="Texts per /v1/classify request."),
    max_body_bytes: int = typer.Option(1_000_000, help="Larger request bodies get 413."),
    batch_size: int = typer.Option(32, help="Micro-batch size."),
    batch_wait_ms: float = typer.Option(0.0, help="Fixed wait for a micro-batch to fill (0: none, the batch is what "
                                        "arrived during the previous model call)."),
    max_tokens: Optional[int] = typer.Option(None, help="extract/generate: most tokens per answer (default: the "
                                             "teacher's max_tokens)."),
    n_ctx: int = typer.Option(2048, help="extract/generate: context per sequence, prompt + answer (longer prompts: 400)."),
    max_batch: int = typer.Option(8, help="extract/generate: sequences decoded together; more requests wait in line."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per worker: onnxruntime's (classify) or the engine's "
                                          "(extract/generate); default: all cores. With --workers N, cores / N "
                                          "(bench/README.md, serving)."),
    spin: bool = typer.Option(False, "--spin/--no-spin", help="classify: onnxruntime threads busy-wait between batches "
                              "(lower latency on an idle machine; burns the cycles the HTTP side needs under load)."),
    workers: int = typer.Option(1, help="Processes sharing the port, each with its own model copy; the store (SQLite "
                                "WAL) is their shared state."),
    candidate: Optional[str] = typer.Option(None, help="classify: a run id (or model folder) served beside the "
                                            "promoted model as a canary, rolled back on its own when it does worse."),
    canary: float = typer.Option(0.1, help="Share of requests sampled for the candidate."),
    candidate_shadow: bool = typer.Option(False, "--candidate-shadow", help="The candidate only sees copies of the "
                                          "sampled requests (the promoted model answers everything)."),
    promote_after: Optional[int] = typer.Option(None, help="Promote the candidate on its own after this many "
                                                "teacher-checked texts within bounds (default: only when asked)."),
    max_disagreement_increase: float = typer.Option(0.05, help="Roll back when the candidate disagrees with the "
                                                    "teacher this much more often than the promoted model."),
    max_p95_ratio: float = typer.Option(1.5, help="Roll back when the candidate's p95 latency passes this multiple of "
                                        "the promoted model's."),
    min_compared: int = typer.Option(200, help="Teacher-checked texts before any verdict on the candidate."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without API keys (loopback only)."),
):
    """Serve the student behind the router: /v1/classify (classify), OpenAI-compatible /v1/chat/completions
    (extract/generate: the GGUF export from `distill export --format gguf`), /metrics."""

    def go():
        from distill.serve.app import ServeConfig, serve as run

        cfg = ServeConfig(model_path=str(model) if model else None, backend=backend.value, device=device,  # type: ignore[arg-type]
                          shadow_rate=shadow, seed=seed, require_key=not no_auth, teacher=teacher,
                          teacher_timeout_s=teacher_timeout, max_texts=max_texts, max_body_bytes=max_body_bytes,
                          batch_size=batch_size, batch_wait_ms=batch_wait_ms, max_tokens=max_tokens,
                          n_ctx_per_seq=n_ctx, max_batch=max_batch, n_threads=threads, spin=spin)
        cfg.check()
        from distill.serve.rollout import RolloutConfig

        ro = None
        if candidate:
            ro = RolloutConfig(candidate=candidate, mode="shadow" if candidate_shadow else "canary", share=canary,
                               promote_after=promote_after, max_disagreement_increase=max_disagreement_increase,
                               max_p95_ratio=max_p95_ratio, min_compared=min_compared, seed=seed)
            ro.check()
        run(project, host=host, port=port, config=cfg, rollout=ro, workers=workers)

    _run(go)


@app.command("review")
def review_cmd(
    project: Path = typer.Argument(..., help="Project folder."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8010, help="Port."),
    no_auth: bool = typer.Option(False, "--no-auth", help="No API key (loopback only)."),
):
    """The review page: work through the suspect, low-confidence and audit queues one item at a time with the
    keyboard (a accept, c correct, s skip, o out of scope, u undo); decisions become corrections with provenance."""
    def go():
        from distill.serve.review_app import serve_review

        serve_review(project, host=host, port=port, require_key=not no_auth)

    _run(go)


rollout_app = typer.Typer(help="The canary of `distill serve --candidate`: see it, promote it, roll it back "
                          "(every worker follows the store within a second).", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")


@rollout_app.command("status")
def rollout_status(project: Path = typer.Argument(...)):
    """The serving model and the latest rollout verdict (workers' live figures: GET /v1/rollout)."""
    def go():
        from distill.serve.rollout import read_state

        p = _open(project)
        try:
            st = read_state(p.store)
            out.print(f"serving: {p.serving_model().describe()}", highlight=False)
            out.print("rollout: none" if st is None else f"rollout: {st['candidate']} {st['state']}"
                      + (f" -- {st['why']}" if st.get("why") else ""), highlight=False)
        finally:
            p.close()

    _run(go)


@rollout_app.command("promote")
def rollout_promote(project: Path = typer.Argument(...), candidate: str = typer.Argument(..., help="Run id.")):
    """Promote the candidate: every `distill serve` of the project swaps to it without dropping a request."""
    def go():
        from distill.serve.rollout import write_state

        p = _open(project)
        try:
            p.promote(candidate, "promoted with `distill rollout promote`")
            write_state(p.store, candidate, "promoted", "distill rollout promote")
            out.print(f"promoted {candidate}; running servers swap to it within a second", highlight=False)
        finally:
            p.close()

    _run(go)


@rollout_app.command("rollback")
def rollout_rollback(project: Path = typer.Argument(...), candidate: str = typer.Argument(..., help="Run id."),
                     why: str = typer.Option("rolled back with `distill rollout rollback`", help="Recorded reason.")):
    """Stop the canary: the candidate takes no more traffic in any worker."""
    def go():
        from distill.serve.rollout import write_state

        p = _open(project)
        try:
            write_state(p.store, candidate, "rolled_back", why)
            out.print(f"rolled back {candidate}; running servers stop sending it traffic within a second",
                      highlight=False)
        finally:
            p.close()

    _run(go)


keys_app = typer.Typer(help="API keys of the service (stored hashed; shown once).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(project: Path = typer.Argument(...), name: str = typer.Option(..., help="Who the key is for.")):
    """Create a key and print it once."""

    def go():
        from distill.serve.keys import create_key

        key_id, raw = create_key(_open(project).store, name)
        out.print(f"key id {key_id} for {name!r} (shown once, store it now):\n{raw}", highlight=False)

    _run(go)


@keys_app.command("revoke")
def keys_revoke(project: Path = typer.Argument(...), key: str = typer.Argument(..., help="Key id or name.")):
    """Revoke a key by id or name."""

    def go():
        from distill.serve.keys import revoke_key

        ids = revoke_key(_open(project).store, key)
        out.print(f"revoked {', '.join(ids) if ids else 'nothing'}")

    _run(go)


@keys_app.command("list")
def keys_list(project: Path = typer.Argument(...)):
    """List keys (never the secrets)."""

    def go():
        from distill.serve.keys import list_keys

        for k in list_keys(_open(project).store):
            _print_dataclass(k.name, k)

    _run(go)


route_app = typer.Typer(help="The student→teacher router.", no_args_is_help=True)
app.add_typer(route_app, name="route")


@route_app.command("calibrate")
def route_calibrate(
    project: Path = typer.Argument(...),
    coverage: float = typer.Option(0.9, help="Share of requests the student should answer."),
    confidence: Optional[str] = typer.Option(
        None, help="Which confidence score to threshold. classify: max_prob (default) | margin | entropy; "
                   "extract/generate: mean_logprob (default) | min_logprob of the answer's tokens."),
    ood: Optional[Ood] = typer.Option(None, help="Which out-of-distribution score to threshold. classify: "
                                                 "mahalanobis over every hidden layer (default) | knn on a frozen "
                                                 "sentence encoder | combined | energy | none; extract/generate: the "
                                                 "kNN distance to the train prompts (default) | none."),
    ood_keep: float = typer.Option(0.95, help="Share of in-domain validation inputs the OOD cut keeps (the rest of "
                                              "the routing budget goes to the confidence cut; bench/router.py)."),
    model: Optional[Path] = typer.Option(None, help="Pin a student folder (default: the serving model; "
                                                    "extract/generate: its GGUF export)."),
    backend: Backend = typer.Option(Backend.auto, help="Thresholds are backend-specific: calibrate what you serve "
                                                       "(classify; LM students are calibrated on their GGUF export)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher whose validation labels define 'right'."),
    k: int = typer.Option(10, help="k of the k-th-nearest-neighbour OOD distance (classify --ood knn/combined; "
                                   "extract/generate)."),
    embedder: str = typer.Option("all-minilm-l6-v2", help="The frozen sentence encoder of the kNN OOD score "
                                                          "(classify --ood knn/combined; extract/generate with "
                                                          "--ood-source text): a packaged name or a local folder."),
    ood_source: str = typer.Option("text", help="extract/generate: what the kNN OOD score reads: text (a frozen "
                                                "sentence encoder's embedding of the input) | hidden (the prompt's "
                                                "mean hidden state in the engine)."),
    max_tokens: Optional[int] = typer.Option(None, help="extract/generate: answer tokens per validation input "
                                                        "(default: the teacher's max_tokens, as `distill serve`)."),
    n_ctx: int = typer.Option(2048, help="extract/generate: engine context per sequence; longer inputs are left out."),
    delta: float = typer.Option(0.05, help="The coverage promise holds with probability 1-delta."),
    guarantee: bool = typer.Option(True, help="Serve the finite-sample (conformal) threshold when the validation "
                                              "split is large enough; else the plain one."),
    route_invalid: Optional[bool] = typer.Option(
        None, "--route-invalid/--keep-invalid", help="extract/generate: send answers that were invalid before the "
                                                     "grammar constrained them to the teacher (default: yes, unless "
                                                     "that makes the coverage target unreachable)."),
    max_reference: int = typer.Option(2000, help="extract/generate: train prompts embedded as the OOD reference."),
    threads: Optional[int] = typer.Option(None, help="extract/generate: llama.cpp threads (default: every core this "
                                                     "process may use; 1 is faster on a machine busy with other work)."),
):
    """Pick router thresholds on the validation split for a target coverage; print the coverage→quality curve."""

    def go():
        p = _open(project)
        kind = p.spec.kind
        p.close()
        if kind == "classify":
            from distill.serve.router import calibrate_project

            conf_kind = confidence or Confidence.max_prob.value
            if conf_kind not in {c.value for c in Confidence}:
                raise DistillError(f"--confidence {conf_kind}: a classify router thresholds one of "
                                   f"{', '.join(c.value for c in Confidence)}")
            cfg = calibrate_project(project, model_path=model, coverage=coverage, confidence_kind=conf_kind,
                                    ood=(ood or Ood.mahalanobis).value,
                                    ood_keep=ood_keep, delta=delta,
                                    guarantee=guarantee, k=k, embedder=embedder, teacher=teacher,
                                    backend=backend.value)
            t = Table(title=f"coverage → quality (validation, {cfg.n_validation} in-domain rows"
                            + (f", {cfg.n_oos_validation} out-of-scope" if cfg.n_oos_validation else "")
                            + "; plain cut per level)")
            cols = {"target": "target", "coverage": "coverage", "student_accuracy": "student acc (vs teacher)",
                    "system_accuracy": "system acc", "teacher_share": "teacher share", "oos_recall": "OOD recall",
                    "threshold": "cut"}
            cols = {k2: v for k2, v in cols.items() if any(k2 in pt for pt in cfg.curve)}
            for v in cols.values():
                t.add_column(v)
            for pt in cfg.curve:
                t.add_row(*[_fmt(pt.get(c)) for c in cols])
            out.print(t)

            def thr(x):
                return "none" if x is None or x in (float("inf"), float("-inf")) else f"{x:.4f}"
            out.print(f"served ({cfg.threshold_rule} threshold): to the teacher when {cfg.ood} > "
                      f"{thr(cfg.ood_threshold)} or {cfg.confidence} < {thr(cfg.conf_threshold)}")
            out.print(f"achieved coverage {cfg.achieved_coverage:.3f} on in-domain validation (target {cfg.coverage})")
            if cfg.guaranteed_coverage is not None:
                out.print(f"promise: in-domain coverage on new inputs >= {cfg.guaranteed_coverage:.3f} with "
                          f"probability >= {1 - cfg.delta:.2f} (split conformal, {cfg.n_validation} rows)")
            if cfg.oos_recall_validation is not None:
                out.print(f"out-of-scope validation rows routed: {cfg.oos_recall_validation:.3f} of "
                          f"{cfg.n_oos_validation} (measured, not promised)")
            from rich.markup import escape

            for note in cfg.notes:
                console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
            return

        # extract / generate: the GGUF student's log-prob, validity and kNN signals (distill.serve.lm_router)
        from distill.serve.lm_router import LM_ROUTER_FILE, calibrate_lm_project

        conf_kind = confidence or "mean_logprob"
        if conf_kind not in ("mean_logprob", "min_logprob"):
            raise DistillError(f"--confidence {conf_kind}: an {kind} router thresholds mean_logprob or min_logprob")
        if ood not in (None, Ood.none):
            raise DistillError(f"--ood {ood.value} is for classify students; an {kind} student's OOD score is the "
                               "kNN distance to the train prompts", hint="leave --ood out, or pass --ood none")
        if backend != Backend.auto:
            raise DistillError(f"--backend is for classify students; an {kind} student is calibrated on its GGUF "
                               "export (the engine that serves it)")
        cfg = calibrate_lm_project(project, model_path=model, coverage=coverage, confidence=conf_kind,
                                   ood_keep=1.0 if ood == Ood.none else ood_keep,
                                   route_invalid=route_invalid,
                                   delta=delta, guarantee=guarantee, teacher=teacher, k=k, max_tokens=max_tokens,
                                   max_reference=max_reference, n_ctx=n_ctx, n_threads=threads,
                                   ood_source=ood_source, embedder=embedder)
        m = cfg.metric
        t = Table(title=f"coverage → {m} (validation, n={cfg.n_validation}): student = the inputs it answers, "
                        "system = student + teacher on the rows the teacher answered")
        cols = {"target": "target", "coverage": "coverage", "answered": "answered", "threshold": "cut",
                f"student_{m}": f"student {m}", f"system_{m}": f"system {m}", "teacher_share": "teacher share"}
        cols = {k2: v for k2, v in cols.items() if any(k2 in pt for pt in cfg.curve)}
        for v in cols.values():
            t.add_column(v)
        for pt in cfg.curve:
            t.add_row(*[_fmt(pt.get(c)) for c in cols])
        out.print(t)
        out.print(f"right = {cfg.right}")

        def thr(x):
            return "none" if x is None or x in (float("inf"), float("-inf")) else f"{x:.4f}"
        cuts = (["invalid before constraints"] if cfg.route_invalid else []) + \
            ([f"ood > {thr(cfg.ood_threshold)} (k={cfg.k}, {cfg.n_reference} train inputs, {cfg.ood_source})"]
             if cfg.ood_threshold != float("inf") else []) + [f"{cfg.confidence} < {thr(cfg.conf_threshold)}"]
        out.print(f"served ({cfg.threshold_rule} threshold): to the teacher when " + " or ".join(cuts))
        out.print(f"achieved coverage {cfg.achieved_coverage:.3f} on validation (target {cfg.coverage})")
        out.print(f"plain threshold {thr(cfg.plain_conf_threshold)}: coverage {cfg.plain_coverage:.3f} on validation, "
                  "no promise for new inputs")
        if cfg.guaranteed_conf_threshold is not None:
            out.print(f"guaranteed threshold {thr(cfg.guaranteed_conf_threshold)}: coverage on new inputs >= "
                      f"{cfg.guaranteed_coverage or cfg.coverage:.3f} with probability >= {1 - cfg.delta:.2f}")
        else:
            out.print(f"guaranteed threshold: none (n={cfg.n_validation}"
                      + (f"; needs n >= {cfg.n_for_guarantee}" if cfg.n_for_guarantee else "") + ")")
        from rich.markup import escape

        for note in cfg.notes:
            console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
        out.print(f"wrote {Path(cfg.model['folder']) / LM_ROUTER_FILE}")

    _run(go)


queue_app = typer.Typer(help="The failure queue: routed, shadow disagreements, feedback.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


@queue_app.command("list")
def queue_list(project: Path = typer.Argument(...), reason: Optional[QueueReason] = typer.Option(None),
               status_: QueueStatus = typer.Option(QueueStatus.new, "--status"), limit: int = typer.Option(50)):
    """Show queue entries: id, reason, the student's confidence, text, answers, and the review decision if any
    (`distill review`)."""

    def go():
        import json as json_

        from distill.serve.queue import counts, list_entries

        p = _open(project)
        out.print(counts(p.store))
        entries = list_entries(p.store, status=status_.value, reasons=[reason.value] if reason else None, limit=limit)
        reviewed = {r["item"]: r for r in p.store.q(
            "SELECT item, action, answer, reviewer FROM review_decisions WHERE undone_at IS NULL ORDER BY id")}
        for e in entries:
            conf = "" if e.student_conf is None else f" conf={e.student_conf:.3f}"
            d = reviewed.get(f"queue:{e.id}")
            rev = "" if d is None else (f"  review: {d['action']}"
                                        + (f" -> {json_.loads(d['answer'])}" if d["answer"] else "") + f" ({d['reviewer']})")
            out.print(f"#{e.id:<5} {e.reason:<20}{conf} {e.text[:80]!r} student={e.student_answer} "
                      f"teacher={e.teacher_answer}{rev}", highlight=False, markup=False)

    _run(go)


# -------------------------------------------------------------------------------- iterate / relabel / cost
@app.command()
def iterate(
    project: Path = typer.Argument(..., help="Project folder."),
    traffic: Optional[Path] = typer.Option(None, help="New traffic (CSV/JSONL/Parquet) to add to this round."),
    budget: Optional[float] = typer.Option(None, help="Teacher spend cap (USD) for labelling this round."),
    margin: float = typer.Option(0.02, help="Largest tolerated per-segment drop vs the serving model."),
    teacher: Optional[str] = typer.Option(None, help="Teacher (default: `teacher:`)."),
):
    """One round: failure queue (+ traffic) → teacher labels → retrain → eval → promote only if no segment regresses."""

    def go():
        from distill.iterate import iterate as run_iterate

        r = run_iterate(_open(project), teacher=teacher, new_traffic=traffic, budget=budget, regression_margin=margin)
        out.print(r.message(), highlight=False)
        if r.stopped == "budget":
            raise typer.Exit(EXIT_BUDGET)
        if not r.promoted and r.stopped != "no_data":
            raise typer.Exit(EXIT_GATE)

    _run(go)


@app.command()
def relabel(
    project: Path = typer.Argument(..., help="Project folder."),
    teacher: Optional[str] = typer.Option(None, help="Teacher (default: `teacher:`)."),
    dry_run: bool = typer.Option(False, help="Only count the labels made under an older teacher/prompt."),
    budget: Optional[float] = typer.Option(None, help="Teacher spend cap (USD)."),
    accept_terms: bool = typer.Option(False, help="Label even if the teacher's terms forbid training on outputs."),
):
    """Re-ask the teacher for labels made under a different model, parameters or prompt (old calls are kept)."""

    def go():
        from distill.relabel import relabel as run_relabel

        r = run_relabel(_open(project), teacher, budget=budget, dry_run=dry_run, accept_terms=accept_terms)
        out.print(r.message(), highlight=False)

    _run(go)


@app.command()
def cost(
    project: Path = typer.Argument(..., help="Project folder."),
    requests: float = typer.Option(1e6, help="Requests per month to cost."),
    cpu_hour_usd: float = typer.Option(0.10, help="Price of one CPU-hour for the student."),
    routed_share: Optional[float] = typer.Option(None, help="Share sent to the teacher (default: from router.json)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher (default: `teacher:`)."),
):
    """Cost per 1M requests teacher-only vs routed vs student-only, one-off distillation cost, break-even volume."""

    def go():
        from distill.cost import cost_report

        rep = cost_report(_open(project), monthly_requests=requests, cpu_hour_usd=cpu_hour_usd,
                          routed_share=routed_share, teacher=teacher)
        out.print_json(json.dumps(rep, default=str))

    _run(go)


# ----------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    project: Path = typer.Option(Path("demo-snips"), "--dir", help="Where to create the demo project."),
    live: int = typer.Option(0, help="Also label N inputs live with the real local teacher (slow on CPU)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N inputs (a quick smoke run)."),
    epochs: Optional[int] = typer.Option(None, help="Override the student's epochs."),
):
    """Run the whole loop on a real task offline: import → teacher labels → filter → train → eval → report."""

    def go():
        from distill.demo import run_demo

        code = run_demo(project, live=live, limit=limit, epochs=epochs)
        if code:
            raise typer.Exit(code)

    _run(go)


# ----------------------------------------------------------------------------------------- bench
@app.command()
def bench(
    suites: Optional[list[str]] = typer.Argument(None, help="Suites to run (default: all): labelling, training, "
                                                 "latency, retention-snips, retention, router, router-clinc150, cost."),
    smoke: bool = typer.Option(False, "--smoke", help="Reduced runs that check each suite works and its JSON shape "
                               "(results in bench/.work/smoke/, not bench/results/)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Where the result JSONs go."),
    list_suites: bool = typer.Option(False, "--list", help="List the suites and exit."),
):
    """Side-by-side benchmarks (retention, latency, router, labelling, training, cost) from a distill checkout."""

    def go():
        from distill.bench import SUITES, run_suites, summary

        if list_suites:
            for s in SUITES:
                out.print(f"[bold]{s.name:<16}[/] {s.what}  ({s.script})", highlight=False)
            return
        runs = run_suites(suites, smoke=smoke, out_dir=out_dir, say=lambda m: out.print(m, highlight=False))
        out.print(summary(runs), highlight=False)
        failed = [r.suite.name for r in runs if r.problems]
        if failed:
            out.print(f"[red]failed suites: {', '.join(failed)}[/]")
            raise typer.Exit(1)

    _run(go)


# ----------------------------------------------------------------------------------------- helpers
def _print_dataclass(title: str, obj) -> None:
    from dataclasses import asdict, is_dataclass

    d = asdict(obj) if is_dataclass(obj) else dict(obj)
    t = Table(title=title, show_header=False, box=None)
    for k, v in d.items():
        t.add_row(str(k), v if isinstance(v, str) else json.dumps(v, default=str))
    out.print(t)


def _print_nested(d: dict, indent: int = 0) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            out.print(" " * indent + f"[bold]{k}[/]")
            _print_nested(v, indent + 2)
        else:
            out.print(" " * indent + f"{k}: {json.dumps(v, default=str) if not isinstance(v, str) else v}",
                      highlight=False)


def _print_eval(d: dict) -> None:
    if d.get("teacher_quality"):
        out.print(f"[bold]{d['teacher_quality']}[/]", highlight=False)
    v = d.get("verdict") or {}
    for i, line in enumerate(v.get("headline") or []):   # the teacher-problem sentence first, when there is one
        out.print(line, style="bold red" if v.get("teacher_problem") and i == 0 else None, highlight=False, markup=False)
    hl = d.get("headline") or {}
    if not hl:
        out.print_json(json.dumps({k: v for k, v in d.items() if k in ("gate", "teacher_quality")}, default=str))
        return
    t = Table(title="test split")
    cols = sorted({c for row in hl.values() for c in row})
    t.add_column("system")
    for c in cols:
        t.add_column(c)
    for name, row in hl.items():
        t.add_row(name, *[_fmt(row.get(c)) for c in cols])
    out.print(t)


def _fmt(v) -> str:
    if isinstance(v, dict) and "value" in v:
        lo, hi = v.get("ci", [None, None]) if isinstance(v.get("ci"), list) else (v.get("lo"), v.get("hi"))
        return f"{v['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
