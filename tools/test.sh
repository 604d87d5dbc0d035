#!/usr/bin/env bash
# The project's tests, exactly as CI runs them (.ci/run): every crate with the CUDA backend's
# feature on, with NVRTC and the CUDA headers from tools/fetch_cuda_tools.sh so the CUDA kernels
# are compiled for sm_80 and sm_90 and checked for errors and register spills (no GPU needed);
# with Chromium + ChromeDriver (Debian's, for the web page's browser test) and the official OpenAI
# Python client (pinned, under target/py-openai) that the `pipefuse serve` tests drive it with;
# and a check that the kernels build for an AVX2-only CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_browser.sh
tools/fetch_openai_client.sh >/dev/null
cuda=$(tools/fetch_cuda_tools.sh)
export LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PIPEFUSE_CUDA_INCLUDE="$cuda/include"
# .cargo/config.toml builds for the host's CPU, and hosts differ (AVX2-only Zen 3, AVX-512 Zen 4
# and Intel): the kernels must also build for a CPU without AVX-512 (asm with zmm operands only
# inside functions that enable AVX-512).
if [ "$(uname -m)" = x86_64 ]; then
  RUSTFLAGS="-C target-cpu=x86-64-v3" cargo check --locked -q -p kernels \
    --target-dir target/check-x86-64-v3
fi
exec cargo test --workspace --locked --features pipefuse/cuda "$@"
