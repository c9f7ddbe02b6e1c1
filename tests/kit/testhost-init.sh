# Sourced by /init (init.sh) for capvm.action=testhost: the test host's own
# loop. The test host is an emulated (TCG) AMD machine whose kernel loads
# kvm_amd, so /dev/kvm inside it runs ordinary guests. tests/testhost.sh starts
# it with three kinds of virtio-9p shares:
#   hostroot    the host's / read-only: the root of the command's world
#               (overlaid with a tmpfs, so it is writable and writes vanish)
#   capvm.xchg  the exchange directory, read-write (protocol below)
#   rwN         capvm.rw=rw0:/path,rw1:/path... host directories mounted
#               read-write at the same path (the workspace checkout)
#
# Exchange protocol, in the capvm.xchg share (N counts from 1):
#   N.cmd       written by the host (atomically, by rename): a sh script run
#               as root, chrooted into the host's tree, stdin /dev/null
#   N.out N.err its stdout and stderr, written while it runs
#   N.status    its exit status (decimal), written once it ended (by rename)
#   ready       the guest uptime once the loop waits for commands
#   stop        written by the host: power off once no N.cmd is pending
#   error       why the test host gave up (it then powers off)
#   heartbeat   its uptime, rewritten every 5 s while it runs
# Commands run one at a time, in order. With capvm.idle=<secs> the test host
# powers off after that long without a command.
# Console markers: CAPVM-TESTHOST: ready|begin N|exit N <status>|error <text>

th_fail() {
    echo "CAPVM-TESTHOST: error $*"
    [ -d /xchg ] && echo "$*" >/xchg/error
    finish poweroff
}

th_mount9p() { # tag dir extra-options
    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,$3" "$1" "$2"
}

mkdir -p /xchg /lower /upper /host
th_mount9p capvm.xchg /xchg cache=none || th_fail "cannot mount the exchange share"
th_mount9p hostroot /lower ro,cache=loose || th_fail "cannot mount the host root"
mount -t tmpfs -o mode=755 tmpfs /upper
mkdir -p /upper/data /upper/work
if ! mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /host 2>/tmp/ovl.err; then
    marker warn "overlay over the host root failed ($(cat /tmp/ovl.err)); it stays read-only"
    mount --bind /lower /host || th_fail "cannot bind the host root"
fi
mount -t proc proc /host/proc || th_fail "cannot mount /proc"
mount -t sysfs sysfs /host/sys || th_fail "cannot mount /sys"
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs /host/dev || th_fail "cannot mount /dev"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
for d in /tmp /run /var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs "/host$d" 2>/dev/null
done
for spec in $(param rw | tr ',' ' '); do
    tag=${spec%%:*}
    path=${spec#*:}
    mkdir -p "/host$path" 2>/dev/null
    th_mount9p "$tag" "/host$path" cache=mmap || th_fail "cannot mount $tag at $path"
done
hostname capvm-testhost
[ -c /dev/kvm ] || marker warn "no /dev/kvm in the test host"

# A heartbeat the host watches: a test host that stops writing it hung.
(while :; do
    cut -d' ' -f1 /proc/uptime >/xchg/heartbeat.tmp && mv /xchg/heartbeat.tmp /xchg/heartbeat
    sleep 5
done) &

idle_max=$(param idle) || idle_max=0
up=$(uptime_s)
echo "$up" >/xchg/ready.tmp && mv /xchg/ready.tmp /xchg/ready
echo "CAPVM-TESTHOST: ready uptime=$up"

mkdir -p /host/run/capvm-testhost
n=1
idle_since=$(cut -d. -f1 /proc/uptime)
while :; do
    if [ -f "/xchg/$n.cmd" ]; then
        echo "CAPVM-TESTHOST: begin $n"
        cp "/xchg/$n.cmd" "/host/run/capvm-testhost/$n.sh"
        chroot /host /bin/sh "/run/capvm-testhost/$n.sh" </dev/null >"/xchg/$n.out" 2>"/xchg/$n.err"
        st=$?
        echo "$st" >"/xchg/$n.status.tmp" && mv "/xchg/$n.status.tmp" "/xchg/$n.status"
        echo "CAPVM-TESTHOST: exit $n $st"
        n=$((n + 1))
        idle_since=$(cut -d. -f1 /proc/uptime)
        continue
    fi
    [ -e /xchg/stop ] && break
    if [ "$idle_max" -gt 0 ] && [ $(($(cut -d. -f1 /proc/uptime) - idle_since)) -ge "$idle_max" ]; then
        echo "CAPVM-TESTHOST: idle for ${idle_max}s, powering off"
        break
    fi
    sleep 0.2
done
sync
finish poweroff
