#!/bin/sh
# scripts/bench-disk.sh [bench_disk ARGS...]
#
# Guest-level disk benchmark: the kit guest runs busybox dd with O_DIRECT on its
# first virtio disk under capvm (dev-blk) and under QEMU (virtio-blk-pci,
# cache=none), in one run, and prints each row's MB/s and the ratio
# (tests/src/bin/bench_disk.rs). Runs directly where /dev/kvm runs ordinary
# guests, else inside the test host (nested KVM under QEMU TCG: compare ratios).
# The device-level benchmark (dev-blk against the host's own pread/pwrite) is
# scripts/bench-blk.sh.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --locked -p supervisor -p vcpu-runner -p dev-blk -p tests --bin bench_disk >&2
tests/kit/build.sh >/dev/null
exec tests/testhost.sh "${CARGO_TARGET_DIR:-target}/release/bench_disk" "$@"
