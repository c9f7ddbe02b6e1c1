#!/bin/sh
# scripts/bench-net.sh [bench_net ARGS...]   (--runs N, --time SECS, --pings N, --mq)
#
# Guest-level network benchmark: the kit guest under capvm (dev-net on a tap on a
# standard switch) and under QEMU (virtio-net-pci on a tap on the same bridge,
# vhost=off), in a network namespace the bench creates (198.18.9.0/24,
# 2001:db8:9::/64), in one run: iperf3 TCP guest->host and host->guest, ping
# round trips both ways, dev-net's resident set against its 4 MiB target; prints
# a table with the ratios capvm/QEMU (tests/src/bin/bench_net.rs). Runs directly
# where /dev/kvm runs ordinary guests, else inside the test host (nested KVM
# under QEMU TCG: compare ratios, not figures). Needs root and iperf3 on the
# host (scripts/install-deps.sh); the kit carries iperf3 (tests/kit/packages.kit).
# --mq: capvm against itself instead of QEMU, one virtio-net queue pair against
# one per vCPU (network0_queues="1" / "2"), iperf3 -P 2 both ways.
set -eu
cd "$(dirname "$0")/.."
command -v iperf3 >/dev/null || { echo "bench-net.sh: iperf3 not found (apt-get install iperf3)" >&2; exit 1; }
# Two builds: `--bin` would narrow the first to bench_net alone (no vm, no dev-net).
cargo build --release --locked -p supervisor -p vcpu-runner -p dev-net -p netcfg >&2
cargo build --release --locked -p tests --bin bench_net >&2
# The kit resolved here, passed on (testhost.sh forwards CAPVM_*): the bench
# inside the test host uses it as is.
CAPVM_KIT_DIR=$(tests/kit/build.sh | tail -n 1)
export CAPVM_KIT_DIR
exec tests/testhost.sh "${CARGO_TARGET_DIR:-target}/release/bench_net" "$@"
