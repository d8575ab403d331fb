#!/usr/bin/env bash
# Set up .venv with everything the default config and the tests need (idempotent).
#   bash workflow/setup.sh [--wikitext DIR]
# --wikitext DIR fills the WikiText-2 cache from a local copy (test_rows.json or
# wiki.test.raw) for machines that cannot reach the Hugging Face Hub.
# For CUDA builds of llama.cpp: CMAKE_ARGS="-DGGML_CUDA=on" bash workflow/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

wikitext=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wikitext) wikitext="$2"; shift 2 ;;
    *) echo "setup.sh: unknown argument $1 (usage: setup.sh [--wikitext DIR])" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch first and pinned, so that nothing later resolves a different (CUDA) build.
"${pip[@]}" torch==2.13.0
# llama-cpp-python compiles llama.cpp from source (about 10 minutes on 2 cores; pip caches the wheel).
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "${pip[@]}" -e ".[all]" torch==2.13.0

# llama.cpp's own programs (llama-imatrix, llama-quantize, llama-perplexity, llama-bench) from the same
# source, once: the workflow's importance matrices, the tests and the bench use this one build.
tools=$(.venv/bin/python -c "from quantbench import paths; print(paths.LLAMA_TOOLS)")
if [ ! -x "$tools/llama-bench" ]; then
  .venv/bin/python -m quantbench build-llama-tools --out "$tools" > /dev/null
fi

if [ -n "$wikitext" ]; then
  .venv/bin/python -m quantbench import-wikitext "$wikitext"
fi
echo "quantbench is set up in .venv"
