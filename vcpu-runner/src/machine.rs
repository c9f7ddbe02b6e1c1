//! The KVM machine: the VM with its in-kernel irqchip and PIT, guest RAM slots, the platform
//! devices on their buses, and one thread per vCPU running `KVM_RUN`.
//!
//! This is the one module that talks to KVM (and so the one with `unsafe`: registering guest
//! RAM with KVM and adopting the `/dev/kvm` descriptor). Everything the guest does arrives
//! here as a vCPU exit: port and MMIO accesses go to the buses, the ends of the guest
//! (poweroff, reset, triple fault, a vCPU KVM cannot run) go to the exit callback exactly once.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use proto::runner::{GuestExit, MachineConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::acpi_pm::AcpiPm;
use crate::devices::cmos::Cmos;
use crate::devices::i8042::I8042;
use crate::devices::pci::PciRoot;
use crate::devices::serial::Com1;
use crate::devices::{Bus, MmioDevice, Overlap, PioDevice, Platform};
use crate::display::kvm_slot::KvmFramebuffer;
use crate::display::sender::ChannelSink;
use crate::display::window::DisplayWindow;
use crate::display::{
    AddressMap, BochsDisplay, DisplayConfig, DisplayError, ModeSink, Placement, SlotError,
};
use crate::layout::{
    ACPI_PM_BASE, ACPI_PM_LEN, CMOS_PORT, COM1_PORT, DISPLAY_FRAMEBUFFER_START,
    DISPLAY_REGISTERS_START, ECAM_SIZE, ECAM_START, I8042_COMMAND_PORT, I8042_DATA_PORT,
    IOAPIC_START, KVM_IDENTITY_MAP_START, KVM_TSS_START, LAPIC_START, MMIO_HOLE_START,
    PCI_CONFIG_PORT, PCI_MMIO32_START,
};
use crate::memory::{GuestMem, MemoryError, RamRange};
use crate::virtio_pci::kvm_host::KvmHost;
use crate::virtio_pci::window::BarWindow;
use crate::virtio_pci::{TransportError, VirtioHost, VirtioPci, bar_address, link};
use crate::{acpi, boot, cpuid};

/// The KVM API version this code speaks (stable since Linux 2.6.22).
const KVM_API_VERSION: i32 = 12;
/// `IA32_MTRR_DEF_TYPE`: MTRRs enabled, default type write-back.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
/// Local APIC LVT registers (offsets in the APIC page) and delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_MASK: u32 = 0x700;
const APIC_MODE_EXTINT: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x400;
/// How many unclaimed port/MMIO accesses are logged (at debug) before the rest are only counted.
const UNCLAIMED_LOG_LIMIT: u32 = 32;
/// How long a device process may take to say what it is.
const DEVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The KVM memory slot of the display's framebuffer (guest RAM takes slots 0 and 1).
const FRAMEBUFFER_SLOT: u32 = 8;
/// Platform MMIO a BAR must not cover: ECAM, the IOAPIC and local APIC pages, and KVM's
/// identity-map page followed by its three TSS pages.
const PLATFORM_MMIO: [(u64, u64); 4] = [
    (ECAM_START, ECAM_SIZE),
    (IOAPIC_START, 0x1000),
    (LAPIC_START, 0x1000),
    (
        KVM_IDENTITY_MAP_START,
        KVM_TSS_START + 0x3000 - KVM_IDENTITY_MAP_START,
    ),
];

/// What the runner does when the guest ends: report it and end the process. Called once.
pub type ExitHandler = Box<dyn Fn(GuestExit, &str) + Send + Sync>;

