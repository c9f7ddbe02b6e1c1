#!/bin/sh
# capvm guest kit builder (see tests/kit/README.md).
#
# Builds, from Debian packages only, a guest kernel and two busybox initramfs
# images, and prints the directory that holds them (last line of stdout):
#
#   vmlinuz        the kernel of linux-image-amd64's current dependency
#   vmlinux        the same kernel uncompressed (ELF, boots via PVH: faster)
#   kit.cpio       the guest kit: busybox, /init (init.sh), /bin/kit-test, the
#                  virtio + bochs modules (modules.kit) with a load order
#   kit-packages.cpio  the same plus the programs of packages.kit (iperf3, fio)
#                  with their libraries, for the benchmarks (a separate image:
#                  8 MiB more initramfs cost ~10 s of boot nested under TCG)
#   testhost.cpio  the same plus testhost-init.sh and modules.testhost, for the
#                  emulated test host (tests/testhost.sh)
#   kit.env        KEY=VALUE lines naming the files above
#   *.modules      each initramfs' module load order; *.deps what it came from
#   kit.packages   the Debian packages (name=version) packages.kit resolved to
#   kit.files      the files those packages put into kit-packages.cpio
#
# Everything is cached under ${CAPVM_CACHE:-/var/cache/capvm}: the .debs in
# debs/, each build in kit/<key>/ where <key> hashes every input (the files of
# this directory, the package versions, the compression). A second run with the
# same inputs only resolves the package versions and prints the cached dir.
#
# Usage: build.sh            build if needed, print the kit directory
#        build.sh --force    rebuild even if cached
#        build.sh --load-order
#                  read "module dep,dep" lines on stdin, print the module names
#                  with every module after its dependencies (used by the build,
#                  exposed for tests)
# Env:   CAPVM_CACHE, CAPVM_KIT_COMPRESS=none|gzip (default none: faster to
#        boot under TCG), CAPVM_KIT_KERNEL_PKG (pin a linux-image-* package).
# Needs: apt-get, apt-cache, dpkg-deb, modinfo (kmod), cpio, tsort, sha256sum,
#        flock, readelf (binutils); the apt lists (apt-get update).
set -eu

KIT_SRC=$(cd "$(dirname "$0")" && pwd)
CACHE=${CAPVM_CACHE:-/var/cache/capvm}
COMPRESS=${CAPVM_KIT_COMPRESS:-none}
# Bump when the layout of the output changes without a change of the inputs.
KIT_FORMAT=1

log() { echo "kit: $*" >&2; }
die() { echo "kit: error: $*" >&2; exit 1; }

# stdin: "name dep,dep,..." lines; stdout: names, dependencies first.
# tsort orders pairs "a b" as a before b; "n n" declares a node with no edge.
load_order() {
    awk '{
        print $1, $1
        if (NF > 1) { k = split($2, d, ","); for (i = 1; i <= k; i++) if (d[i] != "") print d[i], $1 }
    }' | tsort
}

case "${1:-}" in
--load-order) load_order; exit 0 ;;
--force) FORCE=1 ;;
"") FORCE=0 ;;
-h | --help) sed -n '2,/^set -eu/p' "$0" | sed 's/^# \{0,1\}//;/^set -eu/d'; exit 0 ;;
*) die "unknown argument: $1 (try --help)" ;;
esac

case "$COMPRESS" in none | gzip) ;; *) die "CAPVM_KIT_COMPRESS must be none or gzip" ;; esac
for tool in apt-get apt-cache dpkg-deb modinfo cpio tsort sha256sum flock xz readelf; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install kmod cpio coreutils util-linux binutils)"
done

