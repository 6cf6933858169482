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
# OUT (target/scaling), SKIP_BUILD=1 to use target/release as it is, BASE (client port of host 1
# of the 1- and 2-core runs' clusters; default: tynamo-bench picks a free block), JOIN_BASE
# (BASE + 400, or 7401 without BASE: client port of host 1 of the Join row's cluster; host h
# uses +10(h-1), peers +100), JOIN=0 to skip the Join row.
#
# PROFILE=1: every 1- and 2-core run under `perf stat` (the load generator and its three
# servers, inherited) and the write runs also under `perf record -g`; prints the CPU, context
# switches and CPU migrations per operation of each run, and writes $OUT/profile-<run>.txt (the
# hottest symbols and the share of each thread kind). Needs perf (apt-get install linux-perf).
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
KEYS=${KEYS:-10000}
VALUE_SIZE=${VALUE_SIZE:-100}
THREADS=${THREADS:-1}
OUT=${OUT:-target/scaling}
BIN=target/release
BASE=${BASE:-}
PROFILE=${PROFILE:-0}
LOCAL_BASE=()
if [ -n "$BASE" ]; then
  LOCAL_BASE=(--local-base-port "$BASE")
fi
if [ "$PROFILE" = 1 ] && ! command -v perf >/dev/null; then
  echo "scaling: PROFILE=1 needs perf (apt-get install linux-perf)" >&2
  exit 2
fi

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
  local wrap=()
  if [ "$PROFILE" = 1 ]; then
    wrap=(perf stat -x, -e task-clock,context-switches,cpu-migrations -o "$OUT/$name.stat" --)
    if [ "$workload" = write ]; then
      wrap+=(perf record -F 999 -o "$OUT/$name.perf" --)
    fi
  fi
  before=$(cpu_sample)
  # A non-zero status (1: verification failed, 2: the run could not be done) stops the script.
  TYNAMO_BIN="$BIN/tynamo" "${wrap[@]}" "$BIN/tynamo-bench" --local --local-cores "$cores" \
    "${LOCAL_BASE[@]}" --workload "$workload" --duration "$DURATION" \
    --connections "$CONNECTIONS" --threads "$THREADS" --keys "$KEYS" \
    --value-size "$VALUE_SIZE" --verify --json "$OUT/$name.json" "$@" \
    >"$OUT/$name.txt" 2>"$OUT/$name.err"
  after=$(cpu_sample)
  local ops
  ops=$(grep '^RESULT ' "$OUT/$name.txt" | tr ' ' '\n' | sed -n 's/^ops_per_s=//p')
  OPS[$name]=${ops:-0}
  # Busy share of all CPUs over the run (cluster start and the --load fill included).
  CPU[$name]=$(echo "$before $after" | awk '{ b = $3 - $1; t = $4 - $2;
                                             printf "%.0f", (t > 0 ? 100 * b / t : 0) }')
  printf 'scaling: %-8s %d core(s)/host  %8s ops/s  machine CPU busy %3s%%\n' \
    "$workload" "$cores" "${OPS[$name]}" "${CPU[$name]}"
  if [ "$PROFILE" = 1 ]; then
    profile_summary "$name"
  fi
}

