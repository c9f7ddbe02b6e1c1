//! The host side of a guest's NICs, for the whole run: one tap per `networkN`, with one
//! queue (fd) per virtio-net queue pair (`networkN_queues`, planned as
//! [`NicPlan::queue_pairs`](crate::preflight::NicPlan); one by default).
//!
//! A NIC on a switch (or on none) gets a tap made by a sandboxed netcfg that this run starts
//! (allowed to touch the switches' bridges and this guest's taps only): it first deletes taps
//! a crashed earlier run of the guest left behind, then creates `capvm-tapN` per NIC on the
//! switch's bridge with the switch's MTU. A NIC with `networkN_device` is attached here to
//! that existing tap (`TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` on a fresh
//! `/dev/net/tun` fd), without netcfg (vm-bhyve #570).
//!
//! The supervisor keeps every tap fd until the guest ends, so each boot's dev-net (and later
//! a restarted one) gets the same tap. The taps netcfg made are not persistent: they vanish
//! with their last fd, and [`GuestNetwork::stop`] also asks netcfg to delete them.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use proto::netcfg::{NetcfgSetup, validate_ifname};

use super::devices::TapRef;

use crate::netcfg_client::{NetcfgClient, NetcfgClientError};
use crate::preflight::{BootPlan, DEFAULT_MTU, NicBackend};

/// The log file of the guest's netcfg in the guest directory.
pub const NETCFG_LOG_FILE: &str = "netcfg.log";

/// Why the guest's NICs could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("starting netcfg failed")]
    Netcfg(#[source] NetcfgClientError),
    #[error("deleting the taps an earlier run left failed")]
    Cleanup(#[source] NetcfgClientError),
    #[error("creating the tap of network{index} failed")]
    CreateTap {
        index: u32,
        #[source]
        source: NetcfgClientError,
    },
    #[error("attaching network{index} to tap {device} failed")]
    Attach {
        index: u32,
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("network{index}: the NIC number is too large")]
    Index { index: u32 },
    #[error("netcfg has no log")]
    NoLog,
}

/// One NIC's tap, held for the guest's run.
#[derive(Debug)]
pub struct Tap {
    /// The `N` of `networkN`.
    pub index: u32,
    pub name: String,
    /// One fd per queue of the tap, one queue per virtio-net queue pair; never empty.
    pub fds: Vec<OwnedFd>,
    /// The MTU the device offers the guest.
    pub mtu: u16,
}

impl Tap {
    /// The tap as a boot's dev-net gets it.
    pub fn tap_ref(&self) -> TapRef<'_> {
        TapRef {
            fds: self.fds.iter().map(AsFd::as_fd).collect(),
            mtu: self.mtu,
        }
    }
}

/// The taps of a running guest and the netcfg that made them.
#[derive(Debug, Default)]
pub struct GuestNetwork {
    netcfg: Option<NetcfgClient>,
    /// In the plan's NIC order.
    pub taps: Vec<Tap>,
}

impl GuestNetwork {
    /// Whether `plan` has a NIC whose tap netcfg must make.
    pub fn needs_netcfg(plan: &BootPlan) -> bool {
        plan.nics
            .iter()
            .any(|n| matches!(n.backend, NicBackend::Tap { .. }))
    }