# One apt-cache call (about a second) resolves both packages' candidates:
# linux-image-amd64 depends on exactly one linux-image-<abi>-amd64 (= version).
records=$(apt-cache show --no-all-versions linux-image-amd64 busybox-static 2>/dev/null) || true
kdep=$(echo "$records" | awk '$1 == "Package:" { p = $2 } p == "linux-image-amd64" && $1 == "Depends:" { print; exit }')
kpkg=$(echo "$kdep" | sed -n 's/^Depends: \(linux-image-[^ ,]*\) (= \([^)]*\)).*/\1/p')
kver=$(echo "$kdep" | sed -n 's/^Depends: \(linux-image-[^ ,]*\) (= \([^)]*\)).*/\2/p')
bbver=$(echo "$records" | awk '$1 == "Package:" { p = $2 } p == "busybox-static" && $1 == "Version:" { print $2; exit }')
if [ -n "${CAPVM_KIT_KERNEL_PKG:-}" ]; then
    kpkg=$CAPVM_KIT_KERNEL_PKG
    kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
fi
[ -n "$kpkg" ] && [ -n "$kver" ] && [ "$kver" != "(none)" ] ||
    die "cannot resolve linux-image-amd64 to a kernel package (run apt-get update)"
[ -n "$bbver" ] || die "no candidate for busybox-static (run apt-get update)"

# packages.kit's packages and their dependency closure, "name=version" lines.
# One apt-cache call per level of the dependency tree (four for iperf3).
# Only the first alternative of "a | b" is followed; Architecture: all
# packages (debconf, adduser, ...) hold no libraries and are not followed.
resolve_packages() {
    todo=$(sed 's/#.*//' "$KIT_SRC/packages.kit" | awk 'NF { print $1 }' | sort -u | tr '\n' ' ')
    seen=" "
    while [ -n "$(echo "$todo" | tr -d ' ')" ]; do
        for want in $todo; do seen="$seen$want "; done
        # shellcheck disable=SC2086 # one word per package
        recs=$(apt-cache show --no-all-versions $todo 2>/dev/null) || true
        # "name version arch dep dep ..." per record.
        lines=$(echo "$recs" | awk '
            function flush() { if (p != "") print p, v, a, d; p = ""; v = ""; a = ""; d = "" }
            /^$/ { flush(); next }
            $1 == "Package:" { p = $2 }
            $1 == "Version:" { v = $2 }
            $1 == "Architecture:" { a = $2 }
            $1 == "Depends:" || $1 == "Pre-Depends:" {
                line = $0; sub(/^[^:]*: */, "", line)
                n = split(line, alts, ",")
                for (i = 1; i <= n; i++) {
                    dep = alts[i]; sub(/\|.*/, "", dep); sub(/\(.*/, "", dep)
                    gsub(/[ \t]/, "", dep); sub(/:.*/, "", dep)
                    if (dep != "") d = d " " dep
                }
            }
            END { flush() }')
        next_todo=" "
        for want in $todo; do
            echo "$lines" | awk -v n="$want" '$1 == n { f = 1 } END { exit !f }' ||
                die "no candidate for package $want (packages.kit or a dependency; run apt-get update)"
        done
        while read -r name version arch deps; do
            [ -n "$name" ] && [ "$arch" != all ] || continue
            echo "$name=$version"
            for dep in $deps; do
                case "$seen$next_todo" in *" $dep "*) ;; *) next_todo="$next_todo$dep " ;; esac
            done
        done <<EOF
$lines
EOF
        todo=$next_todo
    done
}
# The closure only changes with packages.kit, the apt lists or apt's settings:
# reuse the last resolution of the same inputs (apt-cache takes seconds a call
# on a loaded machine; a cache hit of the kit must stay fast).
apt_state=$({
    cat "$KIT_SRC/packages.kit"
    ls -lR --time-style=+%s /var/lib/apt/lists /etc/apt 2>/dev/null | grep -v ' lock$'
} | sha256sum | cut -c1-16)
resolved=$CACHE/kit/.packages-$apt_state
if [ -f "$resolved" ]; then
    packages=$(cat "$resolved")
else
    packages=$(resolve_packages) || exit 1
    packages=$(echo "$packages" | sed '/^$/d' | sort -u)
    mkdir -p "$CACHE/kit"
    echo "$packages" >"$resolved.$$" && mv "$resolved.$$" "$resolved"
    ls -1t "$CACHE"/kit/.packages-* 2>/dev/null | tail -n +6 | while read -r old; do rm -f "$old"; done
fi

