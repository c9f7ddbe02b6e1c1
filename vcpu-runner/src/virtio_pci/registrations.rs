//! Keeping KVM in step with the transport: the ioeventfds of the queues' notify addresses,
//! the MSI routes of the vectors in use and the irqfds of the interrupt sources. Each sync
//! computes what should be registered from the current state and applies the difference, so
//! every change (activation, reset, a moved BAR, a rewritten or (un)masked MSI-X entry, a new
//! vector) goes through the same two functions.

use vmm_sys_util::eventfd::EventFd;

use super::common::NO_VECTOR;
use super::{MsiMessage, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, Source, VirtioPci};

/// What is registered with the host now.
#[derive(Debug, Default)]
pub(super) struct Registered {
    /// (queue index, address) of each ioeventfd.
    pub ioeventfds: Vec<(u16, u64)>,
    /// (source, GSI) of each irqfd.
    pub irqfds: Vec<(Source, u32)>,
    /// The last route set for each vector's GSI.
    pub routes: Vec<Option<MsiMessage>>,
}

/// Whether `fd` holds a count, leaving the count in place.
pub(super) fn peek(fd: &EventFd) -> bool {
    match fd.read() {
        Ok(count) => {
            // Put it back: the irqfd registered at unmask delivers it.
            let _ = fd.write(count);
            true
        }
        Err(_) => false,
    }
}

impl VirtioPci {
    /// Makes the registered ioeventfds match what should be: each live queue's kick at its
    /// notify address in the decoded BAR.
    pub(super) fn sync_ioeventfds(&mut self) {
        let desired: Vec<(u16, u64)> = match (self.bar(), self.live()) {
            (Some(bar), Some(active)) => active
                .queues
                .iter()
                .filter_map(|q| {
                    let slot = u64::from(q.config.index) * u64::from(NOTIFY_MULTIPLIER);
                    Some((q.config.index, bar.checked_add(NOTIFY_OFFSET + slot)?))
                })
                .collect(),
            _ => Vec::new(),
        };
        let current = std::mem::take(&mut self.registered.ioeventfds);
        let mut kept = Vec::new();
        for (index, addr) in current {
            if desired.contains(&(index, addr)) {
                kept.push((index, addr));
            } else if let Some(q) = self.queue(index)
                && let Err(e) = self.host.unregister_ioeventfd(addr, &q.kick)
            {
                tracing::warn!(index, addr, error = %e, "virtio-pci: removing an ioeventfd failed");
            }
        }
        for (index, addr) in desired {
            if kept.contains(&(index, addr)) {
                continue;
            }
            let Some(q) = self.queue(index) else { continue };
            match self.host.register_ioeventfd(addr, &q.kick) {
                Ok(()) => kept.push((index, addr)),
                // Notify writes then exit to the runner, which forwards them to the kick.
                Err(e) => {
                    tracing::warn!(index, addr, error = %e, "virtio-pci: ioeventfd not registered");
                }
            }
        }
        self.registered.ioeventfds = kept;
    }

    /// The vector `source` is bound to, if it is one of the table's.
    pub(super) fn vector_of(&self, source: Source) -> Option<u16> {
        let vector = match source {
            Source::Config => self.common.config_msix_vector(),
            Source::Queue(index) => self.common.queues().get(usize::from(index))?.msix_vector,
        };
        (vector != NO_VECTOR && usize::from(vector) < self.gsis.len()).then_some(vector)
    }

    /// Every source that may fire now, with its vector.
    pub(super) fn bound_sources(&self) -> Vec<(Source, u16)> {
        let queues = self.live().map_or_else(Vec::new, |a| {
            a.queues
                .iter()
                .map(|q| Source::Queue(q.config.index))
                .collect()
        });
        std::iter::once(Source::Config)
            .chain(queues)
            .filter_map(|s| Some((s, self.vector_of(s)?)))
            .collect()
    }

    /// Makes routes and irqfds match what should be: each bound source whose vector is
    /// unmasked raises that vector's GSI, routed to the vector's current message. A masked
    /// vector's sources keep their counts in their eventfds (the PBA shows them); KVM
    /// delivers a count found when the irqfd is registered again at unmask.
    pub(super) fn sync_irqfds(&mut self) {
        let desired: Vec<(Source, u16)> = self
            .bound_sources()
            .into_iter()
            .filter(|&(_, v)| !self.msix.masked(v))
            .collect();
        for &(_, vector) in &desired {
            let (Some(message), Some(&gsi)) = (
                self.msix.message(vector),
                self.gsis.get(usize::from(vector)),
            ) else {
                continue;
            };
            let slot = self
                .registered
                .routes
                .get(usize::from(vector))
                .copied()
                .flatten();
            if slot != Some(message) {
                match self.host.set_msi_route(gsi, message) {
                    Ok(()) => {
                        if let Some(r) = self.registered.routes.get_mut(usize::from(vector)) {
                            *r = Some(message);
                        }
                    }
                    Err(e) => tracing::warn!(gsi, error = %e, "virtio-pci: MSI route not set"),
                }
            }
        }
        let wanted: Vec<(Source, u32)> = desired
            .iter()
            .filter_map(|&(s, v)| Some((s, *self.gsis.get(usize::from(v))?)))
            .collect();
        let current = std::mem::take(&mut self.registered.irqfds);
        let mut kept = Vec::new();
        for (source, gsi) in current {
            if wanted.contains(&(source, gsi)) {
                kept.push((source, gsi));
            } else if let Some(fd) = self.source_fd(source)
                && let Err(e) = self.host.unregister_irqfd(fd, gsi)
            {
                tracing::warn!(gsi, error = %e, "virtio-pci: removing an irqfd failed");
            }
        }
        let mut failed = false;
        for (source, gsi) in wanted {
            if kept.contains(&(source, gsi)) {
                continue;
            }
            let Some(fd) = self.source_fd(source) else {
                continue;
            };
            match self.host.register_irqfd(fd, gsi) {
                Ok(()) => kept.push((source, gsi)),
                Err(e) => {
                    tracing::warn!(gsi, ?source, error = %e, "virtio-pci: irqfd not registered");
                    failed = true;
                }
            }
        }
        self.registered.irqfds = kept;
        if failed {
            // Interrupts of that source would be lost: tell the driver (§2.1.2).
            self.common.set_needs_reset();
        }
    }

    /// The PBA: bit n set while vector n is masked and one of its sources holds a count.
    pub(super) fn pending_bits(&self) -> u64 {
        self.bound_sources()
            .into_iter()
            .filter(|&(s, v)| self.msix.masked(v) && self.source_fd(s).is_some_and(peek))
            .fold(0, |bits, (_, v)| {
                bits | 1u64.checked_shl(u32::from(v)).unwrap_or(0)
            })
    }
}
