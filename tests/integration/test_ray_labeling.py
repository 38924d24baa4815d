"""`distill label --engine ray` on a real local Ray cluster of two nodes (head + one worker, 1 CPU each,
loopback, no dashboard), with a tiny random causal LM as the local teacher (no downloads).

What it proves:
- the Ray path writes what `distill label` writes in-process: the same cache keys, answers, failed/ok
  statuses, ledger rows (request, tokens, attempt) and label rows; scores equal to float round-off; one
  actor per node, so the answers really came from two machines' worth of Ray workers;
- identical prompts are answered once (one paid call, the others cache hits), as in-process;
- kill -9 of the driver (the CLI, connected to the cluster) mid-run, then a re-run: the re-run sends exactly
  the inputs without a committed answer, and the books are exact (one label and one ledger row per input);
- the errors a user can fix: Ray not installed (says which pip command), a non-local teacher, Ray options
  without --engine ray;
- bench/labelling_ray.py --smoke runs, and merges its section into the labelling results without dropping theirs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.labeling import label
from distill.project import Project

REPO = Path(__file__).resolve().parents[2]
LABELS = ("positive", "negative", "neutral")
# Loopback only. Ray swaps 127.0.0.1 in an address for this machine's network address (so that other machines
# could reach it); this switch (meant for single-machine Windows/macOS) keeps every Ray address on loopback.
# Read when ray is first imported, and inherited by the CLI processes the tests start.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(LOOPBACK_ENV)

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'distill[ray]'")


@pytest.fixture(scope="module")
def cluster():
    """Head + one worker node, 1 CPU each, on loopback: the smallest real multi-node Ray cluster."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # in case ray was imported before this module set LOOPBACK_ENV (another test module)
    ray_constants.ENABLE_RAY_CLUSTER = False
    small = {"num_cpus": 1, "object_store_memory": 100 << 20, "node_ip_address": "127.0.0.1"}
    c = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    c.add_node(**small)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "unit"))    # tiny_lm lives beside the unit tests
    from tiny_lm import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny_teacher"), seed=0)


def make_project(root: Path, model: Path, n: int, *, kind: str = "classify", max_tokens: int = 8,
                 per_hour: float = 0.0) -> Project:
    """``n`` train inputs; inputs 0 and 1 have the same text (one prompt: answered once, as in-process)."""
    task = (f"kind: classify\nlabels: [{', '.join(LABELS)}]\n" if kind == "classify" else
            "kind: generate\nprompt:\n  system: Repeat the message.\n")
    spec = (f"name: t\n{task}description: A test task.\nteachers:\n  - name: tiny\n    kind: local\n"
            f"    path: {model}\n    max_tokens: {max_tokens}\n"
            + ("    logprobs: true\n    top_logprobs: 3\n" if kind == "generate" else "")
            + f"    price: {{per_hour: {per_hour}}}\n    terms: {{outputs_may_train_models: true}}\n")
    project = Project.init(root, kind, spec_text=spec)
    with project.store.tx() as c:
        for i in range(n):
            text = "the same message twice" if i < 2 else f"message {i}: order {i * 7919 % 1000} day {i % 28}"
            # norm made unique by hand for the twins (the importer would have kept one of them)
            c.execute("INSERT INTO examples(id, text, norm, split, created_at) VALUES(?,?,?,?,?)",
                      (f"ex{i:04d}", text, f"{text.lower()} {i}", "train", time.time()))
    return project


def _labels(p: Project) -> dict[str, dict]:
    rows = p.store.q("SELECT example_id, status, answer, probs, confidence, logprobs, reason, call_key FROM labels")
    return {r["example_id"]: dict(r) for r in rows}


def _calls(p: Project) -> dict[str, dict]:
    rows = p.store.q("SELECT key, teacher, attempt, request, response, status, tokens_in, tokens_out FROM teacher_calls")
    return {r["key"]: dict(r) for r in rows}


