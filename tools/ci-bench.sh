#!/usr/bin/env bash
# Latency histograms in CI: short closed-loop runs of tynamo-bench against a local 3-host
# TynamoDB cluster (`--local`: three `tynamo server` processes, data in a temporary directory,
# stopped after each run), with --verify, printing HdrHistogram percentile distributions.
#
#   tools/ci-bench.sh                 # write workload, then workload A, ~20 s each
#   DURATION=5s tools/ci-bench.sh     # shorter
#
# Fails (non-zero exit) when a run cannot be done or --verify finds a read that contradicts an
# acknowledged write (tynamo-bench exits 1 or 2). A latency or throughput figure never fails it:
# this machine is shared and slow, and CI must fail on wrong answers, not on a slow runner.
#
# Environment: DURATION (20s), CONNECTIONS (32), KEYS (10000), VALUE_SIZE (256),
# OUT (directory for .hgrm and JSON files, default target/ci-bench), SKIP_BUILD=1 to use the
# release binaries as they are (otherwise `cargo build --release` runs first; a no-op when fresh).
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-20s}
CONNECTIONS=${CONNECTIONS:-32}
KEYS=${KEYS:-10000}
VALUE_SIZE=${VALUE_SIZE:-256}
OUT=${OUT:-target/ci-bench}
BIN=target/release

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release -p tynamo -p tynamo-bench --bins
fi
for b in tynamo tynamo-bench; do
  if [ ! -x "$BIN/$b" ]; then
    echo "ci-bench: $BIN/$b is missing (cargo build --release -p tynamo -p tynamo-bench --bins)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"

echo "ci-bench: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"

run() {
  local name=$1
  shift
  echo
  echo "=== ci-bench: $name (closed loop, $DURATION, $CONNECTIONS connections, value $VALUE_SIZE B, --verify)"
  # A non-zero status (1: verification failed, 2: the run could not be done) stops the script.
  TYNAMO_BIN="$BIN/tynamo" "$BIN/tynamo-bench" --local \
    --duration "$DURATION" --connections "$CONNECTIONS" --keys "$KEYS" \
    --value-size "$VALUE_SIZE" --verify \
    --json "$OUT/$name.json" --hgrm "$OUT/$name" "$@"
}

run write --workload write
run workload-a --workload a --load

echo
echo "ci-bench: verified; histograms in $OUT/*/*.hgrm, summaries in $OUT/*.json"
