#!/bin/sh
# scripts/bench-boot.sh [bench_boot ARGS...]
#
# Boots the guest kit under capvm and under QEMU (-M microvm and -M q35, with
# KVM) in one run and prints each VMM's time to the ready marker, time to
# power off, host-side memory, and capvm's ratio to each (tests/src/bin/bench_boot.rs).
# Runs directly where /dev/kvm runs ordinary guests, else inside the test host
# (tests/testhost.sh), where the figures are those of nested KVM under QEMU TCG:
# compare the ratios, not the seconds. Inside the test host q35 is left out unless
# asked for (--vmm capvm,microvm,q35): QEMU's q35 has hung the emulated host there.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --locked -p supervisor -p vcpu-runner -p tests --bin bench_boot >&2
tests/kit/build.sh >/dev/null
verdict=$(tests/testhost.sh --verdict 2>/dev/null || echo none)
if [ "$verdict" = testhost ] && [ $# -eq 0 ]; then
    set -- --vmm capvm,microvm
fi
exec tests/testhost.sh "${CARGO_TARGET_DIR:-target}/release/bench_boot" "$@"
