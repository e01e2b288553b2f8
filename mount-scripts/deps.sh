# shellcheck shell=bash
# The Debian packages shardfs needs to build, test and mount, and a function
# that installs the missing ones. Sourced by mount-scripts/shardfs-up and
# tests/run; not meant to be run on its own.

SHARDFS_DEPS=(
    build-essential pkg-config meson ninja-build
    libfuse3-dev fuse3
    liblmdb-dev lmdb-utils
    libxxhash-dev libinih-dev libjansson-dev
    libcurl4-openssl-dev libmicrohttpd-dev libssl-dev curl
    clang libclang-rt-14-dev               # the libFuzzer build (tests/run)
    python3-pytest
    rsync fio attr acl bc util-linux
    openssl                                # tests/system/test_tls.py makes a CA
)

# shardfs_missing_deps: print the packages of SHARDFS_DEPS that are not installed.
shardfs_missing_deps() {
    local p
    for p in "${SHARDFS_DEPS[@]}"; do
        if ! dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii'; then
            printf '%s\n' "$p"
        fi
    done
}

# shardfs_install_deps: apt-get install whatever is missing. Runs apt-get
# update only when something is missing. Returns non-zero if that fails.
shardfs_install_deps() {
    local missing sudo=()
    mapfile -t missing < <(shardfs_missing_deps)
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    echo "installing missing packages: ${missing[*]}" >&2
    "${sudo[@]}" apt-get update &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends \
            "${missing[@]}"
}
