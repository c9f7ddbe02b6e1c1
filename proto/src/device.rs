//! The device channel: `vcpu-runner` ↔ one virtio device process (dev-blk, dev-net, dev-fb).
//!
//! The virtio-pci transport lives in the runner: PCI configuration space, capabilities,
//! feature negotiation, queue setup, device status and MSI-X. The device process owns the
//! queues' contents. The split, in the order things happen:
//!
//! 1. The supervisor creates one socketpair per device; the runner gets one end
//!    ([`FdRole::DeviceChannel`], in device order), the device process the other. Both
//!    handshake as [`ChannelKind::RunnerDevice`].
//! 2. The device sends [`FromDevice::Info`]: its virtio device type, the features it offers,
//!    its queue count and maximum size, its device-specific configuration space. The runner
//!    waits for every device's `Info` before the first vCPU runs, and serves guest reads of the
//!    configuration space from that copy (no round trip per read). A device whose space is
//!    addressed by selectors (virtio-input) sends [`FromDevice::InfoWithTable`] instead, with
//!    every answer in a bounded [`ConfigTable`].
//! 3. When the driver sets `DRIVER_OK`, the runner sends [`ToDevice::Activate`] with the
//!    negotiated features and each enabled queue's size and ring addresses, and attaches two
//!    eventfds per queue, in queue order: the kick (registered by the runner as a KVM
//!    ioeventfd on the queue's notify address) and the call (a KVM irqfd routed from the
//!    queue's MSI-X vector). From then on a request goes guest → KVM → device → guest RAM →
//!    irqfd → guest without the runner. The device answers [`FromDevice::Activated`], or
//!    [`FromDevice::NeedsReset`] if it cannot use what it was given.
//! 4. A guest write to the configuration space is a [`ToDevice::ConfigWrite`]; a change the
//!    device makes (a resized disk, a link going down) is a [`FromDevice::ConfigChanged`] with
//!    the new bytes, and the runner raises the configuration-change interrupt. A device reset
//!    by the driver is a [`ToDevice::Reset`]: the device stops using the queues and drops their
//!    eventfds.
//! 5. After a device process crashed, the supervisor starts a new one on a new socketpair and
//!    hands the runner its end; the runner sends the same `Activate` (same eventfds, so the KVM
//!    registrations stay) and the device resumes from the ring indices in guest memory.
//! 6. State the driver set through a queue rather than a register lives in the device process
//!    and would die with it. The one such state kept is virtio-net's receive queue-pair count
//!    (`VQ_PAIRS_SET` on the control queue, §5.1.6.5.5): dev-net reports each count it
//!    applies as [`FromDevice::QueuePairs`], the runner keeps the last one until the driver
//!    resets the device, and before the re-sent `Activate` of step 5 it sends
//!    [`ToDevice::ResumeQueuePairs`], so the new process receives on as many pairs as the
//!    driver enabled. Both are checked against the pairs the device offered in its `Info`.
//!
//! The runner treats the device as hostile (it parses guest data and may be compromised):
//! [`FromDevice::validate`] bounds everything, and the runner never lets a device name a
//! queue, feature or config byte it did not offer in its `Info`.
//!
//! [`FdRole::DeviceChannel`]: crate::bootstrap::FdRole::DeviceChannel
//! [`ChannelKind::RunnerDevice`]: crate::channel::ChannelKind::RunnerDevice

use serde::{Deserialize, Serialize};

use crate::bounds::{clip, is_printable_ascii};

/// Most queues of one device: two eventfds each must fit one message's
/// [`MAX_FDS`](crate::MAX_FDS).
pub const MAX_QUEUES: u16 = 16;
/// Largest virtio queue (split ring), a power of two.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Bytes of a dev-blk in-flight region ([`FdRole::InflightRegion`]): what the supervisor
/// allocates per disk so that a restarted dev-blk replays the requests its predecessor had in
/// flight (16 queues × (16 + 256) `u32` words, rounded up to pages).
///
/// [`FdRole::InflightRegion`]: crate::bootstrap::FdRole::InflightRegion
pub const INFLIGHT_REGION_BYTES: usize = 20 * 4096;
/// Largest device-specific configuration space, in bytes.
pub const MAX_CONFIG_BYTES: usize = 256;
/// Longest reason text, in bytes.
pub const MAX_DEVICE_REASON_BYTES: usize = 256;

/// Most guest RAM regions of a [`MemoryRegion`] list.
pub const MAX_MEMORY_REGIONS: usize = 8;
/// Longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_BLK_SERIAL_BYTES: usize = 20;

/// Where low guest RAM ends and the 32-bit MMIO hole begins (3 GiB).
pub const RAM_LOW_END: u64 = 0xC000_0000;
/// Where guest RAM above the hole begins (4 GiB).
pub const RAM_HIGH_START: u64 = 1 << 32;

