#!/bin/sh
# scripts/bench-disk.sh [bench_disk ARGS...]
#
# Guest-level disk benchmark: the kit guest runs fio (O_DIRECT, libaio, queue
# depth 32: 1 MiB sequential and 4 KiB random, write then read) on its first
# virtio disk under capvm (dev-blk) and under QEMU (virtio-blk-pci, cache=none),
# interleaved over --runs N (default 3), and prints the medians and the ratio
# capvm/QEMU per row (tests/src/bin/bench_disk.rs). Runs directly where /dev/kvm runs ordinary
# guests, else inside the test host (nested KVM under QEMU TCG: compare ratios).
# The device-level benchmark (dev-blk against the host's own pread/pwrite) is
# scripts/bench-blk.sh.
set -eu
cd "$(dirname "$0")/.."
# Two calls: a --bin filter would apply to every -p of one call (and build only bench_disk).
cargo build --release --locked -p supervisor -p vcpu-runner -p dev-blk >&2
cargo build --release --locked -p tests --bin bench_disk >&2
tests/kit/build.sh >/dev/null
exec tests/testhost.sh "${CARGO_TARGET_DIR:-target}/release/bench_disk" "$@"
