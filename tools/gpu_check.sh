#!/usr/bin/env bash
# The prepared GPU check (issue 11), for a session that is lent a GPU machine (the `device`
# tool's `run`): every `Device` op of the CUDA backend (cuBLASLt GEMMs, NVRTC kernels) on GPU
# tensors of f32, bf16 and f16 against the CPU backend on the same inputs, one JSON line per
# check (exit 1 if any is off), plus nvidia-smi, written under $OUT. The machine has no Rust
# toolchain, so the check binary is built here and carried:
#
#   RUSTFLAGS="-C target-cpu=x86-64-v3" cargo build --release -p kernels --features cuda \
#       --example gpu_check --target-dir target/portable
#   mkdir -p target/gpu && cp target/portable/release/examples/gpu_check target/gpu/ && strip target/gpu/gpu_check
#
# (x86-64-v3, not the workspace's target-cpu=native: the GPU host's CPU is another one.)
#   run(command="tools/gpu_check.sh", carry=["target/gpu"], timeout_s=300)
#
# The CUDA 13 driver comes with the machine; NVRTC and the CUDA headers from its Python's NVIDIA
# wheels (PyTorch cu13 installs them), found below. Sized to finish in well under a minute.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/gpu/out}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >&2
nv=""
for py in python3 python; do
    site=$("$py" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null) || continue
    for cand in "$site/nvidia/cu13" "$site/nvidia/cuda_nvrtc"; do
        if [ -e "$cand/lib/libnvrtc.so.13" ]; then nv="$cand"; break 2; fi
    done
done
if [ -z "$nv" ]; then
    nv=$(dirname "$(dirname "$(find / -name 'libnvrtc.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")")
fi
echo "CUDA tools: $nv" | tee "$out/cuda_tools.txt"
include="$nv/include"
[ -e "$include/cuda_bf16.h" ] || include=$(dirname "$(find / -name cuda_bf16.h -not -path '*/proc/*' 2>/dev/null | head -1)")
libs="$nv/lib"
# cuBLASLt: in the same folder with CUDA 13 wheels, else wherever the nvidia-cublas wheel put it.
if [ ! -e "$nv/lib/libcublasLt.so.13" ]; then
    lt=$(find / -name 'libcublasLt.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
    [ -n "$lt" ] && libs="$libs:$(dirname "$lt")"
fi
echo "libraries: $libs" | tee -a "$out/cuda_tools.txt"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PIPEFUSE_CUDA_INCLUDE="$include"
target/gpu/gpu_check | tee "$out/gpu_check.jsonl"
exit "${PIPESTATUS[0]}"
