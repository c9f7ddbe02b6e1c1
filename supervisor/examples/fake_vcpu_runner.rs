//! A stand-in `vcpu-runner` for the supervisor's tests: the real bootstrap and capability mode
//! (`child::start`), the real runner protocol, and a "guest" that is a few lines of console
//! text, so the lifecycle can be tested fast and without KVM.
//!
//! Words in the kernel command line choose a behaviour:
//! - `fake.fail`: answer `Failed` instead of `Running`;
//! - `fake.ignore_power`: print a line on the power button but do not power off;
//! - `fake.fault`: report a triple fault right after `Running`;
//! - `fake.die`: abort right after `Running`, without a message;
//! - `fake.garbage`: send an `Exited` whose text breaks the protocol's bounds.
//!
//! Each `DeviceChannel` fd is a device (in PCI order): the fake handshakes with it, reads its
//! `Info` and prints `fake: device N: CONFIG` (the fake dev-blk's configuration space is a
//! line of text) before the guest runs, as the real runner waits for every device's `Info`.
//!
//! A line typed on the console is echoed as `echo: LINE`; the lines `reboot`, `poweroff`,
//! `fault` and `die` act as their names say, and `sigsys` makes a system call outside the
//! sandbox's allow-list (`getppid`), which the seccomp filter answers by killing the process.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError, ChannelKind};
use proto::device::FromDevice;
use proto::runner::{FromRunner, GuestExit, ToRunner};

/// Nothing beyond the base policy: reads, writes, poll and the channel.
const POLICY: &str = "# fake vcpu-runner: the base policy covers it\n";

