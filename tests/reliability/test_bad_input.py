"""Bad input through the real CLI: each case exits 2 with a message that names the file and the line or
field and says what to do, prints no traceback, and leaves the store exactly as it was.

tests/unit/test_importer.py checks the importer's messages in detail (in-process); test_cli_flow.py covers
non-UTF-8 CSV, a missing column, unknown gold labels and an unknown spec key through the CLI. This file adds
the rest of the list through the CLI, plus checks that work already stored survives each failure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.project import Project

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"


def distill(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src"), "FAKE_KEY": "k", "COLUMNS": "300"},
                          timeout=timeout)


def snapshot(root: Path) -> list:
    p = Project.open(root)
    try:
        return [tuple(r) for r in p.store.q("SELECT id, text, gold, split FROM examples ORDER BY id")] + \
               [tuple(r) for r in p.store.q("SELECT id, rows_read, added FROM imports ORDER BY id")]
    finally:
        p.close()


def flat(s: str) -> str:
    return " ".join(s.split())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project with the 60 reviews already imported: every failure below must leave them alone."""
    root = tmp_path_factory.mktemp("bad") / "p"
    assert distill("init", root, "--kind", "classify").returncode == 0
    (root / "distill.yaml").write_text((ASSETS / "classify_spec.yaml").read_text())
    r = distill("import", root, ASSETS / "reviews.csv", "--label", "label", "--id", "id")
    assert r.returncode == 0, r.stderr
    return root


def _parquet(path: Path, table: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), path)
    return path.read_bytes()


