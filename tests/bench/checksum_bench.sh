#!/usr/bin/env bash
# tests/bench/checksum_bench.sh - what one hash pass of a shard costs, per MiB.
#
#   tests/bench/checksum_bench.sh [MIB...]     (default: 64 256 1024)
#
# `shardfs fsck --replicas` holds a primary's writes for one pass of
# shard_lmdb_checksum() over its copy, and pauses each replica's applying
# for one (DESIGN.md "Checking replicas"). Builds tests/bench/checksum_bench.c
# against this tree's backend, then for each size fills a new shard in a temp
# dir on the ordinary disk (/var/tmp) and prints the passes: hot (page cache)
# three times, then cold (data.mdb's pages dropped first).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(64 256 1024)
work=$(mktemp -d /var/tmp/shardfs-checksum-bench-XXXXXX)
trap 'rm -rf "$work"' EXIT

(cd "$here" && meson setup "$work/build" --buildtype=debugoptimized >/dev/null &&
    ninja -C "$work/build" libshardfs_backend.a >/dev/null)
cc -O2 -g -std=gnu11 -D_GNU_SOURCE -I"$here/backend" -o "$work/bench" \
    "$here/tests/bench/checksum_bench.c" "$work/build/libshardfs_backend.a" -llmdb -lxxhash -lpthread

echo "MIB PASS MS MS/MIB MIB/S RECORDS"
for mib in "${sizes[@]}"; do
    "$work/bench" "$work/shard-$mib" "$mib" | sed "s/^/$mib /"
    rm -rf "$work/shard-$mib"
done