inputs="build.sh init.sh kit-test.sh testhost-init.sh modules.kit modules.testhost packages.kit"
key=$({
    echo "format=$KIT_FORMAT compress=$COMPRESS $kpkg=$kver busybox-static=$bbver"
    echo "packages:" $packages
    for f in $inputs; do echo "== $f"; cat "$KIT_SRC/$f"; done
} | sha256sum | cut -c1-16)
out=$CACHE/kit/$key

if [ "$FORCE" = 0 ] && [ -f "$out/kit.env" ]; then
    touch "$out" 2>/dev/null || true # last use, for the rotation below
    log "cached: $out"
    echo "$out"
    exit 0
fi

mkdir -p "$CACHE/kit" "$CACHE/debs"
exec 9>"$CACHE/kit/.lock"
flock 9
if [ "$FORCE" = 0 ] && [ -f "$out/kit.env" ]; then
    log "cached (built by a concurrent run): $out"
    echo "$out"
    exit 0
fi

start=$(date +%s)
work=$(mktemp -d "$CACHE/kit/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# apt-get download names a file pkg_version_arch.deb with ':' escaped as %3a.
fetch() {
    deb="$CACHE/debs/${1}_$(echo "$2" | sed 's/:/%3a/g')_amd64.deb"
    if [ ! -f "$deb" ]; then
        log "downloading $1=$2"
        (cd "$CACHE/debs" && apt-get download -q "$1=$2" >&2 2>/dev/null) ||
            (cd "$CACHE/debs" && apt-get download "$1=$2" >&2) || die "apt-get download $1=$2 failed"
        [ -f "$deb" ] || die "apt-get download $1=$2 did not produce $deb"
    fi
    echo "$deb"
}

kdeb=$(fetch "$kpkg" "$kver")
bbdeb=$(fetch busybox-static "$bbver")
log "extracting $(basename "$kdeb")"
dpkg-deb -x "$kdeb" "$work/k"
dpkg-deb -x "$bbdeb" "$work/bb"
set -- "$work"/k/lib/modules/*
[ "$#" = 1 ] && [ -d "$1" ] || die "$kpkg holds no single /lib/modules/<release>"
krel=$(basename "$1")
moddir=$1
find "$moddir" -name '*.ko' >"$work/ko.list"

# Module names use '_' where file names may use '-' (kvm-amd.ko is kvm_amd).
mod_file() {
    awk -v n="$1" '{ b = $0; sub(/.*\//, "", b); sub(/\.ko$/, "", b); gsub(/-/, "_", b); if (b == n) { print; exit } }' "$work/ko.list"
}
is_builtin() {
    sed 's/.*\///; s/\.ko$//; s/-/_/g' "$moddir/modules.builtin" | grep -qx "$1"
}

# Prints "name dep,dep" for the modules listed in the given files and all
# their dependencies (modinfo reads the .ko files directly, no depmod needed).
closure() {
    todo=$(sed 's/#.*//' "$@" | tr '-' '_' | tr -s ' \n' '  ')
    seen=" "
    while [ -n "$(echo "$todo" | tr -d ' ')" ]; do
        set -- $todo
        m=$1
        shift
        todo="$*"
        case "$seen" in *" $m "*) continue ;; esac
        seen="$seen$m "
        f=$(mod_file "$m")
        if [ -z "$f" ]; then
            is_builtin "$m" && continue
            die "module $m not found in $kpkg"
        fi
        deps=$(modinfo -F depends "$f" | tr '-' '_')
        echo "$m $deps"
        todo="$todo $(echo "$deps" | tr ',' ' ')"
    done
}

