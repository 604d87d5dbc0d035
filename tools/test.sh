#!/usr/bin/env bash
# The project's tests, exactly as CI runs them (.ci/run): every crate with the CUDA backend's
# feature on, with NVRTC and the CUDA headers from tools/fetch_cuda_tools.sh so the CUDA kernels
# are compiled for sm_80 and sm_90 and checked for errors and register spills (no GPU needed);
# with Chromium + ChromeDriver (Debian's, for the web page's browser test) and the official OpenAI
# Python client (pinned, under target/py-openai) that the `pipefuse serve` tests drive it with.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_browser.sh
tools/fetch_openai_client.sh >/dev/null
cuda=$(tools/fetch_cuda_tools.sh)
export LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PIPEFUSE_CUDA_INCLUDE="$cuda/include"
exec cargo test --workspace --locked --features pipefuse/cuda "$@"
