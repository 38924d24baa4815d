"""`distill` — one subcommand per pipeline stage, each a thin shim over one public function.

Heavy imports (torch, transformers) happen inside the commands so `distill --help` and `distill status`
stay instant. Every user-fixable problem is a DistillError: printed as one message + hint, exit code 2.
A failed quality gate exits 3, so CI pipelines can tell "broken" from "not good enough".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from distill.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0].strip("` "))
console = Console(stderr=True)
out = Console()

EXIT_ERROR = 2
EXIT_GATE = 3
EXIT_BUDGET = 4  # stopped cleanly at --budget; re-run with a larger budget to continue


def _run(fn):
    """Call fn(); turn DistillError into a clean message and a non-zero exit, and Ctrl-C into 130."""
    try:
        return fn()
    except DistillError as e:
        console.print(f"[bold red]error:[/] {e.message}", highlight=False)
        if e.hint:
            console.print(f"[yellow]hint:[/] {e.hint}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: committed work is kept; re-run the same command to resume")
        raise typer.Exit(130) from None


def _open(project: Path):
    from distill.project import Project

    return Project.open(project)


# ----------------------------------------------------------------------------------------- init
@app.command()
def init(
    project: Path = typer.Argument(..., help="Folder to create; it will hold distill.yaml and the store."),
    kind: str = typer.Option("classify", "--kind", help="classify | extract | generate"),
):
    """Create a project folder with a commented distill.yaml to edit."""

    def go():
        from distill.project import Project

        if kind not in ("classify", "extract", "generate"):
            raise DistillError(f"--kind {kind!r} is not one of classify, extract, generate")
        p = Project.init(project, kind)  # type: ignore[arg-type]
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
    format: Optional[str] = typer.Option(None, "--format", help="csv | jsonl | parquet (default: by extension)."),
):
    """Import inputs: dedupe, split (the test split is locked once created), decontaminate."""

    def go():
        from distill.data.importer import import_file

        p = _open(project)
        r = import_file(p, path, text=text, label=label, segment=segment, id=id, split=split, fmt=format, progress=True)
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
):
    """Ask the teacher for every unlabelled input. Cached: re-running never pays twice; resumes after a crash."""

    def go():
        from distill.labeling import label as run_label

        p = _open(project)
        r = run_label(p, teacher, budget=budget, limit=limit, splits=tuple(s.strip() for s in splits.split(",")),
                      accept_terms=accept_terms, wait=wait, progress=progress)
        out.print(r.message(), highlight=False)
        for reason, n in (r.failed_by_reason or {}).items():
            out.print(f"  failed: {reason}: {n}", highlight=False)
        if r.stopped == "budget":
            console.print("[yellow]" + r.message() + "[/]")
            raise typer.Exit(EXIT_BUDGET)
        if r.stopped == "interrupted":
            console.print("[yellow]" + r.message() + "[/]")
            raise typer.Exit(130)

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
        from distill.filters import run_filters

        p = _open(project)
        r = run_filters(p, teacher)
        _print_dataclass("filtered", r)

    _run(go)


# --------------------------------------------------------------------------------------- status
@app.command()
def status(
    project: Path = typer.Argument(..., help="Project folder."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    contamination: bool = typer.Option(False, help="List the training inputs removed as near-duplicates of test."),
):
    """Inputs per split, labels, failures by reason, calls, spend, filters and models."""

    def go():
        from distill.status import status as get_status

        p = _open(project)
        s = get_status(p)
        if contamination:
            from distill.data.decontam import list_contamination

            s["contamination_pairs"] = list_contamination(p)
        if as_json:
            out.print_json(json.dumps(s, default=str))
        else:
            _print_nested(s)

    _run(go)


# --------------------------------------------------------------------------------------- export
@app.command()
def export(
    project: Path = typer.Argument(..., help="Project folder."),
    format: str = typer.Option("jsonl", "--format", help="jsonl | parquet"),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Output file (default: PROJECT/exports/train.<fmt>)."),
    teacher: Optional[str] = typer.Option(None, help="Whose labels (default: `teacher:`)."),
    splits: str = typer.Option("train,validation", help="Comma-separated splits to export."),
):
    """Write the labelled, filtered training data (with probabilities, rationales and a provenance file)."""

    def go():
        from distill.data.export import export_data

        if format not in ("jsonl", "parquet"):
            raise DistillError(f"--format {format!r}: use jsonl or parquet")
        p = _open(project)
        dest = out_path or (p.root / "exports" / f"train.{format}")
        path = export_data(p, dest, fmt=format, teacher=teacher, splits=tuple(s.strip() for s in splits.split(",")))
        out.print(f"wrote {path} (+ {path.name}.provenance.json)")

    _run(go)


# ---------------------------------------------------------------------------------------- train
@app.command()
def train(
    project: Path = typer.Argument(..., help="Project folder."),
    teacher: Optional[str] = typer.Option(None, help="Whose labels to learn from (default: `teacher:`)."),
    force: bool = typer.Option(False, help="Retrain even if an identical finished run exists."),
):
    """Train the student on the filtered teacher labels (resumes from the last checkpoint after a crash)."""

    def go():
        p = _open(project)
        from distill.recipes.train_classifier import train as train_classifier

        if p.spec.kind != "classify":
            raise DistillError(f"`distill train` for kind {p.spec.kind!r} is not available yet",
                               hint="classify projects train encoder students today")
        r = train_classifier(p, teacher=teacher, force=force)
        _print_dataclass("trained", r)

    _run(go)


# ----------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    project: Path = typer.Argument(..., help="Project folder."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the latest trained model)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher to compare with (default: `teacher:`)."),
    cpu_hour_usd: float = typer.Option(0.10, help="Price of one CPU-hour, for the student's cost per 1M requests."),
    report: bool = typer.Option(True, help="Also write the HTML report."),
    latency_samples: int = typer.Option(200, help="Single-text requests timed for the student's p50/p95."),
):
    """Evaluate student vs teacher vs baseline on the locked test split; exit 3 if the quality gate fails."""

    def go():
        from distill.evaluate import evaluate

        p = _open(project)
        res = evaluate(p, model_path=str(model) if model else None, teacher=teacher, cpu_hour_usd=cpu_hour_usd,
                       latency_samples=latency_samples)
        d = res.to_dict() if hasattr(res, "to_dict") else res
        _print_eval(d)
        if report:
            from distill.report.html import write_report

            html, js = write_report(p, d)
            out.print(f"report: {html}")
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
