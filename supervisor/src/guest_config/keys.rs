//! The table of guest config keys capvm knows, and whether it implements each yet.

use serde::Serialize;

/// Whether capvm implements a key yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Support {
    Yes,
    /// Some values work; the others are warnings.
    Partial,
    /// Accepted for vm-bhyve compatibility, warned about, ignored.
    No,
}

/// One known config key. `N` in a name stands for a device number (`disk0_type`).
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    pub key: &'static str,
    pub support: Support,
    pub meaning: &'static str,
    pub example: &'static str,
}

const fn key(
    key: &'static str,
    support: Support,
    meaning: &'static str,
    example: &'static str,
) -> KeySpec {
    KeySpec {
        key,
        support,
        meaning,
        example,
    }
}

use Support::{No, Partial, Yes};

/// Every guest config key capvm knows: vm-bhyve's, plus capvm's `linux_*`.
#[rustfmt::skip]
pub static KEYS: &[KeySpec] = &[
    key("loader", Partial, "boot method: uefi or linux (bhyveload, grub, uefi-csm, uefi-custom are vm-bhyve's and not supported)", "loader=\"uefi\""),
    key("uefi", Partial, "older vm-bhyve switch for UEFI boot, used when loader is unset: yes, or csm (not supported)", "uefi=\"yes\""),
    key("cpu", Yes, "number of vCPUs, 1 to 255", "cpu=4"),
    key("cpu_sockets", No, "CPU topology: sockets", "cpu_sockets=1"),
    key("cpu_cores", No, "CPU topology: cores per socket", "cpu_cores=2"),
    key("cpu_threads", No, "CPU topology: threads per core", "cpu_threads=1"),
    key("memory", Yes, "guest RAM: a number with an optional K/M/G/T suffix, no suffix = megabytes", "memory=\"4G\""),
    key("wired_memory", No, "wire all guest memory", "wired_memory=\"yes\""),
    key("utctime", Yes, "RTC in UTC (default yes) instead of local time", "utctime=\"yes\""),
    key("uuid", Yes, "fixed SMBIOS UUID; written by vm create", "uuid=\"5a1c…\""),
    key("on_fault", Yes, "capvm: what a triple fault or a crashed vcpu-runner does: stop (default) or restart", "on_fault=\"restart\""),
    key("stop_timeout", Yes, "capvm: seconds vm stop waits for the guest to power off before forcing it (default 30)", "stop_timeout=60"),
    key("loader_timeout", Partial, "bhyveload/grub menu timeout in seconds; checked, no effect on uefi/linux boot", "loader_timeout=5"),
    key("linux_kernel", Yes, "capvm: bzImage for loader=linux (relative paths are in the guest directory)", "linux_kernel=\"vmlinuz\""),
    key("linux_initrd", Yes, "capvm: initramfs for loader=linux", "linux_initrd=\"initrd.img\""),
    key("linux_cmdline", Yes, "capvm: kernel command line for loader=linux (no '#' or '\"')", "linux_cmdline=\"console=ttyS0 root=/dev/vda1\""),
    key("diskN_type", Partial, "disk emulation: virtio-blk (ahci-hd, ahci-cd, nvme, virtio-scsi not supported)", "disk0_type=\"virtio-blk\""),
    key("diskN_name", Yes, "disk image file in the guest directory (or a full path with diskN_dev=custom)", "disk0_name=\"disk0.img\""),
    key("diskN_dev", Partial, "disk backing: file (default) or custom (zvol, sparse-zvol, iscsi not supported)", "disk0_dev=\"file\""),
    key("diskN_size", Yes, "size of the image vm create makes (templates only; default 20G)", "disk0_size=\"64G\""),
    key("diskN_opts", Yes, "disk options: ro, direct and nocache (both open the image O_DIRECT), sectorsize=L[/P], nodelete (no effect)", "disk0_opts=\"nocache\""),
    key("diskN_slot", No, "PCI slot of the disk", "disk0_slot=4"),
    key("networkN_type", Partial, "NIC emulation: virtio-net (e1000 not supported)", "network0_type=\"virtio-net\""),
    key("networkN_switch", Yes, "virtual switch the NIC joins", "network0_switch=\"public\""),
    key("networkN_mac", Yes, "fixed MAC address; written by vm create", "network0_mac=\"58:9c:fc:0a:0b:0c\""),
    key("networkN_device", Yes, "use an existing tap instead of creating one", "network0_device=\"tap0\""),
    key("networkN_queues", Yes, "capvm: virtio-net queue pairs, one tap queue and dev-net thread each: a number or cpus (one per vCPU); default 1", "network0_queues=\"cpus\""),
    key("networkN_name", No, "name for the host-side interface", "network0_name=\"web1\""),
    key("networkN_span", No, "make the port a bridge SPAN port", "network0_span=\"yes\""),
    key("networkN_slot", No, "PCI slot of the NIC", "network0_slot=11"),
    key("graphics", Yes, "frame buffer with a VNC console", "graphics=\"yes\""),
    key("graphics_port", Yes, "VNC TCP port (default: first free from 5900)", "graphics_port=5900"),
    key("graphics_listen", Yes, "VNC listen address (default 127.0.0.1: loopback unless you say otherwise)", "graphics_listen=\"127.0.0.1\""),
    key("graphics_res", Yes, "frame buffer size WxH, 640x480 to 1920x1200 (default 800x600)", "graphics_res=\"1600x900\""),
    key("graphics_wait", Yes, "wait for a VNC client before booting: yes, no, auto (waits during vm install only); vm start returns at once", "graphics_wait=\"auto\""),
    key("graphics_vga", No, "bhyve VGA mode (on, off, io)", "graphics_vga=\"io\""),
    key("vnc_password", Yes, "VNC Authentication password, 1 to 8 characters (never logged or shown)", "vnc_password=\"secret\""),
    key("xhci_mouse", Yes, "absolute-position pointer for VNC: a virtio-input tablet besides the virtio-input keyboard (with graphics=\"yes\"); the guest needs the virtio_input driver", "xhci_mouse=\"yes\""),
    key("xhci_slot", No, "PCI slot of the xHCI controller", "xhci_slot=29"),
    key("fbuf_slot", No, "PCI slot of the frame buffer", "fbuf_slot=30"),
    key("bhyveload_loader", No, "bhyveload: loader path inside the guest", "bhyveload_loader=\"/boot/userboot.so\""),
    key("bhyveload_args", No, "bhyveload: extra arguments", "bhyveload_args=\"-e foo=1\""),
    key("grub_installN", No, "grub-bhyve: commands for install boots", "grub_install0=\"linux /vmlinuz\""),
    key("grub_runN", No, "grub-bhyve: commands for normal boots", "grub_run0=\"linux /vmlinuz\""),
    key("grub_run_partition", No, "grub-bhyve: root partition", "grub_run_partition=\"msdos1\""),
    key("grub_run_dir", No, "grub-bhyve: directory of grub.cfg", "grub_run_dir=\"/grub\""),
    key("grub_run_file", No, "grub-bhyve: name of grub.cfg", "grub_run_file=\"grub.conf\""),
    key("uefi_vars", No, "persistent UEFI variables", "uefi_vars=\"yes\""),
    key("hostbridge", No, "host bridge type (standard, amd, none)", "hostbridge=\"amd\""),
    key("hostbridge_slot", No, "PCI slot of the host bridge", "hostbridge_slot=0"),
    key("lpc_slot", No, "PCI slot of the LPC bridge", "lpc_slot=31"),
    key("ignore_bad_msr", No, "ignore unimplemented MSR accesses", "ignore_bad_msr=\"yes\""),
    key("bhyve_options", No, "extra bhyve command-line options", "bhyve_options=\"-p 1:1\""),
    key("comports", No, "serial ports to connect (com1, com2)", "comports=\"com1 com2\""),
    key("debug", No, "write bhyve's output to bhyve.log", "debug=\"yes\""),
    key("ahci_device_limit", No, "devices per AHCI controller", "ahci_device_limit=8"),
    key("passthruN", No, "PCI pass-through device (bus/slot/function)", "passthru0=\"3/0/0\""),
    key("passthru_slot_start", No, "first PCI slot for pass-through devices", "passthru_slot_start=20"),
    key("disk_slot_start", No, "first PCI slot for disks", "disk_slot_start=4"),
    key("install_slot", No, "PCI slot of the install ISO", "install_slot=3"),
    key("network_slot_start", No, "first PCI slot for NICs", "network_slot_start=15"),
    key("virt_random", No, "virtio-rnd device", "virt_random=\"yes\""),
    key("virt_random_slot", No, "PCI slot of virtio-rnd", "virt_random_slot=26"),
    key("virt_consoleN", No, "virtio console ports", "virt_console0=\"yes\""),
    key("virt_console_slot", No, "PCI slot of the virtio consoles", "virt_console_slot=27"),
    key("sound", No, "HD audio device", "sound=\"yes\""),
    key("sound_play", No, "host audio output device", "sound_play=\"/dev/dsp0\""),
    key("sound_rec", No, "host audio input device", "sound_rec=\"/dev/dsp0\""),
    key("sound_slot", No, "PCI slot of the audio device", "sound_slot=28"),
    key("zfs_dataset_opts", No, "ZFS properties for the guest dataset", "zfs_dataset_opts=\"compress=lz4\""),
    key("zfs_zvol_opts", No, "ZFS properties for zvols", "zfs_zvol_opts=\"volblocksize=16k\""),
    key("prestart", No, "script run before the guest starts", "prestart=\"hook.sh\""),
    key("priority", No, "nice value of the guest", "priority=10"),
    key("nice", No, "nice value of the guest (older name)", "nice=10"),
    key("limit_pcpu", No, "rctl CPU percentage limit", "limit_pcpu=50"),
    key("limit_rbps", No, "rctl read bytes/s limit", "limit_rbps=10M"),
    key("limit_wbps", No, "rctl write bytes/s limit", "limit_wbps=10M"),
    key("limit_riops", No, "rctl read IOPS limit", "limit_riops=1000"),
    key("limit_wiops", No, "rctl write IOPS limit", "limit_wiops=1000"),
    key("guest", No, "guest OS type (vm-bhyve 1.0)", "guest=\"freebsd\""),
];