    /// Makes or attaches a tap for every NIC of `plan`. `log` is netcfg's log, needed when
    /// [`GuestNetwork::needs_netcfg`]: netcfg is started only when a NIC needs a new tap.
    /// Returns the network and the names of leftover taps that were deleted.
    pub fn start(
        name: &str,
        plan: &BootPlan,
        log: Option<BorrowedFd<'_>>,
    ) -> Result<(GuestNetwork, Vec<String>), NetworkError> {
        let mut net = GuestNetwork::default();
        let mut deleted = Vec::new();
        if Self::needs_netcfg(plan) {
            let log = log.ok_or(NetworkError::NoLog)?;
            let setup = NetcfgSetup {
                bridges: plan.bridges.clone(),
                tap_owner: name.to_owned(),
            };
            let mut client = NetcfgClient::start(&setup, log).map_err(NetworkError::Netcfg)?;
            deleted = client.delete_taps().map_err(NetworkError::Cleanup)?;
            net.netcfg = Some(client);
        }
        for nic in &plan.nics {
            let index = nic.index;
            let tap = match &nic.backend {
                NicBackend::Tap { bridge, mtu, .. } => {
                    let nic_number =
                        u16::try_from(index).map_err(|_| NetworkError::Index { index })?;
                    let Some(client) = net.netcfg.as_mut() else {
                        continue;
                    };
                    let (tap_name, fds) = client
                        .create_tap(bridge.as_deref(), nic_number, *mtu, nic.queue_pairs)
                        .map_err(|source| NetworkError::CreateTap { index, source })?;
                    // The tap took the bridge's MTU when the switch sets none.
                    let live_mtu = client
                        .link(&tap_name)
                        .ok()
                        .flatten()
                        .map(|l| l.mtu)
                        .or(*mtu)
                        .unwrap_or(DEFAULT_MTU);
                    Tap {
                        index,
                        name: tap_name,
                        fds,
                        mtu: device_mtu(live_mtu),
                    }
                }
                NicBackend::Device { name: device } => {
                    let fd = attach_tap(device).map_err(|source| NetworkError::Attach {
                        index,
                        device: device.clone(),
                        source,
                    })?;
                    // Someone else's tap: single-queue, as it was made.
                    Tap {
                        index,
                        name: device.clone(),
                        fds: vec![fd],
                        mtu: device_mtu(sysfs_mtu(device).unwrap_or(DEFAULT_MTU)),
                    }
                }
            };
            net.taps.push(tap);
        }
        Ok((net, deleted))
    }

    /// The taps as a boot's dev-nets get them, in NIC order.
    pub fn tap_refs(&self) -> Vec<TapRef<'_>> {
        self.taps.iter().map(Tap::tap_ref).collect()
    }

    /// Closes every tap and asks netcfg to delete what is left of this guest's; returns the
    /// names it deleted.
    pub fn stop(&mut self) -> Vec<String> {
        self.taps.clear();
        let Some(mut client) = self.netcfg.take() else {
            return Vec::new();
        };
        let deleted = match client.delete_taps() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "deleting the guest's taps failed");
                Vec::new()
            }
        };
        if let Err(e) = client.stop() {
            tracing::warn!(error = %e, "reaping netcfg failed");
        }
        deleted
    }
}

impl Drop for GuestNetwork {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An MTU as `NetSetup` carries it.
fn device_mtu(mtu: u32) -> u16 {
    u16::try_from(mtu.max(proto::netcfg::MIN_MTU)).unwrap_or(u16::MAX)
}

/// The MTU of interface `name` from `/sys/class/net`.
fn sysfs_mtu(name: &str) -> Option<u32> {
    validate_ifname(name).ok()?;
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags (a `short`), in a
/// 40-byte union-sized record.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` and attaches it to the existing tap `name` with a vnet header.
pub fn attach_tap(name: &str) -> io::Result<OwnedFd> {
    validate_ifname(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        _pad: [0; 22],
    };
    // validate_ifname bounds the name to 15 bytes, so the NUL terminator stays.
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src;
    }
    // SAFETY: TUNSETIFF reads (and writes back) one `struct ifreq`; `req` is a live,
    // properly sized and aligned record whose name is NUL-terminated, and the fd is ours.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::offset_of!(IfReq, flags), 16);
    }

    #[test]
    fn device_mtus_are_clamped_to_what_a_net_setup_takes() {
        assert_eq!(device_mtu(1500), 1500);
        assert_eq!(device_mtu(65536), u16::MAX);
        assert_eq!(device_mtu(0), 68);
    }

    #[test]
    fn a_bad_device_name_is_refused_before_any_ioctl() {
        let err = attach_tap("a/b").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn loopback_mtu_is_read_from_sysfs() {
        assert!(sysfs_mtu("lo").is_some_and(|m| m >= 1500));
        assert_eq!(sysfs_mtu("../x"), None);
    }
}
