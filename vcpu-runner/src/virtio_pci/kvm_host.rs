//! [`VirtioHost`] over a KVM VM: `KVM_IOEVENTFD`, `KVM_IRQFD` and `KVM_SET_GSI_ROUTING`.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so this keeps every MSI route it was given
//! and always sends them together with KVM's default routes for the in-kernel irqchip (GSIs
//! 0–15 to the IOAPIC pin of the same number and to the PIC, 16–23 to the IOAPIC), which the
//! platform devices and the PIT rely on. MSI routes use GSIs from 24 up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
    kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{HostError, MsiMessage, VirtioHost};

/// IOAPIC inputs (GSIs 0–23); the first 16 are also the PICs' inputs.
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;
/// KVM's limit on routing entries (`KVM_MAX_IRQ_ROUTES`).
const MAX_ROUTES: u32 = 4096;

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HostError {
    move |source| HostError::Kvm { op, source }
}

/// The MSI routes handed out so far.
#[derive(Debug)]
struct Routes {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

/// The virtio transports' access to the VM.
#[derive(Debug)]
pub struct KvmHost {
    vm: Arc<VmFd>,
    routes: Mutex<Routes>,
}

impl KvmHost {
    /// A host for `vm`, which must already have its in-kernel irqchip.
    pub fn new(vm: Arc<VmFd>) -> KvmHost {
        KvmHost {
            vm,
            routes: Mutex::new(Routes {
                next_gsi: IOAPIC_PINS,
                msi: BTreeMap::new(),
            }),
        }
    }
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

fn msi_entry(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: u32::try_from(message.address & 0xffff_ffff).unwrap_or(0),
                address_hi: u32::try_from(message.address >> 32).unwrap_or(0),
                data: message.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// KVM's default irqchip routes (as `kvm_setup_default_irq_routing` installs them) followed
/// by `msi`.
fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_PINS {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(irqchip_entry(gsi, chip, pin));
        }
    }
    entries.extend(msi.iter().map(|(&gsi, &m)| msi_entry(gsi, m)));
    entries
}

impl VirtioHost for KvmHost {
    fn register_ioeventfd(&self, addr: u64, fd: &EventFd) -> Result<(), HostError> {
        // No datamatch and length 0: a write of any width and value at `addr` signals.
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    fn unregister_ioeventfd(&self, addr: u64, fd: &EventFd) -> Result<(), HostError> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    fn alloc_gsi(&self) -> Result<u32, HostError> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let gsi = routes.next_gsi;
        if gsi >= MAX_ROUTES {
            return Err(HostError::GsisExhausted);
        }
        routes.next_gsi = gsi + 1;
        Ok(gsi)
    }

    fn set_msi_route(&self, gsi: u32, message: MsiMessage) -> Result<(), HostError> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = routes.msi.insert(gsi, message);
        let table = KvmIrqRouting::from_entries(&routing_entries(&routes.msi)).map_err(|_| {
            HostError::Kvm {
                op: "KVM_SET_GSI_ROUTING",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            }
        });
        let result = table.and_then(|t| {
            self.vm
                .set_gsi_routing(&t)
                .map_err(kvm_err("KVM_SET_GSI_ROUTING"))
        });
        if result.is_err() {
            // Keep the table as KVM has it.
            match previous {
                Some(p) => routes.msi.insert(gsi, p),
                None => routes.msi.remove(&gsi),
            };
        }
        result
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HostError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HostError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    #[test]
    fn routing_table_keeps_the_irqchip_defaults_and_adds_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x41,
            },
        );
        let entries = routing_entries(&msi);
        assert_eq!(entries.len(), 16 * 2 + 8 + 1);
        let chips: Vec<(u32, u32, u32)> = entries
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries were written through the `irqchip` member.
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(chips.contains(&(0, KVM_IRQCHIP_IOAPIC, 0)));
        assert!(chips.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(chips.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(chips.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(
            !chips
                .iter()
                .any(|&(g, c, _)| g >= 16 && c != KVM_IRQCHIP_IOAPIC)
        );
        let last = entries.last().unwrap();
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the MSI entry was written through the `msi` member.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x41));
    }

    /// A VM with an irqchip, or `None` (printed) where `/dev/kvm` is missing.
    fn vm() -> Option<Arc<VmFd>> {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("skipping: /dev/kvm unavailable: {e}");
                return None;
            }
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        Some(Arc::new(vm))
    }

    #[test]
    fn kvm_accepts_routes_irqfds_and_ioeventfds_and_refuses_duplicates() {
        let Some(vm) = vm() else { return };
        let host = KvmHost::new(vm.clone());
        let gsi = host.alloc_gsi().unwrap();
        assert_eq!(gsi, 24);
        assert_eq!(host.alloc_gsi().unwrap(), 25);
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        };
        host.set_msi_route(gsi, message).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        host.register_irqfd(&call, gsi).unwrap();
        // The same eventfd twice is refused by KVM (EBUSY).
        assert!(host.register_irqfd(&call, gsi).is_err());
        call.write(1).unwrap();
        // Route changes keep working with the irqfd in place; the legacy GSIs keep routes:
        // an irqfd on the IOAPIC's GSI 10 is accepted.
        host.set_msi_route(
            gsi,
            MsiMessage {
                data: 0x31,
                ..message
            },
        )
        .unwrap();
        let legacy = EventFd::new(EFD_NONBLOCK).unwrap();
        host.register_irqfd(&legacy, 10).unwrap();
        host.unregister_irqfd(&legacy, 10).unwrap();
        host.unregister_irqfd(&call, gsi).unwrap();

        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        host.register_ioeventfd(0xc000_3000, &kick).unwrap();
        assert!(host.register_ioeventfd(0xc000_3000, &kick).is_err());
        host.unregister_ioeventfd(0xc000_3000, &kick).unwrap();
        assert!(host.unregister_ioeventfd(0xc000_3000, &kick).is_err());
    }

    #[test]
    fn gsis_run_out_at_kvms_route_limit() {
        let Some(vm) = vm() else { return };
        let host = KvmHost::new(vm);
        let mut last = 0;
        for _ in IOAPIC_PINS..MAX_ROUTES {
            last = host.alloc_gsi().unwrap();
        }
        assert_eq!(last, MAX_ROUTES - 1);
        assert!(matches!(host.alloc_gsi(), Err(HostError::GsisExhausted)));
    }
}
