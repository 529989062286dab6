#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI sdist once (portable CPU build: no -march=native, no CUDA) and
# keep the wheel in a cache outside the clone, so later CI runs only install it (seconds instead of
# ~12 minutes on 2 cores). Prints the wheel's path. The native build crashed with SIGILL here (AMX
# instructions), hence GGML_NATIVE=OFF. --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and could
# hand back a native build made earlier on this machine.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${HAI_ENGINES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hai_medqa/engines}/wheels"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3  # CI starts the build before the venv exists: pip wheel needs no venv
mkdir -p "$CACHE"
wheel="$(find "$CACHE" -maxdepth 1 -name "llama_cpp_python-${VERSION}-*.whl" | sort | head -n 1)"
if [ -z "$wheel" ]; then
    tmp="$(mktemp -d "$CACHE/.build.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "building llama-cpp-python ${VERSION} from its sdist (portable CPU build; ~12 min on 2 cores)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" FORCE_CMAKE=1 \
        "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==${VERSION}" >&2
    built="$(find "$tmp" -maxdepth 1 -name 'llama_cpp_python-*.whl' | head -n 1)"
    [ -n "$built" ] || { echo "error: no wheel was built" >&2; exit 1; }
    mv "$built" "$CACHE/"  # same file system: appears complete or not at all
    wheel="$CACHE/$(basename "$built")"
fi
echo "$wheel"
