"""Two import inputs from an adversarial pass, through the real CLI: each exits 2 with a message naming the
file (and line), says what to do, prints no traceback, and imports nothing.

- a JSON Lines file with a lone UTF-16 surrogate escape (``"\\ud800"``): it used to end in a
  UnicodeEncodeError traceback with no line number. Like a byte that is not UTF-8 or a line that is not
  JSON, it now stops the import with the file, line and column.
- a tab-separated file saved as .csv: it used to say only "no column 'text'; the file has: text<TAB>label"
  with no word about the delimiter. Now the error says the file looks tab-separated and the hint says to
  rename it to .tsv (and the same for a comma-separated file saved as .tsv).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import distill
from distill.project import Project

SRC = Path(distill.__file__).resolve().parents[1]
SPEC = "name: t\nkind: classify\nlabels: [pos, neg]\n"


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "300"}, timeout=timeout)


def flat(s: str) -> str:
    return " ".join(s.split())


@pytest.fixture
def project(tmp_path) -> Path:
    Project.init(tmp_path / "p", "classify", spec_text=SPEC).close()
    return tmp_path / "p"


def n_examples(root: Path) -> int:
    p = Project.open(root)
    try:
        return p.store.one("SELECT COUNT(*) FROM examples") + p.store.one("SELECT COUNT(*) FROM imports")
    finally:
        p.close()


@pytest.mark.parametrize("line,col", [
    ('{"text": "bad \\ud800 here", "label": "pos"}', "text"),                  # high half alone
    ('{"text": "ok", "label": "pos", "note": {"k": ["x", "\\uDFFF"]}}', "note"),  # low half, nested, upper case
])
def test_lone_surrogate_in_jsonl_names_file_and_line(project, tmp_path, line, col):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "fine", "label": "pos"}\n{"text": "a pair is fine \\ud83d\\ude00", "label": "neg"}\n'
                 + line + "\n", encoding="utf-8")
    r = run_cli("import", project, f, "--label", "label")
    msg = flat(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{f}, line 3, column '{col}'" in msg and "surrogate" in msg and "hint:" in msg, msg
    assert n_examples(project) == 0                  # one import is one transaction: nothing was added


@pytest.mark.parametrize("body", [
    "text\tlabel\nhello there\tpos\nbye now\tneg\n",          # no commas anywhere: one column 'text\tlabel'
    "text\tlabel\nhello, there\tpos\nbye now\tneg\n",         # a comma in a row: a ragged-row error
])
def test_tsv_saved_as_csv_says_it_looks_tab_separated(project, tmp_path, body):
    f = tmp_path / "data.csv"
    f.write_text(body, encoding="utf-8")
    r = run_cli("import", project, f, "--label", "label")
    msg = flat(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(f) in msg and "tab-separated" in msg and ".tsv" in msg, msg
    assert n_examples(project) == 0
    # and the hint is right: the same bytes named .tsv import
    g = tmp_path / "data.tsv"
    g.write_text(body, encoding="utf-8")
    r = run_cli("import", project, g, "--label", "label")
    assert r.returncode == 0, r.stderr[-3000:]


def test_csv_saved_as_tsv_says_it_looks_comma_separated(project, tmp_path):
    f = tmp_path / "data.tsv"
    f.write_text("text,label\nhello,pos\n", encoding="utf-8")
    r = run_cli("import", project, f, "--label", "label")
    msg = flat(r.stderr)
    assert r.returncode == 2 and "comma-separated" in msg and ".csv" in msg and "Traceback" not in r.stderr, msg
