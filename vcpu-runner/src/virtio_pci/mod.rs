//! The virtio-pci transport (virtio 1.2 §4.1, modern only) of one virtio device whose queues
//! are served by a device process.
//!
//! The runner owns everything the spec puts in the transport: PCI configuration space with
//! the virtio and MSI-X capabilities, feature negotiation, device status, queue setup and
//! MSI-X. The device process owns the queues' contents (see `proto::device`). When the
//! driver sets `DRIVER_OK` the transport creates a kick and a call eventfd per enabled queue,
//! registers the kick as a KVM ioeventfd on the queue's notify address and the call as an
//! irqfd on the GSI routed from the queue's MSI-X entry, and sends the device
//! `ToDevice::Activate` with both. Afterwards neither kicks nor interrupts pass through here.
//! A restarted device process gets the same `Activate` again; before it, a virtio-net device
//! gets the queue-pair count its predecessor last reported (`FromDevice::QueuePairs`, kept
//! until the driver resets the device) as `ToDevice::ResumeQueuePairs`.
//!
//! BAR0 (64-bit memory, [`BAR_SIZE`] bytes) holds, at fixed offsets:
//!
//! ```text
//!   0x0000  common configuration  (0x38 bytes)
//!   0x1000  ISR status            (1 byte, read-to-clear)
//!   0x2000  device configuration  (the device's Info.config; no capability if empty; for a
//!           device that sent a selector table, `select`/`subsel`/`size`/`u` served from it)
//!   0x3000  notify: queue n at 0x3000 + 4*n (notify_off_multiplier 4, no datamatch needed)
//!   0x3800  MSI-X table           (queues + 1 entries: one per queue, one for config changes)
//!   0x3c00  MSI-X PBA
//! ```
//!
//! What it needs from KVM goes through [`VirtioHost`] and what it sends the device through
//! [`DeviceSender`], so the whole state machine is unit-tested with fakes. The real host is
//! [`kvm_host::KvmHost`]; [`link`] runs the thread that applies the device's messages;
//! [`window::BarWindow`] routes MMIO exits to whichever function decodes an address, so a
//! BAR the guest moves keeps working (its ioeventfds move with it, see `update_decode`).
//!
//! Trusts nothing: every guest access (any width, any offset) and every device message is
//! checked; nothing here panics on them, and every message sent to the device passes
//! `ToDevice::validate` against the device's own `Info` first. Touches: the VM (through
//! [`VirtioHost`]), the eventfds it creates, and its device channel.
//!
//! Not implemented: legacy (transitional) virtio, `INTx` (the interrupt pin is 0: a driver
//! must use MSI-X, as Linux and OVMF do), `VIRTIO_F_RING_PACKED`, `NOTIFICATION_DATA`,
//! `RING_RESET` (never offered).

mod bar;
mod common;
mod config_space;
pub mod kvm_host;
pub mod link;
mod msix;
mod registrations;
#[cfg(test)]
mod tests;
pub mod window;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proto::channel::{Channel, ChannelError};
use proto::device::{
    ConfigTable, DeviceInfo, DeviceMessageError, FromDevice, QueueConfig, ToDevice,
};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::devices::pci_config::{ConfigSetupError, ConfigSpace};
use crate::layout::{ECAM_START, PCI_MMIO32_START};
use common::{Common, F_VERSION_1};
use config_space::MAX_DEVICE_TYPE;
pub use config_space::VIRTIO_VENDOR;
pub use msix::MsiMessage;
use msix::Msix;
use registrations::Registered;

/// Bytes of BAR0.
pub const BAR_SIZE: u64 = 0x4000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
/// The ISR register is one byte; a wider read starting on it is answered too.
const ISR_LEN: u64 = 4;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x3800;
const MSIX_PBA_OFFSET: u64 = 0x3c00;
const MSIX_PBA_LEN: u64 = 8;

/// ISR bits (§4.1.4.5).
const ISR_CONFIG: u8 = 0x2;

/// Feature bits the transport passes on from the device's offer: device-specific bits
/// (0–23, 50–63), `INDIRECT_DESC`, `EVENT_IDX`, `VERSION_1`, `IN_ORDER`, `ORDER_PLATFORM`.
/// Not `ACCESS_PLATFORM` (no IOMMU), `RING_PACKED` (queue sizes are powers of two here),
/// `NOTIFICATION_DATA`, `RING_RESET`, `ADMIN_VQ` or `SR_IOV`.
const TRANSPORT_FEATURES: u64 =
    0x00ff_ffff | (1 << 28) | (1 << 29) | F_VERSION_1 | (1 << 35) | (1 << 36) | (!0u64 << 50);

