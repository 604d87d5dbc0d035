#!/usr/bin/env bash
# The prepared GPU check (issue 11), for a session that is lent a GPU machine (the `device`
# tool's `run`). Sized to finish in well under 8 minutes. Writes under $OUT:
#   nvidia-smi.txt, cuda_tools.txt      what the machine has
#   ops.jsonl                           every Device op of the CUDA backend (cuBLASLt GEMMs, NVRTC
#                                       kernels) on f32 / bf16 / f16 GPU tensors vs the CPU backend
#   golden.jsonl                        the DiT, PixArt, SD3, Flux and VAE golden fixtures through
#                                       CUDA (f32 <= 1e-4, bf16 <= 1e-2 / 2e-2 to diffusers) and a
#                                       two-stage PipeFusion (DiT, Flux) on the one GPU vs the CPU
#   generate.txt                        `pipefuse generate --device cuda` on the bundled demo model
#                                       vs `--device cpu` (relative L2 of the final latents)
#   bench_*.json                        DiT-XL/2 256 px batch 2 and PixArt-alpha 1024 px batch 1
#                                       forwards in bf16, pipefuse vs PyTorch (SDPA) on this GPU
#                                       (tools/bench_torch.py), and PixArt with the row attention
#                                       kernel instead of the tensor-core one
# Exit status: non-zero if a correctness check failed (benchmarks only report).
#
# The machine has no Rust toolchain and no network: build here first with tools/gpu_build.sh
# (binaries and Python wheels into target/gpu), then
#   run(command="tools/gpu_check.sh", carry=["target/gpu"], timeout_s=480)
# The CUDA 13 driver comes with the machine; NVRTC, cuBLASLt and the CUDA headers from its
# Python's NVIDIA wheels (PyTorch cu13 installs them), found below.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/gpu/out}
bin=target/gpu
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >&2
py=python3
nv=""
for cand in python3 python; do
    site=$("$cand" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null) || continue
    py=$cand
    for dir in "$site/nvidia/cu13" "$site/nvidia/cuda_nvrtc"; do
        if [ -e "$dir/lib/libnvrtc.so.13" ]; then nv="$dir"; break 2; fi
    done
done
if [ -z "$nv" ]; then
    nv=$(dirname "$(dirname "$(find / -name 'libnvrtc.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")")
fi
{ echo "CUDA tools: $nv"; "$py" --version; } 2>&1 | tee "$out/cuda_tools.txt"
include="$nv/include"
[ -e "$include/cuda_bf16.h" ] || include=$(dirname "$(find / -name cuda_bf16.h -not -path '*/proc/*' 2>/dev/null | head -1)")
libs="$nv/lib"
# cuBLASLt: in the same folder with CUDA 13 wheels, else wherever the nvidia-cublas wheel put it.
if [ ! -e "$nv/lib/libcublasLt.so.13" ]; then
    lt=$(find / -name 'libcublasLt.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
    [ -n "$lt" ] && libs="$libs:$(dirname "$lt")"
fi
echo "libraries: $libs; headers: $include" | tee -a "$out/cuda_tools.txt"
# gpu_build.sh carries the binaries xz-compressed: unpack them outside $OUT.
exe=$(mktemp -d)
for b in gpu_check gpu_golden pipefuse; do
    "$py" -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.decompress(open(sys.argv[1], "rb").read()))' \
        "$bin/$b.xz" "$exe/$b" 2> /dev/null || xz -dc "$bin/$b.xz" > "$exe/$b" \
        || { echo "error: could not unpack $bin/$b.xz (neither Python's lzma nor xz)" >&2; exit 2; }
    chmod +x "$exe/$b"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PIPEFUSE_CUDA_INCLUDE="$include"
status=0

echo "== ops"
timeout 120 "$exe/gpu_check" | tee "$out/ops.jsonl"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== golden fixtures and two stages"
PIPEFUSE_FIXTURES=model/tests/fixtures timeout 120 "$exe/gpu_golden" | tee "$out/golden.jsonl"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== generate on the demo model, cuda vs cpu"
for d in cuda cpu; do
    timeout 120 "$exe/pipefuse" generate --device "$d" --model assets/digits-dit --pipefusion-degree 1 \
        --class-label 3 --steps 8 --save-latent "$out/latent_$d.safetensors" \
        > "$out/generate_$d.log" 2>&1 || { echo "generate --device $d failed" | tee -a "$out/generate.txt"; status=1; }
done
"$py" - "$out/latent_cuda.safetensors" "$out/latent_cpu.safetensors" <<'PY' | tee -a "$out/generate.txt" || status=1
import json, struct, sys
import numpy as np
def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(raw[8:8 + n])
    name, t = next((k, v) for k, v in meta.items() if k != "__metadata__")
    a, b = t["data_offsets"]
    return np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.float32)
g, w = load(sys.argv[1]), load(sys.argv[2])
e = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
print(json.dumps({"check": "generate demo cuda vs cpu (f32)", "rel_l2": e, "tolerance": 1e-3, "ok": e <= 1e-3}))
sys.exit(0 if e <= 1e-3 else 1)
PY

echo "== benchmarks (bf16)"
pylib=$(mktemp -d)
"$py" -m pip install --quiet --no-index --find-links "$bin/wheels" --target "$pylib" diffusers \
    > "$out/pip.log" 2>&1 || echo "diffusers wheels did not install (see pip.log): no PyTorch baseline"
for case in "DiT-XL/2 256 2" "PixArt-alpha-1024 1024 1"; do
    set -- $case
    tag=$(echo "$1" | tr -c 'A-Za-z0-9\n' '_')
    timeout 150 "$exe/pipefuse" bench forward --device cuda --dtype bf16 --preset "$1" --resolution "$2" \
        --batch "$3" --iters 5 --json 2> "$out/bench_${tag}_pipefuse.log" | tail -1 > "$out/bench_${tag}_pipefuse.json"
    PYTHONPATH="$pylib" timeout 150 "$py" tools/bench_torch.py --device cuda --dtype bf16 --preset "$1" \
        --resolution "$2" --batch "$3" --warmup 2 --iters 5 --json 2> "$out/bench_${tag}_torch.log" \
        | tail -1 > "$out/bench_${tag}_torch.json"
    cat "$out"/bench_"${tag}"_*.json
done
# The row attention kernel instead of the tensor-core one, on the attention-bound model.
PIPEFUSE_CUDA_ATTENTION=rows timeout 150 "$exe/pipefuse" bench forward --device cuda --dtype bf16 \
    --preset PixArt-alpha-1024 --resolution 1024 --batch 1 --iters 3 --json \
    2> "$out/bench_pixart_rows.log" | tail -1 | tee "$out/bench_PixArt_alpha_1024_pipefuse_rows_attention.json"
exit $status
