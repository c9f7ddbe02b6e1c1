//! `dev-blk`: serves one virtio-blk disk (virtio 1.2 §5.2) to one guest.
//!
//! Started by the per-VM supervisor with its bootstrap channel on fd 3. It receives its log,
//! the guest RAM memfd, one disk descriptor (a raw image or a block device, opened read-only
//! for read-only disks) and its channel to the vcpu-runner, enters capability mode
//! (`child::start`, with this crate's `seccomp.policy`), then reads a
//! [`proto::device::DeviceSetup::Block`] on the bootstrap channel and serves the runner.
//!
//! Layout:
//! - [`request`]: the pure request path — chain → [`request::Request`] → status + used length.
//! - [`disk`]: the [`disk::Disk`] trait and its file implementation (`preadv`/`pwritev` straight
//!   into guest memory, `fdatasync`, `fallocate`).
//! - [`uring`]: the opt-in engine (`CAPVM_BLK_IO=uring`): one restricted `io_uring` per
//!   serving thread (made before capability mode), the queue's chains in flight at once.
//! - [`queue_loop`]: the default engine, a leader/follower set of worker threads per virtqueue
//!   (kick/call eventfds, `EVENT_IDX`): each worker pops a chain, runs it and publishes its
//!   completion.
//! - [`config`]: feature bits and the configuration space.
//! - [`device`]: the control side (`Info`, `Activate`, `Reset`).
//!
//! Trusts: its supervisor, for the bootstrap and setup (still validated). Does not trust the
//! runner's messages beyond their validated bounds, nor anything in guest memory.
//! Touches: only the descriptors it was given; guest memory only through `vm-memory`'s
//! bounds-checked slices; the disk only inside its size.

pub mod config;
pub mod device;
pub mod disk;
pub mod inflight;
pub mod queue_loop;
pub mod request;
pub mod uring;

use std::os::fd::AsRawFd;

use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError};
use proto::device::DeviceSetup;

pub use device::{Device, DeviceError, DeviceFds};

/// This process's seccomp policy, on top of the sandbox's base and thread policies.
pub const SECCOMP_POLICY: &str = include_str!("../seccomp.policy");

/// The role name this binary answers to.
pub const ROLE: &str = "dev-blk";

/// Why the process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] child::StartError),
    #[error("reading the device setup failed")]
    Setup(#[source] ChannelError),
    #[error("the device failed")]
    Device(#[from] DeviceError),
    #[error("the supervisor sent the setup of another kind of device")]
    WrongSetup,
}

/// A measuring knob: `var`'s value if it parses as a number within `range`, else `default`.
pub(crate) fn env_number<T>(var: &str, range: std::ops::RangeInclusive<T>, default: T) -> T
where
    T: std::str::FromStr + PartialOrd,
{
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<T>().ok())
        .filter(|n| range.contains(n))
        .unwrap_or(default)
}

/// Runs the process: bootstrap, capability mode, device setup, then serve until the
/// supervisor or the runner hangs up.
pub fn run() -> Result<(), RunError> {
    // With `CAPVM_BLK_IO=uring` the rings are made before capability mode, which forbids
    // `io_uring_setup`: one per host CPU (up to `uring::MAX_RINGS`); a device with fewer
    // queues leaves some idle.
    let mut rings = Vec::new();
    let mut started = child::start_with(
        child::ChildKind {
            role_name: ROLE,
            policy: SECCOMP_POLICY,
            threads: true,
        },
        &mut || {
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            rings = uring::make_rings(cpus);
            rings.iter().map(AsRawFd::as_raw_fd).collect()
        },
    )?;
    let Some(setup) =
        child::recv_setup::<DeviceSetup>(&started.channel).map_err(RunError::Setup)?
    else {
        return Ok(());
    };
    let DeviceSetup::Block(setup) = setup else {
        return Err(RunError::WrongSetup);
    };
    let mut take = |role| started.take_fd(&role).ok_or(DeviceError::MissingFd(role));
    let fds = DeviceFds {
        memory: take(FdRole::GuestMemory)?,
        disk: take(FdRole::Disk)?,
        runner: Channel::from_fd(take(FdRole::DeviceChannel)?),
        inflight: started.take_fd(&FdRole::InflightRegion),
        rings,
    };
    let device = Device::new(&setup, fds)?;
    device.serve(&started.channel)?;
    Ok(())
}
