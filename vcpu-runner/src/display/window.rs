//! The 32-bit PCI window as one MMIO device when a display is present: an access that falls
//! in the display's decoded BAR2 goes to the display, anything else to the window behind it
//! (the virtio functions' `BarWindow`), wherever the guest has moved either.
//!
//! BAR0, the framebuffer, never reaches here while it is decoded: it is a KVM memory slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{BochsDisplay, REGS_BAR_SIZE};
use crate::devices::MmioDevice;

/// Dispatches window accesses to the display's registers or to `next`.
pub struct DisplayWindow {
    /// Where BAR2 is decoded (0: nowhere), read without locking the display.
    registers: Arc<AtomicU64>,
    display: Arc<Mutex<BochsDisplay>>,
    next: Option<Arc<Mutex<dyn MmioDevice>>>,
}

impl std::fmt::Debug for DisplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisplayWindow")
            .field("registers", &self.registers.load(Ordering::Relaxed))
            .field("next", &self.next.is_some())
            .finish_non_exhaustive()
    }
}

impl DisplayWindow {
    /// A window that serves `display`'s registers and hands everything else to `next`.
    pub fn new(
        display: &Arc<Mutex<BochsDisplay>>,
        next: Option<Arc<Mutex<dyn MmioDevice>>>,
    ) -> DisplayWindow {
        let registers = display
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .registers_handle();
        DisplayWindow {
            registers,
            display: display.clone(),
            next,
        }
    }

    fn hits_display(&self, addr: u64) -> bool {
        let base = self.registers.load(Ordering::Acquire);
        base != 0
            && addr
                .checked_sub(base)
                .is_some_and(|rel| rel < REGS_BAR_SIZE)
    }
}

impl MmioDevice for DisplayWindow {
    fn read(&mut self, addr: u64, data: &mut [u8]) {
        if self.hits_display(addr) {
            // The display re-checks under its lock (the BAR may have moved meanwhile).
            self.display
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(addr, data);
        } else if let Some(next) = &self.next {
            next.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(addr, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        if self.hits_display(addr) {
            self.display
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(addr, data);
        } else if let Some(next) = &self.next {
            next.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(addr, data);
        }
    }
}
