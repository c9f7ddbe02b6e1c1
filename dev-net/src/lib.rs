//! `dev-net`: serves one virtio-net NIC (virtio 1.2 §5.1) to one guest over one tap.
//!
//! Started by the per-VM supervisor with its bootstrap channel on fd 3. It receives its log,
//! the guest RAM memfd, one tap descriptor per queue pair (the queues of one tap made by
//! netcfg with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, and `IFF_MULTI_QUEUE` for more than one)
//! and its channel to the vcpu-runner, enters capability mode (`child::start`, with this
//! crate's `seccomp.policy`, threads allowed), then reads a [`proto::device::DeviceSetup::Net`]
//! on the bootstrap channel and serves the runner: receive/transmit queue pairs, each on its
//! own thread and tap queue, with `MQ` and a control queue when there are several,
//! `MRG_RXBUF`, checksum and TSO offloads through the tap's virtio header (`TUNSETVNETHDRSZ`,
//! `TUNSETOFFLOAD`), `EVENT_IDX`, the link status in the configuration space.
//!
//! Layout:
//! - [`header`]: the pure `virtio_net_hdr_v1` codec and the checks of a transmitted header.
//! - [`ring`]: popping and checking descriptor chains; the used ring with batched publishing.
//! - [`rx`]: one frame from the tap into the receive buffers (`MRG_RXBUF`).
//! - [`tx`]: one transmit chain → a checked header and the frame's guest buffers.
//! - [`tap`]: the tap descriptor (ioctls, non-blocking read, `writev`).
//! - [`config`]: feature bits, the configuration space, the tap offloads.
//! - [`ctrl`]: the control queue's commands (`VQ_PAIRS_SET`).
//! - [`pair`]: one queue pair's worker thread (the data path).
//! - [`device`]: the control side (`Info`, `Activate`, `Reset`, the control queue, the
//!   workers).
//!
//! Trusts: its supervisor, for the bootstrap and setup (still validated), and the kernel's tap
//! for the frames it hands over. Does not trust the runner's messages beyond their validated
//! bounds, nor anything in guest memory: a bad frame or chain is dropped and counted, a broken
//! ring asks for a reset; neither stops the process.
//! Touches: only the descriptors it was given; guest memory only through `vm-memory`'s
//! bounds-checked slices.

pub mod config;
pub mod ctrl;
pub mod device;
pub mod header;
pub mod pair;
pub mod ring;
pub mod rx;
pub mod tap;
pub mod tx;

use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError};
use proto::device::DeviceSetup;

pub use device::{Device, DeviceError, DeviceFds};

/// This process's seccomp policy, on top of the sandbox's base policy.
pub const SECCOMP_POLICY: &str = include_str!("../seccomp.policy");

/// The role name this binary answers to.
pub const ROLE: &str = "dev-net";

/// Why the process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] child::StartError),
    #[error("reading the device setup failed")]
    Setup(#[source] ChannelError),
    #[error("the setup is for another kind of device")]
    WrongSetup,
    #[error("the device failed")]
    Device(#[from] DeviceError),
}

/// Runs the process: bootstrap, capability mode, device setup, then serve until the
/// supervisor or the runner hangs up.
pub fn run() -> Result<(), RunError> {
    let mut started = child::start(child::ChildKind {
        role_name: ROLE,
        policy: SECCOMP_POLICY,
        threads: true,
    })?;
    let Some(setup) =
        child::recv_setup::<DeviceSetup>(&started.channel).map_err(RunError::Setup)?
    else {
        return Ok(());
    };
    let DeviceSetup::Net(setup) = setup else {
        return Err(RunError::WrongSetup);
    };
    let mut take = |role| started.take_fd(&role).ok_or(DeviceError::MissingFd(role));
    let memory = take(FdRole::GuestMemory)?;
    let runner = Channel::from_fd(take(FdRole::DeviceChannel)?);
    // The tap's queues, in the order they were passed: one per queue pair.
    let taps = std::iter::from_fn(|| started.take_fd(&FdRole::Tap)).collect();
    let fds = DeviceFds {
        memory,
        taps,
        runner,
    };
    let device = Device::new(&setup, fds)?;
    device.serve(&started.channel)?;
    Ok(())
}

pub(crate) use child::error_chain;