/// The guest RAM layout of an x86 guest with `memory_bytes` of RAM, shared by the runner
/// (which maps and registers it) and the supervisor (which tells devices): `[0, min(mem,
/// 3 GiB))` at memfd offset 0 and, if there is more, `[4 GiB, 4 GiB + (mem − 3 GiB))` at memfd
/// offset 3 GiB.
pub fn guest_ram_layout(memory_bytes: u64) -> Vec<MemoryRegion> {
    let low = memory_bytes.min(RAM_LOW_END);
    let mut regions = vec![MemoryRegion {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    let high = memory_bytes.saturating_sub(RAM_LOW_END);
    if high > 0 {
        regions.push(MemoryRegion {
            guest_addr: RAM_HIGH_START,
            size: high,
            file_offset: RAM_LOW_END,
        });
    }
    regions
}

/// Where a piece of the guest RAM memfd sits in guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub size: u64,
    /// Offset of the region in the [`GuestMemory`](crate::bootstrap::FdRole::GuestMemory) memfd.
    pub file_offset: u64,
}

/// What the supervisor tells a device process about its job, on the bootstrap channel right
/// after [`BootstrapReply::Ready`](crate::bootstrap::BootstrapReply::Ready) (the device's
/// channel to the runner is its [`FdRole::DeviceChannel`](crate::bootstrap::FdRole::DeviceChannel)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSetup {
    Block(BlockSetup),
    Net(NetSetup),
    /// dev-fb's virtio-input devices; sent after its `DisplaySetup`, only when it holds
    /// [`FdRole::DeviceChannel`](crate::bootstrap::FdRole::DeviceChannel)s.
    Input(InputSetup),
}

/// A virtio-blk device (`diskN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSetup {
    /// The guest RAM layout, at most [`MAX_MEMORY_REGIONS`] non-overlapping regions.
    pub memory: Vec<MemoryRegion>,
    /// Refuse writes and offer `VIRTIO_BLK_F_RO` (`diskN_opts="ro"`, install media).
    pub read_only: bool,
    /// The logical block size offered with `BLK_SIZE` (`sectorsize=`): 512..=4096, a power of two.
    pub logical_block_size: u32,
    /// The `GET_ID` answer: printable ASCII, at most [`MAX_BLK_SERIAL_BYTES`].
    pub serial: String,
    /// Request queues (`MQ`), 1..=[`MAX_QUEUES`].
    pub queues: u16,
}

impl BlockSetup {
    /// Checks the bounds the device relies on.
    pub fn validate(&self) -> Result<(), DeviceMessageError> {
        validate_memory(&self.memory)?;
        if !(512..=4096).contains(&self.logical_block_size)
            || !self.logical_block_size.is_power_of_two()
        {
            return Err(DeviceMessageError::BlockSize(self.logical_block_size));
        }
        if self.serial.len() > MAX_BLK_SERIAL_BYTES || !is_printable_ascii(&self.serial) {
            return Err(DeviceMessageError::Serial);
        }
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(DeviceMessageError::QueueCount(usize::from(self.queues)));
        }
        Ok(())
    }
}

/// Smallest MTU a [`NetSetup`] may offer (IPv4's minimum datagram, RFC 791).
pub const MIN_NET_MTU: u16 = 68;
/// Most receive/transmit queue pairs of a virtio-net device: with its control queue a device
/// of `n` pairs has `2n + 1` queues, which must stay within [`MAX_QUEUES`] (and their two
/// eventfds each within one message's [`MAX_FDS`](crate::MAX_FDS)).
pub const MAX_NET_QUEUE_PAIRS: u16 = (MAX_QUEUES - 1) / 2;

/// The queue count of a virtio-net device with `pairs` queue pairs (§5.1.2): `rx0, tx0`
/// alone for one pair; `rx0, tx0, …, rxN-1, txN-1, ctrl` for more.
pub const fn net_queue_count(pairs: u16) -> u16 {
    if pairs <= 1 {
        2
    } else {
        pairs.saturating_mul(2).saturating_add(1)
    }
}

/// A virtio-net device (`networkN`). Its fds, in order: `Log`, `GuestMemory`, `Tap` (opened
/// with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), `DeviceChannel`, then one more `Tap` per further
/// queue pair: the queues of one multi-queue tap (`IFF_MULTI_QUEUE`), queue pair `i` on the
/// `i`-th `Tap` fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSetup {
    /// The guest RAM layout, at most [`MAX_MEMORY_REGIONS`] non-overlapping regions.
    pub memory: Vec<MemoryRegion>,
    /// The NIC's MAC address (`networkN_mac`): unicast, not all zeroes.
    pub mac: [u8; 6],
    /// The MTU offered with `VIRTIO_NET_F_MTU`: [`MIN_NET_MTU`]..=65535.
    pub mtu: u16,
    /// Receive/transmit queue pairs, 1..=[`MAX_NET_QUEUE_PAIRS`]; more than one offers
    /// `VIRTIO_NET_F_MQ` with a control queue, and needs as many `Tap` fds.
    pub queue_pairs: u16,
}

impl NetSetup {
    /// Checks the bounds the device relies on.
    pub fn validate(&self) -> Result<(), DeviceMessageError> {
        validate_memory(&self.memory)?;
        // Bit 0 of the first octet is the group bit: a NIC's own address is unicast.
        if self.mac == [0; 6] || self.mac[0] & 1 != 0 {
            return Err(DeviceMessageError::Mac);
        }
        if self.mtu < MIN_NET_MTU {
            return Err(DeviceMessageError::Mtu(self.mtu));
        }
        if self.queue_pairs == 0 || self.queue_pairs > MAX_NET_QUEUE_PAIRS {
            return Err(DeviceMessageError::QueuePairs(self.queue_pairs));
        }
        Ok(())
    }
}

