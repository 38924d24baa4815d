"""One test per fault a hostile or broken provider can produce, through the real labeller and the loopback
fake provider (tests/fake_openai_server.py). Three inputs, one request at a time, so request i of the
server's log is known to belong to input ex00000 while the fault lasts.

For every kind: the run finishes, the books balance (each Idempotency-Key charged at most once, ledger
rows == charged keys, ledger tokens == charged tokens), every request the server answered without a charge
or a replay was an injected fault, and the fault left its trace where a user looks: ``teacher_calls.retries``
for a transient fault that a retry cured, a failed label with its reason for an answer that never parses,
``failed_by_reason`` of the run for an input the teacher never answered (re-tried on the next run).
tests/integration/test_labeling.py checks a mix of faults in one run; this file isolates each kind.
"""

import time
from collections import Counter

import pytest
from fake_openai_server import make_project, start_server

from distill.labeling import label

N = 3


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "k")


def run(tmp_path, faults: str, *, max_retries: int = 3, timeout_s: float = 5.0, **server_kw):
    server = start_server(tmp_path, faults=faults, **server_kw)
    try:
        p = make_project(tmp_path / "p", N, server.base_url, concurrency=1, max_retries=max_retries,
                         timeout_s=timeout_s)
        t0 = time.monotonic()
        report = label(p, progress=False)
        elapsed = time.monotonic() - t0
        return p, server, report, elapsed, server.log_lines()
    finally:
        server.stop()


def check_books(p, lines) -> dict:
    charged = [x for x in lines if x["charged"]]
    keys = Counter(x["key"] for x in charged)
    assert all(c == 1 for c in keys.values()), "a key was charged twice"
    calls = p.store.q("SELECT * FROM teacher_calls")
    assert {c["key"] for c in calls} == set(keys) and len(calls) == len(charged)
    assert sum(c["tokens_in"] for c in calls) == sum(x["tokens_in"] for x in charged)
    assert sum(c["tokens_out"] for c in calls) == sum(x["tokens_out"] for x in charged)
    # every request answered without a charge or a stored replay was one we injected
    assert all(x["fault"] for x in lines if not x["charged"] and not x["replayed"])
    return {c["key"]: c for c in calls}


def labels(p) -> dict:
    return {r["example_id"]: r for r in p.store.q("SELECT * FROM labels WHERE teacher='api'")}


def first_call(p):
    return p.store.q("SELECT c.* FROM labels l JOIN teacher_calls c ON c.key = l.call_key "
                     "WHERE l.example_id='ex00000'")[0]


# faults the client must treat as "no answer, try again" (nothing charged): two in a row on the first input
UNCHARGED = ["429", "429n", "500", "502", "503", "504", "reset", "garbage", "badschema", "empty", "huge"]


@pytest.mark.parametrize("kind", UNCHARGED)
def test_transient_fault_is_retried_and_counted(tmp_path, kind):
    p, server, r, elapsed, lines = run(tmp_path, f"{kind}@0-1", retry_after=0.5)
    assert r.stopped is None and r.ok == N and not r.failed_by_reason
    check_books(p, lines)
    assert [x["fault"] for x in lines[:2]] == [kind, kind] and all(x["fault"] is None for x in lines[2:])
    assert len(lines) == N + 2 and sum(x["charged"] for x in lines) == N
    assert first_call(p)["retries"] == 2 and r.retries == 2     # the trace: 2 retries on the first input
    assert all(x["status"] == "ok" for x in labels(p).values())
    if kind == "429":
        assert elapsed >= 2 * 0.5          # Retry-After was honoured on both retries (not the shorter jitter)


def test_truncated_body_is_retried_and_replayed_not_charged_twice(tmp_path):
    # the provider charged the first request, then the body was cut in transit: the retry carries the
    # same Idempotency-Key and gets the stored answer back (cut again once, then whole)
    p, server, r, _, lines = run(tmp_path, "truncated@0-1")
    assert r.ok == N and not r.failed_by_reason
    check_books(p, lines)
    assert [(x["charged"], x["replayed"]) for x in lines[:3]] == [(True, False), (False, True), (False, True)]
    assert first_call(p)["retries"] == 2


def test_slow_answer_times_out_and_the_retry_is_a_free_replay(tmp_path):
    p, server, r, _, lines = run(tmp_path, "slow@0", timeout_s=0.5, slow_s=1.5)
    assert r.ok == N and not r.failed_by_reason
    check_books(p, lines)
    assert lines[0]["charged"] and lines[0]["fault"] == "slow"
    first_key = lines[0]["key"]
    assert sum(x["replayed"] for x in lines if x["key"] == first_key) >= 1   # the retry got the stored answer
    assert first_call(p)["retries"] >= 1


def test_label_outside_the_set_is_reasked_with_a_new_key(tmp_path):
    p, server, r, _, lines = run(tmp_path, "badlabel@0")
    assert r.ok == N and not r.failed_by_reason
    calls = check_books(p, lines)
    bad = [c for c in calls.values() if c["status"] == "parse_error"]
    assert len(bad) == 1 and bad[0]["error"] == "label_not_in_set" and bad[0]["attempt"] == 0
    assert len(calls) == N + 1                 # the bad answer was paid once, under its own key, and kept
    assert first_call(p)["attempt"] == 1


def test_label_outside_the_set_every_time_is_a_failed_label_with_its_reason(tmp_path):
    p, server, r, _, lines = run(tmp_path, "badlabel@0-2")
    assert r.failed_by_reason == {"label_not_in_set": 1} and r.ok == N - 1
    check_books(p, lines)
    lab = labels(p)["ex00000"]
    assert lab["status"] == "failed" and lab["reason"] == "label_not_in_set"


@pytest.mark.parametrize("kind,attempts", [("503", 3), ("reset", 3), ("400", 1)])
def test_fault_that_outlasts_the_retries_leaves_the_input_for_the_next_run(tmp_path, kind, attempts):
    # 503/reset: 1 + max_retries attempts, all faulted; 400 is a refusal and is not retried at all
    p, server, r, _, lines = run(tmp_path, f"{kind}@0-{attempts - 1}", max_retries=2)
    assert r.failed_by_reason == {"teacher_unavailable": 1} and r.ok == N - 1 and r.stopped is None
    check_books(p, lines)
    assert "ex00000" not in labels(p)           # nothing paid, nothing stored: re-tried next run
    assert [x["fault"] for x in lines[:attempts]] == [kind] * attempts
    assert len(lines) == attempts + N - 1
