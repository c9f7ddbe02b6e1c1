#!/bin/sh
# scripts/bench-vnc.sh [bench_vnc ARGS...]
#
# VNC benchmark: the kit guest at 1600x900 changes its /dev/fb0 (whole screen to noise, to
# stripes, to one colour; a 64x16 box) under capvm (dev-fb) and under QEMU (-device
# bochs-display -vnc), in one run; a client asking for Raw, Zlib and ZRLE in turn counts the
# bytes and times each change's updates, then each server's CPU with an idle client and its RSS
# are read from /proc, and the table prints capvm/QEMU ratios (tests/src/bin/bench_vnc.rs).
# Runs directly where /dev/kvm runs ordinary guests, else inside the test host (nested KVM
# under QEMU TCG: bytes are comparable, times and CPU are the emulated machine's).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --locked -p supervisor -p vcpu-runner -p dev-fb -p tests --bin bench_vnc >&2
tests/kit/build.sh >/dev/null
exec tests/testhost.sh "${CARGO_TARGET_DIR:-target}/release/bench_vnc" "$@"
