#!/usr/bin/env bash
# Builds what the prepared GPU check (tools/gpu_check.sh) carries to a lent GPU machine, which
# has no Rust toolchain and no network (issue 11): the kernels' op check, the model's golden and
# two-stage check, and the pipefuse binary (bench forward --device cuda, generate --device cuda),
# all release, `--features cuda`, for x86-64-v3 (not this machine's target-cpu=native: the GPU
# host's CPU is another one), stripped; and the wheels diffusers needs for the PyTorch baseline
# (diffusers is not installed there; numpy and torch are). Everything goes to target/gpu/,
# which must stay under the 64 MiB a device call carries:
#
#   tools/gpu_build.sh && run(command="tools/gpu_check.sh", carry=["target/gpu"], timeout_s=480)
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu
rm -rf "$out" && mkdir -p "$out/wheels"
export RUSTFLAGS="-C target-cpu=x86-64-v3"
build=(cargo build --release --locked --target-dir target/portable --features cuda)
"${build[@]}" -p kernels --example gpu_check
"${build[@]}" -p model --example gpu_golden
"${build[@]}" -p pipefuse
for b in examples/gpu_check examples/gpu_golden pipefuse; do
    cp "target/portable/release/$b" "$out/"
done
strip "$out"/gpu_check "$out"/gpu_golden "$out"/pipefuse
# xz takes the three binaries from 17 to 5 MiB of the 64 a device call carries; gpu_check.sh
# unpacks them with the GPU machine's Python (lzma), or xz where that fails.
for b in gpu_check gpu_golden pipefuse; do
    if command -v xz > /dev/null; then
        xz -9 -T1 "$out/$b"
    else
        python3 -c 'import lzma, os, sys; open(sys.argv[1] + ".xz", "wb").write(lzma.compress(open(sys.argv[1], "rb").read(), preset=9)); os.remove(sys.argv[1])' "$out/$b"
    fi
done
# diffusers 0.42.1 and what it imports, for Python 3.11 and 3.12 (what a PyTorch 2.11 image is
# likely to have: gpu_check.sh records the version; a third would not fit the 64 MiB); numpy
# (and torch) are on the machine already.
py=${PYTHON:-.venv-tools/bin/python}
[ -x "$py" ] || py=python3
for v in 3.11 3.12; do
    "$py" -m pip download --quiet --only-binary=:all: --python-version "$v" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --dest "$out/wheels" diffusers==0.42.1
done
rm -f "$out"/wheels/numpy-*.whl
# The working tree travels too: both together must stay under 64 MiB.
size=$(( $(du -sb "$out" | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
size=$(( size / 1048576 ))
echo "target/gpu + the working tree: ${size} MiB"
du -sh "$out"/* | sort -h
if [ "$size" -gt 62 ]; then
    echo "error: ${size} MiB would travel; a device call carries at most 64 MiB" >&2
    exit 1
fi
