#!/usr/bin/env bash
# Installs what capvm needs, builds it, and runs the demo: a datastore in a scratch directory,
# the seed article's steps (vm init, vm create -t freebsd-uefi, vm list, vm info).
# Usage: sudo scripts/setup.sh [DEMO_DIR]      (default DEMO_DIR: /var/tmp/capvm-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --workspace --release --locked

demo_dir=${1:-/var/tmp/capvm-demo}
vm=$PWD/target/release/vm
export VM_DIR="$demo_dir/vm"
export CAPVM_CONF="$demo_dir/vm.conf"
mkdir -p "$demo_dir"
[ -f "$CAPVM_CONF" ] || printf 'vm_dir="%s"\nvm_list="freebsd"\nvm_delay="5"\n' "$VM_DIR" > "$CAPVM_CONF"

run() { echo "+ vm $*"; "$vm" "$@"; }
run init
run datastore list
"$vm" info freebsd >/dev/null 2>&1 || run create -t freebsd-uefi -s 16G freebsd
run list
run info freebsd
echo
echo "capvm is built in target/release; the demo datastore is $VM_DIR (settings in $CAPVM_CONF)."
