#!/usr/bin/env bash
# The wheels the GPU machine's image lacks, for `bench/gpu_check.sh` (run here, where pip works).
#
#   bench/build_gpu_wheels.sh            # .whl/ for the GPU image (CPython 3.12, x86-64 manylinux)
#                                        # and .whl-py311/ for this machine's dry run (CPython 3.11)
#
# The image (KINDS.md "Python packages already there") has torch 2.11+cu130, transformers,
# accelerate, peft, safetensors, pyyaml, numpy, huggingface_hub, fsspec and pytest, but no
# pydantic (loram_core.config) and no bitsandbytes (NF4). One version of each, no dependencies
# resolved (--no-deps): the list below is complete for what the image lacks. bitsandbytes 0.50.2
# ships libbitsandbytes_cuda130.so, the image's CUDA. The folder travels with the working tree,
# 64 MiB in all: the script prints both sizes and fails when they do not fit.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
          typing_extensions==4.16.0 bitsandbytes==0.50.2)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
LIMIT=$((64 * 1024 * 1024))

fetch() {  # fetch DIR PYTHON_VERSION
    rm -rf "$1" && mkdir -p "$1"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$2" --implementation cp \
        "${PLATFORMS[@]}" -d "$1" "${PACKAGES[@]}"
}

fetch .whl 3.12
fetch .whl-py311 3.11
wheels=$(du -sb .whl | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
echo "wheels for the GPU image: $wheels bytes (.whl/, $(ls .whl | wc -l) files)"
echo "working tree that travels: $tree bytes; together $((wheels + tree)) of $LIMIT"
if ((wheels + tree > LIMIT)); then
    echo "too large: drop bitsandbytes from PACKAGES (gpu_check.sh then skips the NF4 section)" >&2
    exit 1
fi
