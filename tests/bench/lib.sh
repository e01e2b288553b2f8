# shellcheck shell=bash
# tests/bench/lib.sh - what the cluster benchmarks share (sourced, not run): a 3-node cluster
# on 127.0.0.1 started from one build, stopped by PID, and the arithmetic of their tables.
#
# The sourcing script sets T (its temp dir) and PY (Debian's python3) and declares
#   declare -A PID MNT; NODES=(a b c)
# then: write_conf DIR VARIANT [EXTRA] writes DIR/cluster.conf (8 shards; a: 0-2, b: 3-5,
# c: 6-7; VARIANT none, or primary / replica: every shard also on a second node, a: 5-6,
# b: 0-1,7, c: 2-4, with that ack; a static map, no etcd; EXTRA: more [cluster] lines);
# start_cluster DIR BIN mounts every node at DIR/mnt/NODE (`shardfs mount -f`, logs in
# DIR/NODE.log), 1 if one did not mount; stop_cluster unmounts (fusermount3 -u) and waits for
# each daemon by PID (kill -9 after 10 s); cpu_ticks sums the daemons' utime + stime;
# median and ratio format the figures.

log() { echo "[$(date +%T)] $*" >&2; }
usec() { echo "${EPOCHREALTIME/./}"; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
in_mountinfo() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

stop_cluster() {
  local n
  for n in "${NODES[@]}"; do
    [ -n "${MNT[$n]:-}" ] && in_mountinfo "${MNT[$n]}" && fusermount3 -u "${MNT[$n]}" 2>/dev/null
  done
  for n in "${NODES[@]}"; do
    if alive "${PID[$n]:-}"; then
      for _ in $(seq 100); do alive "${PID[$n]}" || break; sleep 0.1; done
      alive "${PID[$n]}" && kill -9 "${PID[$n]}" 2>/dev/null
      wait "${PID[$n]}" 2>/dev/null
    fi
    PID[$n]=''
  done
}

free_ports() {
  "$PY" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))' "$1"
}

# write_conf DIR VARIANT [EXTRA]: DIR/cluster.conf (above).
write_conf() {
  local d=$1 v=$2 i=0 n
  local -a p
  read -ra p <<<"$(free_ports 3)"
  {
    printf '[cluster]\nshards = 8\nepoch = 1\ncommit_interval_ms = 200\ncache_timeout = 1\n'
    printf 'secret = bench-%s\ntimeout_ms = 5000\n' "$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
    [ "$v" != none ] && echo "ack = $v"
    [ -n "${3:-}" ] && printf '%s\n' "$3"
    for n in "${NODES[@]}"; do
      printf '\n[node %s]\nurl = http://127.0.0.1:%s\ndata_dir = %s\n' "$n" "${p[$i]}" "$d/$n"
      case $n in
        a) echo "shards = 0-2"; [ "$v" != none ] && echo "replicas = 5-6" ;;
        b) echo "shards = 3-5"; [ "$v" != none ] && echo "replicas = 0-1,7" ;;
        c) echo "shards = 6-7"; [ "$v" != none ] && echo "replicas = 2-4" ;;
      esac
      i=$((i + 1))
    done
  } >"$d/cluster.conf"
}

start_cluster() { # start_cluster DIR BIN
  local d=$1 bin=$2 n ok=0
  for n in "${NODES[@]}"; do
    mkdir -p "$d/$n" "$d/mnt/$n"
    MNT[$n]=$d/mnt/$n
    "$bin" mount -f -c "$d/cluster.conf" -n "$n" "${MNT[$n]}" </dev/null >>"$d/$n.log" 2>&1 &
    PID[$n]=$!
  done
  for n in "${NODES[@]}"; do
    for _ in $(seq 200); do
      in_mountinfo "${MNT[$n]}" && continue 2
      alive "${PID[$n]}" || break
      sleep 0.05
    done
    log "node $n did not mount: $(tail -n 5 "$d/$n.log" 2>/dev/null)"
    ok=1
  done
  return $ok
}

cpu_ticks() { # the three daemons' utime + stime, in clock ticks
  local n t=0 s
  for n in "${NODES[@]}"; do
    s=$(awk '{ print $14 + $15 }' "/proc/${PID[$n]}/stat" 2>/dev/null) || s=0
    t=$((t + s))
  done
  echo "$t"
}

median() { # median of the numbers among the arguments, or "-"
  printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) print "-"; else if (NR % 2) printf "%.2f", v[(NR + 1) / 2];
    else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }'; }

