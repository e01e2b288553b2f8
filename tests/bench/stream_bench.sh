#!/usr/bin/env bash
# tests/bench/stream_bench.sh - what the change stream costs a shard's writes.
#
#   tests/bench/stream_bench.sh [BASE_REF] [ROUNDS]
#
# Builds tests/bench/stream_bench.c twice, against this tree's backend and against BASE_REF's
# (default main; exported with git archive into a temp dir and built there), then runs both
# modes (1 GiB of 64 KiB chunk puts; 100k small batches) ROUNDS times (default 3),
# interleaved (base, this, base, this, ...), each on a fresh shard in a temp dir on the
# ordinary disk (/var/tmp, never tmpfs). Prints every run, then per mode the medians and the
# ratios this/base of the wall seconds and of the CPU seconds (above 1: slower).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
base_ref=${1:-main}
rounds=${2:-3}
work=$(mktemp -d /var/tmp/shardfs-stream-bench-XXXXXX)
trap 'rm -rf "$work"' EXIT

build() { # SRC_TREE OUT_BIN
    local src=$1 out=$2
    (cd "$src" && meson setup "$work/build-$(basename "$out")" --buildtype=debugoptimized >/dev/null &&
        ninja -C "$work/build-$(basename "$out")" libshardfs_backend.a >/dev/null)
    cc -O2 -g -std=gnu11 -D_GNU_SOURCE -I"$src/backend" -o "$out" "$here/tests/bench/stream_bench.c" \
        "$work/build-$(basename "$out")/libshardfs_backend.a" -llmdb -lxxhash -lpthread
}

mkdir "$work/base-src"
git -C "$here" archive "$base_ref" | tar -x -C "$work/base-src"
build "$work/base-src" "$work/bench-base"
build "$here" "$work/bench-this"

declare -A times cpus
for mode in large small; do
    for r in $(seq 1 "$rounds"); do
        for which in base this; do
            sync
            out=$("$work/bench-$which" "$work/shard-$which-$mode-$r" "$mode")
            rm -rf "$work/shard-$which-$mode-$r"
            echo "$which round $r: $out"
            times[$which-$mode]+="$(echo "$out" | awk '{print $2}') "
            cpus[$which-$mode]+="$(echo "$out" | awk '{print $5}') "
        done
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v t="$1" -v b="$2" 'BEGIN {printf "%.2f", t / b}'; }
for mode in large small; do
    b=$(echo "${times[base-$mode]}" | median)
    t=$(echo "${times[this-$mode]}" | median)
    bc=$(echo "${cpus[base-$mode]}" | median)
    tc=$(echo "${cpus[this-$mode]}" | median)
    echo "$mode: median wall $base_ref ${b}s, this ${t}s, ratio $(ratio "$t" "$b");" \
        "CPU $base_ref ${bc}s, this ${tc}s, ratio $(ratio "$tc" "$bc")"
done
