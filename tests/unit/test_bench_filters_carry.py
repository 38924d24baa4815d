"""bench/filters.py rewrites filters.json: a dataset whose cross-check it could not run here (its retention
project is not built in this checkout) keeps the last measured result, marked with the run that measured it."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import filters as FB  # noqa: E402


def test_unchecked_datasets_keep_their_last_cross_check_with_provenance(tmp_path):
    out = tmp_path / "filters.json"
    fresh = {"flagged": 7}
    assert FB.carry_cross_check({"banking77": None, "clinc150": fresh}, out) == {"banking77": None, "clinc150": fresh}
    out.write_text(json.dumps({
        "command": "filters.py --seeds 0,1,2", "environment": {"git_sha": "abc123", "time_utc": "2026-11-30T10:00:00Z"},
        "results": {"cross_check_other_teacher": {
            "banking77": {"dropped": 842},
            "clinc150": {"dropped": 626}}}}))
    got = FB.carry_cross_check({"banking77": None, "clinc150": fresh}, out)
    assert got["clinc150"] == fresh                                   # measured now: replaces the old one
    assert got["banking77"] == {"dropped": 842, "carried_from": {"command": "filters.py --seeds 0,1,2",
                                                                 "git_sha": "abc123", "time_utc": "2026-11-30T10:00:00Z"}}
    # carried twice: still names the run that measured it
    out.write_text(json.dumps({"command": "filters.py", "environment": {"git_sha": "zzz"},
                               "results": {"cross_check_other_teacher": got}}))
    again = FB.carry_cross_check({"banking77": None, "clinc150": None}, out)
    assert again["banking77"]["carried_from"]["git_sha"] == "abc123"
    assert again["clinc150"]["carried_from"]["git_sha"] == "zzz"     # measured by the run that wrote that file
    # a --cross-check-only result names its own run ("measured"), and that becomes its provenance
    out.write_text(json.dumps({"command": "filters.py", "environment": {"git_sha": "zzz"}, "results": {
        "cross_check_other_teacher": {"banking77": {"dropped": 1, "measured": {"command": "c", "git_sha": "m1"}}}}}))
    third = FB.carry_cross_check({"banking77": None}, out)
    assert third["banking77"] == {"dropped": 1, "carried_from": {"command": "c", "git_sha": "m1"}}
    out.write_text("{not json")                                       # unreadable: nothing carried, nothing lost
    assert FB.carry_cross_check({"banking77": None}, out) == {"banking77": None}
