"""The README's main command, reduced: `distill demo --limit 200 --epochs 2` from a fresh folder, through the
real CLI: real SNIPS data, the recorded real teacher, the packaged MiniLM student, eval and report.
Checks the numbers are computed from this run (not their quality: 2 epochs on ~140 rows is a smoke run),
and that a second run resumes instead of redoing work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_demo(root: Path):
    return subprocess.run([sys.executable, "-m", "distill.cli", "demo", "--dir", str(root), "--limit", "200",
                           "--epochs", "2"], capture_output=True, text=True, timeout=1500)


def test_reduced_demo_end_to_end(tmp_path):
    root = tmp_path / "demo"
    r = run_demo(root)
    # 0 = gate passed, 3 = gate failed (possible for a 2-epoch smoke run); anything else is a crash
    assert r.returncode in (0, 3), r.stdout[-3000:] + r.stderr[-3000:]
    assert "report:" in r.stdout
    report = json.loads((root / "reports" / "report.json").read_text())
    n_test = report["test"]["n"] if isinstance(report["test"], dict) else report["test"]
    assert 20 <= n_test <= 80                      # ~20% of 200 rows hash to the locked test split
    student = report["headline"]["student"]["accuracy (gold)"]
    assert 0.0 <= student["ci"][0] <= student["value"] <= student["ci"][1] <= 1.0
    assert "qwen-1.5b-recorded" in report["teacher_quality"]
    assert (root / "reports" / "report.html").read_text().count("snips-intents") >= 1
    funnel = {step["step"]: step for step in report["funnel"]}
    assert funnel["rows imported"]["count"] == 200
    assert funnel["unique inputs"]["count"] == (200 + funnel["duplicates removed"]["delta"]
                                                + funnel["rejected at import"]["delta"])

    # re-running resumes: nothing is imported twice, every label comes from the cache, training is reused
    r2 = run_demo(root)
    assert r2.returncode in (0, 3), r2.stderr[-3000:]
    assert "0 new" in r2.stdout and "0 new calls" in r2.stdout
