#!/usr/bin/env bash
# tests/bench/openreg_bench.sh - what the open registry costs (DESIGN.md, "Files open on
# other nodes"): the standard small-file workloads through node a of a 3-node cluster.
#
#   tests/bench/openreg_bench.sh [BASE_REF] [ROUNDS] [REPLICAS]
#
# Builds BASE_REF (default main; git archive into a temp dir) and uses this tree's
# build/shardfs. Each round, for base then this (interleaved), starts a fresh 3-node
# cluster on 127.0.0.1 (8 shards, the bench's cluster.conf of tests/bench/run; with
# REPLICAS=1 each shard also has a replica, ack = replica, no etcd), mounts every node and,
# through node a: rsync -a $SRC (default /usr/include) in, reads it all back with tar,
# then creates (1 KiB each), reads and unlinks NFILES (default 10000) small files; then
# unmounts and stops the daemons by PID. Prints every run, then the median seconds of each
# workload and the ratio this/base (above 1: slower). Data lives in /var/tmp, not tmpfs.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
base_ref=${1:-main}
rounds=${2:-3}
replicas=${3:-0}
SRC=${SRC:-/usr/include}
NFILES=${NFILES:-10000}
work=$(mktemp -d /var/tmp/shardfs-openreg-bench-XXXXXX)
declare -A PID=()

cleanup() {
    local n
    for n in a b c; do
        mountpoint -q "$work/mnt/$n" 2>/dev/null && fusermount3 -uz "$work/mnt/$n"
        if [ -n "${PID[$n]:-}" ]; then kill "${PID[$n]}" 2>/dev/null || true; fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

mkdir "$work/base-src"
git -C "$here" archive "$base_ref" | tar -x -C "$work/base-src"
(cd "$work/base-src" && meson setup "$work/build-base" >/dev/null && ninja -C "$work/build-base" shardfs >/dev/null)
declare -A BIN=([base]="$work/build-base/shardfs" [this]="$here/build/shardfs")

ports=$(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
read -ra P <<<"$ports"

cluster_up() { # BIN
    local bin=$1 i=0 n
    rm -rf "$work/data" "$work/mnt"
    mkdir -p "$work/data" "$work/mnt"
    {
        printf '[cluster]\nshards = 8\nepoch = 1\ncommit_interval_ms = 200\ncache_timeout = 1\n'
        printf 'secret = openreg-bench-secret-0123456789\ntimeout_ms = 5000\n'
        [ "$replicas" = 1 ] && printf 'ack = replica\n'
        for n in a b c; do
            printf '\n[node %s]\nurl = http://127.0.0.1:%s\ndata_dir = %s\n' "$n" "${P[$i]}" "$work/data/$n"
            case $n in a) echo "shards = 0-2" ;; b) echo "shards = 3-5" ;; c) echo "shards = 6-7" ;; esac
            if [ "$replicas" = 1 ]; then
                case $n in a) echo "replicas = 6-7" ;; b) echo "replicas = 0-2" ;; c) echo "replicas = 3-5" ;; esac
            fi
            i=$((i + 1))
        done
    } >"$work/cluster.conf"
    for n in a b c; do
        mkdir -p "$work/data/$n" "$work/mnt/$n"
        "$bin" mount -f -c "$work/cluster.conf" -n "$n" "$work/mnt/$n" </dev/null >>"$work/log-$n" 2>&1 &
        PID[$n]=$!
    done
    for n in a b c; do
        for _ in $(seq 200); do mountpoint -q "$work/mnt/$n" && break; sleep 0.05; done
        mountpoint -q "$work/mnt/$n" || { tail "$work/log-$n" >&2; exit 1; }
    done
}

cluster_down() {
    local n
    for n in a b c; do fusermount3 -u "$work/mnt/$n"; done
    for n in a b c; do wait "${PID[$n]}" || echo "node $n exited $?" >&2; PID[$n]=''; done
}

secs() { # COMMAND...: run it, print the seconds it took
    local s e
    s=$(date +%s.%N)
    "$@" >/dev/null
    e=$(date +%s.%N)
    awk -v s="$s" -v e="$e" 'BEGIN {printf "%.3f", e - s}'
}

declare -A T
steps="rsync_in tar_read create_1k read_1k unlink"
for r in $(seq 1 "$rounds"); do
    for which in base this; do
        cluster_up "${BIN[$which]}"
        m=$work/mnt/a
        sync
        line="rsync_in $(secs rsync -a "$SRC/" "$m/inc/")"
        line+=" tar_read $(secs sh -c "tar -cf - -C '$m/inc' . | wc -c")"
        line+=" $(python3 - "$m/small" "$NFILES" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d)
buf = b"x" * 1024
t0 = time.time()
for i in range(n):
    fd = os.open("%s/f%d" % (d, i), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, buf)
    os.close(fd)
t1 = time.time()
for i in range(n):
    with open("%s/f%d" % (d, i), "rb") as f:
        assert f.read() == buf
t2 = time.time()
for i in range(n):
    os.unlink("%s/f%d" % (d, i))
t3 = time.time()
print("create_1k %.3f read_1k %.3f unlink %.3f" % (t1 - t0, t2 - t1, t3 - t2))
PY
)"
        cluster_down
        echo "$which round $r: $line"
        set -- $line
        while [ $# -ge 2 ]; do T[$which-$1]+="$2 "; shift 2; done
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-10s %8s %8s %6s\n' workload base this ratio
for s in $steps; do
    b=$(echo "${T[base-$s]}" | median)
    t=$(echo "${T[this-$s]}" | median)
    printf '%-10s %8s %8s %6s\n' "$s" "$b" "$t" "$(awk -v t="$t" -v b="$b" 'BEGIN {printf "%.2f", t / b}')"
done
