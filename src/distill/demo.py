"""`distill demo`: the whole loop on a real task, offline, on a CPU, in minutes.

Task: SNIPS intent classification (7 intents, CC0; examples/snips-intents/README.md). Teacher:
Qwen2.5-Coder-1.5B-Instruct running locally. Labelling ~1200 inputs with it on 2 CPU cores takes about
an hour, so by default the demo *replays* that teacher's recorded answers (same code path, a `replay`
teacher; the recording carries its provenance and the command that regenerates it). ``--live N`` also
labels N inputs with the real model through the local teacher and reports how often it agrees with
the recording.

Every step is the public function behind a CLI verb, so this file is also the recipe a user follows by
hand: import → label → filter → train → eval → report. Re-running resumes: the import dedupes, labels
come from the cache, a finished training run is reused.
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

from rich.console import Console

from distill.errors import DistillError

console = Console()

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "snips-intents"
DATA_FILE = "snips_intents.csv"


def find_example() -> Path:
    if (EXAMPLE / "distill.yaml").exists():
        return EXAMPLE
    raise DistillError(
        f"the demo data is not at {EXAMPLE}",
        hint="run the demo from a clone of the repository installed with `pip install -e .`",
    )


def run_demo(root: Path, *, live: int = 0, limit: int | None = None, epochs: int | None = None) -> int:
    from distill.data.importer import import_file
    from distill.evaluate import evaluate
    from distill.evaluate.common import promote_if_passed
    from distill.filters import run_filters
    from distill.labeling import label
    from distill.project import Project
    from distill.recipes.train import train
    from distill.report.html import write_report

    t0 = time.perf_counter()
    src = find_example()
    root = Path(root)
    if not (root / "distill.yaml").exists():
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "distill.yaml", root / "distill.yaml")
    # The recording lives next to the spec so the project folder is self-contained.
    for f in src.glob("teacher_*.jsonl"):
        if not (root / f.name).exists():
            shutil.copy(f, root / f.name)
    project = Project.open(root)
    data = src / DATA_FILE
    if limit:
        data = sample_csv(data, root / f"subset_{limit}.csv", limit)

    console.rule("1/6 import")
    r = import_file(project, data, text="text", label="intent", id="id")
    console.print(f"{r.rows_read} rows read, {r.added} new, split {r.by_split}")

    console.rule("2/6 teacher labels")
    teacher = project.spec.get_teacher()
    rep = label(project, teacher.name, progress=True)
    console.print(f"teacher `{teacher.name}` ({teacher.kind}): {rep.ok} answers, {rep.calls} new calls, "
                  f"{rep.cache_hits} from cache, failures {rep.failed_by_reason or 'none'}")
    if live:
        live_teacher = next((t for t in project.spec.teachers if t.kind == "local"), None)
        if live_teacher is None:
            raise DistillError("--live needs a `kind: local` teacher in the demo's distill.yaml")
        console.rule(f"2b live: {live} inputs with {live_teacher.name}")
        label(project, live_teacher.name, limit=live, splits=("test",), progress=True)
        _compare_live(project, teacher.name, live_teacher.name)

    console.rule("3/6 filter")
    fr = run_filters(project, teacher.name)
    console.print(f"kept {fr.kept}, dropped {fr.dropped_by_reason or 'none'}")

    console.rule("4/6 train student")
    tr = train(project, teacher=teacher.name, overrides={"epochs": epochs} if epochs else None, progress=True)
    console.print(f"student at {tr.path}")

    console.rule("5/6 evaluate on the locked test split")
    res = evaluate(project, teacher=teacher.name)
    d = res.to_dict() if hasattr(res, "to_dict") else res

    console.rule("6/6 report")
    html, _ = write_report(project, d)
    gate = d.get("gate", {})
    # as `distill eval` does: a model whose gate passed becomes the serving model (export/serve use it)
    promoted = promote_if_passed(project, d)
    console.print(f"\n[bold]report:[/] {html.resolve()}")
    console.print(promoted, highlight=False)
    console.print(f"gate: {'[green]passed[/]' if gate.get('passed') else '[red]failed[/] ' + '; '.join(gate.get('failures', []))}")
    console.print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0 if gate.get("passed") else 3


def sample_csv(src: Path, dest: Path, n: int) -> Path:
    """A seeded random sample of n data rows of a CSV, in file order. (The demo CSV is sorted by intent, so
    its first rows would be a single intent.)"""
    import random

    with open(src, newline="", encoding="utf-8") as fi:
        r = csv.reader(fi)
        header, rows = next(r), list(r)
    keep = sorted(random.Random(0).sample(range(len(rows)), min(n, len(rows))))
    with open(dest, "w", newline="", encoding="utf-8") as fo:
        w = csv.writer(fo)
        w.writerow(header)
        w.writerows(rows[i] for i in keep)
    return dest


def _compare_live(project, recorded: str, live: str) -> None:
    rows = project.store.q(
        """SELECT a.answer AS rec, b.answer AS live FROM labels a JOIN labels b
           ON a.example_id = b.example_id WHERE a.teacher=? AND b.teacher=? AND a.status='ok' AND b.status='ok'""",
        (recorded, live),
    )
    if rows:
        same = sum(r["rec"] == r["live"] for r in rows)
        console.print(f"live teacher agrees with the recording on {same}/{len(rows)} inputs")