# (file name, content or a function of the path, extra CLI args, substrings the message must contain)
CASES = {
    "unbalanced_quotes": ("q.csv", 'text,label\nfine,positive\n"broken,negative\nlast,neutral\n', ["--label", "label"],
                          ["q.csv", "line 3"]),
    "ragged_row": ("rag.csv", "text,label\na,positive\nb,positive,extra\n", ["--label", "label"], ["rag.csv", "line 3"]),
    "bad_jsonl": ("b.jsonl", '{"text": "fine"}\n{"text": "broken",}\n', [], ["b.jsonl", "line 2"]),
    "jsonl_not_object": ("arr.jsonl", '{"text": "fine"}\n[1, 2]\n', [], ["arr.jsonl", "line 2"]),
    "truncated_parquet": ("t.parquet", lambda p: _parquet(p, {"text": ["a b c"] * 50})[:-40], [], ["t.parquet"]),
    "parquet_wrong_column": ("w.parquet", lambda p: _parquet(p, {"body": ["x"]}), [], ["w.parquet", "'text'"]),
    "wrong_columns": ("c.csv", "body,label\nhello,positive\n", [], ["c.csv", "'text'", "body"]),
    "empty_file": ("e.csv", "", [], ["e.csv", "empty"]),
    "header_only": ("h.csv", "text,label\n", [], ["h.csv", "no data rows"]),
    "blank_jsonl": ("e.jsonl", "\n\n\n", [], ["e.jsonl", "empty"]),
    "latin1": ("latin.csv", "text\nok\ncaf".encode() + b"\xe9 au lait\n", [], ["latin.csv", "line 3", "UTF-8"]),
    # UTF-8 text that also holds one cp1252 line (a file concatenated from two exports)
    "mixed_encodings": ("mixed.csv", "text\nna\u00efve caf\u00e9\n".encode() + "smart \u201cquotes\u201d\n".encode("cp1252")
                        + "r\u00e9sum\u00e9\n".encode(), [], ["mixed.csv", "line 3", "UTF-8"]),
    "utf16": ("u16.csv", "text\nhello\n".encode("utf-16"), [], ["u16.csv", "line 1"]),
    "unknown_gold": ("u.csv", "text,label\nnew a,positive\nnew b,ecstatic\n", ["--label", "label"],
                     ["u.csv", "ecstatic", "lines 3"]),
    "duplicate_ids": ("d.csv", "id,text\nx1,first text\nx2,second text\nx1,a different text\n", ["--id", "id"],
                      ["d.csv", "x1", "line"]),
    "bad_split_value": ("s.csv", "text,split\nnew text,holdout\n", ["--split", "split"], ["s.csv", "holdout"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_refused_and_loses_nothing(project, tmp_path, case):
    name, content, args, must = CASES[case]
    f = tmp_path / name
    data = content(f) if callable(content) else content
    f.write_bytes(data.encode() if isinstance(data, str) else data)
    before = snapshot(project)
    r = distill("import", project, f, *args)
    msg = flat(r.stderr)
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    for m in must:
        assert m in msg, f"{m!r} not in: {msg}"
    assert "hint" in msg or "use " in msg or "fix" in msg.lower()      # it says what to do
    assert snapshot(project) == before


def test_empty_megabyte_and_non_string_texts_are_rejected_per_row_and_reported(project, tmp_path):
    """Not an error for the whole file: the good rows go in, the bad ones are counted with their reason."""
    f = tmp_path / "sizes.jsonl"
    rows = [{"text": "a perfectly normal new review"}, {"text": ""}, {"text": "   "}, {"text": "y" * 1_000_000},
            {"text": {"nested": 1}}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    before = snapshot(project)
    r = distill("import", project, f)
    assert r.returncode == 0, r.stderr[-2000:]
    out = flat(r.stdout)
    assert "empty_text" in out and "too_long" in out and "text_not_a_string" in out
    after = snapshot(project)
    added = [x for x in after if x not in before]
    assert [x[1] for x in added if len(x) == 4] == ["a perfectly normal new review"]
    assert all(x in after for x in before)
    p = Project.open(project)
    try:
        rej = json.loads(p.store.q("SELECT rejected_reasons FROM imports ORDER BY id DESC LIMIT 1")[0][0])
    finally:
        p.close()
    assert rej == {"empty_text": 2, "too_long": 1, "text_not_a_string": 1}


SPEC_HEAD = "name: s\nkind: classify\nlabels: [positive, negative]\n"
TEACHER = """teachers:
  - name: api
    kind: openai
    base_url: http://127.0.0.1:9/v1
    api_key_env: FAKE_KEY
    terms: {outputs_may_train_models: true}
"""
SPECS = {
    "yaml_syntax": (SPEC_HEAD + "labels: [positive, negative\n" + TEACHER, ["distill.yaml", "line"]),
    "tab_indent": (SPEC_HEAD + TEACHER + "\tteacher: api\n", ["distill.yaml", "line"]),
    "not_a_mapping": ("- just\n- a list\n", ["distill.yaml"]),
    "unknown_key": (SPEC_HEAD + TEACHER + "temprature: 0.2\n", ["distill.yaml", "temprature"]),
    "wrong_type": (SPEC_HEAD + TEACHER.replace("kind: openai", "kind: openai\n    concurrency: lots"),
                   ["distill.yaml", "concurrency"]),
    "template_syntax": (SPEC_HEAD + "prompt:\n  user: '{{ text '\n" + TEACHER, ["distill.yaml", "template"]),
    "template_unknown_var": (SPEC_HEAD + "prompt:\n  user: 'Classify: {{ txt }}'\n" + TEACHER,
                             ["unknown variable", "txt"]),
    "no_labels": ("name: s\nkind: classify\nlabels: []\n" + TEACHER, ["distill.yaml", "labels"]),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_bad_spec_is_refused_before_any_teacher_call(tmp_path, case):
    text, must = SPECS[case]
    root = tmp_path / "p"
    root.mkdir()
    (root / "distill.yaml").write_text(text)
    inputs = tmp_path / "in.csv"
    inputs.write_text("text\nfirst input\nsecond input\n")
    # a template with an unknown variable parses, so the import works; the label run must stop before paying
    r = distill("import", root, inputs)
    if r.returncode == 0:
        r = distill("label", root, "--no-progress")
    msg = flat(r.stderr)
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    for m in must:
        assert m in msg, f"{m!r} not in: {msg}"
    assert (root / "distill.yaml").read_text() == text          # the user's file is never rewritten
