#!/usr/bin/env bash
# Local TynamoDB clusters for measurements: start/stop a 3-host cluster on loopback, measure the
# idle CPU, run redis-benchmark, and build the in-flight window table.
#
#   tools/cluster.sh start [extra server flags...]   # 3 hosts, data under $DIR, pids in $DIR/pids
#   tools/cluster.sh stop
#   tools/cluster.sh idle-cpu [seconds]              # CPU of the idle cluster, from /proc/<pid>/stat
#   tools/cluster.sh bench [clients] [requests]      # redis-benchmark --cluster -t set,get -d 256
#   tools/cluster.sh window-table [requests]         # SET rps for window 1,2,4,16 x 1,256 clients
#   tools/cluster.sh ctl status|query [N] [--json]   # tynamo ctl against host 1
#   tools/cluster.sh ctl move SHARD GROUP            # move a shard live (watch: ctl status)
#   tools/cluster.sh add-host ID [CORES]             # start host ID (> 3) with --join, then ctl join
#   tools/cluster.sh ctl leave ID                    # retire it (stop it once ctl status shows
#                                                    # no replica on it: tools/cluster.sh stop-host ID)
#
# Environment: BIN (default target/release/tynamo), DIR (default /tmp/tynamo-cluster),
# BASE (client port of host 1, default 7001; host h: BASE + 10(h-1), peers + 100), CORES (2).
set -euo pipefail

BIN=${BIN:-target/release/tynamo}
DIR=${DIR:-/tmp/tynamo-cluster}
BASE=${BASE:-7001}
CORES=${CORES:-2}
HOSTS=3

map() {
  local m=""
  for h in $(seq 1 $HOSTS); do
    local c=$((BASE + 10 * (h - 1)))
    m+="${m:+,}$h=127.0.0.1:$((c + 100))/127.0.0.1:$c"
  done
  echo "$m"
}

start() {
  mkdir -p "$DIR"
  : > "$DIR/pids"
  for h in $(seq 1 $HOSTS); do
    "$BIN" server --id "$h" --data "$DIR/host-$h" --initial-cluster "$(map)" \
      --cores "$CORES" --placement unbound "$@" 2> "$DIR/host-$h.log" &
    echo $! >> "$DIR/pids"
  done
  # Wait (bounded) until every group has a leader.
  for _ in $(seq 1 200); do
    local led=0
    for g in $(seq 0 $((CORES - 1))); do
      for h in $(seq 1 $HOSTS); do
        if redis-cli -p $((BASE + 10 * (h - 1) + g)) INFO 2>/dev/null | grep -q 'raft_role:Leader'; then
          led=$((led + 1))
          break
        fi
      done
    done
    if [ "$led" -eq "$CORES" ]; then return 0; fi
    sleep 0.1
  done
  echo "cluster did not elect leaders; see $DIR/host-*.log" >&2
  return 1
}

# A host beyond the initial three: started with --join through host 1 (it learns the cluster and
# waits), then added with `tynamo ctl join` (the controller places groups on its cores).
add_host() {
  local h=${1:?host id} cores=${2:-$CORES}
  local c=$((BASE + 10 * (h - 1)))
  "$BIN" server --id "$h" --data "$DIR/host-$h" --peer-addr "127.0.0.1:$((c + 100))" \
    --client-addr "127.0.0.1:$c" --cores "$cores" --placement unbound \
    --join "127.0.0.1:$BASE" 2> "$DIR/host-$h.log" &
  echo $! >> "$DIR/pids"
  echo "$!" > "$DIR/host-$h.pid"
  "$BIN" ctl --cluster "127.0.0.1:$BASE" join "$h=127.0.0.1:$((c + 100)),127.0.0.1:$c,$cores"
}

stop_host() {
  local h=${1:?host id}
  if [ -f "$DIR/host-$h.pid" ]; then
    kill "$(cat "$DIR/host-$h.pid")" 2>/dev/null || true
    rm -f "$DIR/host-$h.pid"
  fi
}

stop() {
  if [ -f "$DIR/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$DIR/pids"
    while read -r pid; do while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done; done < "$DIR/pids"
    rm -f "$DIR/pids"
  fi
  rm -rf "$DIR"/host-*
}

cpu_ticks() { # utime + stime of a pid, in clock ticks
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}

idle_cpu() {
  local secs=${1:-10}
  local hz
  hz=$(getconf CLK_TCK)
  sleep 2 # let the elections settle before measuring
  local before=() after=() pids=()
  mapfile -t pids < "$DIR/pids"
  for p in "${pids[@]}"; do before+=("$(cpu_ticks "$p")"); done
  sleep "$secs"
  for p in "${pids[@]}"; do after+=("$(cpu_ticks "$p")"); done
  local total=0
  for i in "${!pids[@]}"; do
    local d=$((after[i] - before[i]))
    total=$((total + d))
    echo "host $((i + 1)) (pid ${pids[i]}): $(awk -v d="$d" -v hz="$hz" -v s="$secs" 'BEGIN { printf "%.2f", 100 * d / hz / s }')% of one CPU"
  done
  echo "3-host idle cluster, $CORES cores each: $(awk -v d="$total" -v hz="$hz" -v s="$secs" 'BEGIN { printf "%.2f", 100 * d / hz / s }')% of one CPU over ${secs}s"
}

bench() {
  local clients=${1:-64} n=${2:-100000}
  redis-benchmark --cluster -p "$BASE" -t set,get -n "$n" -c "$clients" -d 256 -q
}

rps_of_set() { # requests, clients -> the final SET requests per second
  redis-benchmark --cluster -p "$BASE" -t set -n "$1" -c "$2" -d 256 -q 2>/dev/null \
    | tr '\r' '\n' | grep -o 'SET: [0-9.]* requests' | tail -1 | awk '{print $2}'
}

window_table() {
  local n=${1:-50000}
  echo "| window | SET rps, 1 connection | SET rps, 256 connections |"
  echo "| --- | --- | --- |"
  for w in 1 2 4 16; do
    start --window "$w" > /dev/null
    local one many
    one=$(rps_of_set $((n / 10)) 1)
    many=$(rps_of_set "$n" 256)
    stop
    echo "| $w | $one | $many |"
  done
}

cmd=${1:-}
shift || true
case "$cmd" in
  start) start "$@" ;;
  stop) stop ;;
  idle-cpu) idle_cpu "$@" ;;
  bench) bench "$@" ;;
  window-table) window_table "$@" ;;
  ctl) "$BIN" ctl --cluster "127.0.0.1:$BASE" "$@" ;;
  add-host) add_host "$@" ;;
  stop-host) stop_host "$@" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
