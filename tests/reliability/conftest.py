"""Reliability suite set-up: the kill-trial count, and imports of the shared test helpers.

    pytest tests/reliability                                  # CI size (DEFAULT_TRIALS kill -9 trials)
    DISTILL_KILL_TRIALS=20 pytest tests/reliability -k kill9  # the full run (or: --trials 20)

Every test here runs `distill` as a user does (a subprocess) where the property is about processes:
kill -9, two processes on one project, exit codes, what reaches stdout/stderr and disk.
"""

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))            # fake_openai_server
sys.path.insert(0, str(HERE.parent / "unit"))   # tiny_models

# 6 trials keep the CI run of test_kill9_label_trials.py near 30 s on 2 shared cores; 20+ for a release check
DEFAULT_TRIALS = 6


def pytest_addoption(parser):
    parser.addoption("--trials", type=int, default=None,
                     help=f"kill -9 trials per kill test (default $DISTILL_KILL_TRIALS or {DEFAULT_TRIALS})")


def kill_trials(config) -> int:
    n = config.getoption("--trials") or int(os.environ.get("DISTILL_KILL_TRIALS") or DEFAULT_TRIALS)
    if n < 1:
        raise pytest.UsageError(f"--trials / DISTILL_KILL_TRIALS must be >= 1, got {n}")
    return n


def pytest_generate_tests(metafunc):
    # one test item per trial, so a failure names its trial (and so its seed) and the others still run
    if "kill_trial" in metafunc.fixturenames:
        metafunc.parametrize("kill_trial", range(kill_trials(metafunc.config)))
