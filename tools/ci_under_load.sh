#!/bin/bash
# .ci/run N times in a row (default 5) on a fresh clone of this repository while another build of
# the workspace loops on the same machine (issue 15: the tests must not depend on the machine's
# speed). Prints one line per run; exits non-zero if any run failed. Logs: $WORK/ci_run_N.log.
#   tools/ci_under_load.sh [RUNS]
set -u
runs=${1:-5}
repo=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/pipefuse-ci-load.XXXXXX)}
git clone -q "$repo" "$WORK/load" && git clone -q "$repo" "$WORK/fresh" || exit 1
touch "$WORK/loading"
( while [ -f "$WORK/loading" ]; do
    (cd "$WORK/load" && CARGO_TARGET_DIR="$WORK/load-target" cargo build -q --release --workspace >/dev/null 2>&1)
    rm -rf "$WORK/load-target"
  done ) &
loader=$!
failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  if (cd "$WORK/fresh" && ./.ci/run) > "$WORK/ci_run_$i.log" 2>&1; then r=pass; else r=FAIL; failed=1; fi
  counts=$(grep -h 'test result' "$WORK/ci_run_$i.log" | awk '{p+=$4; f+=$6} END {print p" passed, "f" failed"}')
  echo "run $i: $r in $(( $(date +%s) - start )) s; $counts"
done
rm -f "$WORK/loading"
kill "$loader" 2>/dev/null
wait
exit $failed
