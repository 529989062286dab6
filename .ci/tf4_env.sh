#!/usr/bin/env bash
# A transformers 4.x environment beside the venv (the version llama.cpp's own converter pins), without
# a second torch: transformers 4.57.6 and the few pure-Python packages whose venv versions it does not
# accept (tokenizers <= 0.23.0, huggingface_hub < 1.0) go into a --target folder in the cache outside
# the clone; a subprocess puts that folder first on PYTHONPATH and reuses the venv's torch, numpy,
# safetensors. Prints the folder.
set -euo pipefail
TF4="${TF4_VERSION:-4.57.6}"
CACHE="${HAI_ENGINES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hai_medqa/engines}"
PY="${PY:-.venv/bin/python}"
dest="$CACHE/transformers-$TF4"
if [ ! -f "$dest/.complete" ]; then
    mkdir -p "$CACHE"
    tmp="$(mktemp -d "$CACHE/.tf4.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip install -q --no-deps --target "$tmp" "transformers==$TF4" "tokenizers>=0.22,<0.23" \
        "huggingface_hub>=0.34,<1.0" >&2
    touch "$tmp/.complete"
    rm -rf "$dest"
    mv "$tmp" "$dest"
fi
echo "$dest"