/// Checks a guest RAM layout: 1..=[`MAX_MEMORY_REGIONS`] non-empty, non-overlapping regions
/// whose guest and file ranges do not wrap.
fn validate_memory(memory: &[MemoryRegion]) -> Result<(), DeviceMessageError> {
    if memory.is_empty() || memory.len() > MAX_MEMORY_REGIONS {
        return Err(DeviceMessageError::Memory);
    }
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for r in memory {
        let end = r
            .guest_addr
            .checked_add(r.size)
            .ok_or(DeviceMessageError::Memory)?;
        r.file_offset
            .checked_add(r.size)
            .ok_or(DeviceMessageError::Memory)?;
        if r.size == 0 || spans.iter().any(|&(a, e)| r.guest_addr < e && a < end) {
            return Err(DeviceMessageError::Memory);
        }
        spans.push((r.guest_addr, end));
    }
    Ok(())
}

/// One enabled virtqueue, as the driver set it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// The queue's index within the device.
    pub index: u16,
    /// Entries, a power of two, at most the device's `max_queue_size`.
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail: u64,
    /// Guest-physical address of the used (device) ring.
    pub used: u64,
}

/// Runner → device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDevice {
    /// Start serving `queues` with `features`; two eventfds per queue (kick, call) are
    /// attached in the order of `queues`.
    Activate {
        features: u64,
        queues: Vec<QueueConfig>,
    },
    /// The driver reset the device: stop using the queues, drop their eventfds, forget the
    /// negotiated features. Answered with [`FromDevice::ResetDone`].
    Reset,
    /// The driver wrote `data` at `offset` of the device-specific configuration space.
    ConfigWrite { offset: u16, data: Vec<u8> },
    /// virtio-net only: the next `Activate` starts with `pairs` receive queue pairs enabled
    /// instead of 1. The runner sends it to a restarted dev-net right before the re-sent
    /// `Activate`, with the count the previous process last reported
    /// ([`FromDevice::QueuePairs`]) in the same driver session; a `Reset` forgets it. Sent
    /// before rather than after the `Activate`, so that a `VQ_PAIRS_SET` the driver queued
    /// while no process ran is applied after it, not overridden by it. No reply.
    ResumeQueuePairs { pairs: u16 },
}

/// What a device is, sent once after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The virtio device type (2 = block, 1 = network, ...).
    pub device_type: u16,
    /// Feature bits the device offers (`VIRTIO_F_VERSION_1` included).
    pub features: u64,
    /// Queues, 1..=[`MAX_QUEUES`].
    pub queues: u16,
    /// Largest queue the device accepts, a power of two ≤ [`MAX_QUEUE_SIZE`].
    pub max_queue_size: u16,
    /// The device-specific configuration space, at most [`MAX_CONFIG_BYTES`].
    pub config: Vec<u8>,
}

/// Device → runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDevice {
    Info(DeviceInfo),
    /// The queues of the last `Activate` are served.
    Activated,
    /// The last `Reset` is done.
    ResetDone,
    /// The configuration space changed to `config` (same length as in `Info`).
    ConfigChanged {
        config: Vec<u8>,
    },
    /// The device cannot go on (a broken ring, an unusable `Activate`): the runner sets
    /// `DEVICE_NEEDS_RESET` and raises the configuration interrupt.
    NeedsReset {
        reason: String,
    },
    /// [`FromDevice::Info`] for a device whose configuration space is addressed by selectors
    /// (virtio-input, §5.8.4): the driver writes `select` and `subsel`, then reads `size` and
    /// the payload `u`. A round trip to the device per selector write would race with the
    /// driver's read, so the device sends every answer once, here, and the runner serves the
    /// reads from `table` (an unknown selector reads as size 0). `info.config` is the
    /// [`INPUT_CONFIG_BYTES`]-byte space with zeroes where the runner fills in the answers.
    InfoWithTable {
        info: DeviceInfo,
        table: ConfigTable,
    },
    /// virtio-net only: the driver's `VQ_PAIRS_SET` (§5.1.6.5.5) took effect, frames are
    /// received on pairs `0..pairs` from now on. Sent before the command's ack is published,
    /// so a process that dies in between has reported what the driver may already see. The
    /// runner keeps the last count of the driver session for [`ToDevice::ResumeQueuePairs`].
    QueuePairs {
        pairs: u16,
    },
}