/// Why the machine could not be built. Every variant is reported as `FromRunner::Failed`.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("placing a device failed")]
    Bus(#[from] Overlap),
    #[error("virtio device {index}: {source}")]
    DeviceLink {
        index: usize,
        #[source]
        source: link::LinkError,
    },
    #[error("virtio device {index}: {source}")]
    Transport {
        index: usize,
        #[source]
        source: TransportError,
    },
    #[error("virtio device {0}: no PCI slot or BAR left")]
    TooManyDevices(usize),
    #[error("the display: {0}")]
    Display(#[from] DisplayError),
    #[error("the display needs both the framebuffer and the display channel descriptors")]
    DisplayInputs,
    #[error("the display: no PCI slot left")]
    DisplaySlot,
    #[error("writing the ACPI tables into guest RAM failed")]
    AcpiWrite(#[source] vm_memory::GuestMemoryError),
    #[error("duplicating the console descriptor failed")]
    Console(#[source] std::io::Error),
    #[error("starting a vCPU thread failed")]
    Thread(#[source] std::io::Error),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { op, source }
}

/// The descriptors the machine is built from (all handed over by the supervisor).
#[derive(Debug)]
pub struct Inputs {
    pub kvm: OwnedFd,
    pub memory: File,
    pub kernel: File,
    pub initrd: Option<File>,
    pub console: File,
    /// One runner↔device channel per virtio device, in PCI slot order.
    pub devices: Vec<OwnedFd>,
    /// The bochs display, if the guest has one.
    pub display: Option<DisplayInputs>,
}

/// What the bochs display is built from.
#[derive(Debug)]
pub struct DisplayInputs {
    /// The framebuffer memfd (BAR0); its size is the framebuffer's.
    pub framebuffer: File,
    /// The runner↔dev-fb channel, where mode changes go.
    pub channel: OwnedFd,
}

/// The devices' link to the machine: interrupt lines on the VM, exits to the handler.
struct RunnerPlatform {
    vm: Arc<VmFd>,
    exited: AtomicBool,
    on_exit: ExitHandler,
}

impl RunnerPlatform {
    fn finish(&self, exit: GuestExit, detail: &str) {
        if !self.exited.swap(true, Ordering::SeqCst) {
            tracing::info!(?exit, detail, "guest ended");
            (self.on_exit)(exit, detail);
        }
    }
}

impl Platform for RunnerPlatform {
    fn set_irq(&self, gsi: u32, level: bool) {
        if let Err(e) = self.vm.set_irq_line(gsi, level) {
            tracing::warn!(gsi, level, error = %e, "KVM_IRQ_LINE failed");
        }
    }

    fn request_exit(&self, exit: GuestExit) {
        self.finish(exit, "requested by the platform");
    }
}

/// A machine ready to run: call [`Machine::start`].
pub struct Machine {
    vcpus: Vec<VcpuFd>,
    platform: Arc<RunnerPlatform>,
    pio: Arc<Bus<dyn PioDevice>>,
    mmio: Arc<Bus<dyn MmioDevice>>,
    com1: Arc<Mutex<Com1>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    console_in: File,
    virtio: Vec<VirtioDevice>,
    display_sink: Option<Arc<DisplaySink>>,
    // Kept mapped for as long as the guest runs.
    memory_map: GuestMem,
    vm: Arc<VmFd>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// Builds the whole machine for `cfg`; nothing runs yet.
pub fn build(
    cfg: &MachineConfig,
    inputs: Inputs,
    on_exit: ExitHandler,
) -> Result<Machine, BuildError> {
    // SAFETY: the descriptor was passed to us as the `/dev/kvm` role and is owned by `inputs`;
    // `into_raw_fd` gives up that ownership, so `Kvm` becomes its only owner.
    let kvm = unsafe { Kvm::from_raw_fd(inputs.kvm.into_raw_fd()) };
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(BuildError::ApiVersion(version));
    }
    let memory = crate::memory::map(&inputs.memory, cfg.memory_bytes)?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(usize::try_from(KVM_TSS_START).unwrap_or(usize::MAX))
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    register_memory(&vm, &memory)?;

    let tables = acpi::build(cfg.cpus, boot::ram_top(cfg.memory_bytes))?;
    memory
        .write_slice(&tables.blob, GuestAddress(acpi::ACPI_START))
        .map_err(BuildError::AcpiWrite)?;
    let mut kernel = inputs.kernel;
    let mut initrd = inputs.initrd;
    let setup = boot::load_linux(
        &memory,
        cfg.memory_bytes,
        &mut kernel,
        initrd.as_mut(),
        &cfg.cmdline,
        tables.rsdp,
    )?;

    let platform = Arc::new(RunnerPlatform {
        vm: vm.clone(),
        exited: AtomicBool::new(false),
        on_exit,
    });
    let console_out = inputs.console.try_clone().map_err(BuildError::Console)?;
    let virtio = connect_virtio(&vm, inputs.devices)?;
    let (display, display_sink) = match inputs.display {
        Some(d) => {
            let (display, sink) = build_display(&vm, cfg, d, &virtio)?;
            (Some(display), Some(sink))
        }
        None => (None, None),
    };
    let devices = Devices::new(
        cfg,
        platform.clone(),
        Box::new(console_out),
        &virtio,
        display.as_ref(),
    )?;

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for index in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::set_topology(&mut cpuid, index, cfg.cpus);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        setup_vcpu(&vcpu)?;
        if index == 0 {
            vcpu.set_regs(&boot::boot_regs(&setup))
                .map_err(kvm_err("KVM_SET_REGS"))?;
            let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&boot::long_mode_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
        }
        vcpus.push(vcpu);
    }

    Ok(Machine {
        vcpus,
        platform,
        pio: Arc::new(devices.pio),
        mmio: Arc::new(devices.mmio),
        com1: devices.com1,
        acpi_pm: devices.acpi_pm,
        console_in: inputs.console,
        virtio,
        display_sink,
        memory_map: memory,
        vm,
    })
}

/// The platform devices and the buses that reach them.
struct Devices {
    pio: Bus<dyn PioDevice>,
    mmio: Bus<dyn MmioDevice>,
    com1: Arc<Mutex<Com1>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
}

impl Devices {
    /// COM1 (writing to `console_out`), the i8042, the RTC, the ACPI PM block and the PCI root,
    /// each at its place of `layout`.
    fn new(
        cfg: &MachineConfig,
        platform: Arc<RunnerPlatform>,
        console_out: Box<dyn std::io::Write + Send>,
        virtio: &[VirtioDevice],
        display: Option<&Arc<Mutex<BochsDisplay>>>,
    ) -> Result<Devices, BuildError> {
        let dyn_platform: Arc<dyn Platform> = platform;
        let com1 = Arc::new(Mutex::new(Com1::new(dyn_platform.clone(), console_out)));
        let started = Instant::now();
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(
            dyn_platform.clone(),
            Box::new(move || u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)),
        )));
        let below_4g = cfg.memory_bytes.min(MMIO_HOLE_START);
        let cmos = Arc::new(Mutex::new(Cmos::new(
            Box::new(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            }),
            cfg.utctime,
            cfg.local_offset_secs,
            below_4g,
            cfg.memory_bytes - below_4g,
        )));
        let i8042 = Arc::new(Mutex::new(I8042::new(dyn_platform.clone())));
        let mut root = PciRoot::new(dyn_platform);
        for (index, device) in virtio.iter().enumerate() {
            let slot = u8::try_from(index + 1).map_err(|_| BuildError::TooManyDevices(index))?;
            root.add_function(slot, VirtioPci::pci_function(&device.pci))
                .map_err(|_| BuildError::TooManyDevices(index))?;
        }
        if let Some(display) = display {
            // The next slot after the virtio devices.
            let slot = u8::try_from(virtio.len() + 1).map_err(|_| BuildError::DisplaySlot)?;
            root.add_function(slot, BochsDisplay::pci_function(display))
                .map_err(|_| BuildError::DisplaySlot)?;
        }
        let pci = Arc::new(Mutex::new(root));

        let mut pio: Bus<dyn PioDevice> = Bus::default();
        pio.insert(u64::from(COM1_PORT), 8, com1.clone())?;
        pio.insert(u64::from(I8042_DATA_PORT), 1, i8042.clone())?;
        pio.insert(u64::from(I8042_COMMAND_PORT), 1, i8042)?;
        pio.insert(u64::from(CMOS_PORT), 2, cmos)?;
        pio.insert(
            u64::from(ACPI_PM_BASE),
            u64::from(ACPI_PM_LEN),
            acpi_pm.clone(),
        )?;
        pio.insert(u64::from(PCI_CONFIG_PORT), 8, pci.clone())?;
        let mut mmio: Bus<dyn MmioDevice> = Bus::default();
        mmio.insert(ECAM_START, ECAM_SIZE, pci)?;
        // Every virtio BAR0 and the display's BAR2 sit in the 32-bit window; the window routes
        // each access to the function that decodes it now, wherever the guest moved it.
        let virtio_window: Option<Arc<Mutex<dyn MmioDevice>>> = if virtio.is_empty() {
            None
        } else {
            let functions: Vec<_> = virtio.iter().map(|d| d.pci.clone()).collect();
            Some(Arc::new(Mutex::new(BarWindow::new(&functions))))
        };
        let window = match display {
            Some(display) => Some(
                Arc::new(Mutex::new(DisplayWindow::new(display, virtio_window)))
                    as Arc<Mutex<dyn MmioDevice>>,
            ),
            None => virtio_window,
        };
        if let Some(window) = window {
            mmio.insert(PCI_MMIO32_START, ECAM_START - PCI_MMIO32_START, window)?;
        }
        Ok(Devices {
            pio,
            mmio,
            com1,
            acpi_pm,
        })
    }
}

