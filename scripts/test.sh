#!/usr/bin/env bash
# The whole test suite: unit, property, device-level and end-to-end tests.
# Tests that need root or a usable /dev/kvm print `SKIP: <reason>` where those are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --release --locked
cargo test --workspace --release --locked
# dev-blk's io_uring engine (CAPVM_BLK_IO=uring; the default is the worker pool) against the
# same device-level tests.
CAPVM_BLK_IO=uring cargo test --release --locked -p tests --test dev_blk