/// A device message or configuration outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceMessageError {
    #[error("queue count {0} is not within 1..={MAX_QUEUES}")]
    QueueCount(usize),
    #[error("queue size {0} is not a power of two within 1..={MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("queue index {0} repeated or beyond the device's queues")]
    QueueIndex(u16),
    #[error("configuration space of {0} bytes is larger than {MAX_CONFIG_BYTES}")]
    ConfigTooLarge(usize),
    #[error("configuration write at {offset}+{len} is outside the space")]
    ConfigRange { offset: u16, len: usize },
    #[error("reason text must be printable ASCII of at most {MAX_DEVICE_REASON_BYTES} bytes")]
    Reason,
    #[error("guest memory regions must be 1..={MAX_MEMORY_REGIONS}, non-empty, non-overlapping")]
    Memory,
    #[error("logical block size {0} is not a power of two in 512..=4096")]
    BlockSize(u32),
    #[error("serial must be printable ASCII of at most {MAX_BLK_SERIAL_BYTES} bytes")]
    Serial,
    #[error("MAC address must be unicast and not all zeroes")]
    Mac,
    #[error("MTU {0} is below {MIN_NET_MTU}")]
    Mtu(u16),
    #[error("{0} queue pairs requested; 1..={MAX_NET_QUEUE_PAIRS} are supported")]
    QueuePairs(u16),
    #[error(
        "a configuration table needs a virtio-input device with a {INPUT_CONFIG_BYTES}-byte space"
    )]
    TableLayout,
    #[error("configuration table of {0} entries is not 1..={MAX_TABLE_ENTRIES}")]
    TableSize(usize),
    #[error("configuration table entry {select:#x}/{subsel:#x} is not a virtio-input selector")]
    TableSelector { select: u8, subsel: u8 },
    #[error("configuration table entry {select:#x}/{subsel:#x} repeated")]
    TableDuplicate { select: u8, subsel: u8 },
    #[error(
        "configuration table entry {select:#x}/{subsel:#x} has {len} bytes, not 1..={MAX_TABLE_PAYLOAD}"
    )]
    TablePayload { select: u8, subsel: u8, len: usize },
    #[error("input devices must be 1..={MAX_INPUT_DEVICES}, each kind at most once")]
    InputDevices,
    #[error("{pairs} queue pairs are not within 1..={offered}, the pairs the device offers")]
    PairsBeyondOffer { pairs: u16, offered: u16 },
}

/// The virtio device type of a network device (§5.1.1).
pub const VIRTIO_ID_NET: u16 = 1;

/// The virtio device type of an input device (§5.8.1).
pub const VIRTIO_ID_INPUT: u16 = 18;
/// Bytes of `virtio_input_config` (§5.8.4): `select`, `subsel`, `size`, 5 reserved bytes and
/// the 128-byte payload `u`.
pub const INPUT_CONFIG_BYTES: usize = 136;
/// Largest payload of one selector (`u` of `virtio_input_config`).
pub const MAX_TABLE_PAYLOAD: usize = 128;
/// Most entries of a [`ConfigTable`]: names, ids, properties, one bitmap per event type
/// (at most 32) and one `ABS_INFO` per axis a tablet reports, with room to spare.
pub const MAX_TABLE_ENTRIES: usize = 64;
/// Most virtio-input devices one dev-fb serves (a keyboard and a tablet).
pub const MAX_INPUT_DEVICES: usize = 2;

/// virtio-input's `select` values (§5.8.4, `virtio_input_config_select`).
pub mod input_select {
    pub const UNSET: u8 = 0x00;
    pub const ID_NAME: u8 = 0x01;
    pub const ID_SERIAL: u8 = 0x02;
    pub const ID_DEVIDS: u8 = 0x03;
    pub const PROP_BITS: u8 = 0x10;
    pub const EV_BITS: u8 = 0x11;
    pub const ABS_INFO: u8 = 0x12;
}

/// Highest evdev event type (`EV_MAX`), the largest `subsel` of an `EV_BITS` entry.
const EV_MAX: u8 = 0x1f;
/// Highest absolute axis (`ABS_MAX`), the largest `subsel` of an `ABS_INFO` entry.
const ABS_AXIS_MAX: u8 = 0x3f;
/// `virtio_input_devids`: bustype, vendor, product, version (le16 each).
const DEVIDS_BYTES: usize = 8;
/// `virtio_input_absinfo`: min, max, fuzz, flat, res (le32 each).
const ABSINFO_BYTES: usize = 20;

/// One answer of a selector-addressed configuration space: what the driver reads in `u`
/// (and, as its length, in `size`) after writing `select` and `subsel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEntry {
    pub select: u8,
    pub subsel: u8,
    /// 1..=[`MAX_TABLE_PAYLOAD`] bytes.
    pub data: Vec<u8>,
}

/// Every answer of a selector-addressed configuration space ([`FromDevice::InfoWithTable`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigTable {
    /// 1..=[`MAX_TABLE_ENTRIES`] entries, no `(select, subsel)` twice.
    pub entries: Vec<ConfigEntry>,
}

impl ConfigTable {
    /// The payload for `select`/`subsel`, if the device has one.
    pub fn lookup(&self, select: u8, subsel: u8) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| e.select == select && e.subsel == subsel)
            .map(|e| e.data.as_slice())
    }

    /// [`ConfigTable::validate`], and that `info` is a device whose space the table can
    /// answer: virtio-input with an [`INPUT_CONFIG_BYTES`]-byte space.
    pub fn validate_for(&self, info: &DeviceInfo) -> Result<(), DeviceMessageError> {
        if info.device_type != VIRTIO_ID_INPUT || info.config.len() != INPUT_CONFIG_BYTES {
            return Err(DeviceMessageError::TableLayout);
        }
        self.validate()
    }

    /// Checks the bounds the runner relies on and the selectors against virtio-input's
    /// (§5.8.4): names, serial, ids and property bits with `subsel` 0; event bitmaps for
    /// event types up to `EV_MAX`; axis information for axes up to `ABS_MAX`, with the sizes
    /// of `virtio_input_devids` and `virtio_input_absinfo`.
    pub fn validate(&self) -> Result<(), DeviceMessageError> {
        use input_select::{ABS_INFO, EV_BITS, ID_DEVIDS, ID_NAME, ID_SERIAL, PROP_BITS};
        if self.entries.is_empty() || self.entries.len() > MAX_TABLE_ENTRIES {
            return Err(DeviceMessageError::TableSize(self.entries.len()));
        }
        for (n, e) in self.entries.iter().enumerate() {
            let (select, subsel, len) = (e.select, e.subsel, e.data.len());
            let selector_ok = match select {
                ID_NAME | ID_SERIAL | PROP_BITS => subsel == 0,
                ID_DEVIDS => subsel == 0 && len == DEVIDS_BYTES,
                EV_BITS => subsel <= EV_MAX,
                ABS_INFO => subsel <= ABS_AXIS_MAX && len == ABSINFO_BYTES,
                _ => false,
            };
            if !selector_ok {
                return Err(DeviceMessageError::TableSelector { select, subsel });
            }
            if len == 0 || len > MAX_TABLE_PAYLOAD {
                return Err(DeviceMessageError::TablePayload {
                    select,
                    subsel,
                    len,
                });
            }
            let earlier = self.entries.get(..n).unwrap_or_default();
            if earlier
                .iter()
                .any(|x| x.select == select && x.subsel == subsel)
            {
                return Err(DeviceMessageError::TableDuplicate { select, subsel });
            }
        }
        Ok(())
    }
}

