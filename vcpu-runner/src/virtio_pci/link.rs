//! The runner's side of one device channel: the handshake and `Info` before boot, then a
//! thread that applies every `FromDevice` message to the transport.
//!
//! The channel is switched to non-blocking once the thread runs, so a device that stops
//! reading makes the transport's sends fail (`WouldBlock`) instead of stalling a vCPU; the
//! thread itself waits in `poll`.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use proto::channel::{Channel, ChannelError, ChannelKind};
use proto::device::{ConfigTable, DeviceInfo, DeviceMessageError, FromDevice};

use super::VirtioPci;

/// How long the link thread's `poll` sleeps before looking again (any message wakes it).
const IDLE_WAIT: Duration = Duration::from_hours(1);
/// Bad messages logged at `warn` before the rest are logged at `debug` only.
const WARN_LIMIT: u32 = 8;

/// Why a device could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("device channel failed")]
    Channel(#[from] ChannelError),
    #[error("the device's first message was not Info")]
    NoInfo,
    #[error("the device sent descriptors with its Info")]
    UnexpectedFds,
    #[error("the device's Info is out of bounds")]
    Info(#[from] DeviceMessageError),
    #[error("starting the device link thread failed")]
    Thread(#[source] std::io::Error),
}

/// Handshakes on a new device channel and returns the device's `Info` (and its configuration
/// table, if it sent `InfoWithTable`), waiting at most `timeout` for each step. The runner
/// calls it for every device before the first vCPU runs.
pub fn connect(
    channel: &Channel,
    timeout: Duration,
) -> Result<(DeviceInfo, Option<ConfigTable>), LinkError> {
    channel.handshake_timeout(ChannelKind::RunnerDevice, timeout)?;
    let received = channel.recv_timeout::<FromDevice>(timeout)?;
    if !received.fds.is_empty() {
        return Err(LinkError::UnexpectedFds);
    }
    received.msg.validate()?;
    match received.msg {
        FromDevice::Info(info) => Ok((info, None)),
        FromDevice::InfoWithTable { info, table } => Ok((info, Some(table))),
        _ => Err(LinkError::NoInfo),
    }
}

/// Starts the thread applying `channel`'s messages to `pci` until the channel closes, then
/// tells `pci` the device is gone.
pub fn spawn(
    name: &str,
    channel: Arc<Channel>,
    pci: Arc<Mutex<VirtioPci>>,
) -> Result<JoinHandle<()>, LinkError> {
    channel.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name(format!("link-{name}"))
        .spawn(move || serve(&channel, &pci))
        .map_err(LinkError::Thread)
}

/// After a device process was restarted on `channel`: handshakes, makes `channel` the
/// transport's sender and starts the link thread. The device's `Info` arrives through the
/// thread, and the transport re-sends its `Activate`.
pub fn reconnect(
    name: &str,
    channel: Arc<Channel>,
    pci: Arc<Mutex<VirtioPci>>,
    timeout: Duration,
) -> Result<JoinHandle<()>, LinkError> {
    channel.handshake_timeout(ChannelKind::RunnerDevice, timeout)?;
    pci.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .replace_device(channel.clone());
    spawn(name, channel, pci)
}

fn serve(channel: &Channel, pci: &Mutex<VirtioPci>) {
    let mut bad = 0u32;
    let mut complain = |what: &dyn std::fmt::Display| {
        bad = bad.saturating_add(1);
        if bad <= WARN_LIMIT {
            tracing::warn!(error = %what, "virtio device link: bad message dropped");
        } else {
            tracing::debug!(error = %what, "virtio device link: bad message dropped");
        }
    };
    loop {
        let received = match channel.recv_timeout::<FromDevice>(IDLE_WAIT) {
            Ok(received) => received,
            Err(ChannelError::Timeout | ChannelError::WouldBlock) => continue,
            // A hang-up, or a descriptor that cannot be waited on or read any more.
            Err(ChannelError::Closed | ChannelError::Poll(_) | ChannelError::Recv(_)) => {
                pci.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .device_gone();
                return;
            }
            Err(e) => {
                complain(&e);
                continue;
            }
        };
        if !received.fds.is_empty() {
            // Dropping them closes them.
            complain(&"descriptors attached");
            continue;
        }
        if let Err(e) = received.msg.validate() {
            complain(&e);
            continue;
        }
        pci.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle(received.msg);
    }
}