# stage DIR MODULE-LIST... : lays out one initramfs tree.
stage() {
    d=$1
    shift
    mkdir -p "$d/bin" "$d/sbin" "$d/usr/bin" "$d/usr/sbin" "$d/dev" "$d/proc" "$d/sys" \
        "$d/tmp" "$d/run" "$d/etc" "$d/root" "$d/mnt" "$d/lib/modules/kit"
    cp "$work/bb/bin/busybox" "$d/bin/busybox"
    for a in $("$d/bin/busybox" --list-full); do
        case "$a" in */*) [ -e "$d/$a" ] || ln -s /bin/busybox "$d/$a" ;; esac
    done
    install -m 755 "$KIT_SRC/init.sh" "$d/init"
    install -m 755 "$KIT_SRC/kit-test.sh" "$d/bin/kit-test"
    closure "$@" >"$d/lib/modules/kit/deps"
    load_order <"$d/lib/modules/kit/deps" >"$d/lib/modules/kit/order" || die "module dependencies form a loop"
    while read -r m; do
        cp "$(mod_file "$m")" "$d/lib/modules/kit/$m.ko"
    done <"$d/lib/modules/kit/order"
    echo "$krel" >"$d/etc/kit-release"
    echo "root:x:0:0:root:/root:/bin/sh" >"$d/etc/passwd"
    echo "root:x:0:" >"$d/etc/group"
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    [ "$(id -u)" != 0 ] || mknod -m 600 "$d/dev/console" c 5 1
}

# pack DIR FILE : newc cpio, owned by root, optionally gzip'ed.
pack() {
    (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$2.tmp"
    if [ "$COMPRESS" = gzip ]; then gzip -9 -n -c "$2.tmp" >"$2" && rm "$2.tmp"; else mv "$2.tmp" "$2"; fi
}

# A path inside the extracted packages ($work/pkgs) with its symlinks followed
# inside that tree (libc6's /lib64/ld-linux-x86-64.so.2 is an absolute link).
in_pkgs() {
    _p=$1
    _n=0
    while [ -L "$work/pkgs$_p" ]; do
        _n=$((_n + 1))
        [ "$_n" -le 16 ] || return 1
        _t=$(readlink "$work/pkgs$_p")
        case "$_t" in /*) _p=$_t ;; *) _p=$(dirname "$_p")/$_t ;; esac
    done
    [ -f "$work/pkgs$_p" ] || return 1
    echo "$_p"
}

# Where the dynamic loader looks when there is no ld.so.cache (Debian's
# multiarch directories first); sonames are resolved in this order.
LIB_DIRS="/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /lib /usr/lib"

# install_packages DIR : packages.kit's binaries and, recursively, their ELF
# program interpreter and DT_NEEDED libraries (read with readelf), each
# copied as a plain file to the path the loader asks for. DIR/etc/kit-files
# lists what it added.
install_packages() {
    d=$1
    : >"$d/etc/kit-files"
    : >"$work/pkgs.copied"
    [ -n "$packages" ] || return 0
    mkdir -p "$work/pkgs"
    for nv in $packages; do
        dpkg-deb -x "$(fetch "${nv%%=*}" "${nv#*=}")" "$work/pkgs"
    done
    todo=$(sed 's/#.*//' "$KIT_SRC/packages.kit" | awk 'NF {
        if (NF != 2 || $2 !~ /^\//) { print "kit: error: packages.kit: not \"package /path\": " $0 > "/dev/stderr"; exit 1 }
        print $2 }') || exit 1
    # A listed binary replaces a busybox applet of the same path.
    for p in $todo; do rm -f "$d$p"; done
    while [ -n "$(echo "$todo" | tr -d ' ')" ]; do
        # shellcheck disable=SC2086 # one word per path
        set -- $todo
        p=$1
        shift
        todo="$*"
        [ ! -e "$d$p" ] || continue
        real=$(in_pkgs "$p") || die "$p is in none of these packages: $(echo $packages)"
        mkdir -p "$d$(dirname "$p")"
        # One copy of a file asked for by two paths (ld.so is both the
        # interpreter /lib64/... and libc's NEEDED /lib/x86_64-linux-gnu/...).
        first=$(awk -v r="$real" '$1 == r { print $2; exit }' "$work/pkgs.copied")
        if [ -n "$first" ]; then
            ln -s "$first" "$d$p"
            continue
        fi
        cp "$work/pkgs$real" "$d$p"
        echo "$real $p" >>"$work/pkgs.copied"
        echo "$p" >>"$d/etc/kit-files"
        interp=$(readelf -lW "$d$p" 2>/dev/null | sed -n 's/.*program interpreter: \(.*\)]$/\1/p')
        [ -z "$interp" ] || todo="$todo $interp"
        # The object's own DT_RUNPATH/DT_RPATH directories come first for its
        # NEEDED libraries (librados finds libceph-common in .../ceph so).
        runpath=$(readelf -dW "$d$p" 2>/dev/null | sed -n 's/.*(R[UN]*PATH).*\[\(.*\)\]$/\1/p' |
            tr ':' '\n' | sed "s|^\\\$ORIGIN|$(dirname "$p")|;s|^\\\${ORIGIN}|$(dirname "$p")|" | grep '^/' | tr '\n' ' ')
        for so in $(readelf -dW "$d$p" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
            found=
            for dir in $runpath $LIB_DIRS; do
                if in_pkgs "$dir/$so" >/dev/null; then
                    found=$dir/$so
                    break
                fi
            done
            [ -n "$found" ] || die "$p needs $so, which none of these packages holds: $(echo $packages)"
            todo="$todo $found"
        done
    done
}

mkdir -p "$work/out"
cp "$work/k/boot/vmlinuz-$krel" "$work/out/vmlinuz"
# The uncompressed ELF inside the bzImage boots through PVH (QEMU -kernel
# accepts it) and skips the xz decompression, which costs 15-20 s in a guest
# nested under TCG (well under a second on real hardware).
off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$work/out/vmlinuz" | head -n 1 | cut -d: -f1)
[ -n "$off" ] || die "no xz payload in vmlinuz-$krel"
tail -c +$((off + 1)) "$work/out/vmlinuz" | xz -dc --single-stream >"$work/out/vmlinux" ||
    die "cannot decompress vmlinuz-$krel"
[ "$(head -c 4 "$work/out/vmlinux" | od -An -c | tr -d ' ')" = 177ELF ] || die "vmlinuz-$krel holds no ELF"
stage "$work/kit" "$KIT_SRC/modules.kit"
pack "$work/kit" "$work/out/kit.cpio"
# The kit with packages.kit's programs, in an image of its own (the test host
# runs the host's own programs over 9p and needs none of them).
install_packages "$work/kit"
cp "$work/kit/etc/kit-files" "$work/out/kit.files"
echo "$packages" | sed '/^$/d' >"$work/out/kit.packages"
pack "$work/kit" "$work/out/kit-packages.cpio"
stage "$work/testhost" "$KIT_SRC/modules.kit" "$KIT_SRC/modules.testhost"
install -m 755 "$KIT_SRC/testhost-init.sh" "$work/testhost/testhost-init.sh"
pack "$work/testhost" "$work/out/testhost.cpio"
for flavour in kit testhost; do
    cp "$work/$flavour/lib/modules/kit/order" "$work/out/$flavour.modules"
    cp "$work/$flavour/lib/modules/kit/deps" "$work/out/$flavour.deps"
done

cat >"$work/out/kit.env" <<EOF
KIT_DIR=$out
KIT_KEY=$key
KIT_KERNEL=$out/vmlinuz
KIT_VMLINUX=$out/vmlinux
KIT_INITRD=$out/kit.cpio
KIT_PACKAGES_INITRD=$out/kit-packages.cpio
KIT_TESTHOST_INITRD=$out/testhost.cpio
KIT_KERNEL_RELEASE=$krel
KIT_KERNEL_PACKAGE=$kpkg=$kver
KIT_BUSYBOX_PACKAGE=busybox-static=$bbver
KIT_PACKAGES=$(echo $packages)
KIT_COMPRESS=$COMPRESS
EOF

rm -rf "$out"
mv "$work/out" "$out"
log "built $out in $(($(date +%s) - start)) s (kernel $krel)"

# Keep the three most recent builds; older keys belong to older inputs. A build
# touched in the last two hours may still be booting guests of a run that
# resolved it earlier (a benchmark, a test suite of another checkout): kept too.
# (A cache hit touches its build, so this is the last use.)
ls -1dt "$CACHE"/kit/*/ 2>/dev/null | tail -n +4 | while read -r old; do
    [ -n "$(find "$old" -maxdepth 0 -mmin -120)" ] || rm -rf "$old"
done
echo "$out"
