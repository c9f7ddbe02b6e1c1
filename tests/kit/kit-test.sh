#!/bin/sh
# /bin/kit-test NAME... : the guest kit's built-in checks. Each prints
#   CAPVM-KIT: result <name> ok|fail <detail>
# and the command exits 0 only if every named check passed. Expectations come
# from the kernel command line (capvm.cpus=, capvm.ip=, capvm.peer=).
#
#   cpus     detail count=<n>; fails if capvm.cpus is given and differs
#   mem      detail total_kib=<n>
#   virtio   detail ids=<virtio device ids>; fails if there is none
#   blk      first virtio disk: detail dev=<name> sectors=<n> sha256=<of its first MiB>
#   net      first ethernet link: detail mac=<mac>; with capvm.ip=<addr/prefix>
#            and capvm.peer=<addr> also configures it and pings the peer
#   display  DRM card (bochs): detail driver=<name> modes=<first mode>
#   rng      hwrng: detail current=<name> (virtio-rng expected)

param() {
    for p in $(cat /proc/cmdline); do
        case "$p" in "capvm.$1="*) echo "${p#*=}"; return 0 ;; esac
    done
    return 1
}

result() { echo "CAPVM-KIT: result $1 $2 $3"; [ "$2" = ok ]; }

t_cpus() {
    n=$(grep -c '^processor' /proc/cpuinfo)
    want=$(param cpus) || want=$n
    [ "$n" = "$want" ] && result cpus ok "count=$n" || result cpus fail "count=$n want=$want"
}

t_mem() {
    kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
    result mem ok "total_kib=$kib"
}

t_virtio() {
    ids=""
    for d in /sys/bus/virtio/devices/*; do
        [ -e "$d/device" ] && ids="$ids${ids:+,}$(($(cat "$d/device")))"
    done
    [ -n "$ids" ] && result virtio ok "ids=$ids" || result virtio fail "ids=none"
}

t_blk() {
    for b in /sys/block/vd*; do
        [ -e "$b" ] || break
        dev=${b##*/}
        sum=$(dd if="/dev/$dev" bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
        result blk ok "dev=$dev sectors=$(cat "$b/size") sha256=$sum"
        return
    done
    result blk fail "no virtio disk"
}

t_net() {
    for n in /sys/class/net/*; do
        [ "$(cat "$n/type" 2>/dev/null)" = 1 ] || continue
        dev=${n##*/}
        mac=$(cat "$n/address")
        ip=$(param ip) || { result net ok "dev=$dev mac=$mac"; return; }
        peer=$(param peer) || { result net fail "capvm.ip without capvm.peer"; return; }
        ip addr add "$ip" dev "$dev" && ip link set "$dev" up || { result net fail "cannot configure $dev"; return; }
        if ping -c 3 -W 2 "$peer" >/tmp/ping.out 2>&1; then
            result net ok "dev=$dev mac=$mac peer=$peer"
        else
            result net fail "dev=$dev ping $peer: $(tail -n 1 /tmp/ping.out)"
        fi
        return
    done
    result net fail "no ethernet link"
}

t_display() {
    for c in /sys/class/drm/card[0-9]; do
        [ -e "$c" ] || break
        drv=$(basename "$(readlink "$c/device/driver")")
        mode=$(cat "$c"-*/modes 2>/dev/null | head -n 1)
        result display ok "driver=$drv modes=${mode:-none}"
        return
    done
    result display fail "no DRM card"
}

t_rng() {
    cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null) || cur=none
    case "$cur" in virtio*) result rng ok "current=$cur" ;; *) result rng fail "current=$cur" ;; esac
}

status=0
for name in "$@"; do
    case "$name" in
    cpus | mem | virtio | blk | net | display | rng) "t_$name" || status=1 ;;
    *) result "$name" fail "unknown test"; status=1 ;;
    esac
done
exit $status
