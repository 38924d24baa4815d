"""Property-based fuzzing of the service from its own OpenAPI schema (schemathesis): every operation is called
with generated requests (valid API key header, derandomized, at most MAX_EXAMPLES per operation) against the
in-process ASGI app, and every response must

- not be a server error (``not_a_server_error``: no 5xx),
- use a status code, content type and body the schema declares (``status_code_conformance``,
  ``content_type_conformance``, ``response_schema_conformance``): 2xx bodies match the response models,
  4xx bodies the error shape.

Positive cases (requests the schema allows) for every operation, negative ones (requests it forbids: wrong
types, missing fields) for those with a body. The schema is fetched from /openapi.json with the key, as a
client would. The app runs its lifespan (store, writer thread, batcher) in schemathesis' ASGI portal thread;
it is shut down at the end of the module, which prints the number of cases. (Driven through ``as_strategy``
and ``@given`` rather than ``schemathesis.pytest.from_fixture``, whose plugin reads a private pytest
attribute that pytest 9 no longer has.)
"""

import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode
from serving import served_project

from distill.serve.app import create_app

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = [("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/classify"),
              ("POST", "/v1/chat/completions"), ("POST", "/v1/feedback"), ("GET", "/v1/rollout"),
              ("POST", "/v1/rollout/promote"), ("POST", "/v1/rollout/rollback")]
# positive: requests the schema allows; negative: requests it does not (wrong types, missing fields, ...)
RUNS = [(m, p, "positive") for m, p in OPERATIONS] + [(m, p, "negative") for m, p in OPERATIONS if m == "POST"]
SEEN: Counter = Counter()            # (method path, mode, status) -> cases


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    root, key = served_project(tmp_path_factory.mktemp("fuzz"))
    app = create_app(root)
    h = {"Authorization": f"Bearer {key}"}
    t0 = time.monotonic()
    # fetched over the app's own /openapi.json, with the key, as a client would
    yield schemathesis.openapi.from_asgi("/openapi.json", app, headers=h), h
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()             # close the app's store, writer thread and batcher
    by_op = Counter()
    for (op, mode, _), n in SEEN.items():
        by_op[f"{op} {mode}"] += n
    statuses = Counter()
    for (_, _, status), n in SEEN.items():
        statuses[status] += n
    print("\nschemathesis cases by (operation, mode, status):", dict(SEEN))
    print(f"\nschemathesis {schemathesis.__version__}: {sum(SEEN.values())} generated cases in "
          f"{time.monotonic() - t0:.1f}s; per operation {dict(by_op)}; by status {dict(sorted(statuses.items()))}")


def test_the_schema_lists_every_operation(fuzz):
    schema, _ = fuzz
    ops = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    assert ops == set(OPERATIONS)


@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m} {p} {g}" for m, p, g in RUNS])
def test_api_conforms_to_its_schema_and_never_5xx(fuzz, method, path, mode):
    schema, h = fuzz
    op = schema[path][method]

    @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(headers=h, checks=CHECKS)
        SEEN[(f"{method} {path}", mode, response.status_code)] += 1

    run()
    assert sum(n for (op_, m, _), n in SEEN.items() if op_ == f"{method} {path}" and m == mode) > 0


def test_streamed_chat_conforms_to_its_schema(fuzz):
    """A generated case reaches `stream: true` only by chance; this one always does: the server-sent events
    of a streamed answer must match the schema's event shape too."""
    schema, h = fuzz
    op = schema["/v1/chat/completions"]["POST"]
    case = op.Case(body={"model": "t", "messages": [{"role": "user", "content": "a streamed question"}],
                         "stream": True}, media_type="application/json")
    response = case.call_and_validate(headers=h, checks=CHECKS)
    assert response.status_code == 200 and "text/event-stream" in response.headers["content-type"][0]
    assert response.text.rstrip().endswith("data: [DONE]")