def _same_numbers(a, b, tol: float = 1e-5) -> bool:
    """Equal, floats to ``tol`` (an actor's thread count and prefix cache change float round-off only)."""
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_numbers(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_numbers(x, y, tol) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", ["classify", "generate"])
def test_ray_writes_what_in_process_labelling_writes(cluster, tiny_model, tmp_path, kind):
    from distill.ray_label import RayConfig, label_ray

    n = 24
    inproc, on_ray = make_project(tmp_path / "a", tiny_model, n, kind=kind), make_project(tmp_path / "b", tiny_model, n, kind=kind)
    ra = label(inproc, progress=False)
    rr = label_ray(on_ray, config=RayConfig(actors=2, address=cluster.address, batch_size=4), progress=False)
    rb = rr.report

    assert len(rr.node_ids) == 2                      # one actor on each node of the cluster
    assert rr.sent == rr.answered == n - 1            # the duplicated prompt was sent once
    for f in ("total", "calls", "cache_hits", "ok", "failed_by_reason", "tokens_in", "tokens_out"):
        assert getattr(ra, f) == getattr(rb, f), f
    assert (rb.calls, rb.cache_hits) == (n - 1, 1)

    la, lb = _labels(inproc), _labels(on_ray)
    assert la.keys() == lb.keys() and len(la) == n
    for ex, a in la.items():
        b = lb[ex]
        assert (a["status"], a["answer"], a["reason"], a["call_key"]) == (b["status"], b["answer"], b["reason"], b["call_key"])
        for col in ("probs", "logprobs"):
            assert _same_numbers(json.loads(a[col] or "null"), json.loads(b[col] or "null")), (ex, col)
        assert _same_numbers(a["confidence"], b["confidence"]), ex
    ca, cb = _calls(inproc), _calls(on_ray)
    assert ca.keys() == cb.keys() and len(ca) == n - 1
    for key, a in ca.items():
        b = cb[key]
        assert {k: a[k] for k in ("teacher", "attempt", "request", "status", "tokens_in", "tokens_out")} == \
               {k: b[k] for k in ("teacher", "attempt", "request", "status", "tokens_in", "tokens_out")}
        ra_, rb_ = json.loads(a["response"]), json.loads(b["response"])
        assert ra_["texts"] == rb_["texts"]
        assert _same_numbers(ra_, rb_), key

    again = label_ray(on_ray, config=RayConfig(actors=2, address=cluster.address), progress=False)
    assert (again.sent, again.report.calls, again.report.already_labelled) == (0, 0, n)


def test_budget_stops_the_stream_and_a_larger_budget_continues(cluster, tiny_model, tmp_path):
    from distill.ray_label import RayConfig, label_ray

    # priced by compute time, as a local teacher is: a budget of a few inputs' worth stops the run part-way
    p = make_project(tmp_path / "p", tiny_model, 60, per_hour=3600.0)
    cfg = RayConfig(actors=2, address=cluster.address, batch_size=4)
    first = label_ray(p, config=cfg, budget=0.1, progress=False)
    assert first.report.stopped == "budget" and 0 < first.report.ok < 60
    # (the budget check is the labeller's: before a call, from the mean latency so far, so the first call of a
    # per-hour priced teacher can overshoot it by its own cost, in-process as on Ray)
    assert first.report.ok == p.store.one("SELECT COUNT(*) FROM labels")
    assert first.report.calls == p.store.one("SELECT COUNT(*) FROM teacher_calls")
    rest = label_ray(p, config=cfg, budget=100.0, progress=False)
    # 59 distinct prompts (the twins share one); only those without a committed answer are sent again
    assert rest.report.stopped is None and rest.sent == 59 - first.report.calls
    assert p.store.one("SELECT COUNT(*) FROM labels WHERE status = 'ok'") == 60


# -- kill -9 ------------------------------------------------------------------------------------------------


def _spawn(root: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "label", str(root), "--no-progress",
                             "--engine", "ray", "--actors", "2", "--ray-address", address],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(root: Path) -> set[str]:
    con = sqlite3.connect(f"file:{root / 'distill.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {r[0] for r in con.execute("SELECT example_id FROM labels")}
    finally:
        con.close()


def test_kill9_of_the_driver_resumes_without_duplicate_work(cluster, tiny_model, tmp_path):
    # generate with 24 new tokens: ~10 ms per input per actor here, so 400 inputs keep the actors busy for
    # seconds after the first commit; the kill lands mid-stream
    n = 400
    project = make_project(tmp_path / "p", tiny_model, n, kind="generate", max_tokens=24)
    root = project.root
    project.close()
    proc = _spawn(root, cluster.address)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(_committed(root)) < 20:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the kill: " + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = _committed(root)
    assert 20 <= len(before) < n

    final = _spawn(root, cluster.address)
    stdout, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr[-3000:]
    sent = int(re.search(r"ray: (\d+) sent", stdout).group(1))
    # exactly the inputs without a committed answer went to the actors (the duplicated prompt once)
    # (ex0000 and ex0001 share one prompt: sent once if neither was committed, not at all if one was)
    rest = {f"ex{i:04d}" for i in range(n)} - before
    twins = {"ex0000", "ex0001"}
    assert sent == len(rest - twins) + (1 if twins <= rest else 0)
    print(f"\nkill -9 after {len(before)} of {n} committed; the re-run sent {sent}")

    p = Project.open(root)                               # the store passes its check after the kill
    labels, calls = _labels(p), _calls(p)
    assert len(labels) == n and {r["status"] for r in labels.values()} == {"ok"}
    assert len(calls) == n - 1                           # one ledger row per distinct prompt, none twice
    assert {r["call_key"] for r in labels.values()} == set(calls)
    p.close()


# -- errors a user can fix ---------------------------------------------------------------------------------


def test_without_ray_installed_the_error_says_which_pip_command(monkeypatch):
    from distill.ray_label import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)        # as if it were not installed
    with pytest.raises(DistillError) as e:
        import_ray()
    assert "pip install 'distill[ray]'" in str(e.value)


def test_api_teachers_are_refused(tmp_path):
    from fake_openai_server import make_project as make_api_project

    from distill.ray_label import label_ray

    p = make_api_project(tmp_path / "p", 3, "http://127.0.0.1:9")
    with pytest.raises(DistillError, match="runs local teachers"):
        label_ray(p, progress=False)


def test_ray_options_need_engine_ray(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from distill.cli import app

    make_project(tmp_path / "p", tiny_model, 2).close()
    r = CliRunner().invoke(app, ["label", str(tmp_path / "p"), "--actors", "2"])
    assert r.exit_code == 2 and "--engine ray" in r.output


# -- the benchmark script ----------------------------------------------------------------------------------


def test_bench_smoke_merges_into_the_labelling_results(tmp_path):
    from distill.bench import check_result

    out = tmp_path / "labelling_throughput.json"
    shutil.copy(REPO / "bench" / "results" / "labelling_throughput.json", out)
    before = json.loads(out.read_text())
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "labelling_ray.py"), "--smoke", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    after = json.loads(out.read_text())
    assert check_result(after, "labelling_throughput") == []
    # the labelling suite's own results are kept; the Ray section, ratios and targets are added
    for k in ("rpm_bound", "tpm_bound"):
        assert after["results"][k] == before["results"][k]
    assert {k: v for k, v in after["ratios"].items() if not k.startswith("ray_")} == \
           {k: v for k, v in before["ratios"].items() if not k.startswith("ray_")}
    ray_part = after["results"]["ray_local_teacher"]
    assert {a["actors"] for n in ("ray_1", "ray_2") for a in ray_part["arms"][n]} == {1, 2}
    assert after["ratios"]["ray_answers_equal_inprocess"] == 1.0
    assert after["ratios"]["ray_2_over_1_actors"] is not None