# PROFILE=1: per-operation CPU, context switches and migrations of the whole run (the cluster's
# start and the --load fill included, so these are upper bounds for the measured phase), and
# for the write runs the hottest symbols and the CPU share of each kind of thread.
profile_summary() {
  local name=$1 total
  total=$(grep '^RESULT ' "$OUT/$name.txt" | tr ' ' '\n' | sed -n 's/^ops=//p')
  awk -F, -v ops="${total:-0}" -v name="$name" '
    $3 == "task-clock" { cpu_ms = $1 }
    $3 == "context-switches" { cs = $1 }
    $3 == "cpu-migrations" { mig = $1 }
    END { if (ops > 0) printf "scaling: profile %-12s cpu %.1f us/op, context switches %.2f/op, migrations %.3f/op (%d ops)\n",
            name, 1000 * cpu_ms / ops, cs / ops, mig / ops, ops }' "$OUT/$name.stat"
  if [ -f "$OUT/$name.perf" ]; then
    {
      echo "# CPU share by thread kind (executors, io_uring workers, load generator) and space"
      perf report -i "$OUT/$name.perf" --stdio --no-children --sort comm,dso 2>/dev/null |
        awk '$1 ~ /%$/ { kind = $2; sub(/-[0-9]+$/, "", kind);
                         space = ($3 ~ /kernel/ ? "kernel" : "user");
                         share[kind " " space] += $1 }
             END { for (k in share) printf "%6.2f%%  %s\n", share[k], k }' | sort -rn
      echo "# CPU share by symbol (>= 0.5%)"
      perf report -i "$OUT/$name.perf" --stdio --no-children --sort symbol \
        --percent-limit 0.5 2>/dev/null | grep '%' | sed 's/ *-  *- *$//; s/ *$//'
    } >"$OUT/profile-$name.txt"
    echo "scaling: profile $name: $OUT/profile-$name.txt"
  fi
}

for cores in 1 2; do
  run "$cores" write
  run "$cores" c --load
done


ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'
}
WRITE_RATIO=$(ratio "${OPS[write-2core]}" "${OPS[write-1core]}")
C_RATIO=$(ratio "${OPS[c-2core]}" "${OPS[c-1core]}")
echo "scaling: write 2-core/1-core = ${WRITE_RATIO}x, C 2-core/1-core = ${C_RATIO}x (target >= 1.7x with enough CPUs)"

# ----- The Join row ----------------------------------------------------------------------------
if [ -n "$BASE" ]; then
  JOIN_BASE=${JOIN_BASE:-$((BASE + 400))}
else
  JOIN_BASE=${JOIN_BASE:-7401}
fi
JOIN_DIR=""
JOIN_PIDS=()
join_cleanup() {
  for pid in "${JOIN_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${JOIN_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  JOIN_PIDS=()
  if [ -n "$JOIN_DIR" ]; then
    rm -rf "$JOIN_DIR"
  fi
}
trap join_cleanup EXIT

jclient() { echo "127.0.0.1:$((JOIN_BASE + 10 * ($1 - 1)))"; }
jpeer() { echo "127.0.0.1:$((JOIN_BASE + 100 + 10 * ($1 - 1)))"; }
jctl() { "$BIN/tynamo" ctl --cluster "$(jclient 1)" --timeout-ms 20000 "$@"; }

