"""`kill -9` of `distill label` at seeded random moments, many trials: nothing lost, nothing paid twice.

Each trial (seed = 1000 + trial number) builds its own project and fake provider with its own random fault
mix, SIGKILLs the labeller 1-3 times at random moments (some during start-up, most while calls are in
flight), then runs it to completion and checks the books against the provider's own log:
- every input has exactly one ok label (inputs lost: 0);
- charged requests == distinct charged Idempotency-Keys == ledger rows == inputs (duplicate paid calls: 0);
- ledger tokens and cost == what the provider charged.
tests/integration/test_kill9_labeling.py is the single-project version; this one is the randomised,
many-trial run behind ``--trials`` / ``DISTILL_KILL_TRIALS`` (see conftest.py).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai_server import make_project, start_server

from distill.project import Project

REPO = Path(__file__).resolve().parents[2]
PRICE_IN, PRICE_OUT = 1.0, 2.0          # make_project's price per 1M tokens


def spawn_label(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FAKE_KEY": "k"}
    return subprocess.Popen([sys.executable, "-m", "distill.cli", "label", str(root), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_new_request(server, before: int, proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(server.log_lines()) > before:
            return True
        time.sleep(0.01)
    return False


def check_books(root: Path, server, n: int) -> dict:
    """The invariants of the module docstring; returns the counts for the trial summary."""
    p = Project.open(root)
    try:
        by_status = Counter(r["status"] for r in p.store.q("SELECT status FROM labels WHERE teacher='api'"))
        assert dict(by_status) == {"ok": n}, f"inputs lost or failed: {dict(by_status)}"
        labelled = p.store.one("SELECT COUNT(DISTINCT example_id) FROM labels WHERE teacher='api'")
        assert labelled == n == p.store.one("SELECT COUNT(*) FROM examples")
        lines = server.log_lines()
        charged = [x for x in lines if x["charged"]]
        keys = Counter(x["key"] for x in charged)
        dup = sum(c - 1 for c in keys.values())
        assert dup == 0, f"{dup} keys charged more than once"
        calls = p.store.q("SELECT key, tokens_in, tokens_out, cost FROM teacher_calls")
        assert len(calls) == len(charged) == n
        assert {c["key"] for c in calls} == set(keys)
        t_in, t_out = sum(x["tokens_in"] for x in charged), sum(x["tokens_out"] for x in charged)
        assert sum(c["tokens_in"] for c in calls) == t_in
        assert sum(c["tokens_out"] for c in calls) == t_out
        assert sum(c["cost"] for c in calls) == pytest.approx(t_in / 1e6 * PRICE_IN + t_out / 1e6 * PRICE_OUT)
        faults = Counter(x["fault"] for x in lines if x.get("fault"))
        return {"requests": len(lines), "charged": len(charged), "replayed": sum(x["replayed"] for x in lines),
                "duplicate_paid": dup, "faults": dict(faults)}
    finally:
        p.close()


def test_kill9_label_trial(tmp_path, kill_trial):
    seed = 1000 + kill_trial
    rng = random.Random(seed)
    n = rng.randint(30, 60)
    p_fault = {k: round(rng.uniform(0.0, 0.06), 3) for k in ("429", "500", "503", "reset", "truncated")}
    faults = ",".join(f"{k}:{v}" for k, v in p_fault.items()) + f",seed={seed}"
    delay, concurrency = rng.choice([0.03, 0.06, 0.1]), rng.choice([2, 4, 8])
    # kill within the first 90% of the expected labelling time, so every kill lands while calls are in flight
    span = 0.9 * n * delay / concurrency
    server = start_server(tmp_path, delay_s=delay, faults=faults, retry_after=0.2)
    try:
        project = make_project(tmp_path / "p", n, server.base_url, concurrency=concurrency, max_retries=8,
                               timeout_s=5.0)
        project.close()
        kills, moments = 0, []
        for _ in range(rng.randint(1, 3)):
            before = len(server.log_lines())
            proc = spawn_label(project.root)
            if rng.random() < 0.2:
                moment = ("startup", round(rng.uniform(0.0, 1.2), 3))   # while importing / opening the store
            else:
                moment = ("labelling", round(rng.uniform(0.0, span), 3))
                wait_for_new_request(server, before, proc)
            time.sleep(moment[1])
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                moments.append(moment)
            proc.communicate(timeout=60)
            Project.open(project.root).close()        # integrity check passes after every kill
        final = spawn_label(project.root)
        out, err = final.communicate(timeout=180)
        assert final.returncode == 0, err.decode()[-3000:]
        books = check_books(project.root, server, n)
        summary = {"trial": kill_trial, "seed": seed, "inputs": n, "kills": kills, "moments": moments, **books}
        print("\nKILL9_TRIAL " + json.dumps(summary))       # pytest -s shows it; the report sums these lines
        assert kills >= 1, "every kill came after the run had finished: the trial tested nothing"
    finally:
        server.stop()