/// One virtio device: its channel to the device process and its transport.
struct VirtioDevice {
    channel: Arc<proto::Channel>,
    pci: Arc<Mutex<VirtioPci>>,
}

/// Handshakes with each device process and builds its transport (BAR0 at its fixed place);
/// every device has said what it is before the first vCPU runs.
fn connect_virtio(vm: &Arc<VmFd>, devices: Vec<OwnedFd>) -> Result<Vec<VirtioDevice>, BuildError> {
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let host: Arc<dyn VirtioHost> = Arc::new(KvmHost::new(vm.clone()));
    devices
        .into_iter()
        .enumerate()
        .map(|(index, fd)| {
            let channel = Arc::new(proto::Channel::from_fd(fd));
            let (info, table) = link::connect(&channel, DEVICE_CONNECT_TIMEOUT)
                .map_err(|source| BuildError::DeviceLink { index, source })?;
            let bar = bar_address(index).ok_or(BuildError::TooManyDevices(index))?;
            let pci = VirtioPci::with_table(info, table, bar, host.clone(), channel.clone())
                .map_err(|source| BuildError::Transport { index, source })?;
            Ok(VirtioDevice {
                channel,
                pci: Arc::new(Mutex::new(pci)),
            })
        })
        .collect()
}

/// The rest of the machine's address map, as the display sees it when the guest moves its
/// framebuffer BAR.
struct MachineAddresses {
    ram: Vec<RamRange>,
    virtio: Vec<Arc<Mutex<VirtioPci>>>,
}

