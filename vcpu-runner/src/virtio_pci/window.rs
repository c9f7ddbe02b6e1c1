//! The PCI memory windows as one MMIO device: an access goes to the virtio function whose
//! BAR0 is decoded at that address now, wherever the guest put it.
//!
//! The machine's MMIO bus is fixed once the vCPUs run, but a guest may move a BAR. Inserting
//! this window over the PCI windows (32-bit `PCI_MMIO32_START..ECAM_START` and the 64-bit one
//! above RAM) instead of each BAR at its first address keeps MMIO exits reaching the device
//! after a move; the transport itself moves its ioeventfds. The decoded addresses are read
//! without locking any function; only the function hit is locked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{BAR_SIZE, VirtioPci};
use crate::devices::MmioDevice;

/// Dispatches accesses in the PCI windows to the virtio functions.
pub struct BarWindow {
    functions: Vec<(Arc<AtomicU64>, Arc<Mutex<VirtioPci>>)>,
}

impl std::fmt::Debug for BarWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarWindow")
            .field("functions", &self.functions.len())
            .finish()
    }
}

impl BarWindow {
    /// A window over `functions`.
    pub fn new(functions: &[Arc<Mutex<VirtioPci>>]) -> BarWindow {
        let functions = functions
            .iter()
            .map(|f| {
                let decoded = f
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .decoded_handle();
                (decoded, f.clone())
            })
            .collect();
        BarWindow { functions }
    }

    /// The function whose decoded BAR0 holds `addr`.
    fn target(&self, addr: u64) -> Option<&Arc<Mutex<VirtioPci>>> {
        self.functions.iter().find_map(|(decoded, f)| {
            let base = decoded.load(Ordering::Acquire);
            (base != 0 && addr.checked_sub(base).is_some_and(|rel| rel < BAR_SIZE)).then_some(f)
        })
    }
}

impl MmioDevice for BarWindow {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        match self.target(addr) {
            // The function re-checks under its lock (the BAR may have moved meanwhile).
            Some(f) => f
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(addr, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        if let Some(f) = self.target(addr) {
            f.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(addr, data);
        }
    }
}
