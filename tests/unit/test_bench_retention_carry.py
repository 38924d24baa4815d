"""bench/retention_intents.py --dataset X rewrites the result file: the other dataset's results must survive it,
marked with the run that measured them (one dataset's students take ~1 h here, so they are re-run one at a time)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import retention_intents as RI  # noqa: E402


def test_a_one_dataset_run_keeps_the_other_datasets_results_with_their_provenance(tmp_path):
    out = tmp_path / "retention_intents.json"
    assert RI.carry_other_datasets(out, ("clinc150",)) == {}          # nothing to keep yet
    old = {"command": "retention_intents.py", "environment": {"git_sha": "abc123", "time_utc": "2026-11-30T10:00:00Z"},
           "results": {"banking77": {"test": {"n": 3}}, "clinc150": {"test": {"n": 5}}}}
    out.write_text(json.dumps(old))

    kept = RI.carry_other_datasets(out, ("clinc150",))
    assert set(kept) == {"banking77"}                                  # the re-run dataset is not carried
    assert kept["banking77"]["test"] == {"n": 3}
    assert kept["banking77"]["carried_from"] == {"command": "retention_intents.py", "git_sha": "abc123",
                                                 "started": "2026-11-30T10:00:00Z"}

    # carried twice: it still names the run that measured it, not the run that copied it
    out.write_text(json.dumps({"command": "retention_intents.py --dataset clinc150",
                               "environment": {"git_sha": "def456", "time_utc": "2026-12-01T00:00:00Z"},
                               "results": {**kept, "clinc150": {"test": {"n": 6}}}}))
    again = RI.carry_other_datasets(out, ("clinc150",))
    assert again["banking77"]["carried_from"]["git_sha"] == "abc123"
    assert RI.carry_other_datasets(out, RI.DATASETS) == {}             # a run of both carries nothing

    # an unreadable file loses only what it held: the run's own results are still written
    out.write_text("{not json")
    assert RI.carry_other_datasets(out, ("clinc150",)) == {}


def test_an_experiment_with_other_student_settings_must_write_its_own_file():
    # the main result file holds the default recipe only; an experiment there would be read as the default's
    for flags in (["--temperature", "1"], ["--alpha", "1"], ["--max-epochs", "12"], ["--patience", "0"]):
        with pytest.raises(SystemExit, match="write them to their own file with --out"):
            RI.main(["--dataset", "clinc150", *flags])
