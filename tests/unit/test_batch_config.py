"""Batch API teachers without a server: the config rules, the batch price, and which request goes where
(a new batch, a follow-up batch, or online) from what the store holds (distill.teachers.batch._next_requests)."""

import json
import time

import pytest
from pydantic import ValidationError

from distill.project import Project
from distill.task import TeacherSpec
from distill.teachers.batch import BatchItem, _next_requests
from distill.teachers.ledger import cost_of


def spec(**kw) -> TeacherSpec:
    return TeacherSpec(**{"name": "api", "kind": "openai", "base_url": "http://127.0.0.1:1/v1", "batch": True,
                          "price": {"input_per_1m": 3.0, "output_per_1m": 15.0, "per_hour": 36.0}, **kw})


def test_batch_needs_an_openai_teacher_and_is_not_part_of_the_cache_identity():
    with pytest.raises(ValidationError, match="batch: true needs kind 'openai'"):
        TeacherSpec(name="l", kind="local", batch=True)
    assert spec().identity() == spec(batch=False).identity()      # one cache key for batch and online answers
    with pytest.raises(ValidationError):
        spec(price={"batch_factor": 1.5})
    with pytest.raises(ValidationError):
        spec(batch_max_requests=50_001)


def test_batch_price_is_the_factor_times_the_token_price():
    s = spec()
    # 1M in at $3 + 1M out at $15 = $18 online; x 0.5 = $9 in a batch; the per-hour part is not discounted
    assert cost_of(s, 1e6, 1e6, 0.0) == pytest.approx(18.0)
    assert cost_of(s, 1e6, 1e6, 0.0, batch=True) == pytest.approx(9.0)
    assert cost_of(s, 1e6, 1e6, 100.0, batch=True) == pytest.approx(9.0 + 1.0)
    assert cost_of(spec(price={"input_per_1m": 3.0, "batch_factor": 0.25}), 1e6, 0, 0.0, batch=True) == 0.75


def _store_state(project, calls: dict[str, str], failed: list[dict[str, str]]) -> None:
    with project.store.tx() as c:
        for key, status in calls.items():
            c.execute("""INSERT INTO teacher_calls(key, teacher, model, attempt, request, status, created_at)
                         VALUES(?, 'api', 'm', 0, '{}', ?, ?)""", (key, status, time.time()))
        for i, f in enumerate(failed):
            c.execute("""INSERT INTO teacher_batches(id, teacher, keys, requests, path, estimate, state, failed,
                         created_at) VALUES(?, 'api', '{}', 0, '', 0, 'collected', ?, ?)""",
                      (f"b{i}", json.dumps(f), time.time() + i))


@pytest.mark.parametrize("retry", ["online", "batch"])
def test_where_each_request_goes(tmp_path, retry):
    project = Project.init(tmp_path / "p", "classify")
    _store_state(project, calls={"a0": "ok", "b0": "parse_error", "e0": "parse_error", "e1": "parse_error"},
                 failed=[{"c0": "server_error", "d0": "batch_expired"}, {"d0": "server_error"}])
    items = [BatchItem(["a0", "a1"], []),        # answered: nothing to do
             BatchItem(["b0", "b1"], []),        # did not parse: attempt 1
             BatchItem(["c0", "c1"], []),        # an error line in one batch
             BatchItem(["d0", "d1"], []),        # failed in two batches already
             BatchItem(["e0", "e1"], []),        # every attempt did not parse: ends failed, nothing to ask
             BatchItem(["f0", "f1"], []),        # never asked
             BatchItem(["f0", "f1"], [])]        # the same prompt: asked once
    new, online, retried = _next_requests(project.store, spec(batch_retry=retry), items)
    if retry == "online":
        assert set(new) == {"f0"} and retried == {}
        assert online == {"b1": "parse_error", "c0": "server_error", "d0": "server_error"}
    else:
        assert set(new) == {"f0", "b1", "c0"}
        assert retried == {"b1": "parse_error", "c0": "server_error"}
        assert online == {"d0": "server_error"}          # at most two batches per request, then online
    assert new["f0"][0] == 0 and (retry == "online" or new["b1"][0] == 1)
    project.close()
