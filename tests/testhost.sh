#!/bin/sh
# tests/testhost.sh CMD [ARGS...]
#
# Runs CMD as root with a /dev/kvm that runs ordinary Linux guests, with the
# workspace's release binaries first on PATH (and as CAPVM_LIBEXEC), streams
# its stdout and stderr, and exits with its exit status.
#
# Where the host's KVM runs ordinary guests (Intel VT-x / AMD-V) CMD simply runs
# here. Where it cannot (PVM, or no /dev/kvm at all) CMD runs inside the test
# host: an emulated (QEMU TCG) AMD machine booted from the guest kit's kernel,
# whose kvm_amd gives a nested /dev/kvm. The test host sees the host's root
# filesystem read-only (writes land in a tmpfs and vanish), the workspace
# checkout read-write at the same path, and runs CMD in the same directory.
# Only the workspace is shared back: files written elsewhere are lost.
#
# Other forms (used by the tests crate, tests/src/testhost.rs):
#   testhost.sh --verdict            print direct|testhost|none (reason on stderr)
#   testhost.sh --kit                build or reuse the guest kit, print its dir
#   testhost.sh --serve XCHG         boot the test host on exchange dir XCHG and
#                                    run its commands until XCHG/stop, stdin EOF
#                                    or idle timeout (protocol: kit/testhost-init.sh)
#   testhost.sh --submit XCHG N CMD [ARGS...]
#                                    write command N (CMD in the current dir,
#                                    with this environment's CAPVM_*, RUST_* and
#                                    CARGO_* variables) into XCHG
#
# Environment:
#   CAPVM_TESTHOST=auto|always|never  force the choice (default auto: probe once)
#   CAPVM_CACHE        cache dir (default /var/cache/capvm): kit, KVM verdict
#   CAPVM_TESTHOST_MEM / _SMP         test host size (default 4096 MiB / 2)
#   CAPVM_TESTHOST_TIMEOUT            hard limit for one boot in s (default 3600)
#   CAPVM_TESTHOST_IDLE               --serve: power off after s idle (default 600)
#   CAPVM_TESTHOST_APPEND             more kernel parameters for the test host
#   CAPVM_TESTHOST_VERBOSE=1          copy the test host's console to stderr
#   CAPVM_TESTHOST_KEEP=1             keep the exchange dir (console.log) after a run
#   CARGO_TARGET_DIR   where the release binaries are (default: <workspace>/target)
# Exit status: CMD's; 125 when the test host itself failed (its console log is
# printed); 127 when CMD was not found.
set -eu