/// The spec of `key`, and its device number for `N` keys. Device numbers are plain
/// decimal (`disk0`, never `disk00`), since vm-bhyve looks up exactly `disk${n}_...`.
pub fn lookup_key(key: &str) -> Option<(&'static KeySpec, Option<u32>)> {
    for spec in KEYS {
        match spec.key.split_once('N') {
            None if spec.key == key => return Some((spec, None)),
            None => {}
            Some((prefix, suffix)) => {
                let Some(digits) = key
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix(suffix))
                else {
                    continue;
                };
                if let Some(n) = parse_index(digits) {
                    return Some((spec, Some(n)));
                }
            }
        }
    }
    None
}

fn parse_index(digits: &str) -> Option<u32> {
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    (n.to_string() == digits).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_key_matches_numbered_keys_exactly() {
        assert_eq!(
            lookup_key("disk12_type").map(|(s, n)| (s.key, n)),
            Some(("diskN_type", Some(12)))
        );
        assert_eq!(
            lookup_key("network0_mac").map(|(s, n)| (s.key, n)),
            Some(("networkN_mac", Some(0)))
        );
        assert!(lookup_key("disk01_type").is_none());
        assert!(lookup_key("disk_type").is_none());
        assert!(lookup_key("diskx_type").is_none());
        assert!(
            lookup_key("network_slot_start")
                .is_some_and(|(s, n)| s.key == "network_slot_start" && n.is_none())
        );
        assert!(lookup_key("cpu ").is_none());
    }

    #[test]
    fn key_table_has_no_duplicates() {
        let mut names: Vec<_> = KEYS.iter().map(|k| k.key).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }
}
