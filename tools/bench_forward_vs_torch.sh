#!/usr/bin/env bash
# Runs `pipefuse bench forward` and tools/bench_torch.py with the same config, alternating
# ROUNDS times (the 2 vCPUs are noisy: interleave, compare medians), and prints the ratio
# pipefuse_ms / pytorch_ms of the medians. Needs the .venv-tools venv (see tools/README.md).
#   tools/bench_forward_vs_torch.sh [PRESET] [RESOLUTION] [BATCH] [THREADS] [ROUNDS] [DTYPE]
# DTYPE: f32 (default) or bf16, for both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-DiT-XL/2}; res=${2:-256}; batch=${3:-2}; threads=${4:-2}; rounds=${5:-3}; dtype=${6:-f32}
py=${PYTHON:-.venv-tools/bin/python}
echo "$(grep -m1 "model name" /proc/cpuinfo); $(date -u +%F)"
cargo build --release -q -p pipefuse
ours=(); theirs=()
for r in $(seq "$rounds"); do
  o=$(./target/release/pipefuse bench forward --preset "$preset" --resolution "$res" --batch "$batch" --threads "$threads" --iters 3 --dtype "$dtype" --json 2>/dev/null | tail -1)
  t=$("$py" tools/bench_torch.py --preset "$preset" --resolution "$res" --batch "$batch" --threads "$threads" --warmup 1 --iters 3 --dtype "$dtype" --json 2>/dev/null | tail -1)
  echo "round $r pipefuse: $o"
  echo "round $r pytorch:  $t"
  ours+=("$(echo "$o" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["ms_per_forward"])')")
  theirs+=("$(echo "$t" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["ms_per_forward"])')")
done
"$py" - "${ours[*]}" "${theirs[*]}" <<'PY'
import statistics, sys
o = [float(x) for x in sys.argv[1].split()]; t = [float(x) for x in sys.argv[2].split()]
mo, mt = statistics.median(o), statistics.median(t)
print(f"pipefuse median {mo:.1f} ms (runs {o}); pytorch median {mt:.1f} ms (runs {t})")
print(f"pipefuse_vs_pytorch={mo / mt:.3f}")
PY
