//! A stand-in `dev-blk` for the supervisor's tests: the real bootstrap and capability mode
//! (`child::start`) and the real device channel handshake, but no virtio. It reads its
//! [`DeviceSetup`], looks at its disk descriptor (the first 8 bytes, and whether it was opened
//! for writing), and answers the runner's handshake with an `Info` whose configuration space
//! is a line of text saying what it got, which the fake runner prints on the console:
//!
//! `serial=5a1c0e2f-d0 ro=false bs=512 queues=2 regions=1 writable=true head=DISK0...`
//!
//! It then waits until the supervisor or the runner hangs up.

use std::os::fd::AsFd;
use std::process::ExitCode;

use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelKind};
use proto::device::{DeviceInfo, DeviceSetup, FromDevice};

/// Reading the head of the disk and probing it for writing.
const POLICY: &str =
    "pread64  # the first bytes of the disk\npwrite64 # a zero-length write probes the open mode\n";

fn main() -> ExitCode {
    let mut started = match child::start(child::ChildKind {
        role_name: "dev-blk",
        policy: POLICY,
        threads: false,
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-dev-blk: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Ok(received) = started.channel.recv::<DeviceSetup>() else {
        return ExitCode::FAILURE;
    };
    let DeviceSetup::Block(setup) = received.msg else {
        return ExitCode::FAILURE;
    };
    let (Some(disk), Some(runner)) = (
        started.take_fd(&FdRole::Disk),
        started.take_fd(&FdRole::DeviceChannel),
    ) else {
        return ExitCode::FAILURE;
    };
    let mut head = [0u8; 8];
    let n = nix::sys::uio::pread(disk.as_fd(), &mut head, 0).unwrap_or(0);
    let head: String = head
        .get(..n)
        .unwrap_or_default()
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() {
                char::from(b)
            } else {
                '.'
            }
        })
        .collect();
    let writable = nix::sys::uio::pwrite(disk.as_fd(), &[], 0).is_ok();
    let text = format!(
        "serial={} ro={} bs={} queues={} regions={} writable={writable} head={head}",
        setup.serial,
        setup.read_only,
        setup.logical_block_size,
        setup.queues,
        setup.memory.len()
    );
    let runner = Channel::from_fd(runner);
    if runner.handshake(ChannelKind::RunnerDevice).is_err() {
        return ExitCode::FAILURE;
    }
    let info = FromDevice::Info(DeviceInfo {
        device_type: 2,
        features: 1 << 32,
        queues: setup.queues,
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
