#!/usr/bin/env bash
# Scaling figure (issue 7): throughput of the write and C (read-only) workloads on a local
# 3-host TynamoDB cluster with 1 core per host (one data group) vs 2 cores per host (two data
# groups), through tynamo-bench --local (three `tynamo server` processes on this machine).
#
#   benches/scaling.sh                     # ~10 s per run, 4 runs
#   DURATION=20s benches/scaling.sh
#
# Prints one line per run, the 2-core/1-core ratios, the machine's CPU use during each run
# (from /proc/stat: when the machine is saturated, more cores per host cannot help, and that is
# the profile to show), and a `RESULT` last line. The target is >= 1.7x where the machine has
# the CPUs for it: 3 hosts x 2 cores plus the load generator want about 7 CPUs.
#
# The Join row: 3 hosts x 1 core (one group) measured, then 3 more hosts of 1 core started with
# `--join` and added with `tynamo ctl join` (six cores: two groups, the new one on the joined
# hosts, half the shards moved to it), measured again once `tynamo ctl status` says the shards
# settled; `join_write_ratio` and `join_c_ratio` are after/before.
#
# Environment: DURATION (10s), CONNECTIONS (64), KEYS (10000), VALUE_SIZE (100), THREADS (1),
# OUT (target/scaling), SKIP_BUILD=1 to use target/release as it is, JOIN_BASE (7401: client
# port of host 1 of the Join row's cluster; host h uses +10(h-1), peers +100), JOIN=0 to skip
# the Join row.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
KEYS=${KEYS:-10000}
VALUE_SIZE=${VALUE_SIZE:-100}
THREADS=${THREADS:-1}
OUT=${OUT:-target/scaling}
BIN=target/release

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release -p tynamo -p tynamo-bench --bins
fi
for b in tynamo tynamo-bench; do
  if [ ! -x "$BIN/$b" ]; then
    echo "scaling: $BIN/$b is missing (cargo build --release -p tynamo -p tynamo-bench --bins)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"

# Busy and total jiffies of the whole machine.
cpu_sample() {
  awk '/^cpu / { idle = $5 + $6; total = 0; for (i = 2; i <= NF; i++) total += $i;
                 print total - idle, total }' /proc/stat
}

echo "scaling: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) (a shared machine:"
echo "scaling: other work running now lowers every figure; the ratios are what to read)"

declare -A OPS CPU
run() {
  local cores=$1 workload=$2
  shift 2
  local name="${workload}-${cores}core"
  local before after
  before=$(cpu_sample)
  # A non-zero status (1: verification failed, 2: the run could not be done) stops the script.
  TYNAMO_BIN="$BIN/tynamo" "$BIN/tynamo-bench" --local --local-cores "$cores" \
    --workload "$workload" --duration "$DURATION" --connections "$CONNECTIONS" \
    --threads "$THREADS" --keys "$KEYS" --value-size "$VALUE_SIZE" --verify \
    --json "$OUT/$name.json" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err"
  after=$(cpu_sample)
  local ops
  ops=$(grep '^RESULT ' "$OUT/$name.txt" | tr ' ' '\n' | sed -n 's/^ops_per_s=//p')
  OPS[$name]=${ops:-0}
  # Busy share of all CPUs over the run (cluster start and the --load fill included).
  CPU[$name]=$(echo "$before $after" | awk '{ b = $3 - $1; t = $4 - $2;
                                             printf "%.0f", (t > 0 ? 100 * b / t : 0) }')
  printf 'scaling: %-8s %d core(s)/host  %8s ops/s  machine CPU busy %3s%%\n' \
    "$workload" "$cores" "${OPS[$name]}" "${CPU[$name]}"
}

for cores in 1 2; do
  run "$cores" write
  run "$cores" c --load
done


