//! A stand-in `dev-net` for the supervisor's tests: the real bootstrap and capability mode
//! (`child::start`) and the real device channel handshake, but no virtio. It reads its
//! [`DeviceSetup`], asks its tap fd what it is (`TUNGETIFF`: the interface name and flags),
//! and answers the runner's handshake with an `Info` whose configuration space is a line of
//! text saying what it got, which the fake runner prints on the console:
//!
//! `net mac=58:9c:fc:00:00:01 mtu=1500 pairs=1 regions=1 tap=capvm-tap0 vnet_hdr=true`
//!
//! It then waits until the supervisor or the runner hangs up.

use std::os::fd::AsRawFd;
use std::process::ExitCode;

use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelKind};
use proto::device::{DeviceInfo, DeviceSetup, FromDevice};

/// `TUNGETIFF` (`_IOR('T', 210, unsigned int)`): what the tap fd is attached to.
const POLICY: &str = "ioctl arg1 == 0x800454d2 # TUNGETIFF: the tap's name and flags\n";

/// `struct ifreq` as `TUNGETIFF` fills it.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn main() -> ExitCode {
    let mut started = match child::start(child::ChildKind {
        role_name: "dev-net",
        policy: POLICY,
        threads: false,
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-dev-net: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Ok(received) = started.channel.recv::<DeviceSetup>() else {
        return ExitCode::FAILURE;
    };
    let DeviceSetup::Net(setup) = received.msg else {
        return ExitCode::FAILURE;
    };
    let (Some(tap), Some(runner)) = (
        started.take_fd(&FdRole::Tap),
        started.take_fd(&FdRole::DeviceChannel),
    ) else {
        return ExitCode::FAILURE;
    };
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, a live record of that size;
    // the fd is the tap this process was given.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), 0x8004_54d2, &raw mut req) };
    let (tap_name, vnet_hdr) = if rc == 0 {
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(req.name.get(..end).unwrap_or_default()).into_owned();
        let vnet = i32::from(req.flags) & libc::IFF_VNET_HDR != 0;
        (name, vnet)
    } else {
        ("?".to_owned(), false)
    };
    let mac: Vec<String> = setup.mac.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!(
        "net mac={} mtu={} pairs={} regions={} tap={tap_name} vnet_hdr={vnet_hdr}",
        mac.join(":"),
        setup.mtu,
        setup.queue_pairs,
        setup.memory.len()
    );
    let runner = Channel::from_fd(runner);
    if runner.handshake(ChannelKind::RunnerDevice).is_err() {
        return ExitCode::FAILURE;
    }
    let info = FromDevice::Info(DeviceInfo {
        device_type: 1,
        features: 1 << 32,
        queues: 2,
        max_queue_size: 256,
        config: text.into_bytes(),
    });
    if runner.send(&info, &[]).is_err() {
        return ExitCode::FAILURE;
    }
    // Until the runner or the supervisor hangs up.
    child::wait_for_close(&runner);
    ExitCode::SUCCESS
}
