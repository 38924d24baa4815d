"""`distill export --out` never destroys a project or anything distill did not write (through the real CLI).

An adversarial pass found `distill export demo-snips --format onnx --out demo-snips` exiting 0 after replacing
the whole project (the store with its paid teacher calls, the spec, the recording, the models) with ONNX files;
`--out reports` / `--out models` wiped those folders the same way, and `--format jsonl --out
demo-snips/distill.db` overwrote the store. The rule now (distill.fsutil.check_export_target): the project
folder, a folder containing it, its own files and folders, and what its store points at are refused (exit 2,
the message names the path), even with --force; any other existing target that is not a previous distill
export is refused unless --force, which moves it aside instead of deleting it. The default outputs, and
re-exporting over a previous export, keep working.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distill
from distill.project import Project

SRC = Path(distill.__file__).resolve().parents[1]     # run the CLI from the same source as these imports


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "300"}, timeout=timeout)


def flat(s: str) -> str:
    return " ".join(s.split())


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (what must survive a refused export), but SQLite's
    -wal/-shm files and the open-store markers (store.py: a live process's open store, not project content)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("distill.db-")
            and ".distill-open" not in p.parts}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny classify project with a trained (random tiny BERT) serving model, a recording and a report."""
    import torch
    from tiny_models import tiny_bert_folder, tiny_classify_project

    from distill.students.classifier import ClassifierStudent

    base = tmp_path_factory.mktemp("exp")
    p = tiny_classify_project(base / "proj", n=30)
    torch.manual_seed(0)
    student = ClassifierStudent.create(str(tiny_bert_folder(base / "bert")), ["pos", "neg"], device="cpu")
    model_dir = student.save(base / "proj" / "models" / "r1" / "final")
    p.record_run("r1", "train", "done", model_dir, {})
    p.promote("r1", "test fixture")
    with p.store.tx() as c:       # something that would be lost with the store: a paid teacher call
        c.execute("INSERT INTO teacher_calls(key,teacher,model,request,status,cost,created_at) "
                  "VALUES('k1','rec','m','{}','ok',0.5,0)")
    p.close()
    (base / "proj" / "recorded.jsonl").write_text('{"provenance": {}}\n')
    (base / "proj" / "reports").mkdir()
    (base / "proj" / "reports" / "eval-r1.json").write_text("{}\n")
    return base / "proj"


@pytest.mark.parametrize("fmt,target", [
    ("onnx", "."), ("onnx", ".."), ("onnx", "reports"), ("onnx", "models"), ("onnx", "models/r1"),
    ("onnx", "models/r1/final"), ("onnx", "distill.db"), ("onnx", "exports"),
    ("jsonl", "distill.db"), ("jsonl", "distill.yaml"), ("parquet", "distill.db"), ("jsonl", "recorded.jsonl"),
    ("jsonl", "reports/eval-r1.json"), ("jsonl", "models/r1/final/config.json"), ("jsonl", "."),
])
def test_export_over_the_project_or_its_files_is_refused_even_with_force(project, fmt, target):
    before = tree(project.parent)
    for force in ((), ("--force",)):
        r = run_cli("export", project, "--format", fmt, "--out", project / target, *force)
        assert r.returncode == 2, (target, force, r.stdout[-2000:], r.stderr[-3000:])
        msg = flat(r.stderr)
        assert "Traceback" not in r.stderr and str(project / target) in msg, msg
        assert "hint:" in msg
    assert tree(project.parent) == before           # nothing changed, moved or deleted
    p = Project.open(project)
    try:
        assert p.store.one("SELECT COUNT(*) FROM teacher_calls") == 1
        assert p.serving_model().path == (project / "models" / "r1" / "final").resolve()
    finally:
        p.close()


def test_onnx_export_refuses_a_foreign_folder_and_force_moves_it_aside(project, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    r = run_cli("export", project, "--format", "onnx", "--out", mine, "--no-quantize")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(mine) in flat(r.stderr) and "--force" in flat(r.stderr)
    assert (mine / "thesis.txt").read_text() == "years of work"

    r = run_cli("export", project, "--format", "onnx", "--out", mine, "--no-quantize", "--force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (mine / "model.onnx").is_file() and (mine / "export.json").is_file()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")]
    assert len(aside) == 1 and (aside[0] / "thesis.txt").read_text() == "years of work"   # moved, not deleted


def test_reexport_replaces_only_its_own_export_and_keeps_a_users_dot_old(project, tmp_path):
    out = tmp_path / "o"
    users = tmp_path / "o.old"               # the old exporter rmtree'd "<out>.old" whatever it was
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    for _ in range(2):                       # the second run replaces the first (a previous distill export)
        r = run_cli("export", project, "--format", "onnx", "--out", out, "--no-quantize")
        assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "export.json").is_file() and (users / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "o.old"]


def test_default_outputs_and_reexports_keep_working(project):
    for _ in range(2):
        r = run_cli("export", project, "--format", "onnx", "--no-quantize")
        assert r.returncode == 0, r.stderr[-3000:]
        r = run_cli("export", project, "--format", "jsonl")
        assert r.returncode == 0, r.stderr[-3000:]
    assert (project / "models" / "r1" / "onnx" / "export.json").is_file()
    assert (project / "exports" / "train.jsonl").is_file()
    assert not list(project.rglob("*.replaced-*"))


def test_data_export_refuses_a_foreign_file_and_force_moves_it_aside(project, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "notes"}\n')
    r = run_cli("export", project, "--format", "jsonl", "--out", notes)
    assert r.returncode == 2 and str(notes) in flat(r.stderr) and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert notes.read_text() == '{"my": "notes"}\n'
    r = run_cli("export", project, "--format", "jsonl", "--out", notes, "--force")
    assert r.returncode == 0, r.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("notes.jsonl.replaced-")]
    assert len(aside) == 1 and aside[0].read_text() == '{"my": "notes"}\n'
    assert '"text"' in notes.read_text()
    # a previous data export is replaced without --force, also when its sidecar was lost
    (tmp_path / "notes.jsonl.provenance.json").unlink()
    assert run_cli("export", project, "--format", "jsonl", "--out", notes).returncode == 0