impl AddressMap for MachineAddresses {
    fn is_free(&self, start: u64, len: u64) -> bool {
        let overlaps = |base: u64, size: u64| {
            start < base.saturating_add(size) && base < start.saturating_add(len)
        };
        let ram = self.ram.iter().any(|r| overlaps(r.guest, r.len));
        let platform = PLATFORM_MMIO.iter().any(|&(b, l)| overlaps(b, l));
        // Called under the PCI root's lock; a virtio function never takes the root's or the
        // display's lock while it holds its own, so this order cannot deadlock.
        let virtio = self.virtio.iter().any(|f| {
            f.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .bar()
                .is_some_and(|b| overlaps(b, crate::virtio_pci::BAR_SIZE))
        });
        !(ram || platform || virtio)
    }
}

/// The bochs display over the framebuffer memfd: BAR0 a KVM slot at its first place, mode
/// changes sent on the display channel by a thread of their own.
fn build_display(
    vm: &Arc<VmFd>,
    cfg: &MachineConfig,
    inputs: DisplayInputs,
    virtio: &[VirtioDevice],
) -> Result<(Arc<Mutex<BochsDisplay>>, Arc<DisplaySink>), BuildError> {
    let size = inputs
        .framebuffer
        .metadata()
        .map_err(|e| DisplayError::Slot(SlotError::Stat(e)))?
        .len();
    let config = display_config(cfg, size);
    config.validate().map_err(DisplayError::from)?;
    // Linux's `bochs` driver drops every mode that needs more than half the framebuffer
    // (`drm_vram_helper_mode_valid`), the EDID's preferred one included.
    let preferred = u64::from(config.width) * u64::from(config.height) * 4;
    if preferred.saturating_mul(2) > size {
        tracing::warn!(
            width = config.width,
            height = config.height,
            framebuffer_bytes = size,
            "the preferred mode needs more than half the framebuffer: Linux guests will not use it"
        );
    }
    let slot = KvmFramebuffer::new(vm.clone(), FRAMEBUFFER_SLOT, inputs.framebuffer, size)
        .map_err(DisplayError::from)?;
    let sink = Arc::new(DisplaySink::new(proto::Channel::from_fd(inputs.channel))?);
    let addresses = MachineAddresses {
        ram: crate::memory::ram_ranges(cfg.memory_bytes),
        virtio: virtio.iter().map(|d| d.pci.clone()).collect(),
    };
    let display = BochsDisplay::new(
        &config,
        Placement {
            framebuffer: DISPLAY_FRAMEBUFFER_START,
            registers: DISPLAY_REGISTERS_START,
        },
        Box::new(slot),
        Box::new(addresses),
        sink.clone(),
    )?;
    tracing::info!(
        framebuffer_bytes = size,
        bar0 = format_args!("{DISPLAY_FRAMEBUFFER_START:#x}"),
        bar2 = format_args!("{DISPLAY_REGISTERS_START:#x}"),
        "bochs display present"
    );
    Ok((Arc::new(Mutex::new(display)), sink))
}

