//! [`FramebufferSlot`] over KVM: the framebuffer memfd mapped `MAP_SHARED` into this process
//! and registered with `KVM_SET_USER_MEMORY_REGION` as one memory slot at BAR0's address, so
//! a guest store to a pixel is a store to the memfd (no exit) that dev-fb sees in its own
//! mapping. Moving the BAR deletes the slot and adds it again at the new address.

use std::fs::File;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, MmapRegion};

use super::{FramebufferSlot, SlotError};

/// The framebuffer as a KVM memory slot.
pub struct KvmFramebuffer {
    vm: Arc<VmFd>,
    slot: u32,
    /// The memfd's mapping; lives as long as the slot can point at it (`None` only while
    /// being dropped, see `Drop`).
    region: Option<MmapRegion<()>>,
    size: u64,
    placed: Option<u64>,
}

impl std::fmt::Debug for KvmFramebuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmFramebuffer")
            .field("slot", &self.slot)
            .field("size", &self.size)
            .field("placed", &self.placed)
            .finish_non_exhaustive()
    }
}

impl KvmFramebuffer {
    /// Maps `size` bytes of `memfd` (which must be exactly that long) for KVM slot `slot` of
    /// `vm`; nothing is registered until [`FramebufferSlot::place`].
    pub fn new(
        vm: Arc<VmFd>,
        slot: u32,
        memfd: File,
        size: u64,
    ) -> Result<KvmFramebuffer, SlotError> {
        let actual = memfd.metadata().map_err(SlotError::Stat)?.len();
        if actual != size {
            return Err(SlotError::Size {
                expected: size,
                actual,
            });
        }
        let len = usize::try_from(size).map_err(|_| SlotError::Size {
            expected: size,
            actual,
        })?;
        let region =
            MmapRegion::from_file(FileOffset::new(memfd, 0), len).map_err(SlotError::Map)?;
        Ok(KvmFramebuffer {
            vm,
            slot,
            region: Some(region),
            size,
            placed: None,
        })
    }

    fn set_region(&self, guest: u64, size: u64) -> Result<(), SlotError> {
        let Some(region) = &self.region else {
            return Err(SlotError::Gone);
        };
        let mr = kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: guest,
            memory_size: size,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: `userspace_addr..+size` is the live MAP_SHARED mapping owned by `self.region`
        // (size is its length, or 0 to delete the slot). The mapping is only dropped after the
        // slot is deleted, and leaked if that fails (`Drop` below), so KVM never maps unmapped
        // host memory; an
        // overlap with another slot is refused by KVM (EEXIST), not undefined behaviour.
        unsafe { self.vm.set_user_memory_region(mr) }.map_err(|source| SlotError::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })
    }
}

impl FramebufferSlot for KvmFramebuffer {
    fn size(&self) -> u64 {
        self.size
    }

    fn place(&mut self, at: Option<u64>) -> Result<(), SlotError> {
        if at == self.placed {
            return Ok(());
        }
        if let Some(old) = self.placed {
            self.set_region(old, 0)?;
            self.placed = None;
        }
        if let Some(new) = at {
            self.set_region(new, self.size())?;
            self.placed = Some(new);
        }
        Ok(())
    }

    fn placed(&self) -> Option<u64> {
        self.placed
    }
}

impl Drop for KvmFramebuffer {
    fn drop(&mut self) {
        if let Err(e) = self.place(None) {
            tracing::error!(error = %e, "display: deleting the framebuffer slot failed; its mapping is leaked");
            std::mem::forget(self.region.take());
        }
    }
}