/// What one of dev-fb's virtio-input devices is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputKind {
    /// Keys from VNC key events.
    Keyboard,
    /// An absolute pointer (`xhci_mouse="yes"`): VNC pointer events, buttons and wheel.
    Tablet,
}

/// dev-fb's virtio-input devices: one per [`FdRole::DeviceChannel`] it holds, in that order.
///
/// [`FdRole::DeviceChannel`]: crate::bootstrap::FdRole::DeviceChannel
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSetup {
    /// The guest RAM layout, at most [`MAX_MEMORY_REGIONS`] non-overlapping regions.
    pub memory: Vec<MemoryRegion>,
    /// 1..=[`MAX_INPUT_DEVICES`], each kind at most once.
    pub devices: Vec<InputKind>,
}

impl InputSetup {
    /// Checks the bounds dev-fb relies on.
    pub fn validate(&self) -> Result<(), DeviceMessageError> {
        validate_memory(&self.memory)?;
        let n = self.devices.len();
        let repeated = self
            .devices
            .iter()
            .enumerate()
            .any(|(i, k)| self.devices.get(..i).unwrap_or_default().contains(k));
        if n == 0 || n > MAX_INPUT_DEVICES || repeated {
            return Err(DeviceMessageError::InputDevices);
        }
        Ok(())
    }
}

fn check_queue_size(size: u16) -> Result<(), DeviceMessageError> {
    if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
        return Err(DeviceMessageError::QueueSize(size));
    }
    Ok(())
}

fn check_config(config: &[u8]) -> Result<(), DeviceMessageError> {
    if config.len() > MAX_CONFIG_BYTES {
        return Err(DeviceMessageError::ConfigTooLarge(config.len()));
    }
    Ok(())
}

impl DeviceInfo {
    /// Checks the bounds the runner relies on.
    pub fn validate(&self) -> Result<(), DeviceMessageError> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(DeviceMessageError::QueueCount(usize::from(self.queues)));
        }
        check_queue_size(self.max_queue_size)?;
        check_config(&self.config)
    }

    /// The receive/transmit queue pairs a virtio-net device offers, from its queue count
    /// (§5.1.2: `2n + 1` queues for `n` pairs with a control queue; `rx0, tx0` or
    /// `rx0, tx0, ctrl` for one); 0 for any other kind of device.
    pub fn net_queue_pairs(&self) -> u16 {
        if self.device_type != VIRTIO_ID_NET {
            return 0;
        }
        (self.queues.saturating_sub(1) / 2).max(1)
    }

    /// Checks a queue-pair count against the pairs this device offers.
    pub fn check_queue_pairs(&self, pairs: u16) -> Result<(), DeviceMessageError> {
        let offered = self.net_queue_pairs();
        if pairs == 0 || pairs > offered {
            return Err(DeviceMessageError::PairsBeyondOffer { pairs, offered });
        }
        Ok(())
    }
}

impl ToDevice {
    /// Checks an `Activate` against the device's own `info` (the device calls this before
    /// touching guest memory), a `ConfigWrite` against its configuration space, a
    /// `ResumeQueuePairs` against the queue pairs it offers.
    pub fn validate(&self, info: &DeviceInfo) -> Result<(), DeviceMessageError> {
        match self {
            ToDevice::Activate { queues, .. } => {
                if queues.is_empty() || queues.len() > usize::from(info.queues) {
                    return Err(DeviceMessageError::QueueCount(queues.len()));
                }
                let mut seen = 0u32;
                for q in queues {
                    let bit = 1u32.checked_shl(u32::from(q.index)).unwrap_or(0);
                    if q.index >= info.queues || seen & bit != 0 {
                        return Err(DeviceMessageError::QueueIndex(q.index));
                    }
                    seen |= bit;
                    check_queue_size(q.size)?;
                    if q.size > info.max_queue_size {
                        return Err(DeviceMessageError::QueueSize(q.size));
                    }
                }
                Ok(())
            }
            ToDevice::Reset => Ok(()),
            ToDevice::ResumeQueuePairs { pairs } => info.check_queue_pairs(*pairs),
            ToDevice::ConfigWrite { offset, data } => {
                let end = usize::from(*offset).checked_add(data.len());
                if data.is_empty() || end.is_none_or(|e| e > info.config.len()) {
                    return Err(DeviceMessageError::ConfigRange {
                        offset: *offset,
                        len: data.len(),
                    });
                }
                Ok(())
            }
        }
    }