/// The display's configuration: `cfg`'s resolutions (`graphics_res`) over a framebuffer of
/// `framebuffer_bytes`, or the defaults when the supervisor sent none.
fn display_config(cfg: &MachineConfig, framebuffer_bytes: u64) -> DisplayConfig {
    let mut config = DisplayConfig::with_framebuffer(framebuffer_bytes);
    if let Some(modes) = cfg.display {
        config.width = modes.width;
        config.height = modes.height;
        config.max_width = modes.max_width;
        config.max_height = modes.max_height;
    }
    config
}

/// The display's mode changes, sent to whichever dev-fb is current: a restarted dev-fb's new
/// channel replaces the old one ([`Controls::replace_display`]) and first hears the mode the
/// guest set last.
struct DisplaySink {
    /// The sink of the current dev-fb and the last mode the guest set (dev-fb has no message
    /// for a disabled display, so only modes are replayed).
    current: Mutex<(Arc<ChannelSink>, Option<proto::display::Mode>)>,
}

impl DisplaySink {
    fn new(channel: proto::Channel) -> Result<DisplaySink, BuildError> {
        let sink = ChannelSink::spawn(channel).map_err(BuildError::Thread)?;
        Ok(DisplaySink {
            current: Mutex::new((sink, None)),
        })
    }

    fn replace(&self, channel: proto::Channel) -> std::io::Result<()> {
        let fresh = ChannelSink::spawn(channel)?;
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(mode) = current.1 {
            fresh.mode_changed(Some(mode));
        }
        let old = std::mem::replace(&mut current.0, fresh);
        // The old channel's peer is dead: a mode for it makes its thread's send fail, and the
        // thread end, rather than wait for ever.
        old.mode_changed(Some(proto::display::Mode::packed(1, 1, 32)));
        Ok(())
    }
}

impl ModeSink for DisplaySink {
    fn mode_changed(&self, mode: Option<proto::display::Mode>) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if mode.is_some() {
            current.1 = mode;
        }
        current.0.mode_changed(mode);
    }
}