# Waits (up to 120 s) until `tynamo ctl status` says settled at configuration $1.
join_wait_settled() {
  local num=$1 i
  for i in $(seq 1 1200); do
    if jctl --json status 2>/dev/null | grep -q '"settled":true' &&
      [ "$(jctl --json query 2>/dev/null | grep -o '"num":[0-9]*' | head -1)" = "\"num\":$num" ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "scaling: the Join row's cluster did not settle at configuration $num; logs in $JOIN_DIR" >&2
  jctl status >&2 || true
  JOIN_DIR="" # keep the logs
  exit 2
}

join_bench() {
  local name=$1 seeds=$2 workload=$3
  shift 3
  local before after ops
  before=$(cpu_sample)
  "$BIN/tynamo-bench" --cluster "$seeds" --workload "$workload" --duration "$DURATION" \
    --connections "$CONNECTIONS" --threads "$THREADS" --keys "$KEYS" \
    --value-size "$VALUE_SIZE" --verify --json "$OUT/$name.json" "$@" \
    >"$OUT/$name.txt" 2>"$OUT/$name.err"
  after=$(cpu_sample)
  ops=$(grep '^RESULT ' "$OUT/$name.txt" | tr ' ' '\n' | sed -n 's/^ops_per_s=//p')
  OPS[$name]=${ops:-0}
  CPU[$name]=$(echo "$before $after" | awk '{ b = $3 - $1; t = $4 - $2;
                                             printf "%.0f", (t > 0 ? 100 * b / t : 0) }')
  printf 'scaling: %-8s %-18s %8s ops/s  machine CPU busy %3s%%\n' \
    "$workload" "$name" "${OPS[$name]}" "${CPU[$name]}"
}

JOIN_RESULT="join=skipped"
if [ "${JOIN:-1}" != 0 ]; then
  for h in 1 2 3 4 5 6; do
    for p in "$(jclient "$h")" "$(jpeer "$h")"; do
      if (exec 3<>"/dev/tcp/${p%:*}/${p#*:}") 2>/dev/null; then
        echo "scaling: port ${p#*:} is in use; set JOIN_BASE to a free block of 160 ports" >&2
        exit 2
      fi
    done
  done
  JOIN_DIR=$(mktemp -d -t tynamo-scaling-join-XXXXXX)
  MAP=""
  for h in 1 2 3; do
    MAP="${MAP:+$MAP,}$h=$(jpeer "$h")/$(jclient "$h")"
  done
  for h in 1 2 3; do
    "$BIN/tynamo" server --id "$h" --data "$JOIN_DIR/host-$h" --initial-cluster "$MAP" \
      --cores 1 --placement unbound 2>"$JOIN_DIR/host-$h.log" &
    JOIN_PIDS+=($!)
  done
  join_wait_settled 2
  SEEDS3="$(jclient 1),$(jclient 2),$(jclient 3)"
  join_bench join-before-write "$SEEDS3" write
  join_bench join-before-c "$SEEDS3" c --load
  for h in 4 5 6; do
    "$BIN/tynamo" server --id "$h" --data "$JOIN_DIR/host-$h" --peer-addr "$(jpeer "$h")" \
      --client-addr "$(jclient "$h")" --cores 1 --placement unbound --join "$(jclient 1)" \
      2>"$JOIN_DIR/host-$h.log" &
    JOIN_PIDS+=($!)
  done
  join_started=$(date +%s.%N)
  jctl join "4=$(jpeer 4),$(jclient 4),1" "5=$(jpeer 5),$(jclient 5),1" \
    "6=$(jpeer 6),$(jclient 6),1" >/dev/null
  join_wait_settled 3
  join_settled_s=$(awk -v a="$join_started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  groups=$(jctl --json query | grep -o '"created_in"' | wc -l)
  echo "scaling: the join of hosts 4-6 settled in ${join_settled_s} s, ${groups} groups"
  SEEDS6="$SEEDS3,$(jclient 4),$(jclient 5),$(jclient 6)"
  join_bench join-after-write "$SEEDS6" write
  join_bench join-after-c "$SEEDS6" c --load
  join_cleanup
  JW=$(ratio "${OPS[join-after-write]}" "${OPS[join-before-write]}")
  JC=$(ratio "${OPS[join-after-c]}" "${OPS[join-before-c]}")
  echo "scaling: after/before a Join that doubles the groups: write ${JW}x, C ${JC}x"
  JOIN_RESULT="join_groups_after=${groups} join_before_write_ops_per_s=${OPS[join-before-write]} join_after_write_ops_per_s=${OPS[join-after-write]} join_write_ratio=${JW} join_before_c_ops_per_s=${OPS[join-before-c]} join_after_c_ops_per_s=${OPS[join-after-c]} join_c_ratio=${JC} join_settled_s=${join_settled_s}"
fi

echo "RESULT cpus=$(nproc) write_1core_ops_per_s=${OPS[write-1core]} write_2core_ops_per_s=${OPS[write-2core]} write_ratio=${WRITE_RATIO} c_1core_ops_per_s=${OPS[c-1core]} c_2core_ops_per_s=${OPS[c-2core]} c_ratio=${C_RATIO} cpu_busy_pct_write_2core=${CPU[write-2core]} cpu_busy_pct_c_2core=${CPU[c-2core]} ${JOIN_RESULT}"
