#!/bin/sh
# scripts/bench-blk.sh [bench_blk ARGS...]   (root)
#
# Device-level virtio-blk benchmark (tests/src/bin/bench_blk.rs): the sandboxed dev-blk
# process driven through a split ring, against the host's own pread/pwrite, both O_DIRECT on
# the same image file; 1 MiB sequential and 4 KiB random reads and writes at queue depth 32.
# Prints MB/s or IOPS, dev-blk's ratio to the host (target >= 90%) and dev-blk's RSS.
# Options: --secs N (per run, default 5), --rounds N, --only NAME,... (workloads), --size-mib N (image, default 1024),
# --compare-engines (a second dev-blk with the other I/O engine, CAPVM_BLK_IO, interleaved),
# --compare-env VAR=VALUE (a second dev-blk with that variable set, e.g. CAPVM_BLK_WORKERS=24), --dir DIR
# (where the image lives, default /var/tmp: it must support O_DIRECT, so not tmpfs).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --locked -p dev-blk >&2
cargo build --release --locked -p tests --bin bench_blk >&2
target="${CARGO_TARGET_DIR:-target}/release"
CAPVM_LIBEXEC="$target" exec "$target/bench_blk" "$@"
