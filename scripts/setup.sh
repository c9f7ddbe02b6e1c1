#!/usr/bin/env bash
# Installs what capvm needs, builds it, and runs the demo: a datastore in a scratch directory,
# the seed article's steps (vm init, vm create -t freebsd-uefi, vm list, vm info), then a Linux
# guest (the test kit's Debian kernel + busybox initramfs, built from Debian packages) booted with
# `vm start -f`: it prints what it sees and powers itself off. Where this host's /dev/kvm cannot
# run ordinary guests (PVM), the guest boots inside the emulated test host (tests/testhost.sh).
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

kit=$(tests/kit/build.sh)
guest_dir="$VM_DIR/linux-demo"
mkdir -p "$guest_dir"
hello='echo "hello from a capvm guest: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) vCPUs, $(sed -n "s/MemTotal: *//p" /proc/meminfo) RAM"'
cat > "$guest_dir/linux-demo.conf" <<EOF
loader="linux"
linux_kernel="$kit/vmlinuz"
linux_initrd="$kit/kit.cpio"
linux_cmdline="console=ttyS0 quiet iommu=noaperture init_on_alloc=0 panic=-1 capvm.action=run capvm.run=$(printf '%s' "$hello" | base64 -w0)"
cpu="2"
memory="512M"
EOF
run info linux-demo
case $(tests/testhost.sh --verdict 2>/dev/null || echo none) in
direct) run start -f linux-demo </dev/null ;;
testhost)
    # The test host shares only this checkout read-write (its /tmp and /var/tmp are its own),
    # so the guest goes into a datastore under target/ for this boot.
    th=$PWD/target/demo-testhost
    rm -rf "$th" && mkdir -p "$th"
    printf 'vm_dir="%s"\n' "$th/vm" > "$th/vm.conf"
    CAPVM_CONF="$th/vm.conf" VM_DIR="$th/vm" "$vm" init >/dev/null
    cp -r "$guest_dir" "$th/vm/"
    echo "+ vm start -f linux-demo    (inside the test host: this host's KVM cannot run ordinary guests)"
    CAPVM_CONF="$th/vm.conf" CAPVM_LIBEXEC="$PWD/target/release" \
        tests/testhost.sh "$vm" start -f linux-demo </dev/null
    ;;
*) echo "no /dev/kvm that runs guests here: not booting linux-demo" ;;
esac
echo
echo "capvm is built in target/release; the demo datastore is $VM_DIR (settings in $CAPVM_CONF)."
