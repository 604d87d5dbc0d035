#!/usr/bin/env bash
# Runs a command on the fake GPU: a stand-in CUDA driver and cuBLASLt over the CUDA emulator
# (kernels/tests/fake_gpu; ARCHITECTURE.md, "The fake GPU"), with the real NVRTC from
# tools/fetch_cuda_tools.sh. Slow (every CUDA thread runs on the host), exact enough to check the
# CUDA backend's host path end to end on a machine without a GPU, e.g.
#   cargo build --release -p pipefuse --features cuda
#   tools/fake_gpu.sh target/release/pipefuse generate --device cuda --model assets/digits-dit \
#       --pipefusion-degree 1 --class-label 3 --steps 2
#   tools/fake_gpu.sh target/release/examples/gpu_check --small
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=$(tools/fetch_cuda_tools.sh)
export PIPEFUSE_CUDA_INCLUDE="$cuda/include"
cargo run -q --release -p kernels --features cuda --example fake_gpu -- target/fake-gpu >/dev/null
export LD_LIBRARY_PATH="$PWD/target/fake-gpu:$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
