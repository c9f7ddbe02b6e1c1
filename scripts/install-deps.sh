#!/usr/bin/env bash
# Installs everything capvm's build, demo and test suite need on a fresh Debian 12 (bookworm)
# machine, as root. Safe to run again. Used by the README's commands and by .ci/run alike.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

# QEMU (the reference VMM and the test host) comes from bookworm-backports: QEMU 10 matches the
# machine's qemu-utils, where bookworm's 7.2 would downgrade it.
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$backports" ] && grep -q bookworm /etc/os-release; then
    cat > "$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt_updated=no
fi

# Debian packages: build tools, the test guests' ingredients (the kernel itself is fetched by
# tests/kit/build.sh with apt-get download), and the tools the tests drive (TigerVNC's viewer
# under Xvfb is one of the real VNC clients of tests/tests/vnc_clients.rs).
APT_PACKAGES=(
    build-essential pkg-config
    busybox-static kmod cpio xz-utils
    iproute2 iputils-ping iperf3 openssl python3 python3-pip
    tigervnc-viewer xvfb
)
BACKPORTS_PACKAGES=(qemu-system-x86 qemu-utils)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
need_qemu=no
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_qemu=yes
if [ ${#missing[@]} -gt 0 ] || [ "$need_qemu" = yes ] || [ "${apt_updated:-}" = no ]; then
    apt-get update
fi
export DEBIAN_FRONTEND=noninteractive
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
if [ "$need_qemu" = yes ]; then
    if [ -f "$backports" ]; then
        apt-get install -y --no-install-recommends -t bookworm-backports "${BACKPORTS_PACKAGES[@]}"
    else
        apt-get install -y --no-install-recommends "${BACKPORTS_PACKAGES[@]}"
    fi
fi

# Python packages for the tests, as PACKAGE:MODULE (the name pip installs, the name Python
# imports): an FTP server for `vm iso ftp://…`; vncdotool, a real VNC client for
# tests/tests/vnc_clients.rs, with Pillow (imported as PIL), which it depends on and the test
# uses to read its PNGs and to grab Xvfb's screen.
PIP_PACKAGES=(pyftpdlib:pyftpdlib vncdotool:vncdotool Pillow:PIL)
for entry in "${PIP_PACKAGES[@]}"; do
    package=${entry%%:*}
    module=${entry#*:}
    python3 -c "import ${module}" 2>/dev/null || python3 -m pip install --quiet "$package"
done

# Rust: capvm needs a stable toolchain >= 1.85 (edition 2024). Debian 12's rustc is too old;
# install one with rustup (https://rustup.rs) before running this script.
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps.sh: cargo not found; install Rust >= 1.85 with rustup first" >&2
    exit 1
fi
echo "install-deps.sh: all dependencies present"