/// `VIRTIO_NET_F_MQ` (§5.1.3): without it a virtio-net device has one queue pair.
const NET_F_MQ: u64 = 1 << 22;

/// Reads of `device_status` while a reset waits for the device's `ResetDone`, after which the
/// reset completes anyway (a hung or hostile device must not hang the driver's reset).
const RESET_POLL_LIMIT: u32 = 2000;

/// What the transport cannot do in the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("no GSI is left for another MSI route")]
    GsisExhausted,
}

/// What the transport needs from the hypervisor.
pub trait VirtioHost: Send + Sync {
    /// Makes a guest write of any width to MMIO `addr` signal `fd` instead of exiting.
    fn register_ioeventfd(&self, addr: u64, fd: &EventFd) -> Result<(), HostError>;
    /// Undoes [`VirtioHost::register_ioeventfd`].
    fn unregister_ioeventfd(&self, addr: u64, fd: &EventFd) -> Result<(), HostError>;
    /// A GSI of its own for one MSI-X vector.
    fn alloc_gsi(&self) -> Result<u32, HostError>;
    /// Routes `gsi` to `message` (replacing its previous route).
    fn set_msi_route(&self, gsi: u32, message: MsiMessage) -> Result<(), HostError>;
    /// Makes a signal on `fd` raise `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HostError>;
    /// Undoes [`VirtioHost::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HostError>;
}

