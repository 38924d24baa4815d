"""`bench/training_throughput.py --smoke` end to end (tiny random BERT and Llama, one run per arm, each arm in
its own process): it writes one JSON with the common bench envelope, four ours/plain ratios and the two
issue targets. Checks the shape and that both arms of a comparison trained on the same padded batches,
not the speed (tiny models on a shared machine say nothing about it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.bench import check_result

pytestmark = pytest.mark.slow   # ~45 s: four child processes, each importing torch + transformers

ROOT = Path(__file__).resolve().parents[2]
RATIOS = ("classifier_samples_per_s_ours_over_plain", "lm_samples_per_s_ours_over_plain",
          "classifier_peak_rss_ours_over_plain", "lm_peak_rss_ours_over_plain")


def test_training_throughput_smoke(tmp_path):
    out = tmp_path / "training_throughput.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "training_throughput.py"), "--smoke", "--out", str(out),
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert check_result(doc, "training_throughput") == []
    assert doc["smoke"] is True
    for name in RATIOS:
        assert isinstance(doc["ratios"][name], float) and doc["ratios"][name] > 0, name
    for arm in ("classifier_ours", "classifier_plain", "lm_ours", "lm_plain"):
        (run,) = doc["results"][arm]["runs"]
        assert run["torch_threads"] == 1 and run["samples"] > 0 and run["peak_rss_mb"] > 0
    # same data, same batch shapes: the arms of each comparison padded exactly the same tokens
    assert doc["results"]["same_padded_batches"] == {"classifier": True, "lm": True}
    assert [t["name"].split()[0] for t in doc["targets"]] == ["classifier", "lm"]
    assert all(t["target"] == ">= 1" for t in doc["targets"])
