"""A project folder is relocatable: a copy (or a moved project) uses its own files, never the original's.

The adversarial pass found that the store kept absolute model paths, so a copied project served the original's
model, and that evaluation paths were kept relative to the working directory, so `distill report .` from
inside the project said an existing eval JSON was missing. Here a tiny project is trained (a random tiny BERT),
evaluated, promoted, exported (ONNX beside the model, JSONL data), and router-calibrated; then the folder is
copied elsewhere and the original deleted, and `distill status`, `distill report .` and `distill cost .` (run
from inside the copy), model resolution and the predictor the server would load must all work from the copy.
A second test simulates a store written by an older distill (absolute paths) and keeps the original in place:
the copy must still resolve to its own files, and the original must be left byte for byte as it was.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import distill
from distill import runs
from distill.project import Project

SRC = Path(distill.__file__).resolve().parents[1]


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "300"}, timeout=timeout)


def tree(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The original project, everything done once; tests copy it."""
    import torch
    from tiny_models import tiny_bert_folder, tiny_classify_project

    from distill.data.export import export_data
    from distill.evaluate import evaluate
    from distill.export.onnx import export_project
    from distill.serve.router import calibrate_project
    from distill.students.classifier import ClassifierStudent

    base = tmp_path_factory.mktemp("reloc")
    root = base / "orig"
    p = tiny_classify_project(root, n=60)
    with p.store.tx() as c:      # 12 validation (router), 12 test (eval), 36 train
        c.execute("UPDATE examples SET split='test' WHERE split='train' AND id >= 'ex0048'")
        c.execute("INSERT INTO teacher_calls(key,teacher,model,request,status,tokens_in,tokens_out,cost,latency_s,"
                  "created_at) VALUES('k1','rec','m','{}','ok',100,5,0.001,1.5,0)")    # the ledger `cost` reads
    (root / "recorded.jsonl").write_text('{"provenance": {"model": "m"}}\n')
    torch.manual_seed(0)
    student = ClassifierStudent.create(str(tiny_bert_folder(base / "bert")), ["pos", "neg"], device="cpu")
    model_dir = student.save(root / "models" / "r1" / "final")
    p.record_run("r1", "train", "done", model_dir, {"config": {"base": str(base / "bert")}})
    evaluate(p, latency_samples=2, progress=False)
    p.promote("r1", "test fixture")
    export_data(p, root / "exports" / "train.jsonl")
    p.close()
    export_project(root, quantize=False)
    calibrate_project(root, coverage=0.8)
    assert (root / "models" / "r1" / "onnx" / "router.json").is_file()
    return root


def copy_of(built: Path, dest: Path) -> Path:
    shutil.copytree(built, dest)
    return dest


def check_copy_uses_itself(copy: Path) -> None:
    real = copy.resolve()
    r = run_cli("status", ".", "--json", cwd=copy)
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads(r.stdout)
    assert st["serving_model"]["run_id"] == "r1"
    assert Path(st["serving_model"]["path"]).resolve() == real / "models" / "r1" / "final"

    r = run_cli("report", ".", cwd=copy)                       # from inside the copy, cwd = copy
    assert r.returncode == 0, r.stderr[-3000:]
    assert (copy / "reports" / "report.html").is_file()

    r = run_cli("cost", ".", cwd=copy)                         # reads router.json beside the serving model
    assert r.returncode == 0, r.stderr[-3000:]
    basis = json.loads(r.stdout)
    assert str(real / "models" / "r1" / "onnx" / "router.json") in json.dumps(basis)

    from distill.students.predictor import load_predictor

    p = Project.open(copy)
    try:
        ref = p.serving_model()
        assert ref.path == real / "models" / "r1" / "final"
        pred = load_predictor(ref.path)                         # what `distill serve` would load: the copy's ONNX
        assert Path(pred.path).resolve() == real / "models" / "r1" / "onnx"
        _, eval_json = runs.latest_eval(p.store, p.root)
        assert eval_json == real / "reports" / "eval-r1.json"
    finally:
        p.close()


def test_copied_project_with_the_original_deleted_uses_its_own_files(built, tmp_path):
    orig = tmp_path / "orig"
    shutil.copytree(built, orig)     # a private original for this test (the module fixture stays intact)
    copy = copy_of(orig, tmp_path / "elsewhere" / "copy")
    shutil.rmtree(orig)
    check_copy_uses_itself(copy)
    assert not orig.exists()          # nothing recreated, nothing written under the original path

    # every path the store or the export files keep for later stages is project- or folder-relative
    p = Project.open(copy)
    try:
        stored = [r["path"] for r in runs.all_runs(p.store) if r["path"]]
    finally:
        p.close()
    assert stored and not any(Path(s).is_absolute() for s in stored), stored
    export = json.loads((copy / "models" / "r1" / "onnx" / "export.json").read_text())
    assert export["out_dir"] == "." and export["fp32_path"] == "model.onnx"
    for f in ("models/r1/onnx/export.json", "models/r1/onnx/router.json", "exports/train.jsonl.provenance.json"):
        assert str(built) not in (copy / f).read_text(), f


def test_copy_of_an_older_store_with_absolute_paths_resolves_into_the_copy(built, tmp_path):
    orig = copy_of(built, tmp_path / "orig")
    p = Project.open(orig)
    try:                              # what an older distill wrote: absolute paths into the original
        with p.store.tx() as c:
            for r in c.execute("SELECT id, path FROM runs WHERE path IS NOT NULL").fetchall():
                c.execute("UPDATE runs SET path=? WHERE id=?", (str(orig.resolve() / r["path"]), r["id"]))
    finally:
        p.close()
    before = tree(orig)
    copy = copy_of(orig, tmp_path / "elsewhere" / "copy")
    check_copy_uses_itself(copy)      # with the original still there, the copy must not use it
    assert tree(orig) == before       # the original is untouched, byte for byte and mtime for mtime
    p = Project.open(orig)            # and the original still resolves to itself
    try:
        assert p.serving_model().path == orig.resolve() / "models" / "r1" / "final"
    finally:
        p.close()