/// The runner's end of a device channel, for sending.
pub trait DeviceSender: Send + Sync {
    fn send(&self, msg: &ToDevice, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError>;
}

impl DeviceSender for Channel {
    fn send(&self, msg: &ToDevice, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        Channel::send(self, msg, fds)
    }
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("the device's Info is out of bounds")]
    Info(#[from] DeviceMessageError),
    #[error("the device does not offer VIRTIO_F_VERSION_1 (this transport is modern only)")]
    NotModern,
    #[error("virtio device type {0} has no modern PCI device ID")]
    DeviceType(u16),
    #[error("BAR address {0:#x} is not a non-zero multiple of the BAR size")]
    BarAddress(u64),
    #[error("building the configuration space failed")]
    ConfigSpace(#[from] ConfigSetupError),
    #[error("allocating the MSI-X vectors' GSIs failed")]
    Host(#[from] HostError),
    #[error("creating an eventfd failed")]
    EventFd(#[source] std::io::Error),
}

/// Where BAR0 of the `n`th virtio device (from 0) sits when the runner assigns addresses like
/// firmware: packed from the start of the 32-bit PCI window. `None` past the window.
pub fn bar_address(n: usize) -> Option<u64> {
    let at = u64::try_from(n)
        .ok()?
        .checked_mul(BAR_SIZE)?
        .checked_add(PCI_MMIO32_START)?;
    (at.checked_add(BAR_SIZE)? <= ECAM_START).then_some(at)
}

/// An interrupt source: the configuration-change interrupt or a queue's call eventfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Config,
    Queue(u16),
}

/// One activated queue and its eventfds.
#[derive(Debug)]
struct ActiveQueue {
    config: QueueConfig,
    kick: EventFd,
    call: EventFd,
}

/// The device between `DRIVER_OK` and reset.
#[derive(Debug)]
struct Active {
    features: u64,
    queues: Vec<ActiveQueue>,
    /// The receive queue pairs a virtio-net device last reported enabled (more than 1 only),
    /// for a restarted process: `ToDevice::ResumeQueuePairs` before its `Activate`. Kept here
    /// so that a driver reset, which drops this, starts again from 1 pair (§5.1.6.5.5).
    queue_pairs: Option<u16>,
    /// Being reset: its registrations are being removed.
    stopping: bool,
}

/// A reset waiting for the device's `ResetDone`.
#[derive(Debug, Clone, Copy)]
struct PendingReset {
    /// `device_status` reads this until the reset completes (§4.1.4.3.2: the driver waits for
    /// a read of 0).
    status: u8,
    polls: u32,
}

/// One virtio device's PCI function and BAR.
pub struct VirtioPci {
    /// The device's Info; `config` is the cache guest reads are served from.
    info: DeviceInfo,
    /// A selector-addressed space's answers (virtio-input), and the driver's `select` and
    /// `subsel`: reads of the device configuration come from here instead of `info.config`.
    table: Option<SelectedTable>,
    space: ConfigSpace,
    common: Common,
    msix: Msix,
    isr: u8,
    /// Where BAR0 is decoded (memory decoding on, a usable address), shared with the window.
    decoded: Arc<AtomicU64>,
    /// One GSI per MSI-X vector.
    gsis: Vec<u32>,
    /// The configuration-change interrupt's eventfd (an irqfd like the queues' calls).
    config_irq: EventFd,
    active: Option<Active>,
    reset_pending: Option<PendingReset>,
    registered: Registered,
    host: Arc<dyn VirtioHost>,
    device: Arc<dyn DeviceSender>,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("device_type", &self.info.device_type)
            .field("status", &self.common.status())
            .field("bar", &self.bar())
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

/// A device's [`ConfigTable`] and the selector the driver last wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SelectedTable {
    table: ConfigTable,
    select: u8,
    subsel: u8,
}

/// A new eventfd that never blocks (the device process only polls and drains it; the PBA
/// peeks at it).
fn new_eventfd() -> std::io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
}

/// `fd` as a borrowed descriptor, for attaching it to a message.
fn borrow(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: `EventFd` owns its descriptor and closes it only when dropped; the borrow
    // cannot outlive `fd`, so the descriptor stays open for the returned lifetime.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

impl VirtioPci {
    /// The transport of the device that sent `info`, with BAR0 at `bar_address` and memory
    /// decoding on (as firmware leaves it), talking to the device through `device`.
    pub fn new(
        info: DeviceInfo,
        bar_address: u64,
        host: Arc<dyn VirtioHost>,
        device: Arc<dyn DeviceSender>,
    ) -> Result<VirtioPci, TransportError> {
        Self::with_table(info, None, bar_address, host, device)
    }

    /// [`VirtioPci::new`] for a device that sent [`FromDevice::InfoWithTable`]: configuration
    /// reads are answered from `table` (checked against `info` here too).
    pub fn with_table(
        info: DeviceInfo,
        table: Option<ConfigTable>,
        bar_address: u64,
        host: Arc<dyn VirtioHost>,
        device: Arc<dyn DeviceSender>,
    ) -> Result<VirtioPci, TransportError> {
        info.validate()?;
        if let Some(t) = &table {
            t.validate_for(&info)?;
        }
        if info.features & F_VERSION_1 == 0 {
            return Err(TransportError::NotModern);
        }
        if info.device_type > MAX_DEVICE_TYPE {
            return Err(TransportError::DeviceType(info.device_type));
        }
        if bar_address == 0
            || !bar_address.is_multiple_of(BAR_SIZE)
            || bar_address.checked_add(BAR_SIZE).is_none()
        {
            return Err(TransportError::BarAddress(bar_address));
        }
        // Queues ≤ MAX_QUEUES (16), so the vectors fit the table region and a u16.
        let vectors = info.queues.saturating_add(1);
        let space = Self::config_space(&info, vectors, bar_address)?;
        let gsis = (0..vectors)
            .map(|_| host.alloc_gsi())
            .collect::<Result<Vec<_>, _>>()?;
        let offered = info.features & TRANSPORT_FEATURES;
        let mut pci = VirtioPci {
            common: Common::new(offered, info.queues, info.max_queue_size, vectors),
            msix: Msix::new(vectors),
            info,
            table: table.map(|table| SelectedTable {
                table,
                select: 0,
                subsel: 0,
            }),
            space,
            isr: 0,
            decoded: Arc::new(AtomicU64::new(0)),
            gsis,
            config_irq: new_eventfd().map_err(TransportError::EventFd)?,
            active: None,
            reset_pending: None,
            registered: Registered {
                routes: vec![None; usize::from(vectors)],
                ..Registered::default()
            },
            host,
            device,
        };
        pci.update_decode();
        Ok(pci)
    }

    /// Where BAR0 is decoded now, if it is.
    pub fn bar(&self) -> Option<u64> {
        match self.decoded.load(Ordering::Acquire) {
            0 => None,
            at => Some(at),
        }
    }

    /// The device's Info as the transport holds it (config = the current cache).
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// A handle on where BAR0 is decoded (0 = nowhere), for [`window::BarWindow`].
    fn decoded_handle(&self) -> Arc<AtomicU64> {
        self.decoded.clone()
    }

    /// The activated device, unless it is being reset.
    fn live(&self) -> Option<&Active> {
        self.active.as_ref().filter(|a| !a.stopping)
    }

    fn queue(&self, index: u16) -> Option<&ActiveQueue> {
        self.active
            .as_ref()?
            .queues
            .iter()
            .find(|q| q.config.index == index)
    }

    fn source_fd(&self, source: Source) -> Option<&EventFd> {
        match source {
            Source::Config => Some(&self.config_irq),
            Source::Queue(index) => self.queue(index).map(|q| &q.call),
        }
    }

    /// Sends `msg` (checked against the device's Info first) with `fds`.
    fn send(&self, msg: &ToDevice, fds: &[BorrowedFd<'_>]) -> bool {
        if let Err(e) = msg.validate(&self.info) {
            tracing::error!(error = %e, "virtio-pci: refusing to send an invalid message");
            return false;
        }
        match self.device.send(msg, fds) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-pci: sending to the device failed");
                false
            }
        }
    }

    /// `Activate` for the live queues, preceded by the queue-pair count to resume with if the
    /// device reported one in this driver session.
    fn send_activate(&self) {
        let Some(active) = self.live() else { return };
        if let Some(pairs) = active.queue_pairs {
            // Whatever becomes of it, the device is activated (with 1 pair at worst).
            self.send(&ToDevice::ResumeQueuePairs { pairs }, &[]);
        }
        let msg = ToDevice::Activate {
            features: active.features,
            queues: active.queues.iter().map(|q| q.config).collect(),
        };
        let fds: Vec<BorrowedFd<'_>> = active
            .queues
            .iter()
            .flat_map(|q| [borrow(&q.kick), borrow(&q.call)])
            .collect();
        self.send(&msg, &fds);
    }

    /// `DRIVER_OK`: eventfds for every enabled queue, their registrations, then `Activate`.
    fn activate(&mut self) {
        let configs: Vec<QueueConfig> = (0u16..)
            .zip(self.common.queues())
            .filter(|(_, q)| q.enabled)
            .map(|(index, q)| QueueConfig {
                index,
                size: q.size,
                desc: q.desc,
                avail: q.driver,
                used: q.device,
            })
            .collect();
        if configs.is_empty() {
            tracing::warn!("virtio-pci: DRIVER_OK without an enabled queue");
            self.device_failed();
            return;
        }
        let mut queues = Vec::with_capacity(configs.len());
        for config in configs {
            match (new_eventfd(), new_eventfd()) {
                (Ok(kick), Ok(call)) => queues.push(ActiveQueue { config, kick, call }),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "virtio-pci: creating queue eventfds failed");
                    self.device_failed();
                    return;
                }
            }
        }
        self.active = Some(Active {
            features: self.common.driver_features(),
            queues,
            queue_pairs: None,
            stopping: false,
        });
        self.sync_ioeventfds();
        self.sync_irqfds();
        // If this fails the device is gone; a restarted one gets the same Activate.
        self.send_activate();
    }

