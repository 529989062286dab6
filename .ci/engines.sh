#!/usr/bin/env bash
# Provide the engines tests/engines checks against (make test-engines): llama-cpp-python (built once
# from its sdist, cached), transformers 4.57.6 in its own folder (cached), mistral.rs, Go. The caches
# live under ${XDG_CACHE_HOME:-~/.cache}/hai_medqa/engines, outside the clone, so CI reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
wheel="$(bash .ci/build_llama_cpp.sh)"
"$PY" -m pip install -q "$wheel" -r requirements-engines.txt
PY="$PY" bash .ci/tf4_env.sh >/dev/null
if ! command -v go >/dev/null 2>&1; then
    echo "installing Go (Debian golang-go) to execute Ollama's template language" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq golang-go >/dev/null
fi
