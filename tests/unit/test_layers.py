"""The import layers of pyproject.toml ([tool.importlinter]) hold: serve, eval, export and the router load
models through distill.students.predictor and ask the project which model to use, so no stage imports
another's module and there is no import cycle. CI runs `lint-imports` too; this keeps the README's test
command covering it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (bash scripts/setup.sh --dev installs it)")
    r = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in r.stdout