    /// The driver reset the device (§2.4): registrations removed, eventfds dropped, the
    /// device told; `device_status` reads non-zero until it answers.
    fn reset(&mut self, previous: u8) {
        self.isr = 0;
        let was_active = self.active.is_some();
        if let Some(active) = self.active.as_mut() {
            active.stopping = true;
        }
        self.sync_ioeventfds();
        self.sync_irqfds();
        self.active = None;
        // A configuration interrupt not yet delivered belongs to the old driver.
        let _ = self.config_irq.read();
        self.reset_pending = None;
        if was_active && self.send(&ToDevice::Reset, &[]) {
            self.reset_pending = Some(PendingReset {
                status: previous,
                polls: 0,
            });
        }
    }

    /// The supervisor gave up restarting the device's process: the driver sees it broken.
    pub fn fail(&mut self) {
        tracing::warn!(
            device_type = self.info.device_type,
            "virtio device failed for good: needs a reset"
        );
        self.device_failed();
    }

    /// The device cannot go on: `DEVICE_NEEDS_RESET` and a configuration interrupt (§2.1.2).
    fn device_failed(&mut self) {
        self.common.set_needs_reset();
        self.raise_config();
    }

    /// A configuration-change interrupt: the ISR bit, and the config vector if MSI-X is on
    /// (fired through its irqfd, or left pending in the eventfd while masked).
    fn raise_config(&mut self) {
        self.isr |= ISR_CONFIG;
        if self.msix.enabled()
            && self.vector_of(Source::Config).is_some()
            && let Err(e) = self.config_irq.write(1)
        {
            tracing::warn!(error = %e, "virtio-pci: raising the config interrupt failed");
        }
    }

