"""`distill bench`: the shape check, and the whole `--smoke` run as CI runs it (every suite, reduced)."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.bench import SUITES, check_result, run_suites
from distill.errors import DistillError
from distill.runinfo import bench_result, environment, target

REPO = Path(__file__).resolve().parents[2]


def _good() -> dict:
    return bench_result("x", smoke=True, config={"a": 1}, results={"r": 1}, ratios={"speedup": 2.0, "missing": None},
                        targets=[target("speedup", 2.0, ">=", 1.0), target("later", None, "<=", 0.15)],
                        started=time.perf_counter(), environment_start=environment())


def test_target_is_met_only_when_measured():
    assert target("a", 1.0, ">=", 1.0)["met"] is True
    assert target("a", 0.99, ">=", 1.0)["met"] is False
    assert target("b", 0.2, "<=", 0.15)["met"] is False
    assert target("c", None, ">=", 1.0)["met"] is None
    with pytest.raises(ValueError):
        target("d", 1.0, ">", 1.0)


def test_check_result_accepts_the_envelope_and_names_each_defect():
    good = _good()
    assert check_result(good, "x") == []
    assert check_result(json.loads(json.dumps(good)), "x") == []      # as read back from disk
    cases = {
        "missing key 'ratios'": lambda d: d.pop("ratios"),
        "'bench' is 'x', expected 'y'": None,
        "not a finite number": lambda d: d["ratios"].update(speedup=math.nan),
        "without a measured value": lambda d: d["targets"].append({"name": "t", "target": ">= 1", "measured": None,
                                                                    "met": True}),
        "lacks the CPU flags": lambda d: d["environment"]["cpu"].update(flags=[]),
        "non-empty object": lambda d: d.update(ratios={}),
    }
    for msg, mutate in cases.items():
        d = copy.deepcopy(good)
        if mutate:
            mutate(d)
        problems = check_result(d, "y" if mutate is None else "x")
        assert any(msg in p for p in problems), (msg, problems)
    assert check_result([1, 2]) == ["not a JSON object"]


def test_unknown_suite_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="unknown bench suite"):
        run_suites(["latencyy"], out_dir=tmp_path, root=REPO, say=lambda m: None)


@pytest.mark.slow
def test_distill_bench_smoke_runs_every_suite_and_writes_valid_results(tmp_path):
    """The CI run of the benchmarks: every suite reduced, through the real CLI. Checks shape, not speed."""
    out = tmp_path / "results"
    cli = Path(sys.executable).parent / "distill"
    # Its own process group: on a time-out the suite `distill bench` is running dies with it (subprocess.run
    # would kill `distill bench` alone and leave that suite busy on a core after the test has failed).
    p = subprocess.Popen([str(cli), "bench", "--smoke", "--out-dir", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        pytest.fail(f"distill bench --smoke ran over 1,500 s\n{stdout[-4000:]}{stderr[-4000:]}")
    assert p.returncode == 0, stdout[-4000:] + stderr[-4000:]
    for s in SUITES:
        d = json.loads((out / s.result).read_text())
        assert check_result(d, Path(s.result).stem) == [], s.name
        assert d["smoke"] is True and d["environment"]["git_sha"] == d["environment_end"]["git_sha"]
        assert any(v is not None for v in d["ratios"].values()), s.name
    assert "target:" in stdout and "failed suites" not in stdout
    # the cost suite priced this run's latency and router results
    cost = json.loads((out / "cost.json").read_text())
    assert cost["config"]["inputs"]["latency"] == str(out / "latency.json")
