#!/bin/sh
# /init of the capvm guest kit (and of the test host, which adds
# /testhost-init.sh). Mounts the basics, loads the kit's modules in the order
# build.sh computed, prints the ready marker and acts on the command line.
#
# Kernel command-line parameters (all optional):
#   capvm.action=shell|poweroff|run|test|agent|testhost   (default: shell)
#       shell     interactive shell on the console; power off when it exits
#       poweroff  power off right after the ready marker
#       run       run capvm.run with sh -c, output on the console
#       test      run the built-in checks named in capvm.test (see kit-test.sh)
#       agent     read commands from the console (protocol below)
#       testhost  the test host's own loop (testhost-init.sh)
#   capvm.run=<base64 of a shell command>   for action=run
#   capvm.test=<name>[,<name>...]           for action=test
#   capvm.then=poweroff|reboot|shell|halt   after run/test (default: poweroff)
#   capvm.cpus=, capvm.ip=, capvm.peer=     expectations for kit-test
#
# Console markers ("CAPVM-KIT: " may follow unterminated output on a line):
#   CAPVM-KIT: ready uptime=<secs> kernel=<release> cpus=<n>
#   CAPVM-KIT: warn <text>
#   CAPVM-KIT: result <name> ok|fail <detail>        (kit-test)
#   CAPVM-KIT: exit <status>                         (after run/test)
#   CAPVM-KIT: begin <id>  ...  CAPVM-KIT: end <id> exit=<status>   (agent)
#   CAPVM-KIT: poweroff | reboot | halt              (just before it happens)
#   CAPVM-KIT: power-button                          (ACPI power button pressed)
#
# Agent protocol: the host writes one line per command to the console,
# "<id> <base64 of a shell command>" (id: [A-Za-z0-9_-]+, line < 4 KiB), or
# "poweroff". The agent answers with begin, the command's output (stdout and
# stderr) and end. Echo is off, so the command line itself does not come back.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root

mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -t 1 ] || exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm

marker() { echo "CAPVM-KIT: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# Reads a capvm.* parameter from the kernel command line.
param() {
    for p in $(cat /proc/cmdline); do
        case "$p" in "capvm.$1="*) echo "${p#*=}"; return 0 ;; esac
    done
    return 1
}

finish() {
    case "$1" in
    shell) run_shell ;;
    reboot) marker reboot; sync; reboot -f ;;
    halt) marker halt; sync; halt -f ;;
    *) marker poweroff; sync; poweroff -f ;;
    esac
    sleep 5
    reboot -f
}

run_shell() {
    echo "capvm kit shell (exit to power off)"
    setsid cttyhack sh -l
    finish poweroff
}

agent() {
    stty -echo 2>/dev/null
    while read -r id b64; do
        case "$id" in
        poweroff) finish poweroff ;;
        "") continue ;;
        esac
        marker begin "$id"
        cmd=$(echo "$b64" | base64 -d 2>/dev/null) || {
            marker end "$id" exit=126
            continue
        }
        sh -c "$cmd" </dev/null 2>&1
        marker end "$id" exit=$?
    done
    finish poweroff
}

# Like modprobe, pass <module>.<param>=<value> from the command line.
while read -r m; do
    opts=
    for p in $(cat /proc/cmdline); do
        case "$p" in "$m".*=*) opts="$opts ${p#"$m".}" ;; esac
    done
    insmod "/lib/modules/kit/$m.ko" $opts 2>/tmp/insmod.err || marker warn "insmod $m: $(cat /tmp/insmod.err)"
done </lib/modules/kit/order
ip link set lo up 2>/dev/null

# The ACPI power button (`vm stop`, QEMU's system_powerdown) is an input device
# named "Power Button"; as a distribution's logind or acpid would, shut down
# cleanly on its first event (one struct input_event is 24 bytes).
watch_power_button() {
    for d in /sys/class/input/input*; do
        [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ] || continue
        for e in "$d"/event*; do
            [ -c "/dev/input/${e##*/}" ] || continue
            (dd if="/dev/input/${e##*/}" bs=24 count=1 of=/dev/null 2>/dev/null &&
                marker power-button && finish poweroff) &
            return 0
        done
    done
    return 1
}
watch_power_button || marker warn "no ACPI power button"
marker ready "uptime=$(uptime_s)" "kernel=$(uname -r)" "cpus=$(grep -c '^processor' /proc/cpuinfo)"

then=$(param then) || then=poweroff
case "$(param action || echo shell)" in
poweroff) finish poweroff ;;
run)
    cmd=$(param run | base64 -d) || marker warn "capvm.run is not valid base64"
    sh -c "$cmd" </dev/null 2>&1
    marker exit $?
    finish "$then"
    ;;
test)
    names=$(param test | tr ',' ' ')
    kit-test $names
    marker exit $?
    finish "$then"
    ;;
agent) agent ;;
testhost) . /testhost-init.sh ;;
*) run_shell ;;
esac