    /// Eventfds that must arrive with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            ToDevice::Activate { queues, .. } => queues.len().saturating_mul(2),
            _ => 0,
        }
    }
}

impl FromDevice {
    /// A [`FromDevice::NeedsReset`] with `reason` made to fit.
    pub fn needs_reset(reason: &str) -> Self {
        let cleaned: String = reason
            .chars()
            .map(|c| if (' '..='~').contains(&c) { c } else { ' ' })
            .collect();
        FromDevice::NeedsReset {
            reason: clip(&cleaned, MAX_DEVICE_REASON_BYTES),
        }
    }

    /// Checks the message's bounds; the runner calls this on everything it receives.
    pub fn validate(&self) -> Result<(), DeviceMessageError> {
        match self {
            FromDevice::Info(info) => info.validate(),
            FromDevice::Activated | FromDevice::ResetDone => Ok(()),
            FromDevice::ConfigChanged { config } => check_config(config),
            FromDevice::NeedsReset { reason } => {
                if reason.len() > MAX_DEVICE_REASON_BYTES || !is_printable_ascii(reason) {
                    return Err(DeviceMessageError::Reason);
                }
                Ok(())
            }
            FromDevice::InfoWithTable { info, table } => {
                info.validate()?;
                table.validate_for(info)
            }
            // The receiver checks it against the device's own offer too
            // (`DeviceInfo::check_queue_pairs`).
            FromDevice::QueuePairs { pairs } => {
                if *pairs == 0 || *pairs > MAX_NET_QUEUE_PAIRS {
                    return Err(DeviceMessageError::QueuePairs(*pairs));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo {
            device_type: 2,
            features: 1 << 32,
            queues: 2,
            max_queue_size: 256,
            config: vec![0; 60],
        }
    }

    fn queue(index: u16, size: u16) -> QueueConfig {
        QueueConfig {
            index,
            size,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
        }
    }

    #[test]
    fn a_sensible_device_and_activation_are_valid() {
        assert_eq!(info().validate(), Ok(()));
        let a = ToDevice::Activate {
            features: 1 << 32,
            queues: vec![queue(0, 256), queue(1, 128)],
        };
        assert_eq!(a.validate(&info()), Ok(()));
        assert_eq!(a.fd_count(), 4);
    }

    #[test]
    fn activations_outside_the_devices_offer_are_refused() {
        let act = |queues| ToDevice::Activate {
            features: 0,
            queues,
        };
        assert_eq!(
            act(vec![queue(0, 100)]).validate(&info()),
            Err(DeviceMessageError::QueueSize(100))
        );
        assert_eq!(
            act(vec![queue(0, 512)]).validate(&info()),
            Err(DeviceMessageError::QueueSize(512))
        );
        assert_eq!(
            act(vec![queue(0, 0)]).validate(&info()),
            Err(DeviceMessageError::QueueSize(0))
        );
        assert_eq!(
            act(vec![queue(2, 64)]).validate(&info()),
            Err(DeviceMessageError::QueueIndex(2))
        );
        assert_eq!(
            act(vec![queue(1, 64), queue(1, 64)]).validate(&info()),
            Err(DeviceMessageError::QueueIndex(1))
        );
        assert_eq!(
            act(vec![]).validate(&info()),
            Err(DeviceMessageError::QueueCount(0))
        );
        assert!(
            act(vec![queue(0, 8), queue(1, 8), queue(0, 8)])
                .validate(&info())
                .is_err()
        );
    }

    #[test]
    fn config_writes_must_stay_inside_the_space() {
        let w = |offset, len| ToDevice::ConfigWrite {
            offset,
            data: vec![1; len],
        };
        assert_eq!(w(56, 4).validate(&info()), Ok(()));
        assert!(w(57, 4).validate(&info()).is_err());
        assert!(w(0, 0).validate(&info()).is_err());
        assert!(w(u16::MAX, 2).validate(&info()).is_err());
    }

    #[test]
    fn small_memory_is_one_region_and_large_memory_skips_the_hole() {
        assert_eq!(
            guest_ram_layout(256 << 20),
            vec![MemoryRegion {
                guest_addr: 0,
                size: 256 << 20,
                file_offset: 0
            }]
        );
        assert_eq!(
            guest_ram_layout(5 << 30),
            vec![
                MemoryRegion {
                    guest_addr: 0,
                    size: 3 << 30,
                    file_offset: 0
                },
                MemoryRegion {
                    guest_addr: 4 << 30,
                    size: 2 << 30,
                    file_offset: 3 << 30
                }
            ]
        );
    }

    #[test]
    fn block_setups_are_bounded() {
        let region = |guest_addr, size| MemoryRegion {
            guest_addr,
            size,
            file_offset: 0,
        };
        let ok = BlockSetup {
            memory: vec![region(0, 1 << 30), region(1 << 32, 1 << 30)],
            read_only: false,
            logical_block_size: 512,
            serial: "capvm-0123".into(),
            queues: 2,
        };
        assert_eq!(ok.validate(), Ok(()));
        let mut b = ok.clone();
        b.memory = vec![region(0, 1 << 30), region(1 << 29, 1 << 20)];
        assert_eq!(b.validate(), Err(DeviceMessageError::Memory));
        b.memory = vec![region(u64::MAX, 2)];
        assert_eq!(b.validate(), Err(DeviceMessageError::Memory));
        let mut b = ok.clone();
        b.logical_block_size = 1000;
        assert!(b.validate().is_err());
        let mut b = ok.clone();
        b.serial = "x".repeat(21);
        assert_eq!(b.validate(), Err(DeviceMessageError::Serial));
        let mut b = ok;
        b.queues = 0;
        assert!(b.validate().is_err());
    }

    #[test]
    fn net_setups_are_bounded() {
        let ok = NetSetup {
            memory: vec![MemoryRegion {
                guest_addr: 0,
                size: 1 << 30,
                file_offset: 0,
            }],
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 1500,
            queue_pairs: 1,
        };
        assert_eq!(ok.validate(), Ok(()));
        let mut n = ok.clone();
        n.mac = [0; 6];
        assert_eq!(n.validate(), Err(DeviceMessageError::Mac));
        n.mac = [0x01, 0, 0x5e, 0, 0, 1];
        assert_eq!(n.validate(), Err(DeviceMessageError::Mac));
        let mut n = ok.clone();
        n.mtu = 67;
        assert_eq!(n.validate(), Err(DeviceMessageError::Mtu(67)));
        n.mtu = u16::MAX;
        assert_eq!(n.validate(), Ok(()));
        let mut n = ok.clone();
        n.queue_pairs = MAX_NET_QUEUE_PAIRS;
        assert_eq!(n.validate(), Ok(()));
        assert!(net_queue_count(n.queue_pairs) <= MAX_QUEUES);
        n.queue_pairs = MAX_NET_QUEUE_PAIRS + 1;
        assert_eq!(
            n.validate(),
            Err(DeviceMessageError::QueuePairs(MAX_NET_QUEUE_PAIRS + 1))
        );
        n.queue_pairs = 0;
        assert!(n.validate().is_err());
        assert_eq!((net_queue_count(1), net_queue_count(2)), (2, 5));
        let mut n = ok;
        n.memory = vec![];
        assert_eq!(n.validate(), Err(DeviceMessageError::Memory));
    }

    #[test]
    fn device_messages_are_bounded() {
        let mut i = info();
        i.queues = MAX_QUEUES + 1;
        assert!(FromDevice::Info(i).validate().is_err());
        let mut i = info();
        i.config = vec![0; MAX_CONFIG_BYTES + 1];
        assert!(FromDevice::Info(i).validate().is_err());
        let m = FromDevice::needs_reset(&"\u{1b}bad ring ".repeat(100));
        assert_eq!(m.validate(), Ok(()));
        let bad = FromDevice::NeedsReset {
            reason: "\n".into(),
        };
        assert_eq!(bad.validate(), Err(DeviceMessageError::Reason));
    }

    fn net_info(queues: u16) -> DeviceInfo {
        DeviceInfo {
            device_type: VIRTIO_ID_NET,
            features: 1 << 32,
            queues,
            max_queue_size: 256,
            config: vec![0; 12],
        }
    }

    #[test]
    fn the_pairs_a_net_device_offers_follow_from_its_queue_count() {
        assert_eq!(net_info(2).net_queue_pairs(), 1, "rx0 tx0");
        assert_eq!(net_info(3).net_queue_pairs(), 1, "rx0 tx0 ctrl");
        assert_eq!(net_info(5).net_queue_pairs(), 2);
        assert_eq!(net_info(15).net_queue_pairs(), MAX_NET_QUEUE_PAIRS);
        assert_eq!(info().net_queue_pairs(), 0, "a block device has none");
    }

    #[test]
    fn resuming_queue_pairs_must_stay_within_the_devices_offer() {
        let resume = |pairs| ToDevice::ResumeQueuePairs { pairs };
        let four = net_info(9);
        assert_eq!(resume(1).validate(&four), Ok(()));
        assert_eq!(resume(4).validate(&four), Ok(()));
        assert_eq!(resume(4).fd_count(), 0);
        assert_eq!(
            resume(5).validate(&four),
            Err(DeviceMessageError::PairsBeyondOffer {
                pairs: 5,
                offered: 4
            })
        );
        assert!(resume(0).validate(&four).is_err());
        assert!(resume(u16::MAX).validate(&four).is_err());
        assert!(resume(2).validate(&net_info(2)).is_err(), "one pair only");
        assert_eq!(
            resume(1).validate(&info()),
            Err(DeviceMessageError::PairsBeyondOffer {
                pairs: 1,
                offered: 0
            }),
            "not for a block device"
        );
    }

    #[test]
    fn reported_queue_pairs_are_bounded_and_round_trip_through_a_channel() {
        use crate::Channel;
        let report = |pairs| FromDevice::QueuePairs { pairs };
        assert_eq!(report(1).validate(), Ok(()));
        assert_eq!(report(MAX_NET_QUEUE_PAIRS).validate(), Ok(()));
        assert_eq!(report(0).validate(), Err(DeviceMessageError::QueuePairs(0)));
        assert!(report(MAX_NET_QUEUE_PAIRS + 1).validate().is_err());
        let (a, b) = Channel::pair().unwrap();
        a.send(&report(3), &[]).unwrap();
        assert_eq!(b.recv::<FromDevice>().unwrap().msg, report(3));
        b.send(&ToDevice::ResumeQueuePairs { pairs: 3 }, &[])
            .unwrap();
        assert_eq!(
            a.recv::<ToDevice>().unwrap().msg,
            ToDevice::ResumeQueuePairs { pairs: 3 }
        );
    }

    fn entry(select: u8, subsel: u8, len: usize) -> ConfigEntry {
        ConfigEntry {
            select,
            subsel,
            data: vec![1; len],
        }
    }

    fn input_info() -> DeviceInfo {
        DeviceInfo {
            device_type: VIRTIO_ID_INPUT,
            features: 1 << 32,
            queues: 2,
            max_queue_size: 64,
            config: vec![0; INPUT_CONFIG_BYTES],
        }
    }

    #[test]
    fn a_keyboard_table_is_valid_and_found_by_selector() {
        use input_select::{EV_BITS, ID_DEVIDS, ID_NAME};
        let table = ConfigTable {
            entries: vec![
                entry(ID_NAME, 0, 14),
                entry(ID_DEVIDS, 0, 8),
                entry(EV_BITS, 1, 96),
                entry(EV_BITS, 0x14, 1),
            ],
        };
        let msg = FromDevice::InfoWithTable {
            info: input_info(),
            table: table.clone(),
        };
        assert_eq!(msg.validate(), Ok(()));
        assert_eq!(table.lookup(EV_BITS, 1).map(<[u8]>::len), Some(96));
        assert_eq!(table.lookup(EV_BITS, 2), None);
        assert_eq!(table.lookup(input_select::UNSET, 0), None);
    }

    #[test]
    fn tables_with_bad_selectors_sizes_or_repeats_are_refused() {
        use input_select::{ABS_INFO, EV_BITS, ID_DEVIDS, ID_NAME, PROP_BITS, UNSET};
        let check = |entries| ConfigTable { entries }.validate();
        assert_eq!(check(vec![]), Err(DeviceMessageError::TableSize(0)));
        assert!(matches!(
            check(vec![entry(ID_NAME, 0, 1); MAX_TABLE_ENTRIES + 1]),
            Err(DeviceMessageError::TableSize(_))
        ));
        for (select, subsel, len) in [
            (UNSET, 0, 4),
            (0x04, 0, 4),
            (0xff, 0, 4),
            (ID_NAME, 1, 4),
            (PROP_BITS, 3, 1),
            (EV_BITS, 0x20, 1),
            (ABS_INFO, 0x40, 20),
            (ABS_INFO, 0, 19),
            (ID_DEVIDS, 0, 4),
        ] {
            assert_eq!(
                check(vec![entry(select, subsel, len)]),
                Err(DeviceMessageError::TableSelector { select, subsel }),
                "{select:#x}/{subsel:#x}/{len}"
            );
        }
        assert!(matches!(
            check(vec![entry(ID_NAME, 0, 129)]),
            Err(DeviceMessageError::TablePayload { len: 129, .. })
        ));
        assert!(matches!(
            check(vec![entry(EV_BITS, 1, 0)]),
            Err(DeviceMessageError::TablePayload { len: 0, .. })
        ));
        assert_eq!(
            check(vec![entry(EV_BITS, 1, 8), entry(EV_BITS, 1, 8)]),
            Err(DeviceMessageError::TableDuplicate {
                select: EV_BITS,
                subsel: 1
            })
        );
    }

    #[test]
    fn a_table_for_anything_but_a_virtio_input_space_is_refused() {
        let table = ConfigTable {
            entries: vec![entry(input_select::ID_NAME, 0, 4)],
        };
        let mut info = input_info();
        info.device_type = 2;
        let msg = FromDevice::InfoWithTable {
            info,
            table: table.clone(),
        };
        assert_eq!(msg.validate(), Err(DeviceMessageError::TableLayout));
        let mut info = input_info();
        info.config = vec![0; 60];
        let msg = FromDevice::InfoWithTable { info, table };
        assert_eq!(msg.validate(), Err(DeviceMessageError::TableLayout));
    }

    #[test]
    fn input_setups_need_one_or_two_distinct_devices() {
        let memory = vec![MemoryRegion {
            guest_addr: 0,
            size: 1 << 30,
            file_offset: 0,
        }];
        let setup = |devices| InputSetup {
            memory: memory.clone(),
            devices,
        };
        assert_eq!(
            setup(vec![InputKind::Keyboard, InputKind::Tablet]).validate(),
            Ok(())
        );
        assert_eq!(setup(vec![InputKind::Tablet]).validate(), Ok(()));
        for bad in [
            vec![],
            vec![InputKind::Keyboard, InputKind::Keyboard],
            vec![InputKind::Keyboard, InputKind::Tablet, InputKind::Keyboard],
        ] {
            assert_eq!(setup(bad).validate(), Err(DeviceMessageError::InputDevices));
        }
        let mut s = setup(vec![InputKind::Keyboard]);
        s.memory = vec![];
        assert_eq!(s.validate(), Err(DeviceMessageError::Memory));
    }

    #[test]
    fn a_table_message_round_trips_through_a_channel() {
        use crate::Channel;
        let (a, b) = Channel::pair().unwrap();
        let msg = FromDevice::InfoWithTable {
            info: input_info(),
            table: ConfigTable {
                entries: vec![entry(input_select::ID_SERIAL, 0, 128)],
            },
        };
        a.send(&msg, &[]).unwrap();
        let got: FromDevice = b.recv().unwrap().msg;
        assert_eq!(got, msg);
    }
}
