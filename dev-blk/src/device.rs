//! The device's control side: map guest RAM, open the disk, tell the runner what the device is
//! ([`FromDevice::Info`]) and serve its `Activate` / `Reset` / `ConfigWrite` messages.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use proto::bootstrap::FdRole;
use proto::channel::{Channel, ChannelError, ChannelKind};
use proto::device::{BlockSetup, DeviceInfo, FromDevice, QueueConfig, ToDevice};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::config::{DEVICE_TYPE_BLOCK, DiskGeometry, MAX_QUEUE_SIZE, bit};
use crate::disk::{Disk, DiskError, FileDisk};
use crate::inflight::{InflightError, QueueLog, Region};
use crate::queue_loop::{self, QueueHandle, Rings, Shared};
use crate::request::Context;
use crate::uring::{self, LoopHandle, Served};

/// Why the device could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the supervisor did not pass a {0:?} descriptor")]
    MissingFd(FdRole),
    #[error("invalid block setup")]
    Setup(#[from] proto::device::DeviceMessageError),
    #[error("mapping guest memory failed")]
    Memory(#[from] child::guest_ram::GuestRamError),
    #[error("opening the disk failed")]
    Disk(#[from] DiskError),
    #[error("the runner channel failed")]
    Channel(#[from] ChannelError),
    #[error("waiting on the channels failed")]
    Poll(#[source] nix::errno::Errno),
    #[error("the in-flight region cannot be used")]
    Inflight(#[from] InflightError),
}

/// The descriptors the device process holds.
pub struct DeviceFds {
    pub memory: OwnedFd,
    pub disk: OwnedFd,
    pub runner: Channel,
    /// The supervisor's in-flight region; without it a restart replays nothing.
    pub inflight: Option<OwnedFd>,
    /// Restricted rings made before capability mode ([`uring::make_rings`]); without any the
    /// device serves with the worker pool.
    pub rings: Vec<io_uring::IoUring>,
}

impl std::fmt::Debug for DeviceFds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceFds")
            .field("memory", &self.memory)
            .field("disk", &self.disk)
            .field("inflight", &self.inflight)
            .field("rings", &self.rings.len())
            .finish_non_exhaustive()
    }
}

/// A configured device, serving its runner channel.
pub struct Device {
    info: DeviceInfo,
    geometry: DiskGeometry,
    serial: Vec<u8>,
    mem: Arc<GuestMemoryMmap>,
    disk: Arc<FileDisk>,
    runner: Arc<Channel>,
    inflight: Arc<Region>,
    /// Idle rings; a running serving thread holds its own.
    rings: Vec<io_uring::IoUring>,
    queues: Vec<QueueHandle>,
    loops: Vec<LoopHandle>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("geometry", &self.geometry)
            .field("queues", &self.queues.len())
            .field("rings", &(self.rings.len() + self.loops.len()))
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Maps memory and opens the disk described by `setup`.
    pub fn new(setup: &BlockSetup, fds: DeviceFds) -> Result<Device, DeviceError> {
        setup.validate()?;
        let mem = child::guest_ram::map_guest_ram(&fds.memory, &setup.memory)?;
        let disk = FileDisk::new(File::from(fds.disk))?;
        let inflight = match fds.inflight {
            Some(fd) => Region::map(fd)?,
            None => Region::private()?,
        };
        let geometry = DiskGeometry {
            capacity_bytes: disk.size(),
            logical_block_size: setup.logical_block_size,
            read_only: setup.read_only,
            queues: setup.queues,
        };
        let info = DeviceInfo {
            device_type: DEVICE_TYPE_BLOCK,
            features: geometry.features(),
            queues: setup.queues,
            max_queue_size: MAX_QUEUE_SIZE,
            config: geometry.config_space(),
        };
        Ok(Device {
            info,
            geometry,
            serial: setup.serial.as_bytes().to_vec(),
            mem: Arc::new(mem),
            disk: Arc::new(disk),
            runner: Arc::new(fds.runner),
            inflight: Arc::new(inflight),
            rings: fds.rings,
            queues: Vec::new(),
            loops: Vec::new(),
        })
    }

    /// Handshakes with the runner, sends `Info`, then serves the runner until it or the
    /// supervisor (`bootstrap`) hangs up.
    pub fn serve(mut self, bootstrap: &Channel) -> Result<(), DeviceError> {
        self.runner.handshake(ChannelKind::RunnerDevice)?;
        self.runner
            .send(&FromDevice::Info(self.info.clone()), &[])?;
        tracing::info!(
            sectors = self.geometry.sectors(),
            read_only = self.geometry.read_only,
            queues = self.geometry.queues,
            engine = if self.rings.is_empty() {
                "worker pool"
            } else {
                "io_uring"
            },
            rings = self.rings.len(),
            "virtio-blk device ready"
        );
        loop {
            let (from_runner, from_supervisor) = {
                let mut fds = [
                    PollFd::new(self.runner.as_fd(), PollFlags::POLLIN),
                    PollFd::new(bootstrap.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(DeviceError::Poll(e)),
                }
                let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if from_supervisor && supervisor_hung_up(bootstrap) {
                tracing::info!("supervisor closed the channel; exiting");
                return Ok(());
            }
            if from_runner {
                match self.runner.recv::<ToDevice>() {
                    Ok(received) => self.handle(received.msg, received.fds)?,
                    Err(ChannelError::Closed) => {
                        tracing::info!("runner closed the device channel; exiting");
                        return Ok(());
                    }
                    Err(e @ (ChannelError::Send(_) | ChannelError::Recv(_))) => {
                        return Err(e.into());
                    }
                    Err(e) => tracing::warn!(error = %e, "dropping a malformed runner message"),
                }
            }
        }
    }

    fn handle(&mut self, msg: ToDevice, fds: Vec<OwnedFd>) -> Result<(), DeviceError> {
        if let Err(e) = msg.validate(&self.info) {
            tracing::warn!(error = %e, "refusing a runner message");
            return Ok(self
                .runner
                .send(&FromDevice::needs_reset(&e.to_string()), &[])?);
        }
        match msg {
            ToDevice::Activate { features, queues } => {
                self.stop_queues();
                let reply = match self.activate(features, &queues, fds) {
                    Ok(()) => {
                        tracing::info!(
                            queues = queues.len(),
                            features = format_args!("{features:#x}"),
                            "activated"
                        );
                        FromDevice::Activated
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "activation refused");
                        self.stop_queues();
                        FromDevice::needs_reset(&reason)
                    }
                };
                self.runner.send(&reply, &[])?;
            }
            ToDevice::Reset => {
                self.stop_queues();
                self.inflight.deactivate_all();
                tracing::info!("reset");
                self.runner.send(&FromDevice::ResetDone, &[])?;
            }
            ToDevice::ConfigWrite { offset, .. } => {
                // Without VIRTIO_BLK_F_CONFIG_WCE no field is writable (§5.2.4).
                tracing::debug!(offset, "ignoring a configuration write");
            }
            // virtio-net's; `validate` refuses it for any other device.
            ToDevice::ResumeQueuePairs { .. } => {}
        }
        Ok(())
    }

    /// Starts the queues of an `Activate`; an error is the `NeedsReset` reason.
    fn activate(
        &mut self,
        features: u64,
        configs: &[QueueConfig],
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        if features & !self.info.features != 0 {
            return Err(format!(
                "features {features:#x} exceed the offer {:#x}",
                self.info.features
            ));
        }
        if fds.len() != configs.len().saturating_mul(2) {
            return Err(format!(
                "{} eventfds for {} queues",
                fds.len(),
                configs.len()
            ));
        }
        let ctx = Arc::new(Context {
            read_only: self.geometry.read_only,
            serial: self.serial.clone(),
            discard: features & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: features & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        });
        let runner = Arc::clone(&self.runner);
        let on_broken: Arc<queue_loop::BrokenHook> = Arc::new(move |index, e| {
            let reason = format!("queue {index}: {}", error_chain(e));
            tracing::warn!(%reason, "device needs reset");
            let _ = runner.send(&FromDevice::needs_reset(&reason), &[]);
        });
        let event_idx = features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut fds = fds.into_iter();
        let mut served = Vec::with_capacity(configs.len());
        for c in configs {
            let mut queue = build_queue(c, event_idx, &self.mem)?;
            let (Some(kick), Some(call)) = (fds.next(), fds.next()) else {
                return Err("missing eventfds".into());
            };
            let log = QueueLog::new(Arc::clone(&self.inflight), c.index);
            let replay = if let Some(resume) = log.resume(c, queue.next_used()) {
                // A predecessor served these rings: new chains start where it stopped taking
                // them, and what it left in flight runs first.
                queue.set_next_avail(resume.last_avail);
                let heads: Vec<u16> = resume.inflight.iter().map(|&(_, h)| h).collect();
                tracing::info!(
                    queue = c.index,
                    last_avail = resume.last_avail,
                    used = queue.next_used(),
                    replayed = heads.len(),
                    inflight = ?resume.inflight,
                    "resuming the queue after a restart"
                );
                queue_loop::replay_requests(&self.mem, c.size, c.desc, &heads)
                    .map_err(|e| error_chain(&e))?
            } else {
                log.begin(c, queue.next_avail());
                Vec::new()
            };
            served.push(Served {
                index: c.index,
                queue,
                rings: Rings {
                    kick,
                    call,
                    log,
                    replay,
                },
            });
        }
        if self.rings.is_empty() {
            let shared = Shared {
                mem: Arc::clone(&self.mem),
                disk: Arc::clone(&self.disk) as Arc<dyn Disk>,
                ctx,
                workers: queue_loop::workers_per_queue(),
                on_broken,
            };
            for s in served {
                let handle = queue_loop::start(s.index, s.queue, s.rings, shared.clone())
                    .map_err(|e| error_chain(&e))?;
                self.queues.push(handle);
            }
            return Ok(());
        }
        // Queues share the rings round-robin: queue i is served by ring i % rings.
        let threads = self.rings.len().min(served.len());
        let mut groups: Vec<Vec<Served>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, s) in served.into_iter().enumerate() {
            if let Some(g) = groups.get_mut(i % threads.max(1)) {
                g.push(s);
            }
        }
        let shared = uring::Shared {
            mem: Arc::clone(&self.mem),
            disk: Arc::clone(&self.disk),
            ctx,
            on_broken,
        };
        for group in groups {
            let Some(ring) = self.rings.pop() else {
                return Err("no ring left".into());
            };
            let handle = uring::start(ring, group, shared.clone()).map_err(|e| error_chain(&e))?;
            self.loops.push(handle);
        }
        Ok(())
    }

    fn stop_queues(&mut self) {
        for q in self.queues.drain(..) {
            q.stop();
        }
        for l in self.loops.drain(..) {
            if let Some(ring) = l.stop() {
                self.rings.push(ring);
            } else {
                tracing::warn!("a ring failed; serving with fewer");
            }
        }
    }
}

/// A `Queue` for `c` of at most [`MAX_QUEUE_SIZE`] entries ([`child::guest_ram::build_queue`]).
pub fn build_queue(
    c: &QueueConfig,
    event_idx: bool,
    mem: &GuestMemoryMmap,
) -> Result<Queue, String> {
    child::guest_ram::build_queue(c, MAX_QUEUE_SIZE, event_idx, mem)
}

use child::supervisor_hung_up;

pub(crate) use child::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    fn config(size: u16, desc: u64) -> QueueConfig {
        QueueConfig {
            index: 0,
            size,
            desc,
            avail: 0x2000,
            used: 0x3000,
        }
    }

    #[test]
    fn queues_of_bad_size_or_outside_memory_are_refused() {
        let mem = mem();
        assert!(build_queue(&config(64, 0x1000), true, &mem).is_ok());
        for size in [0, 3, 100, MAX_QUEUE_SIZE * 2] {
            assert!(
                build_queue(&config(size, 0x1000), false, &mem).is_err(),
                "size {size}"
            );
        }
        assert!(
            build_queue(&config(64, 0x1001), false, &mem).is_err(),
            "misaligned table"
        );
        assert!(
            build_queue(&config(64, 0x20_0000), false, &mem).is_err(),
            "table outside RAM"
        );
    }

    #[test]
    fn a_queue_resumes_from_the_used_index_in_guest_memory() {
        use vm_memory::Bytes;
        let mem = mem();
        let fresh = build_queue(&config(64, 0x1000), true, &mem).expect("fresh queue");
        assert_eq!((fresh.next_avail(), fresh.next_used()), (0, 0));
        mem.write_obj(1234u16, GuestAddress(0x3002))
            .expect("used idx");
        let resumed = build_queue(&config(64, 0x1000), true, &mem).expect("resumed queue");
        assert_eq!((resumed.next_avail(), resumed.next_used()), (1234, 1234));
    }

    #[test]
    fn the_seccomp_policy_parses() {
        assert!(sandbox::Policy::parse(crate::SECCOMP_POLICY).is_ok());
    }
}