    /// Applies a message from the device (validated again here: the device is not trusted).
    pub fn handle(&mut self, msg: FromDevice) {
        if let Err(e) = msg.validate() {
            tracing::warn!(error = %e, "virtio-pci: invalid message from the device dropped");
            return;
        }
        match msg {
            FromDevice::Info(info) => self.restarted(info, None),
            FromDevice::InfoWithTable { info, table } => self.restarted(info, Some(&table)),
            FromDevice::Activated => {
                if self.live().is_some() {
                    tracing::info!(
                        device_type = self.info.device_type,
                        "virtio device activated"
                    );
                }
            }
            FromDevice::ResetDone => self.reset_pending = None,
            FromDevice::ConfigChanged { config } => {
                if config.len() != self.info.config.len() {
                    tracing::warn!(
                        len = config.len(),
                        "virtio-pci: configuration of another size than Info's dropped"
                    );
                } else if config != self.info.config {
                    self.info.config = config;
                    self.common.bump_generation();
                    self.raise_config();
                }
            }
            FromDevice::QueuePairs { pairs } => self.queue_pairs_reported(pairs),
            FromDevice::NeedsReset { reason } => {
                if self.live().is_some() {
                    tracing::warn!(%reason, "virtio device needs a reset");
                    self.device_failed();
                } else {
                    tracing::debug!(%reason, "virtio-pci: NeedsReset of an inactive device ignored");
                }
            }
        }
    }

    /// A virtio-net device applied the driver's `VQ_PAIRS_SET`: kept for a restarted process
    /// if it is within what the device offered and negotiated, and the device is live (a
    /// report from before a reset belongs to the old driver). Anything else is dropped: a
    /// compromised device can only make its own restart resume with a count the driver
    /// could have set.
    fn queue_pairs_reported(&mut self, pairs: u16) {
        let offered = self.info.check_queue_pairs(pairs);
        let Some(active) = self.active.as_mut().filter(|a| !a.stopping) else {
            tracing::debug!(
                pairs,
                "virtio-pci: queue pairs of an inactive device ignored"
            );
            return;
        };
        if let Err(e) = offered {
            tracing::warn!(error = %e, "virtio-pci: queue-pair report refused");
            return;
        }
        if pairs > 1 && active.features & NET_F_MQ == 0 {
            tracing::warn!(pairs, "virtio-pci: queue pairs reported without MQ refused");
            return;
        }
        let kept = (pairs > 1).then_some(pairs);
        if active.queue_pairs != kept {
            active.queue_pairs = kept;
            tracing::info!(pairs, "virtio-net queue pairs enabled by the driver");
        }
    }

    /// A restarted device process introduced itself: if it is the same device, it gets the
    /// same `Activate` and eventfds (the KVM registrations stay), after the queue-pair count
    /// to resume with if there is one; otherwise the driver is told to reset.
    fn restarted(&mut self, info: DeviceInfo, table: Option<&ConfigTable>) {
        let same = info.device_type == self.info.device_type
            && info.features == self.info.features
            && info.queues == self.info.queues
            && info.max_queue_size == self.info.max_queue_size
            && info.config.len() == self.info.config.len()
            && table == self.table.as_ref().map(|t| &t.table);
        self.reset_pending = None;
        if !same {
            tracing::warn!(
                "virtio-pci: the restarted device differs from the first; driver must reset"
            );
            self.device_failed();
            return;
        }
        if info.config != self.info.config {
            self.info.config = info.config;
            self.common.bump_generation();
            self.raise_config();
        }
        self.send_activate();
    }

    /// The device channel closed (the process died). A reset waiting for it completes; the
    /// queues stay set up for a restarted device.
    pub fn device_gone(&mut self) {
        tracing::warn!(
            device_type = self.info.device_type,
            "virtio device process gone"
        );
        self.reset_pending = None;
    }

    /// A new channel to a restarted device process; its `Info` follows through [`handle`].
    ///
    /// [`handle`]: VirtioPci::handle
    pub fn replace_device(&mut self, device: Arc<dyn DeviceSender>) {
        self.device = device;
    }

    /// `device_status` as the driver sees it during a pending reset.
    fn poll_pending_reset(&mut self) -> Option<u8> {
        let pending = self.reset_pending.as_mut()?;
        pending.polls = pending.polls.saturating_add(1);
        if pending.polls > RESET_POLL_LIMIT {
            tracing::warn!("virtio-pci: the device did not finish its reset; completing it anyway");
            self.reset_pending = None;
            return None;
        }
        Some(pending.status)
    }
}