fn register_memory(vm: &VmFd, memory: &GuestMem) -> Result<(), BuildError> {
    for (slot, region) in (0u32..).zip(memory.iter()) {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::TooLarge(region.len()))?;
        let mr = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host+len` is a live MAP_SHARED mapping owned by `memory`, which the
        // Machine keeps until the process exits, so the guest never sees unmapped memory; the
        // slots do not overlap because vm-memory's regions do not.
        unsafe { vm.set_user_memory_region(mr) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn setup_vcpu(vcpu: &VcpuFd) -> Result<(), BuildError> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_MTRR_DEF_TYPE,
        data: MTRR_ENABLE_WB,
        ..Default::default()
    }])
    .map_err(|_| BuildError::Kvm {
        op: "KVM_SET_MSRS",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    vcpu.set_fpu(&boot::reset_fpu())
        .map_err(kvm_err("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Sets the delivery mode of the LVT register at `offset` of a local APIC page.
fn set_lvt_mode(regs: &mut [libc::c_char], offset: usize, mode: u32) {
    if let Some(reg) = regs.get_mut(offset..offset.saturating_add(4)) {
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(reg.iter()) {
            *b = u8::from_ne_bytes(r.to_ne_bytes());
        }
        let value = (u32::from_le_bytes(bytes) & !APIC_MODE_MASK) | mode;
        for (r, b) in reg.iter_mut().zip(value.to_le_bytes()) {
            *r = libc::c_char::from_ne_bytes([b]);
        }
    }
}

impl Machine {
    /// Starts a thread per vCPU and the console input thread; returns once every vCPU thread
    /// is about to enter the guest. Returns the handles the supervisor's messages act on.
    pub fn start(self) -> Result<Controls, BuildError> {
        let count = self.vcpus.len();
        let barrier = Arc::new(Barrier::new(count + 1));
        for (index, vcpu) in (0u32..).zip(self.vcpus) {
            let ctx = VcpuContext {
                index,
                platform: self.platform.clone(),
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
            };
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    barrier.wait();
                    ctx.run(vcpu);
                })
                .map_err(BuildError::Thread)?;
        }
        let com1 = self.com1.clone();
        let console = self.console_in;
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || feed_console(console, &com1))
            .map_err(BuildError::Thread)?;
        let mut devices = Vec::with_capacity(self.virtio.len());
        for (index, device) in self.virtio.into_iter().enumerate() {
            devices.push(device.pci.clone());
            link::spawn(&format!("dev{index}"), device.channel, device.pci)
                .map_err(|source| BuildError::DeviceLink { index, source })?;
        }
        barrier.wait();
        // The memory and the VM must outlive the vCPU threads, which run until the process
        // exits: they are leaked rather than dropped.
        std::mem::forget(self.memory_map);
        std::mem::forget(self.vm);
        Ok(Controls {
            acpi_pm: self.acpi_pm,
            devices,
            display: self.display_sink,
        })
    }
}

/// What the supervisor's messages act on while the guest runs: the ACPI power button and
/// each virtio device's transport (in PCI order).
#[allow(missing_debug_implementations)] // holds only devices
pub struct Controls {
    acpi_pm: Arc<Mutex<AcpiPm>>,
    devices: Vec<Arc<Mutex<VirtioPci>>>,
    display: Option<Arc<DisplaySink>>,
}

/// Why a device message from the supervisor could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("there is no virtio device {0}")]
    NoDevice(u16),
    #[error("the guest has no display")]
    NoDisplay,
    #[error("starting the display channel's thread failed")]
    DisplayThread(#[source] std::io::Error),
    #[error("connecting the restarted device {index} failed")]
    Reconnect {
        index: u16,
        #[source]
        source: link::LinkError,
    },
}

impl Controls {
    /// Presses the guest's ACPI power button.
    pub fn press(&self) {
        self.acpi_pm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .press_power_button();
    }

    /// Device `index`'s process was restarted on `channel`: handshake, make it the transport's
    /// device; its `Info` arrives through the new link thread and the transport re-sends its
    /// `Activate`.
    pub fn replace_device(&self, index: u16, channel: OwnedFd) -> Result<(), ControlError> {
        let pci = self
            .devices
            .get(usize::from(index))
            .ok_or(ControlError::NoDevice(index))?;
        let channel = Arc::new(proto::Channel::from_fd(channel));
        link::reconnect(
            &format!("dev{index}"),
            channel,
            pci.clone(),
            DEVICE_CONNECT_TIMEOUT,
        )
        .map(drop)
        .map_err(|source| ControlError::Reconnect { index, source })
    }

    /// dev-fb was restarted: mode changes go to `channel` from now on, the current mode first.
    pub fn replace_display(&self, channel: OwnedFd) -> Result<(), ControlError> {
        self.display
            .as_ref()
            .ok_or(ControlError::NoDisplay)?
            .replace(proto::Channel::from_fd(channel))
            .map_err(ControlError::DisplayThread)
    }

    /// Device `index` will not come back: the driver sees `DEVICE_NEEDS_RESET`.
    pub fn fail_device(&self, index: u16) -> Result<(), ControlError> {
        self.devices
            .get(usize::from(index))
            .ok_or(ControlError::NoDevice(index))?
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fail();
        Ok(())
    }
}

/// Moves console input into COM1's receive FIFO, offering what did not fit again later.
/// Input the guest leaves unread for [`STALL_REPORT_AFTER`] is logged once, with COM1's
/// registers (a guest that stopped taking console input is otherwise invisible).
fn feed_console(mut console: File, com1: &Mutex<Com1>) {
    let mut buf = [0u8; 256];
    let mut reported = false;
    let check_stall = |reported: &mut bool| {
        let report = com1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stalled_input(STALL_REPORT_AFTER);
        match report {
            Some(state) if !*reported => {
                tracing::warn!(%state, "com1: the guest is not reading console input");
                *reported = true;
            }
            Some(_) => {}
            None => *reported = false,
        }
    };
    loop {
        let ready = {
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&console),
                nix::poll::PollFlags::POLLIN,
            )];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16))
        };
        if matches!(ready, Ok(0)) {
            check_stall(&mut reported);
            continue;
        }
        let n = match console.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "console input ended");
                return;
            }
        };
        let mut pending = buf.get(..n).unwrap_or_default();
        let mut waits = 0u32;
        while !pending.is_empty() {
            let taken = com1
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .enqueue_input(pending);
            pending = pending.get(taken..).unwrap_or_default();
            if taken == 0 {
                std::thread::sleep(Duration::from_millis(10));
                waits = waits.wrapping_add(1);
                if waits.is_multiple_of(100) {
                    check_stall(&mut reported);
                }
            }
        }
    }
}

/// How long console input may wait unread, with no guest access to COM1, before it is logged.
const STALL_REPORT_AFTER: Duration = Duration::from_secs(2);

struct VcpuContext {
    index: u32,
    platform: Arc<RunnerPlatform>,
    pio: Arc<Bus<dyn PioDevice>>,
    mmio: Arc<Bus<dyn MmioDevice>>,
}

static UNCLAIMED: AtomicU32 = AtomicU32::new(0);

fn log_unclaimed(kind: &'static str, addr: u64, len: usize, write: bool) {
    let n = UNCLAIMED.fetch_add(1, Ordering::Relaxed);
    if n < UNCLAIMED_LOG_LIMIT {
        tracing::debug!(
            kind,
            addr = format_args!("{addr:#x}"),
            len,
            write,
            "unclaimed guest access"
        );
    } else if n == UNCLAIMED_LOG_LIMIT {
        tracing::debug!("further unclaimed guest accesses are not logged");
    }
}

impl VcpuContext {
    fn run(self, mut vcpu: VcpuFd) {
        let index = self.index;
        loop {
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    self.end(
                        GuestExit::Crashed { vcpu: index },
                        &format!("KVM_RUN failed: {e}"),
                    );
                    return;
                }
            };
            match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.pio.read(port, data) {
                        log_unclaimed("in", u64::from(port), data.len(), false);
                    }
                }
                VcpuExit::IoOut(port, data) => {
                    if !self.pio.write(port, data) {
                        log_unclaimed("out", u64::from(port), data.len(), true);
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        log_unclaimed("mmio-read", addr, data.len(), false);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.mmio.write(addr, data) {
                        log_unclaimed("mmio-write", addr, data.len(), true);
                    }
                }
                VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
                VcpuExit::Shutdown => {
                    let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                    self.end(
                        GuestExit::TripleFault { vcpu: index },
                        &format!("vcpu {index} shut down (triple fault) at rip {rip:#x}"),
                    );
                    return;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    let exit = match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::Poweroff,
                        KVM_SYSTEM_EVENT_RESET => GuestExit::Reboot,
                        // KVM_SYSTEM_EVENT_CRASH and anything newer.
                        _ => GuestExit::Crashed { vcpu: index },
                    };
                    self.end(exit, &format!("vcpu {index}: KVM system event {kind}"));
                    return;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    self.end(
                        GuestExit::Crashed { vcpu: index },
                        &format!("vcpu {index}: entry failed, hardware reason {reason:#x} on host cpu {cpu}"),
                    );
                    return;
                }
                VcpuExit::InternalError => {
                    self.end(
                        GuestExit::Crashed { vcpu: index },
                        &format!("vcpu {index}: KVM internal error"),
                    );
                    return;
                }
                other => {
                    let what = format!("{other:?}");
                    self.end(
                        GuestExit::Crashed { vcpu: index },
                        &format!(
                            "vcpu {index}: unexpected exit {}",
                            what.get(..80).unwrap_or(&what)
                        ),
                    );
                    return;
                }
            }
        }
    }

    fn end(&self, exit: GuestExit, detail: &str) {
        self.platform.finish(exit, detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_display_sees_ram_and_platform_mmio_as_taken_and_the_pci_window_as_free() {
        let map = MachineAddresses {
            ram: crate::memory::ram_ranges(5 << 30),
            virtio: Vec::new(),
        };
        assert!(!map.is_free(0xbf00_0000, 16 << 20), "low RAM");
        assert!(!map.is_free(0x1_0000_0000, 16 << 20), "high RAM");
        assert!(!map.is_free(ECAM_START, 0x1000));
        assert!(!map.is_free(0xfe00_0000, 16 << 20), "IOAPIC and local APIC");
        assert!(!map.is_free(0xff00_0000, 16 << 20), "KVM's TSS below 4 GiB");
        assert!(map.is_free(DISPLAY_FRAMEBUFFER_START, 256 << 20));
        assert!(map.is_free(0xc000_0000, 16 << 20));
        assert!(
            map.is_free(0xe100_0000, 16 << 20),
            "between ECAM and the IOAPIC"
        );
    }

    fn machine(display: Option<proto::runner::DisplayModes>) -> MachineConfig {
        MachineConfig {
            cpus: 1,
            memory_bytes: 256 << 20,
            cmdline: String::new(),
            utctime: true,
            local_offset_secs: 0,
            uuid: [0; 16],
            display,
        }
    }

    #[test]
    fn the_display_takes_graphics_res_from_the_machine_config_as_its_edid_mode() {
        let modes = proto::runner::DisplayModes {
            width: 1600,
            height: 900,
            max_width: 1600,
            max_height: 900,
        };
        let config = display_config(&machine(Some(modes)), 16 << 20);
        assert_eq!(
            (
                config.width,
                config.height,
                config.max_width,
                config.max_height
            ),
            (1600, 900, 1600, 900)
        );
        assert_eq!(config.framebuffer_bytes, 16 << 20);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn without_graphics_res_the_display_keeps_its_defaults() {
        assert_eq!(
            display_config(&machine(None), 16 << 20),
            DisplayConfig::with_framebuffer(16 << 20)
        );
    }

    #[test]
    fn lvt_mode_is_replaced_and_other_bits_kept() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT_LINT0] = -1;
        regs[APIC_LVT_LINT0 + 1] = 0x05;
        regs[APIC_LVT_LINT0 + 2] = 0x01; // masked
        set_lvt_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT_LINT0], -1);
        assert_eq!(regs[APIC_LVT_LINT0 + 1], 0x07);
        assert_eq!(regs[APIC_LVT_LINT0 + 2], 0x01);
        // An offset past the page changes nothing and does not panic.
        let before = regs;
        set_lvt_mode(&mut regs, 1022, APIC_MODE_NMI);
        assert_eq!(regs, before);
    }
}