TESTS_DIR=$(cd "$(dirname "$0")" && pwd)
WS=$(dirname "$TESTS_DIR")
CACHE=${CAPVM_CACHE:-/var/cache/capvm}
case "${CARGO_TARGET_DIR:-}" in
"") TARGET=$WS/target ;;
/*) TARGET=$CARGO_TARGET_DIR ;;
*) TARGET=$PWD/$CARGO_TARGET_DIR ;;
esac
BIN=$TARGET/release
PROBE_TIMEOUT=30
# The test host's CPU and kernel parameters. Nested SVM under TCG is fragile:
# with 5-level paging (la57), vGIF and transparent huge pages in the test host
# we saw it crash (stack guard page hit in KVM's page fault path) or hang
# within a few inner boots; without them far less often (tests/README.md).
OUTER_ARGS="transparent_hugepage=never kvm_amd.vgif=0"
OUTER_CPU=max,vendor=AuthenticAMD,la57=off

say() { echo "testhost: $*" >&2; }
die() { echo "testhost: error: $*" >&2; exit 125; }

kit_dir() {
    if [ -n "${CAPVM_KIT_DIR:-}" ] && [ -f "$CAPVM_KIT_DIR/kit.env" ]; then
        echo "$CAPVM_KIT_DIR"
    else
        "$TESTS_DIR/kit/build.sh" | tail -n 1
    fi
}

# Does this host's KVM boot the kit? Cached per host kernel release, since
# that is what decides (PVM vs hardware virtualization).
verdict() {
    case "${CAPVM_TESTHOST:-auto}" in
    always) say "CAPVM_TESTHOST=always"; echo testhost; return ;;
    never) say "CAPVM_TESTHOST=never"; echo direct; return ;;
    auto) ;;
    *) die "CAPVM_TESTHOST must be auto, always or never" ;;
    esac
    if [ -n "${CAPVM_IN_TESTHOST:-}" ]; then
        say "inside the test host"
        echo direct
        return
    fi
    if [ ! -c /dev/kvm ]; then
        say "no /dev/kvm on this host"
        echo none
        return
    fi
    file=$CACHE/kvm-verdict/$(uname -r)
    if [ -f "$file" ]; then
        say "cached verdict ($file): $(tail -n 1 "$file")"
        head -n 1 "$file"
        return
    fi
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    kit=$(kit_dir)
    pvm=no
    [ -d /sys/module/kvm_pvm ] && pvm=yes
    say "probing whether /dev/kvm boots the guest kit (up to ${PROBE_TIMEOUT}s, once per host kernel)"
    log=$(mktemp)
    timeout -k 5 "$PROBE_TIMEOUT" qemu-system-x86_64 -accel kvm -cpu host -M q35 -smp 1 -m 256 \
        -nodefaults -display none -no-reboot -serial "file:$log" \
        -kernel "$kit/vmlinuz" -initrd "$kit/kit.cpio" \
        -append "console=ttyS0 quiet panic=-1 capvm.action=poweroff" </dev/null >/dev/null 2>&1 || true
    if grep -q 'CAPVM-KIT: ready' "$log"; then
        v=direct
        why="the guest kit booted on /dev/kvm (kvm_pvm loaded: $pvm)"
    else
        v=testhost
        why="the guest kit did not boot on /dev/kvm within ${PROBE_TIMEOUT}s (kvm_pvm loaded: $pvm)"
    fi
    rm -f "$log"
    mkdir -p "$CACHE/kvm-verdict"
    printf '%s\n%s\n' "$v" "$why" >"$file.tmp" && mv "$file.tmp" "$file"
    say "$why"
    echo "$v"
}

# Single-quotes a word for sh.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# submit XCHG N CMD ARGS... : writes XCHG/N.cmd atomically.
submit() {
    xchg=$1
    n=$2
    shift 2
    [ "$#" -gt 0 ] || die "--submit needs a command"
    {
        echo "# capvm test host command $n"
        echo "cd $(quote "$PWD") || exit 125"
        printf 'exec env -i'
        printf ' %s' "$(quote "PATH=$BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")"
        printf ' %s' "$(quote "CAPVM_LIBEXEC=$BIN")" "$(quote "HOME=/root")" "$(quote CAPVM_IN_TESTHOST=1)"
        printf ' %s' "$(quote "TERM=${TERM:-dumb}")" "$(quote "LANG=${LANG:-C.UTF-8}")"
        for name in $(env | sed -n 's/^\(\(CAPVM\|RUST\|CARGO\)_[A-Za-z0-9_]*\)=.*/\1/p' | sort -u); do
            case "$name" in CAPVM_LIBEXEC | CAPVM_IN_TESTHOST) continue ;; esac
            eval "value=\${$name}"
            printf ' %s' "$(quote "$name=$value")"
        done
        for arg in "$@"; do printf ' %s' "$(quote "$arg")"; done
        echo
    } >"$xchg/$n.cmd.tmp"
    mv "$xchg/$n.cmd.tmp" "$xchg/$n.cmd"
}

# serve XCHG [watch-stdin] : boots the test host, returns when it powered off.
serve() {
    xchg=$(cd "$1" && pwd)
    mode=${2:-}
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    kit=$(kit_dir)
    case "$WS$xchg" in *[[:space:],:]*) die "paths with spaces, commas or colons cannot be shared: $WS $xchg" ;; esac
    : >"$xchg/console.log"
    set -- -accel tcg,thread=multi -cpu "${CAPVM_TESTHOST_CPU:-$OUTER_CPU}" -M q35 \
        -smp "${CAPVM_TESTHOST_SMP:-2}" -m "${CAPVM_TESTHOST_MEM:-4096}" \
        -nodefaults -display none -no-reboot -serial "file:$xchg/console.log" \
        -kernel "$kit/vmlinuz" -initrd "$kit/testhost.cpio" \
        -append "console=ttyS0 loglevel=4 panic=-1 mitigations=off $OUTER_ARGS ${CAPVM_TESTHOST_APPEND:-} capvm.action=testhost capvm.idle=${CAPVM_TESTHOST_IDLE:-600} capvm.rw=rw0:$WS" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        -virtfs "local,path=$xchg,mount_tag=capvm.xchg,security_model=none" \
        -virtfs "local,path=$WS,mount_tag=rw0,security_model=none,multidevs=remap"
    # --foreground keeps QEMU in our process group, so killing the group
    # (the tests crate does) or ^C reaches it.
    timeout --foreground -k 5 "${CAPVM_TESTHOST_TIMEOUT:-3600}" qemu-system-x86_64 "$@" </dev/null &
    qpid=$!
    trap 'kill "$qpid" 2>/dev/null' TERM INT HUP
    wpid=
    if [ "$mode" = watch-stdin ]; then
        # The caller holds our stdin open while it lives: EOF means it is gone.
        { cat >/dev/null; kill "$qpid" 2>/dev/null; } <&3 &
        wpid=$!
    fi
    vpid=
    if [ "${CAPVM_TESTHOST_VERBOSE:-}" = 1 ]; then
        tail -n +1 -f --pid="$qpid" "$xchg/console.log" >&2 &
        vpid=$!
    fi
    st=0
    wait "$qpid" || st=$?
    [ -z "$vpid" ] || wait "$vpid" || true
    [ -z "$wpid" ] || kill "$wpid" 2>/dev/null || true
    return "$st"
}

