#!/usr/bin/env bash
# Puts NVRTC (libnvrtc.so.13) and the CUDA headers (cuda_bf16.h, ...) under target/cuda-tools/,
# from the NVIDIA wheels pinned with their hashes in tools/cuda-tools.txt, so that the CUDA
# kernels compile and are checked for sm_80 / sm_90 on a machine with no GPU and no toolkit.
# Cached: a second run downloads nothing. Needs python3 with pip and PyPI (or a wheel mirror).
# Prints the folder holding lib/ and include/.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/cuda-tools
if [ ! -f "$dest/nvidia/cu13/lib/libnvrtc.so.13" ] || [ ! -f "$dest/nvidia/cu13/include/cuda_bf16.h" ]; then
    mkdir -p "$dest/wheels"
    python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
        --dest "$dest/wheels" -r tools/cuda-tools.txt >&2 || {
        echo "error: could not download the CUDA tools in tools/cuda-tools.txt (python3 -m pip, PyPI)" >&2
        exit 1
    }
    for w in "$dest"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$dest"
    done
fi
echo "$PWD/$dest/nvidia/cu13"