fn main() -> ExitCode {
    let mut started = match child::start(child::ChildKind {
        role_name: "vcpu-runner",
        policy: POLICY,
        threads: false,
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-vcpu-runner: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fds = (
        started.take_fd(&FdRole::Console),
        started.take_fd(&FdRole::GuestMemory),
        started.take_fd(&FdRole::Kvm),
        started.take_fd(&FdRole::Kernel),
    );
    let (Some(console), Some(memory), Some(_kvm), Some(_kernel)) = fds else {
        let _ = started.channel.send(
            &FromRunner::failed("missing console, memory, kvm or kernel fd"),
            &[],
        );
        return ExitCode::FAILURE;
    };
    let mut devices = Vec::new();
    while let Some(fd) = started.take_fd(&FdRole::DeviceChannel) {
        devices.push(Channel::from_fd(fd));
    }
    match run(&started.channel, File::from(console), &memory, &devices) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-vcpu-runner: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    channel: &Channel,
    mut console: File,
    memory: &OwnedFd,
    devices: &[Channel],
) -> Result<(), ChannelError> {
    let ToRunner::Boot(machine) = channel
        .recv_timeout::<ToRunner>(Duration::from_secs(10))?
        .msg
    else {
        return channel.send(&FromRunner::failed("first message was not Boot"), &[]);
    };
    let size = nix::sys::stat::fstat(memory.as_fd()).map_or(-1, |st| st.st_size);
    if u64::try_from(size).ok() != Some(machine.memory_bytes) {
        let reason = format!(
            "guest memory is {size} bytes, expected {}",
            machine.memory_bytes
        );
        return channel.send(&FromRunner::failed(&reason), &[]);
    }
    let words: Vec<&str> = machine.cmdline.split_whitespace().collect();
    let has = |w: &str| words.contains(&w);
    let _ = write!(
        console,
        "fake: booting {} cpus {} MiB cmdline [{}]\r\n",
        machine.cpus,
        machine.memory_bytes >> 20,
        machine.cmdline
    );
    for n in 1..=3 {
        let _ = write!(console, "fake: early line {n}\r\n");
    }
    for (n, device) in devices.iter().enumerate() {
        let wait = Duration::from_secs(10);
        let info = device
            .handshake_timeout(ChannelKind::RunnerDevice, wait)
            .and_then(|()| device.recv_timeout::<FromDevice>(wait));
        match info.map(|r| r.msg) {
            Ok(FromDevice::Info(info)) => {
                let text = String::from_utf8_lossy(&info.config).into_owned();
                let _ = write!(console, "fake: device {n}: {text}\r\n");
            }
            Ok(FromDevice::InfoWithTable { info, .. }) => {
                let _ = write!(console, "fake: device {n}: type {}\r\n", info.device_type);
            }
            other => {
                let reason = format!("device {n} sent no Info: {other:?}");
                return channel.send(&FromRunner::failed(&reason), &[]);
            }
        }
    }
    if has("fake.fail") {
        return channel.send(&FromRunner::failed("fake failure requested"), &[]);
    }
    channel.send(&FromRunner::Running, &[])?;
    let _ = write!(console, "fake: ready\r\n");
    if has("fake.fault") {
        return exit(channel, GuestExit::TripleFault { vcpu: 0 }, "fake fault");
    }
    if has("fake.die") {
        std::process::abort();
    }
    if has("fake.garbage") {
        let bad = FromRunner::Exited {
            exit: GuestExit::Poweroff,
            detail: "\u{1b}]0;owned\u{7}".to_owned(),
        };
        return channel.send(&bad, &[]);
    }
    serve(channel, &mut console, has("fake.ignore_power"))
}

fn exit(channel: &Channel, how: GuestExit, detail: &str) -> Result<(), ChannelError> {
    channel.send(&FromRunner::exited(how, detail), &[])
}

fn serve(channel: &Channel, console: &mut File, ignore_power: bool) -> Result<(), ChannelError> {
    let mut line = Vec::new();
    // Channels of restarted devices, kept open like the real runner keeps them.
    let mut replaced: Vec<Channel> = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let mut fds = [
            PollFd::new(channel.as_fd(), PollFlags::POLLIN),
            PollFd::new(console.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let (channel_ready, console_ready) = (ready(&fds[0]), ready(&fds[1]));
        if channel_ready {
            match channel.recv::<ToRunner>() {
                Ok(m) if m.msg == ToRunner::PowerButton => {
                    let _ = write!(console, "fake: power button pressed\r\n");
                    if !ignore_power {
                        return exit(channel, GuestExit::Poweroff, "acpi s5");
                    }
                }
                Ok(m) => match (m.msg, m.fds.into_iter().next()) {
                    (ToRunner::ReplaceDevice { index }, Some(fd)) => {
                        // As the real runner: handshake with the new process, read its Info.
                        let device = Channel::from_fd(fd);
                        let wait = Duration::from_secs(10);
                        let info = device
                            .handshake_timeout(ChannelKind::RunnerDevice, wait)
                            .and_then(|()| device.recv_timeout::<FromDevice>(wait));
                        let text = match info.map(|r| r.msg) {
                            Ok(FromDevice::Info(info)) => {
                                String::from_utf8_lossy(&info.config).into_owned()
                            }
                            Ok(FromDevice::InfoWithTable { info, .. }) => {
                                format!("type {}", info.device_type)
                            }
                            other => format!("no Info: {other:?}"),
                        };
                        let _ = write!(console, "fake: device {index} replaced: {text}\r\n");
                        replaced.push(device);
                    }
                    (ToRunner::DeviceFailed { index }, _) => {
                        let _ = write!(console, "fake: device {index} failed\r\n");
                    }
                    (ToRunner::ReplaceDisplay, Some(fd)) => {
                        let _ = write!(console, "fake: display replaced\r\n");
                        replaced.push(Channel::from_fd(fd));
                    }
                    _ => {}
                },
                // The supervisor is gone: so is the guest.
                Err(ChannelError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if console_ready {
            let n = console.read(&mut buf).unwrap_or(0);
            if n == 0 {
                return Ok(());
            }
            for &b in &buf[..n] {
                if b != b'\n' && b != b'\r' {
                    line.push(b);
                    continue;
                }
                if line.is_empty() {
                    continue;
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                line.clear();
                let _ = write!(console, "echo: {text}\r\n");
                match text.as_str() {
                    "reboot" => return exit(channel, GuestExit::Reboot, "reboot typed"),
                    "poweroff" => return exit(channel, GuestExit::Poweroff, "poweroff typed"),
                    "fault" => {
                        return exit(channel, GuestExit::TripleFault { vcpu: 0 }, "fault typed");
                    }
                    "die" => std::process::abort(),
                    "sigsys" => {
                        let _ = nix::unistd::getppid();
                    }
                    _ => {}
                }
            }
        }
    }
}
