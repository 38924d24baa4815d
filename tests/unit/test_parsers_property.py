"""Property tests: the importer and ``task.parse_answer`` fail only in the ways they promise.

- ``import_file`` on arbitrary bytes raises nothing but ``DistillError``; well-formed files round-trip.
- ``parse_answer`` on arbitrary strings raises nothing but ``ParseError``; what it returns is valid for the
  task (a label of the set / an object that validates against the schema).

Example counts are modest (CI speed); the examples of a test share one project, emptied before each.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from distill.data.importer import import_file, normalise
from distill.errors import DistillError
from distill.project import Project
from distill.task import ParseError, ProjectSpec, parse_answer

ASSETS = Path(__file__).parent.parent / "assets"
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """One project for all examples of a test (a new store per example costs ~90 ms, mostly fsync)."""
    root = tmp_path_factory.mktemp("prop") / "proj"
    root.mkdir()
    shutil.copy(ASSETS / "recording.jsonl", root)
    p = Project.init(root, "classify", (ASSETS / "classify_spec.yaml").read_text())
    yield p
    p.close()


def _import_bytes(p: Project, content: bytes, name: str, **kw):
    with p.store.tx() as c:   # start each example from an empty store
        for table in ("examples", "imports", "contamination"):
            c.execute(f"DELETE FROM {table}")
        c.execute("DELETE FROM meta WHERE key='test_locked'")
    f = p.root.parent / name
    f.write_bytes(content)
    try:
        rep = import_file(p, f, **kw)
    except DistillError:
        # whatever went wrong, nothing was half-written
        assert p.store.one("SELECT COUNT(*) FROM examples") == 0
        assert p.store.one("SELECT COUNT(*) FROM imports") == 0
        return None, []
    return rep, [r[0] for r in p.store.q("SELECT text FROM examples")]


# -- importer: arbitrary input ------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from(["x.csv", "x.jsonl", "x.tsv", "x.parquet"]))
@example(b'text\n"unclosed', "x.csv")
@example(b'{"text": ' + b"[" * 5000 + b"\n", "x.jsonl")
@example(b'{"text": ' + b"1" * 5000 + b"}\n", "x.jsonl")
@example(b"text\n\x00\xff\xfe", "x.csv")
def test_importer_only_raises_distill_error_on_arbitrary_bytes(proj, content, name):
    _import_bytes(proj, content, name)


@SETTINGS
@given(st.text(max_size=300))
@example('{"text": {"nested": 1}}\n{"text": null}\n{"text": 3}\n')
def test_importer_only_raises_distill_error_on_text_after_a_valid_header(proj, body):
    _import_bytes(proj, ("text,label,channel\n" + body).encode("utf-8"), "x.csv", label="label")
    _import_bytes(proj, ("text,channel\n" + body).encode("utf-8"), "x.csv")
    _import_bytes(proj, ('{"text": "hello"}\n' + body).encode("utf-8"), "x.jsonl")


# -- importer: round trip -----------------------------------------------------------------------------

texts = st.lists(st.text(min_size=1, max_size=80).filter(lambda t: t.strip()), min_size=1, max_size=12)


def _unique_by_norm(ts: list[str]) -> list[str]:
    seen, out = set(), []
    for t in ts:
        if normalise(t) not in seen:
            seen.add(normalise(t))
            out.append(t)
    return out


@SETTINGS
@given(texts)
def test_csv_rows_round_trip(proj, ts):
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["text"])
    w.writerows([[t] for t in ts])
    rep, stored = _import_bytes(proj, buf.getvalue().encode("utf-8"), "x.csv")
    assert rep is not None
    expected = _unique_by_norm(ts)
    assert sorted(stored) == sorted(expected)
    assert rep.added == len(expected) and rep.dup_exact + rep.dup_normalised == len(ts) - len(expected)


@SETTINGS
@given(texts, st.lists(st.sampled_from(["positive", "negative", "neutral"]), min_size=12, max_size=12))
def test_jsonl_rows_round_trip_with_gold(proj, ts, labels):
    lines = [json.dumps({"text": t, "label": lab, "extra": i}) for i, (t, lab) in enumerate(zip(ts, labels))]
    rep, stored = _import_bytes(proj, ("\n".join(lines) + "\n").encode("utf-8"), "x.jsonl", label="label")
    assert rep is not None
    assert sorted(stored) == sorted(_unique_by_norm(ts))


# -- parse_answer ---------------------------------------------------------------------------------------

CLASSIFY = ProjectSpec(name="p", kind="classify", labels=["positive", "negative", "not_sure"])
SCHEMA = {
    "type": "object",
    "properties": {"intent": {"type": "string", "enum": ["buy", "cancel"]},
                   "slots": {"type": "object", "additionalProperties": {"type": "string"}}},
    "required": ["intent", "slots"],
}
EXTRACT = ProjectSpec(name="p", kind="extract", schema=SCHEMA)


def _classify_ok(text: str) -> str | None:
    try:
        out = parse_answer(CLASSIFY, text)
    except ParseError as e:
        assert e.reason in {"empty", "label_not_in_set"}
        return None
    assert out in CLASSIFY.label_names
    return out


def _extract_ok(text: str):
    try:
        out = parse_answer(EXTRACT, text)
    except ParseError as e:
        assert e.reason in {"empty", "bad_json", "schema_violation"}
        return None
    jsonschema.validate(out, SCHEMA)
    return out


@SETTINGS
@given(st.text(max_size=200))
@example('{"label": ' + "1" * 5000 + "}")
@example('{"label": ' + "[" * 5000)
@example("{")
def test_parse_classify_arbitrary(text):
    _classify_ok(text)


@SETTINGS
@given(st.sampled_from(["positive", "negative", "not_sure"]), st.sampled_from(["", " ", "\n", '"', "*"]),
       st.sampled_from([str.upper, str.lower, lambda s: s.replace("_", " "), lambda s: s]),
       st.sampled_from(["plain", "then prose", "json"]))
def test_parse_classify_recovers_label_variants(label, pad, case, frame):
    answer = pad + case(label) + pad
    text = {"plain": answer, "then prose": answer + "\nbecause reasons",
            "json": json.dumps({"label": answer})}[frame]
    assert _classify_ok(text) == label


@SETTINGS
@given(st.text(max_size=200))
@example('{"intent": "buy", "slots": {}, "n": ' + "9" * 5000 + "}")
@example('{"intent": ' + "[" * 5000)
def test_parse_extract_arbitrary(text):
    _extract_ok(text)


objects = st.fixed_dictionaries({"intent": st.sampled_from(["buy", "cancel"]),
                                 "slots": st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)})


@SETTINGS
@given(objects, st.sampled_from(["{}", "```json\n{}\n```", "Sure! Here it is: {} Hope that helps.", "Answer: {}"]))
def test_parse_extract_finds_valid_objects_in_wrappers(obj, frame):
    assert _extract_ok(frame.replace("{}", json.dumps(obj))) == obj


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10))
def test_parse_extract_arbitrary_json_values(value):
    _extract_ok(json.dumps(value))