run_in_testhost() {
    xchg=$(mktemp -d /tmp/capvm-testhost.XXXXXX)
    submit "$xchg" 1 "$@"
    : >"$xchg/1.out"
    : >"$xchg/1.err"
    touch "$xchg/stop"
    say "booting the test host (TCG; exchange dir $xchg)"
    start=$(date +%s)
    qst=0
    serve "$xchg" >/dev/null &
    spid=$!
    tail -n +1 -f --pid="$spid" "$xchg/1.out" &
    opid=$!
    tail -n +1 -f --pid="$spid" "$xchg/1.err" >&2 &
    epid=$!
    # The test host rewrites xchg/heartbeat every 5 s; if it stops, it hung
    # (seen under TCG with nested SVM): stop it rather than wait for ever.
    (while kill -0 "$spid" 2>/dev/null; do
        sleep 10
        [ -f "$xchg/heartbeat" ] || continue
        if [ $(($(date +%s) - $(stat -c %Y "$xchg/heartbeat"))) -gt 90 ]; then
            say "the test host stopped its heartbeat for 90 s: hung, stopping it"
            echo "hung: no heartbeat for 90 s" >"$xchg/error"
            kill "$spid"
            break
        fi
    done) &
    hpid=$!
    wait "$spid" || qst=$?
    kill "$hpid" 2>/dev/null || true
    wait "$opid" "$epid" || true
    if [ -f "$xchg/1.status" ]; then
        st=$(cat "$xchg/1.status")
        say "exit status $st (test host up in $(cat "$xchg/ready" 2>/dev/null || echo '?') s of its uptime, $(($(date +%s) - start)) s in all)"
        [ "${CAPVM_TESTHOST_KEEP:-}" = 1 ] || rm -rf "$xchg"
        exit "$st"
    fi
    say "the test host ended (status $qst) without reporting CMD's exit status"
    [ ! -f "$xchg/error" ] || say "it reported: $(cat "$xchg/error")"
    say "last lines of its console ($xchg/console.log):"
    tail -n 40 "$xchg/console.log" >&2
    exit 125
}

case "${1:-}" in
"" | -h | --help)
    sed -n '2,/^set -eu/p' "$0" | sed 's/^# \{0,1\}//;/^set -eu/d'
    [ -n "${1:-}" ] || exit 2
    exit 0
    ;;
--verdict) verdict; exit 0 ;;
--kit) kit_dir; exit 0 ;;
--serve)
    [ "$#" -ge 2 ] || die "--serve needs an exchange dir"
    exec 3<&0
    serve "$2" watch-stdin
    exit 0
    ;;
--submit)
    [ "$#" -ge 4 ] || die "--submit needs XCHG N CMD"
    shift
    submit "$@"
    exit 0
    ;;
--) shift ;;
esac
[ "$#" -gt 0 ] || die "no command"

[ "$(id -u)" = 0 ] || die "must run as root (the test host shares / and CMD needs /dev/kvm)"
[ -d "$BIN" ] || say "warning: $BIN does not exist (run cargo build --release first)"
case "$(verdict)" in
direct)
    PATH=$BIN:$PATH
    CAPVM_LIBEXEC=$BIN
    export PATH CAPVM_LIBEXEC
    exec "$@"
    ;;
*) run_in_testhost "$@" ;;
esac
