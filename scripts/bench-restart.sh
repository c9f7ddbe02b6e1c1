#!/bin/sh
# scripts/bench-restart.sh [bench_restart ARGS...]   (root)
#
# Restart-latency benchmark (issue 8; tests/src/bin/bench_restart.rs): the time from a device
# process's SIGKILL to the first request it completes after its restart, over many kills in one
# run (default 50 each), for dev-blk (4 KiB I/O at depth 16, in-flight requests replayed) and
# dev-net (a tap in a namespace the bench creates, a datagram a millisecond). Device level: the
# real sandboxed binaries, restarted the way the supervisor does (same fds, same Activate); no
# KVM. Prints each kill, then median, p90 and worst per device against the 20 ms median target,
# and where it ran. Exit status 2 if a median missed the target.
# Options: --kills N, --only blk|net.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --locked -p dev-blk -p dev-net >&2
cargo build --release --locked -p tests --bin bench_restart >&2
target="${CARGO_TARGET_DIR:-target}/release"
CAPVM_LIBEXEC="$target" exec "$target/bench_restart" "$@"
