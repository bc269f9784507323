#!/usr/bin/env bash
# Create the peers' own venv for bench/bench_prune.py: llmcompressor and torch-pruning, kept out of
# the project's .venv (llmcompressor pins transformers<=5.17, ours runs 5.23).
#
#   bash bench/setup_peers.sh [VENV_DIR]      (default: bench/.peers-venv)
#
# torch is installed first and pinned: torch==2.13.0 is the CPU wheel on the build machines, and
# any looser spec would pull a multi-GB CUDA build. The constraint file keeps the peers from
# replacing it (llmcompressor 0.14.0.1 accepts torch>=2.10,<=2.14.0).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.peers-venv}"
py="${PYTHON:-python3}"
TORCH="torch==2.13.0"
PEERS=(llmcompressor==0.14.0.1 torch-pruning==1.6.1)

if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "$TORCH"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH" > "$constraints"
"${pip[@]}" install -q -c "$constraints" "${PEERS[@]}"
# Fail loudly if anything swapped torch after all.
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0"), f"peers venv has torch {torch.__version__}, not 2.13.0"
for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "torch-pruning"):
    print(f"{name} {md.version(name)}")
EOF
touch "$venv/.installed"
